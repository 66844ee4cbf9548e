"""Benchmark: the cost of planning at rollout (world_f with --policy.planner=rerank|cem) against no planning.

    python benchmarks/planning_bench.py                      # ~2 min on one CPU thread
    python benchmarks/planning_bench.py --samples 8,16,32 --out outputs/bench/planning.json
    python benchmarks/planning_bench.py --samples 16 --score critic   # the outcome critic's score (or reward)
    python benchmarks/planning_bench.py --samples 16 --score critic --critic_input both_projected

One world_f policy (config defaults: width 256, depth 4, Prophet width 128; world model = an
action-conditioned Prophet of the same size with the head `--score` names: progress (default), the
outcome critic, reading `--critic_input`, or the reward head) on the `pixels` encoder's latent
dimension, batch 1, eval mode. For each planner and candidate count N it measures `select_action` on
a preprocessed observation (the online encoder and the simulator are not included: they cost the same
with and without planning), alternating with the same policy without planning on every repetition so
machine noise hits both alike:

- inference step: the call that predicts (and plans) a new chunk;
- per env step: the mean over whole chunks (n_action_steps calls, one of which plans);
- the ratio of each to no planning (target: per env step <= 3x at N = 16);
- counts that do not depend on the machine: matmul FLOPs and ATen ops of one inference call
  (torch.utils.flop_counter, torch profiler-free op count via a dispatch mode).

All N candidates go through the world model in one batch (`WorldPath.score_chunks`), so the cost
grows with N far slower than N separate rollouts would. Prints a table and writes JSON (`--out`).
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_io import write_result  # noqa: E402

from lerobot.configs.types import FeatureType, PolicyFeature  # noqa: E402

from lerobot_policy_world_modality.constants import OBS_WORLD_LATENT  # noqa: E402
from lerobot_policy_world_modality.world.dynamics import CRITIC_INPUTS  # noqa: E402
from lerobot_policy_world_modality.world_f.configuration_world_f import WorldFConfig  # noqa: E402
from lerobot_policy_world_modality.world_f.modeling_world_f import WorldFPolicy  # noqa: E402

LATENT_DIM = 768  # the built-in `pixels` encoder: a 16x16 RGB thumbnail


class _OpCounter(TorchDispatchMode):
    """Counts ATen ops dispatched inside the mode (a machine-independent measure of per-call overhead)."""

    def __init__(self):
        super().__init__()
        self.ops = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops += 1
        return func(*args, **(kwargs or {}))


# The head each planner score needs.
SCORE_HEADS = {"progress": "progress_head", "critic": "plan_critic", "reward": "reward_head"}


def build_policy(planner: str, samples: int, iterations: int, score: str = "progress",
                 critic_input: str = "imagined") -> WorldFPolicy:  # fmt: skip
    """world_f (variant F defaults) with an action-conditioned world model, the head of `score` (the critic
    reading `critic_input`) and `planner`."""
    torch.manual_seed(0)
    cfg = WorldFConfig(
        device="cpu", world_latent_dim=LATENT_DIM, dynamics="action_conditioned", **{SCORE_HEADS[score]: True},
        critic_input=critic_input,
        planner_score=score, planner=planner, planner_samples=samples, planner_iterations=iterations,
        input_features={"observation.state": PolicyFeature(FeatureType.STATE, (4,)),
                        "observation.image": PolicyFeature(FeatureType.VISUAL, (3, 480, 480))},
        output_features={"action": PolicyFeature(FeatureType.ACTION, (4,))},
    )  # fmt: skip
    policy = WorldFPolicy(cfg)
    policy.eval()
    return policy


def observation(seed: int) -> dict:
    g = torch.Generator().manual_seed(seed)
    return {OBS_WORLD_LATENT: torch.rand(1, LATENT_DIM, generator=g), "observation.state": torch.randn(1, 4, generator=g)}


@torch.inference_mode()
def chunk_times(policy: WorldFPolicy, steps: int) -> tuple[float, float]:
    """(seconds of the inference call, mean seconds per env step over one whole chunk)."""
    policy.reset()
    times = []
    for i in range(steps):
        obs = observation(i)
        t0 = time.perf_counter()
        policy.select_action(obs)
        times.append(time.perf_counter() - t0)
    return times[0], sum(times) / len(times)


@torch.inference_mode()
def counts(policy: WorldFPolicy) -> dict:
    """Matmul FLOPs and ATen ops of one inference call (the call that predicts, and plans, a chunk)."""
    policy.reset()
    with FlopCounterMode(display=False) as flops:
        policy.select_action(observation(0))
    policy.reset()
    with _OpCounter() as ops:
        policy.select_action(observation(0))
    return {"flops": int(flops.get_total_flops()), "aten_ops": ops.ops}


def main(argv: list[str] | None = None) -> int:
    """Measure every (planner, N) against no planning; print the table, write the JSON."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--samples", default="4,8,16,32", help="candidate counts N, comma-separated")
    p.add_argument("--iterations", type=int, default=3, help="CEM rounds")
    p.add_argument("--repeats", type=int, default=15, help="alternating repetitions per setting (medians)")
    p.add_argument("--score", default="progress", choices=sorted(SCORE_HEADS), help="what the planner scores by")
    p.add_argument("--critic_input", default="imagined", choices=CRITIC_INPUTS,
                   help="what the outcome critic reads (with --score critic)")
    p.add_argument("--out", default="outputs/bench/planning_bench.json")
    args = p.parse_args(argv)
    if args.critic_input != "imagined" and args.score != "critic":
        p.error("--critic_input needs --score critic (only the outcome critic reads it)")
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))

    base = build_policy("none", 16, args.iterations, args.score, args.critic_input)
    steps = base.config.n_action_steps
    rows = []
    load_before = os.getloadavg()
    base_counts = counts(base)
    for planner in ("rerank", "cem"):
        for n in [int(x) for x in args.samples.split(",")]:
            policy = build_policy(planner, n, args.iterations, args.score, args.critic_input)
            policy.load_state_dict(base.state_dict())
            chunk_times(policy, steps), chunk_times(base, steps)  # warm-up
            plan_inf, plan_step, none_inf, none_step = [], [], [], []
            for r in range(args.repeats):
                order = [(policy, plan_inf, plan_step), (base, none_inf, none_step)]
                for pol, inf, per in order if r % 2 == 0 else order[::-1]:
                    a, b = chunk_times(pol, steps)
                    inf.append(a)
                    per.append(b)
            med = {k: statistics.median(v) for k, v in
                   {"plan_inf": plan_inf, "plan_step": plan_step, "none_inf": none_inf, "none_step": none_step}.items()}  # fmt: skip
            c = counts(policy)
            rows.append({
                "planner": planner, "samples": n, "iterations": args.iterations if planner == "cem" else 1,
                "inference_ms": 1e3 * med["plan_inf"], "none_inference_ms": 1e3 * med["none_inf"],
                "per_step_ms": 1e3 * med["plan_step"], "none_per_step_ms": 1e3 * med["none_step"],
                "inference_ratio": med["plan_inf"] / med["none_inf"], "per_step_ratio": med["plan_step"] / med["none_step"],
                "flops": c["flops"], "flops_ratio": c["flops"] / base_counts["flops"],
                "aten_ops": c["aten_ops"], "aten_ops_ratio": c["aten_ops"] / base_counts["aten_ops"],
            })  # fmt: skip
            r = rows[-1]
            print(f"{planner:6s} N={n:3d}: inference {r['inference_ms']:7.2f} ms ({r['inference_ratio']:.2f}x), per step "
                  f"{r['per_step_ms']:6.2f} ms ({r['per_step_ratio']:.2f}x), FLOPs {r['flops_ratio']:.1f}x, "
                  f"ops {r['aten_ops_ratio']:.2f}x", flush=True)  # fmt: skip

    print("\n| planner | N | rounds | inference ms (x none) | per env step ms (x none) | FLOPs x none | ATen ops x none |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['planner']} | {r['samples']} | {r['iterations']} | {r['inference_ms']:.2f} ({r['inference_ratio']:.2f}x) | "
              f"{r['per_step_ms']:.2f} ({r['per_step_ratio']:.2f}x) | {r['flops_ratio']:.1f} | {r['aten_ops_ratio']:.2f} |")
    at16 = [r for r in rows if r["samples"] == 16]
    verdicts = {r["planner"]: r["per_step_ratio"] <= 3.0 for r in at16}
    if at16:
        print("\nTarget per env step <= 3x no planning at N = 16: "
              + ", ".join(f"{k} {'met' if v else 'MISSED'}" for k, v in verdicts.items()))
    write_result(args.out, {
        "benchmark": "planning_bench", "when": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(),
                    "load_before": load_before, "load_after": os.getloadavg()},
        "latent_dim": LATENT_DIM, "score": args.score, "critic_input": args.critic_input, "n_action_steps": steps, "none_counts": base_counts, "rows": rows,
        "target_per_step_ratio_at_16": verdicts,
    })  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
