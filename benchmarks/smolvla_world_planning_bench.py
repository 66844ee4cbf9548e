"""Benchmark: smolvla_world's planner (N flow samples scored through the world model) against no planning.

    python benchmarks/smolvla_world_planning_bench.py                     # random stand-in backbone
    python benchmarks/smolvla_world_planning_bench.py --samples 4,16 --planners rerank,cem --chunks 4
    python benchmarks/smolvla_world_planning_bench.py --vlm_model_name=HuggingFaceTB/SmolVLM2-500M-Video-Instruct \
        --num_vlm_layers=16 --resize=512 --device=cuda                   # the real backbone, when available

One smolvla_world policy (the backbone options of `smolvla_world_bench.py`: a random SmolVLM stand-in by
default; the world defaults plus `dynamics=action_conditioned` and the progress head the planner scores
by) times `select_action` at batch 1 on a preprocessed observation with the planner off and with
`--policy.planner=rerank|cem` at each N and each `planner_candidates` (`flow`: N flow samples;
`perturbed`: one flow sample and N - 1 Gaussian perturbations of it), on the same weights (the planner is a rollout-time setting),
alternating the two on every repetition so machine noise hits both alike:

- inference call: the call that samples (and plans) a new chunk;
- per env step: the mean over a whole chunk of `n_action_steps` calls, one of which samples;
- the ratio of each to no planning (the issue's target: per env step <= 3x at N = 16);
- counts that do not depend on the machine: matmul FLOPs of one inference call
  (`torch.utils.flop_counter`), and their ratio to no planning.

The planner's first round is N flow samples (`SmolVLAWorldPolicy.plan_candidates`); CEM's later rounds
perturb the elites and only go through the world model. A second table times that first round alone with
each observation's prefix (images, instruction, state) encoded once and its key/value cache repeated for
the N denoising runs (the default), against the whole SmolVLA call on the N-times repeated batch
(`share_prefix=False`), with the FLOPs of each. Prints a table and writes JSON (`--out`)
atomically, with the load average before and after.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

import torch
from bench_io import write_result  # sibling modules: benchmarks run as scripts from this folder
from smolvla_world_bench import (
    REPO,
    alternate,
    backbone_arguments,
    build_policies,
    make_batch,
    run_record,
    select_chunk,
    vlm_dir_of,
)
from torch.utils.flop_counter import FlopCounterMode


def parse_args(argv=None) -> argparse.Namespace:
    """Command-line options."""
    p = backbone_arguments(argparse.ArgumentParser(description=__doc__.splitlines()[0]))
    p.add_argument("--samples", default="4,16", help="Candidate counts N (flow samples), comma-separated.")
    p.add_argument("--planners", default="rerank,cem", help="Planners to time, comma-separated.")
    p.add_argument("--candidates", default="flow,perturbed",
                   help="First-round candidates to time (planner_candidates), comma-separated.")
    p.add_argument("--iterations", type=int, default=3, help="CEM rounds.")
    p.add_argument("--chunks", type=int, default=4, help="Alternating whole chunks per setting (medians).")
    p.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "smolvla_world_planning_bench.json"))
    return p.parse_args(argv)


def set_planner(policy, planner: str, samples: int, candidates: str = "flow") -> None:
    """Switch the rollout-time planner settings of `policy` in place."""
    cfg = policy.config
    cfg.planner, cfg.planner_samples, cfg.planner_candidates = planner, samples, candidates


def inference_flops(policy, batch: dict, planner: str, samples: int, candidates: str = "flow") -> int:
    """Matmul FLOPs of one inference call (the call that samples, and plans, a chunk)."""
    set_planner(policy, planner, samples, candidates)
    policy.reset()
    with FlopCounterMode(display=False) as flops:
        policy.select_action(dict(batch))
    return int(flops.get_total_flops())


def main(argv=None) -> int:
    """Time every (planner, N) against no planning on the same weights; print the table, write the JSON."""
    args = parse_args(argv)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if args.threads:
        torch.set_num_threads(args.threads)
    import lerobot_policy_world_modality  # noqa: F401  registers smolvla_world

    samples = [int(n) for n in args.samples.split(",") if n.strip()]
    planners = [p.strip() for p in args.planners.split(",") if p.strip()]
    modes = [c.strip() for c in args.candidates.split(",") if c.strip()]
    load_before = os.getloadavg()
    wall = time.perf_counter()
    rows, shared_rows = [], []
    with tempfile.TemporaryDirectory() as tmp:
        vlm_dir = vlm_dir_of(args, tmp)
        _, policy = build_policies(args, vlm_dir, dynamics="action_conditioned", progress_head=True,
                                   planner_score="progress", planner_iterations=args.iterations)  # fmt: skip
        policy.eval()
        cfg = policy.config
        batch = make_batch(vlm_dir, cfg.world_latent_dim, 1, cfg, args.device, seed=1)
        for key in ("action", "observation.world.history", "observation.world.future"):
            batch.pop(key)
        n_steps = cfg.n_action_steps
        with torch.inference_mode():
            none_flops = inference_flops(policy, batch, "none", samples[0])
            for mode, planner, n in ((m, p, n) for m in modes for p in planners for n in samples):

                def off(n=n):
                    set_planner(policy, "none", n)
                    return select_chunk(policy, batch, n_steps, args.device)

                def on(planner=planner, n=n, mode=mode):
                    set_planner(policy, planner, n, mode)
                    return select_chunk(policy, batch, n_steps, args.device)

                alternate(off, on, 1)  # warm-up
                a, b = alternate(off, on, args.chunks)
                flops = inference_flops(policy, batch, planner, n, mode)
                call_off, call_on = statistics.median(x[0] for x in a), statistics.median(x[0] for x in b)
                step_off, step_on = statistics.median(x[1] for x in a), statistics.median(x[1] for x in b)
                rows.append({
                    "candidates": mode, "planner": planner, "samples": n,
                    "inference_call_s": {"none": call_off, "planned": call_on, "ratio": call_on / call_off},
                    "per_env_step_s": {"none": step_off, "planned": step_on, "ratio": step_on / step_off},
                    "flops": {"none": none_flops, "planned": flops, "ratio": flops / none_flops},
                })  # fmt: skip
                print(f"{mode} {planner} N={n}: per env step {step_on / step_off:.2f}x, FLOPs {flops / none_flops:.2f}x",
                      flush=True)  # fmt: skip
            # The first round alone, with each observation's prefix encoded once (the default) and with
            # the whole SmolVLA call on the repeated batch.
            for n in samples:
                set_planner(policy, "rerank", n, "flow")
                hist = torch.randn(1, cfg.history_frames, cfg.world_latent_dim)

                def first_round(share, n=n, hist=hist):
                    policy.reset()
                    t0 = time.perf_counter()
                    policy.plan_candidates(dict(batch), hist, share_prefix=share)
                    return time.perf_counter() - t0

                alternate(lambda: first_round(True), lambda: first_round(False), 1)  # warm-up
                a, b = alternate(lambda: first_round(True), lambda: first_round(False), args.chunks)
                fl = {}
                for share in (True, False):
                    policy.reset()
                    with FlopCounterMode(display=False) as counter:
                        policy.plan_candidates(dict(batch), hist, share_prefix=share)
                    fl[share] = int(counter.get_total_flops())
                shared_rows.append({"samples": n, "shared_s": statistics.median(a), "unshared_s": statistics.median(b),
                                    "time_ratio": statistics.median(a) / statistics.median(b),
                                    "shared_flops": fl[True], "unshared_flops": fl[False],
                                    "flops_ratio": fl[True] / fl[False]})  # fmt: skip
    result = {
        **run_record(args, load_before),
        "smolvla_options": {"chunk_size": cfg.chunk_size, "n_action_steps": cfg.n_action_steps,
                            "num_steps": cfg.num_steps, "resize_imgs_with_padding": list(cfg.resize_imgs_with_padding)},
        "world_options": {"world_latent_dim": cfg.world_latent_dim, "history_frames": cfg.history_frames,
                          "future_frames": cfg.future_frames, "prophet_width": cfg.prophet_width,
                          "planner_score": "progress", "planner_iterations": args.iterations},
        "chunks": args.chunks,
        "rows": rows,
        "first_round_shared_prefix": shared_rows,
        "wall_s": time.perf_counter() - wall,
    }  # fmt: skip
    print_table(result)
    write_result(args.out, result)
    return 0


def print_table(r: dict) -> None:
    """Human-readable summary of the result dict."""
    print(f"\nsmolvla_world planning vs none  {r['date']}  {r['device']}, {r['cpu_count']} cores, "
          f"{r['torch_threads']} threads, load avg {r['load_average_1_5_15_before'][0]:.2f} -> "
          f"{r['load_average_1_5_15_after'][0]:.2f}")  # fmt: skip
    print(f"\n{'cands':9s} {'planner':8s} {'N':>3s} {'call ms none/planned':>22s} {'x':>6s} {'step ms none/planned':>22s} "
          f"{'x':>6s} {'FLOPs x':>8s}  target (step, N=16)")  # fmt: skip
    for row in r["rows"]:
        c, s, f = row["inference_call_s"], row["per_env_step_s"], row["flops"]
        target = ("ok" if s["ratio"] <= 3.0 else "MISSED") if row["samples"] == 16 else ""
        print(f"{row.get('candidates', 'flow'):9s} {row['planner']:8s} {row['samples']:3d} {c['none'] * 1e3:10.1f}/{c['planned'] * 1e3:<11.1f} "
              f"{c['ratio']:6.2f} {s['none'] * 1e3:10.2f}/{s['planned'] * 1e3:<11.2f} {s['ratio']:6.2f} "
              f"{f['ratio']:8.2f}  {target}")  # fmt: skip
    print(f"\nfirst round (N flow samples): prefix encoded once vs the whole call on the repeated batch")
    print(f"{'N':>3s} {'shared ms':>10s} {'unshared ms':>12s} {'time x':>7s} {'FLOPs x':>8s}")
    for row in r["first_round_shared_prefix"]:
        print(f"{row['samples']:3d} {row['shared_s'] * 1e3:10.1f} {row['unshared_s'] * 1e3:12.1f} "
              f"{row['time_ratio']:7.2f} {row['flops_ratio']:8.2f}")
    print(f"\ntotal wall {r['wall_s']:.0f}s")


if __name__ == "__main__":
    raise SystemExit(main())
