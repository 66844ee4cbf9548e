"""Benchmark: world_f training and evaluation cost, side by side with its baseline A and LeRobot's ACT.

    ~/wmvenv/bin/python benchmarks/world_f_bench.py            # ~5-10 min on 2 CPU cores
    ~/wmvenv/bin/python benchmarks/world_f_bench.py --dataset.root=/data/drawer --dataset.repo_id=local/drawer

Writes a synthetic 480x480 AV1 video dataset (or uses `--dataset.root`), runs the real
`lerobot-wm-precompute` command on it (latent cache + latent-only training view), then measures in
one process, with LeRobot's own training pieces (`make_dataset` on a `TrainPipelineConfig`,
`make_policy`, `make_pre_post_processors`, `make_optimizer_and_scheduler`, the DataLoader exactly as
`lerobot_train.py` builds it, `accelerator.prepare`, and `lerobot_train.update_policy` for the step):

1. F vs A (same width/depth, the config defaults). *Training step*: one `update_policy` call
   (forward + backward + grad clipping + AdamW step) on one pre-batched, already preprocessed batch.
   *select_action*: eval-mode latency at batch 1 on a preprocessed observation, split into the
   inference call (the action queue is empty: a chunk is predicted) and the mean per env step over
   whole chunks. F and A alternate on every repetition (order swapped each time) so machine noise hits
   both alike; medians are reported with the ratio F / A (target <= 1.10 for both). Also counted, free
   of machine noise: matmul FLOPs and ATen ops of one training forward+backward and one inference call.
   The same measurement, in its own alternating run against A, for F on the in-trunk foresight path
   (`world_path=in_trunk`, target <= 1.10 on time) and for the A_hist control (`in_trunk_vs_a`,
   `a_hist_vs_a` in the JSON).
2. Data-pipeline efficiency of world_f: samples/s of the full lerobot-train loop body
   (`next(dataloader)` -> preprocessor -> `update_policy`) divided by samples/s of `update_policy`
   alone on a pre-batched, preprocessed batch of the same policy, measured right after (target
   >= 0.5). Run on the training view (no frames decoded) and on the original video dataset
   (LeRobotDataset decodes the 480x480 frame of every sample although world_f never reads it), each
   with lerobot-train's default `num_workers` and with `num_workers=0`. Warm-up steps (worker
   start-up) are excluded; timed steps stay within one epoch when the dataset is large enough.
3. Training samples/s of world_f (on the view) vs ACT (resnet18 from scratch,
   `pretrained_backbone_weights=None`, decoding the frames it needs) on the same dataset, batch size and
   machine, both through the same lerobot-train loop body with the default `num_workers`. world_f is
   measured right before and right after ACT (mean of the two) so both see the same machine load.
4. Per-step eval latency, as `lerobot-eval`'s rollout does it: `preprocess_observation` of a raw
   480x480 uint8 env frame (untimed), then timed: preprocessor + `select_action` (inference mode) +
   postprocessor. world_f with the built-in `pixels` encoder and with a random-weight
   DINOv2-small-architecture encoder (saved to a temp dir, loaded through the product path) both
   encode the frame online at every step; ACT encodes only when its queue is empty. Reported: the
   inference step, the queue step and the mean per step over whole chunks (each policy's own
   `n_action_steps`).

Prints a table and writes JSON (`--out`), including the load average before and after: other
processes may share the machine, so compare ratios measured in the same run, not absolute times.
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from datetime import datetime, timezone
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch
from bench_io import write_result  # sibling module: benchmarks run as scripts from this folder

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))  # the synthetic dataset writer lives with the tests
BIN = Path(sys.executable).parent


def median(xs):
    """Median of a non-empty list, or None."""
    return statistics.median(xs) if xs else None


def build_dinov2_small(directory: Path) -> Path:
    """Save a random DINOv2-small-shaped model (no download) and return its directory."""
    from transformers import Dinov2Config, Dinov2Model

    torch.manual_seed(0)
    config = Dinov2Config(hidden_size=384, num_hidden_layers=12, num_attention_heads=6, patch_size=14, image_size=224)
    Dinov2Model(config).save_pretrained(directory)
    return directory


# ---------------------------------------------------------------------- lerobot-train's pieces
class Trainer(SimpleNamespace):
    """Policy, processors, optimizer and DataLoader built exactly as lerobot-train builds them."""


def build_trainer(policy_cfg, repo_id: str, root: Path, batch_size: int, num_workers: int, accelerator) -> Trainer:
    """`lerobot_train.train` up to its loop: dataset, policy, processors, optimizer, DataLoader, prepare."""
    from lerobot.configs.default import DatasetConfig
    from lerobot.configs.train import TrainPipelineConfig
    from lerobot.datasets.factory import make_dataset
    from lerobot.optim.factory import make_optimizer_and_scheduler
    from lerobot.policies.factory import make_policy, make_pre_post_processors
    from lerobot.utils.logging_utils import AverageMeter, MetricsTracker

    cfg = TrainPipelineConfig(
        dataset=DatasetConfig(repo_id=repo_id, root=str(root), video_backend="pyav"),
        policy=policy_cfg, batch_size=batch_size, num_workers=num_workers,
    )  # fmt: skip
    # What cfg.validate() does for the optimizer (validate itself re-parses sys.argv).
    cfg.optimizer = cfg.policy.get_optimizer_preset()
    cfg.scheduler = cfg.policy.get_scheduler_preset()
    dataset = make_dataset(cfg)
    policy = make_policy(cfg=cfg.policy, ds_meta=dataset.meta, rename_map=cfg.rename_map)
    pre, post = make_pre_post_processors(policy_cfg=cfg.policy, pretrained_path=None, dataset_stats=dataset.meta.stats)
    optimizer, scheduler = make_optimizer_and_scheduler(cfg, policy)
    loader = torch.utils.data.DataLoader(
        dataset, num_workers=num_workers, batch_size=batch_size, shuffle=True, sampler=None,
        pin_memory=False, drop_last=False, prefetch_factor=2 if num_workers > 0 else None,
    )  # fmt: skip
    policy, optimizer, loader, scheduler = accelerator.prepare(policy, optimizer, loader, scheduler)
    meters = {
        "loss": AverageMeter("loss", ":.3f"), "grad_norm": AverageMeter("grdn", ":.3f"),
        "lr": AverageMeter("lr", ":0.1e"), "update_s": AverageMeter("updt_s", ":.3f"),
        "dataloading_s": AverageMeter("data_s", ":.3f"),
    }  # fmt: skip
    tracker = MetricsTracker(batch_size, dataset.num_frames, dataset.num_episodes, meters, accelerator=accelerator)
    return Trainer(cfg=cfg, dataset=dataset, policy=policy, pre=pre, post=post, optimizer=optimizer,
                   scheduler=scheduler, loader=loader, tracker=tracker, accelerator=accelerator)  # fmt: skip


def update(tr: Trainer, batch, cpu: list | None = None) -> float:
    """One `lerobot_train.update_policy` call; returns its wall time in seconds.

    With `cpu`, also appends the CPU time this process spent in the call: unlike wall time, it does
    not grow while other processes hold the cores, so its F / A ratio survives a loaded machine.
    """
    from lerobot.scripts.lerobot_train import update_policy

    c0, t0 = time.process_time(), time.perf_counter()
    update_policy(tr.tracker, tr.policy, batch, tr.optimizer, tr.cfg.optimizer.grad_clip_norm,
                  accelerator=tr.accelerator, lr_scheduler=tr.scheduler)  # fmt: skip
    wall = time.perf_counter() - t0
    if cpu is not None:
        cpu.append(time.process_time() - c0)
    return wall


def one_batch(tr: Trainer):
    """One preprocessed training batch from the trainer's own data path (untimed)."""
    return tr.pre(next(iter(tr.loader)))


def pipeline_rate(tr: Trainer, warmup: int, steps: int) -> dict:
    """samples/s of the lerobot-train loop body, then of update_policy alone on a fixed batch."""
    from lerobot.datasets.utils import cycle

    it = cycle(tr.loader)
    data_s, update_s = [], []
    for i in range(warmup + steps):
        if i == warmup:
            t_start = time.perf_counter()
        t0 = time.perf_counter()
        batch = tr.pre(next(it))
        t1 = time.perf_counter()
        update(tr, batch)
        if i >= warmup:
            data_s.append(t1 - t0)
            update_s.append(time.perf_counter() - t1)
    total = time.perf_counter() - t_start
    del it  # stops the DataLoader workers before the compute-only measurement
    bs = tr.cfg.batch_size
    compute = [update(tr, batch) for _ in range(steps)]
    pipe_sps = bs * steps / total
    comp_sps = bs * steps / sum(compute)
    return {
        "pipeline_samples_per_s": pipe_sps,
        "compute_only_samples_per_s": comp_sps,
        "efficiency": pipe_sps / comp_sps,
        "median_data_plus_preprocessor_s": median(data_s),
        "median_update_s_in_loop": median(update_s),
        "median_update_s_prebatched": median(compute),
        "timed_steps": steps,
        "num_workers": tr.cfg.num_workers,
    }


# ---------------------------------------------------------------------- measurements
def f_vs_a(tr_f: Trainer, tr_a: Trainer, reps: int, act_cycles: int) -> dict:
    """Training-step and select_action medians of F and A, alternating, with ratios F / A."""
    from lerobot.utils.constants import OBS_STATE

    from lerobot_policy_world_modality.constants import OBS_WORLD_LATENT

    batch = one_batch(tr_f)
    for _ in range(3):  # warm-up: allocator, optimizer state
        update(tr_f, batch), update(tr_a, batch)
    steps = {"F": [], "A": []}
    steps_cpu = {"F": [], "A": []}
    for r in range(reps):
        for name in ("F", "A") if r % 2 == 0 else ("A", "F"):
            steps[name].append(update(tr_f if name == "F" else tr_a, batch, steps_cpu[name]))

    obs = {OBS_WORLD_LATENT: batch[OBS_WORLD_LATENT][:1].clone(), OBS_STATE: batch[OBS_STATE][:1].clone()}
    n_steps = tr_f.policy.config.n_action_steps
    assert n_steps == tr_a.policy.config.n_action_steps
    infer = {"F": [], "A": []}
    infer_cpu = {"F": [], "A": []}
    per_step = {"F": [], "A": []}
    for pol in (tr_f.policy, tr_a.policy):
        pol.reset()
    for r in range(act_cycles):
        for name in ("F", "A") if r % 2 == 0 else ("A", "F"):
            pol = tr_f.policy if name == "F" else tr_a.policy
            times, cpu = [], []
            with torch.inference_mode():
                for _ in range(n_steps):  # one whole chunk: the first call predicts, the rest pop the queue
                    c0, t0 = time.process_time(), time.perf_counter()
                    pol.select_action(obs)
                    times.append(time.perf_counter() - t0)
                    cpu.append(time.process_time() - c0)
            infer[name].append(times[0])
            infer_cpu[name].append(cpu[0])
            per_step[name].append(sum(times) / len(times))
    counts = {"F": work_counts(tr_f.policy, batch, obs), "A": work_counts(tr_a.policy, batch, obs)}
    res = {
        "work_counts": counts,
        "train_step_s": {k: median(v) for k, v in steps.items()},
        "train_step_cpu_s": {k: median(v) for k, v in steps_cpu.items()},
        "select_action_inference_call_s": {k: median(v) for k, v in infer.items()},
        "select_action_inference_call_cpu_s": {k: median(v) for k, v in infer_cpu.items()},
        "select_action_mean_per_step_s": {k: median(v) for k, v in per_step.items()},
        "params": {k: sum(p.numel() for p in t.policy.parameters()) for k, t in (("F", tr_f), ("A", tr_a))},
        "repetitions": reps,
        "select_action_chunks": act_cycles,
    }
    for part in ("train_forward_backward", "select_action_inference_call"):
        for what in ("aten_ops", "flops"):
            counts[f"{part}_{what}_ratio_F_over_A"] = counts["F"][part][what] / counts["A"][part][what]
    for key in ("train_step_s", "train_step_cpu_s", "select_action_inference_call_s",
                "select_action_inference_call_cpu_s", "select_action_mean_per_step_s"):
        res[key]["ratio_F_over_A"] = res[key]["F"] / res[key]["A"]
    return res


def work_counts(policy, batch: dict, obs: dict) -> dict:
    """Machine-independent cost of one training forward+backward and one select_action inference call.

    `flops`: matmul / attention FLOPs (torch's FlopCounterMode); `aten_ops`: every ATen op dispatched
    (forward, backward and inference alike). On a CPU at small batch each op has a fixed cost of a few
    to tens of microseconds, so the op count explains what the FLOPs do not.
    """
    from torch.utils._python_dispatch import TorchDispatchMode
    from torch.utils.flop_counter import FlopCounterMode

    class OpCounter(TorchDispatchMode):
        """Counts ATen ops as they are dispatched."""

        def __init__(self):
            super().__init__()
            self.count = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.count += 1
            return func(*args, **(kwargs or {}))

    def measure(run) -> dict:
        ops, flops = OpCounter(), FlopCounterMode(display=False)
        with ops:
            run()
        with flops:
            run()
        return {"aten_ops": ops.count, "flops": flops.get_total_flops()}

    def train_pass():
        policy.train()
        loss, _ = policy.forward(batch)
        loss.backward()
        policy.zero_grad(set_to_none=True)

    def infer_call():
        policy.eval()
        policy.reset()
        with torch.inference_mode():
            policy.select_action(obs)

    return {"train_forward_backward": measure(train_pass), "select_action_inference_call": measure(infer_call)}


def eval_latency(policies: dict, raw_obs: dict, cycles: int) -> dict:
    """Per-step eval latency (preprocessor + select_action + postprocessor), round-robin over policies."""
    from lerobot.envs.utils import preprocess_observation

    stats = {name: {"pre": [], "select": [], "post": [], "infer_total": [], "queue_total": [], "per_step": []}
             for name in policies}  # fmt: skip
    for name, (pol, pre, post) in policies.items():  # warm-up: loads the online encoder, first inference
        pol.reset()
        with torch.inference_mode():
            post(pol.select_action(pre({**preprocess_observation(raw_obs), "task": ["bench"]})))
    names = list(policies)
    for r in range(cycles):
        for name in names[r % len(names):] + names[: r % len(names)]:
            pol, pre, post = policies[name]
            pol.reset()
            totals = []
            for i in range(pol.config.n_action_steps):
                observation = {**preprocess_observation(raw_obs), "task": ["bench"]}  # untimed, as in the rollout
                t0 = time.perf_counter()
                observation = pre(observation)
                t1 = time.perf_counter()
                with torch.inference_mode():
                    action = pol.select_action(observation)
                t2 = time.perf_counter()
                post(action)
                t3 = time.perf_counter()
                s = stats[name]
                s["pre"].append(t1 - t0), s["select"].append(t2 - t1), s["post"].append(t3 - t2)
                (s["infer_total"] if i == 0 else s["queue_total"]).append(t3 - t0)
                totals.append(t3 - t0)
            stats[name]["per_step"].append(sum(totals) / len(totals))
    return {
        name: {
            "n_action_steps": policies[name][0].config.n_action_steps,
            "inference_step_s": median(s["infer_total"]),
            "queue_step_s": median(s["queue_total"]),
            "mean_per_step_s": median(s["per_step"]),
            "median_preprocessor_s": median(s["pre"]),
            "median_select_action_s": median(s["select"]),
            "median_postprocessor_s": median(s["post"]),
            "chunks": cycles,
        }
        for name, s in stats.items()
    }


# ---------------------------------------------------------------------- main
def parse_args():
    """Command-line options (sizes, steps, dataset)."""
    from lerobot.configs.train import TrainPipelineConfig

    default_workers = TrainPipelineConfig.__dataclass_fields__["num_workers"].default
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dataset.repo_id", dest="repo_id", default="local/world_f_bench")
    p.add_argument("--dataset.root", dest="root", default=None,
                   help="Existing local LeRobotDataset with a camera (default: write a synthetic 480x480 one).")
    p.add_argument("--episodes", type=int, default=4, help="Synthetic dataset: number of episodes.")
    p.add_argument("--episode_length", type=int, default=100, help="Synthetic dataset: frames per episode.")
    p.add_argument("--image_size", type=int, default=480, help="Synthetic dataset: square frame side.")
    p.add_argument("--batch_size", type=int, default=8, help="Training batch size (lerobot-train's default: 8).")
    p.add_argument("--num_workers", type=int, default=default_workers,
                   help=f"DataLoader workers for the default-path runs (lerobot-train's default: {default_workers}).")
    p.add_argument("--reps", type=int, default=30, help="F/A: alternating training-step repetitions.")
    p.add_argument("--select_chunks", type=int, default=30, help="F/A: alternating select_action chunks.")
    p.add_argument("--warmup", type=int, default=3, help="Pipeline runs: untimed warm-up steps.")
    p.add_argument("--pipeline_steps", type=int, default=30, help="Pipeline runs: timed steps (world_f).")
    p.add_argument("--act_steps", type=int, default=4, help="ACT: timed training steps (~3-5 s each here).")
    p.add_argument("--eval_chunks", type=int, default=3, help="Eval latency: whole chunks per policy.")
    p.add_argument("--threads", type=int, default=None,
                   help="torch intra-op threads (default: torch's default, as lerobot-train runs).")
    p.add_argument("--skip_act", action="store_true", help="Skip the ACT measurements (parts 3 and 4).")
    p.add_argument("--only_f_vs_a", action="store_true",
                   help="Run part 1 only (F cross_attn, F in_trunk and A_hist against A); skip parts 2-4.")
    p.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "world_f_bench.json"))
    return p.parse_args()


def main() -> None:
    """Run the benchmark and write its JSON."""
    args = parse_args()
    warnings.filterwarnings("ignore", message="The video decoding and encoding capabilities of torchvision")
    warnings.filterwarnings("ignore", category=UserWarning, module="torchvision")
    # lerobot-train's default of 4 workers on a 2-core machine triggers this; measuring it is the point.
    warnings.filterwarnings("ignore", message="This DataLoader will create")
    if args.threads:
        torch.set_num_threads(args.threads)
    tmp = Path(tempfile.mkdtemp(prefix="wm_world_f_bench_"))
    # Throwaway cache and view next to the dataset; nothing may be fetched from the Hub.
    os.environ["LEROBOT_WM_CACHE"] = str(tmp / "cache")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    load_before = os.getloadavg()
    t_begin = time.perf_counter()

    from accelerate import Accelerator
    from lerobot.policies.act.configuration_act import ACTConfig
    from lerobot.policies.factory import make_policy_config, make_pre_post_processors

    import lerobot_policy_world_modality  # noqa: F401  (registers world_f)
    from lerobot_policy_world_modality.world_f.configuration_world_f import WorldFConfig
    from lerobot_policy_world_modality.world_f.modeling_world_f import WorldFPolicy

    torch.manual_seed(0)
    root = Path(args.root) if args.root else None
    if root is None:
        from support.datasets import make_synthetic_dataset

        root = tmp / "dataset"
        t0 = time.perf_counter()
        make_synthetic_dataset(root, repo_id=args.repo_id, episode_lengths=(args.episode_length,) * args.episodes,
                               image_hw=(args.image_size, args.image_size), fps=30)  # fmt: skip
        print(f"wrote synthetic {args.image_size}x{args.image_size} video dataset in {time.perf_counter() - t0:.1f}s")

    t0 = time.perf_counter()
    res = subprocess.run([str(BIN / "lerobot-wm-precompute"), f"--dataset.repo_id={args.repo_id}",
                          f"--dataset.root={root}", "--encoder=pixels", "--no_progress"],
                         capture_output=True, text=True, env=dict(os.environ))  # fmt: skip
    if res.returncode != 0:
        sys.exit(f"lerobot-wm-precompute failed:\n{res.stdout[-2000:]}\n{res.stderr[-4000:]}")
    precompute_s = time.perf_counter() - t0
    view = Path(next(ln for ln in res.stdout.splitlines() if "training view" in ln).split(": ", 1)[1].strip())
    print(f"lerobot-wm-precompute (pixels): {precompute_s:.1f}s, view at {view}")

    accelerator = Accelerator(step_scheduler_with_optimizer=False, cpu=True)
    bs, nw = args.batch_size, args.num_workers

    def world_cfg(**kw) -> WorldFConfig:
        return make_policy_config("world_f", device="cpu", push_to_hub=False, **kw)

    # 1. F vs A on pre-batched tensors.
    tr_f = build_trainer(world_cfg(variant="F"), args.repo_id, view, bs, 0, accelerator)
    tr_a = build_trainer(world_cfg(variant="A"), args.repo_id, view, bs, 0, accelerator)
    print(f"[{time.perf_counter() - t_begin:.0f}s] 1/4 F vs A ...", flush=True)
    fa = f_vs_a(tr_f, tr_a, args.reps, args.select_chunks)
    # The in-trunk path and the A_hist control, each in its own alternating run against the same A.
    tr_it = build_trainer(world_cfg(variant="F", world_path="in_trunk"), args.repo_id, view, bs, 0, accelerator)
    print(f"[{time.perf_counter() - t_begin:.0f}s] 1b/4 F in_trunk vs A ...", flush=True)
    fa_in_trunk = f_vs_a(tr_it, tr_a, args.reps, args.select_chunks)
    del tr_it
    tr_h = build_trainer(world_cfg(variant="A_hist"), args.repo_id, view, bs, 0, accelerator)
    print(f"[{time.perf_counter() - t_begin:.0f}s] 1c/4 A_hist vs A ...", flush=True)
    fa_hist = f_vs_a(tr_h, tr_a, args.reps, args.select_chunks)
    del tr_h
    if args.only_f_vs_a:
        result = {
            "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "machine": f"{platform.machine()} {platform.processor() or ''}".strip(),
            "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(), "torch": torch.__version__,
            "load_average_1_5_15_before": list(load_before), "load_average_1_5_15_after": list(os.getloadavg()),
            "batch_size": bs, "f_vs_a": fa, "in_trunk_vs_a": fa_in_trunk, "a_hist_vs_a": fa_hist,
            "targets": {"f_over_a_max": 1.10}, "wall_s": time.perf_counter() - t_begin,
        }  # fmt: skip
        print_f_vs_a(result)
        write_result(args.out, result)
        shutil.rmtree(tmp, ignore_errors=True)
        return

    # 2. Data-pipeline efficiency of world_f (variant F, the default), view vs video, workers default vs 0.
    print(f"[{time.perf_counter() - t_begin:.0f}s] 2/4 data pipeline ...", flush=True)
    pipeline = {}
    for label, ds_root in (("view", view), ("video", root)):
        for workers in dict.fromkeys((nw, 0)):
            tr = build_trainer(world_cfg(), args.repo_id, ds_root, bs, workers, accelerator)
            pipeline[f"{label}, num_workers={workers}"] = pipeline_rate(tr, args.warmup, args.pipeline_steps)
            del tr

    # 3. world_f vs ACT training samples/s, same dataset, batch size, loop body and num_workers.
    act_result = None
    act_trainer = None
    if not args.skip_act:
        print(f"[{time.perf_counter() - t_begin:.0f}s] 3/4 ACT training ...", flush=True)
        act_cfg = ACTConfig(device="cpu", push_to_hub=False, pretrained_backbone_weights=None)
        # world_f (view) right before and right after ACT, so both see the same machine load.
        bracket = [pipeline_rate(build_trainer(world_cfg(), args.repo_id, view, bs, nw, accelerator),
                                 args.warmup, args.pipeline_steps)]  # fmt: skip
        act_trainer = build_trainer(act_cfg, args.repo_id, root, bs, nw, accelerator)
        act = pipeline_rate(act_trainer, 1, args.act_steps)
        bracket.append(pipeline_rate(build_trainer(world_cfg(), args.repo_id, view, bs, nw, accelerator),
                                     args.warmup, args.pipeline_steps))  # fmt: skip
        wf_view = statistics.mean(b["pipeline_samples_per_s"] for b in bracket)
        wf_video = pipeline[f"video, num_workers={nw}"]["pipeline_samples_per_s"]
        act_result = {
            "act": act,
            "world_f_view_samples_per_s": wf_view,
            "world_f_view_before_after_act": [b["pipeline_samples_per_s"] for b in bracket],
            "world_f_video_samples_per_s_part2": wf_video,
            "ratio_world_f_view_over_act": wf_view / act["pipeline_samples_per_s"],
        }

    # 4. Eval latency with the online encoder, as lerobot-eval's rollout runs it.
    print(f"[{time.perf_counter() - t_begin:.0f}s] 4/4 eval latency ...", flush=True)
    from support.datasets import synthetic_frame

    raw_obs = {
        "pixels": synthetic_frame(0, 5, 0, (480, 480))[None],
        "agent_pos": np.zeros((1, tr_f.policy.config.robot_state_feature.shape[0]), dtype=np.float32),
    }
    stats = tr_f.dataset.meta.stats
    dino_dir = build_dinov2_small(tmp / "dinov2_small_random")
    dcfg = world_cfg(encoder=str(dino_dir))
    dcfg.input_features = dict(tr_f.policy.config.input_features)  # what a checkpoint's config holds
    dcfg.output_features = dict(tr_f.policy.config.output_features)
    dcfg.world_cameras = list(tr_f.policy.config.world_cameras)
    dino_policy = WorldFPolicy(dcfg)
    dpre, dpost = make_pre_post_processors(dcfg, dataset_stats=stats)
    policies = {
        "world_f (pixels encoder)": (tr_f.policy, tr_f.pre, tr_f.post),
        "world_f (DINOv2-small arch, random)": (dino_policy, dpre, dpost),
    }
    if act_trainer is not None:
        policies["ACT (resnet18)"] = (act_trainer.policy, act_trainer.pre, act_trainer.post)
    latency = eval_latency(policies, raw_obs, args.eval_chunks)
    if act_trainer is not None:
        act_lat = latency["ACT (resnet18)"]
        for name, lat in latency.items():
            lat["mean_per_step_over_act"] = lat["mean_per_step_s"] / act_lat["mean_per_step_s"]
            lat["inference_step_over_act"] = lat["inference_step_s"] / act_lat["inference_step_s"]

    load_after = os.getloadavg()
    result = {
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "machine": f"{platform.machine()} {platform.processor() or ''}".strip(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "load_average_1_5_15_before": list(load_before),
        "load_average_1_5_15_after": list(load_after),
        "dataset": {"repo_id": args.repo_id, "frames": tr_f.dataset.meta.total_frames,
                    "synthetic": args.root is None, "image_hw": [args.image_size] * 2 if args.root is None else None},
        "batch_size": bs,
        "default_num_workers": nw,
        "precompute_pixels_s": precompute_s,
        "world_f_config": {k: getattr(tr_f.policy.config, k) for k in
                           ("width", "depth", "heads", "chunk_size", "n_action_steps", "history_frames",
                            "future_frames", "prophet_width", "prophet_depth", "world_latent_dim", "encoder")},
        "f_vs_a": fa,
        "in_trunk_vs_a": fa_in_trunk,
        "a_hist_vs_a": fa_hist,
        "data_pipeline": pipeline,
        "world_f_vs_act_training": act_result,
        "eval_latency": latency,
        "targets": {"f_over_a_max": 1.10, "pipeline_efficiency_min": 0.5},
        "wall_s": time.perf_counter() - t_begin,
    }  # fmt: skip
    print_table(result)
    write_result(args.out, result)
    shutil.rmtree(tmp, ignore_errors=True)


def print_f_vs_a(r: dict) -> None:
    """Part 1 of the summary: each world_f arm against A (time medians, FLOPs, ATen ops)."""
    ms = 1000.0
    print(f"\nworld_f benchmark  {r['date']}  {r['machine']}  {r['cpu_count']} cores, {r['torch_threads']} torch "
          f"threads, load avg before {r['load_average_1_5_15_before'][0]:.2f} after "
          f"{r['load_average_1_5_15_after'][0]:.2f}; batch {r['batch_size']}")
    for key, arm in (("f_vs_a", "F cross_attn"), ("in_trunk_vs_a", "F in_trunk"), ("a_hist_vs_a", "A_hist")):
        if key in r:
            print_arm_vs_a(r[key], arm)


def print_arm_vs_a(fa: dict, arm: str) -> None:
    """One arm's rows of part 1 ("F" in the JSON keys is the arm measured against A)."""
    ms = 1000.0
    print(f"\n1. {arm} vs A (median over {fa['repetitions']} alternating reps)   {'F ms':>9s} {'A ms':>9s} {'F/A':>6s}  target")
    for key, label in (("train_step_s", "training step (fwd+bwd+optim)"),
                       ("train_step_cpu_s", "training step, CPU time"),
                       ("select_action_inference_call_s", "select_action, inference call"),
                       ("select_action_inference_call_cpu_s", "select_action, inference call, CPU time"),
                       ("select_action_mean_per_step_s", "select_action, mean per step")):
        v = fa[key]
        ok = "ok" if v["ratio_F_over_A"] <= 1.10 else "MISSED"
        print(f"   {label:48s} {v['F'] * ms:9.2f} {v['A'] * ms:9.2f} {v['ratio_F_over_A']:6.2f}  <=1.10 {ok}")
    wc = fa["work_counts"]
    for part, label in (("train_forward_backward", "training fwd+bwd"), ("select_action_inference_call", "select_action inference call")):
        f, a = wc["F"][part], wc["A"][part]
        print(f"   {label:30s} work: matmul GFLOP F {f['flops'] / 1e9:.3f} A {a['flops'] / 1e9:.3f} "
              f"(F/A {wc[part + '_flops_ratio_F_over_A']:.2f}); ATen ops F {f['aten_ops']} A {a['aten_ops']} "
              f"(F/A {wc[part + '_aten_ops_ratio_F_over_A']:.2f})")


def print_table(r: dict) -> None:
    """Human-readable summary of the result dict."""
    ms = 1000.0
    print_f_vs_a(r)
    print(f"   dataset: {r['dataset']['frames']} frames")
    print(f"\n2. world_f data-pipeline efficiency     {'pipe s/s':>9s} {'fwd+bwd s/s':>11s} {'eff':>6s}"
          f" {'data ms':>8s} {'upd ms':>7s}  target >= 0.5")
    for name, v in r["data_pipeline"].items():
        ok = "ok" if v["efficiency"] >= 0.5 else "MISSED"
        print(f"   {name:36s} {v['pipeline_samples_per_s']:9.1f} {v['compute_only_samples_per_s']:11.1f} "
              f"{v['efficiency']:6.2f} {v['median_data_plus_preprocessor_s'] * ms:8.1f} "
              f"{v['median_update_s_in_loop'] * ms:7.1f}  {ok}")
    act = r["world_f_vs_act_training"]
    if act:
        print(f"\n3. training samples/s (num_workers={r['default_num_workers']}): ACT (video) "
              f"{act['act']['pipeline_samples_per_s']:.2f}, world_f view {act['world_f_view_samples_per_s']:.1f} "
              f"(x{act['ratio_world_f_view_over_act']:.1f}; before/after ACT "
              f"{act['world_f_view_before_after_act'][0]:.1f}/{act['world_f_view_before_after_act'][1]:.1f}); "
              f"ACT update step {act['act']['median_update_s_in_loop']:.2f}s")
    print(f"\n4. eval latency, pre+select_action+post   {'infer ms':>9s} {'queue ms':>9s} {'mean/step ms':>12s}"
          f" {'pre ms':>8s} {'n_act':>5s}")
    for name, v in r["eval_latency"].items():
        print(f"   {name:38s} {v['inference_step_s'] * ms:9.1f} {v['queue_step_s'] * ms:9.1f} "
              f"{v['mean_per_step_s'] * ms:12.1f} {v['median_preprocessor_s'] * ms:8.1f} {v['n_action_steps']:5d}")
    print(f"\ntotal wall {r['wall_s']:.0f}s")


if __name__ == "__main__":
    main()
