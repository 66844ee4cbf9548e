"""Benchmark: world encoders on recorded MetaWorld frames, encode time per frame and linear-probe scores.

    python benchmarks/encoder_bench.py --task=pick-place-v3 --episodes=16 --work_dir=outputs/encoder_bench
    python benchmarks/encoder_bench.py --dataset.root=<dir recorded with --store_sim_state> --encoders=pixels,<dir>

Data: a MetaWorld dataset recorded by `lerobot-wm-record-metaworld --store_sim_state` (recorded into
`<work_dir>/dataset` first when `--dataset.root` is not given), so each frame carries its ground truth:
hand xyz and gripper opening (`observation.state`) and the first object's xyz (MetaWorld's raw
observation, entries 4:7). A recording without `--store_sim_state` (e.g. the noisy expert's) gets every
column but the object's. Encoders (`--encoders`, comma-separated): built-in names, encoder
directories, and `fit`, which runs `lerobot-wm-fit-encoder` on the dataset first (reused on rerun).

For each encoder: latents of every frame through `lerobot-wm-precompute` (the cache training reads),
ridge probes (`latents.linear_probe.ridge_probe`) fitted on the first 75% of each task's episodes and
scored on the rest (R^2 per target group, gripper closed/open accuracy, and R^2 of the expert's action: what a
policy reading only the latent could get linearly); the latent motion probe (`linear_probe.motion_probe`,
`--motion_horizon` steps: how much of z_{t+h} - z_t the actions explain beyond z_t, what an
action-conditioned world model and its planner need); and the wall time of
`WorldEncoder.encode` on one 480x480 frame (batch 1, as at eval; median of `--timing_reps`, one
torch thread). Prints a table and writes `--out` JSON.
"""

from __future__ import annotations

import argparse
import os
import platform
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench_io import write_result  # sibling module: benchmarks run as scripts from this folder

from lerobot_policy_world_modality.latents.cache import DatasetIdentity, LatentCache  # noqa: E402
from lerobot_policy_world_modality.latents.encoders import load_encoder  # noqa: E402
from lerobot_policy_world_modality.latents.linear_probe import motion_probe, ridge_probe  # noqa: E402
from lerobot_policy_world_modality.tools import fit_encoder, precompute  # noqa: E402
from lerobot_policy_world_modality.tools.record_metaworld import SIM_STATE_KEY  # noqa: E402

CAMERA = "observation.image"
# Slices of MetaWorld's raw 39-d observation: hand xyz, gripper, first object xyz.
OBJECT_XYZ = slice(4, 7)


def record(args, root: Path) -> None:
    """Record the expert dataset with ground-truth sim state (resumes; reuses a finished recording)."""
    cmd = [str(Path(sys.executable).parent / "lerobot-wm-record-metaworld"), f"--dataset.repo_id={args.repo_id}",
           f"--dataset.root={root}", f"--env.task={args.task}", f"--episodes_per_task={args.episodes}",
           f"--seed={args.seed}", "--store_sim_state=true"]  # fmt: skip
    subprocess.run(cmd, check=True)


def targets(root: Path, repo_id: str) -> dict[str, np.ndarray]:
    """Ground-truth signals per frame (row i = global index i), and the episode and task of each frame."""
    from lerobot.datasets.lerobot_dataset import LeRobotDataset

    table = LeRobotDataset(repo_id, root=root, video_backend="pyav").hf_dataset.data
    state = np.stack(table.column("observation.state").to_numpy(zero_copy_only=False))
    if SIM_STATE_KEY in table.column_names:
        objects = np.stack(table.column(SIM_STATE_KEY).to_numpy(zero_copy_only=False))[:, OBJECT_XYZ]
    else:
        objects = None
        print(f"{root} has no {SIM_STATE_KEY} column: no object-position probe (record with "
              "lerobot-wm-record-metaworld --store_sim_state=true for it).")  # fmt: skip
    return {"hand_xyz": state[:, :3], "gripper": state[:, 3], "object_xyz": objects,
            "action": np.stack(table.column("action").to_numpy(zero_copy_only=False)),
            "episode": np.asarray(table.column("episode_index").to_numpy()),
            "task": np.asarray(table.column("task_index").to_numpy())}  # fmt: skip


def encode_ms(encoder_name: str, frame: torch.Tensor, reps: int) -> float:
    """Median wall milliseconds of one batch-1 `encode` of a full-size frame, one torch thread."""
    torch.set_num_threads(1)
    enc = load_encoder(encoder_name)
    for _ in range(5):
        enc.encode(frame[None])
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        enc.encode(frame[None])
        times.append(time.perf_counter() - t)
    return 1000 * float(np.median(times))


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark; returns 0."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--dataset.root", dest="root", default=None, help="recorded dataset (with --store_sim_state)")
    p.add_argument("--dataset.repo_id", dest="repo_id", default="local/encoder_bench")
    p.add_argument("--task", default="pick-place-v3", help="MetaWorld task to record when no root is given")
    p.add_argument("--episodes", type=int, default=16, help="episodes to record when no root is given")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--encoders", default="pixels,fit", help="comma-separated; 'fit' fits one on the dataset")
    p.add_argument("--fit_arg", action="append", default=[], help="extra lerobot-wm-fit-encoder flag (repeatable)")
    p.add_argument("--work_dir", default="outputs/encoder_bench")
    p.add_argument("--timing_reps", type=int, default=50, help="0: no timing (e.g. on a loaded machine)")
    p.add_argument("--motion_horizon", type=int, default=5, help="steps h of the latent motion probe z_{t+h} - z_t")
    p.add_argument("--out", default=str(Path(__file__).parent / "results" / "encoder_bench.json"))
    args = p.parse_args(argv)
    work = Path(args.work_dir).expanduser().resolve()
    root = Path(args.root).expanduser().resolve() if args.root else work / "dataset"
    if not args.root:
        record(args, root)
    truth = targets(root, args.repo_id)
    cache_root = work / "cache"
    rows = []
    for name in [s.strip() for s in args.encoders.split(",") if s.strip()]:
        label = name
        if name == "fit":
            t = time.time()
            enc_dir = work / "encoder_fit"
            fit_encoder.main([f"--dataset.repo_id={args.repo_id}", f"--dataset.root={root}", f"--output_dir={enc_dir}",
                              f"--seed={args.seed}", *args.fit_arg])  # fmt: skip
            name, label = str(enc_dir), f"fit ({enc_dir.name})"
            print(f"fit took {time.time() - t:.0f} s (0 if reused)")
        precompute.main([f"--dataset.repo_id={args.repo_id}", f"--dataset.root={root}", f"--encoder={name}",
                         f"--cache_root={cache_root}", "--no_training_view", "--no_progress"])  # fmt: skip
        enc = load_encoder(name)
        latents = LatentCache.open(cache_root, DatasetIdentity.from_dataset(args.repo_id, root), CAMERA,
                                   enc.identity).latents.numpy()  # fmt: skip
        from lerobot.datasets.lerobot_dataset import LeRobotDataset

        frame = LeRobotDataset(args.repo_id, root=root, video_backend="pyav")[0][CAMERA]
        ep, task = truth["episode"], truth["task"]
        gripper = ridge_probe(latents, truth["gripper"], ep, binary=True, groups=task)
        objects = truth["object_xyz"]
        motion = motion_probe(latents, truth["action"], ep, args.motion_horizon, groups=task)
        rows.append({
            "encoder": label, "dim": enc.identity.dim,
            "encode_ms_per_frame": round(encode_ms(name, frame, args.timing_reps), 2) if args.timing_reps else None,
            "r2_hand_xyz": round(ridge_probe(latents, truth["hand_xyz"], ep, groups=task)["r2_mean"], 3),
            "r2_object_xyz": None if objects is None else round(ridge_probe(latents, objects, ep, groups=task)["r2_mean"], 3),
            "r2_gripper": round(gripper["r2_mean"], 3),
            "r2_expert_action": round(ridge_probe(latents, truth["action"], ep, groups=task)["r2_mean"], 3),
            "gripper_accuracy": round(gripper["accuracy"], 3), "gripper_majority": round(gripper["majority_rate"], 3),
            "r2_motion_state": round(motion["r2_state"], 3), "r2_motion_state_actions": round(motion["r2_state_actions"], 3),
            "motion_action_gain": round(motion["action_gain"], 3),
        })  # fmt: skip
    import pandas as pd

    table = pd.DataFrame(rows)
    print(table.to_string(index=False))
    write_result(args.out, {
        "benchmark": "encoder_bench", "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "machine": {"cpu": platform.processor() or platform.machine(), "torch_threads": 1,
                    "loadavg": [round(x, 2) for x in os.getloadavg()]},
        "dataset": {"root": str(root), "frames": int(len(truth["episode"])), "episodes": int(len(np.unique(truth["episode"]))),
                    "test_fraction": 0.25, "motion_horizon": args.motion_horizon},
        "command": " ".join(sys.argv), "rows": rows,
    })  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
