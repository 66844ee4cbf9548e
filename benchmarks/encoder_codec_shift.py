"""Benchmark: how far the video codec moves each encoder's latents, against how far one env step moves them.

    python benchmarks/encoder_codec_shift.py --encoders=pixels,<encoder dir> --work_dir=outputs/codec_shift

Training latents are computed from frames decoded from the dataset's AV1 videos; at evaluation the encoder
sees the simulator's uncompressed render. This records the same MetaWorld expert episodes twice with
`lerobot-wm-record-metaworld` (same seed, so the same frames): once into videos (LeRobot's default codec)
and once as lossless images. Each encoder then encodes both copies. Per encoder it prints the mean L2
distance between a frame's two latents (`codec`), between consecutive frames' latents of one episode
(`step`, the scale of motion) and from a latent to the mean latent (`spread`), and their ratios. An encoder
with codec/step near or above 1 sees the codec as much as it sees one step of motion.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import torch

from lerobot_policy_world_modality.fileio import atomic_write_text
from lerobot_policy_world_modality.latents.encoders import load_encoder

CAMERA = "observation.image"


def record(root: Path, use_videos: bool, args) -> None:
    """Record the episodes once (reused when `root` exists)."""
    if (root / "meta" / "info.json").exists():
        return
    subprocess.run([sys.executable, "-m", "lerobot_policy_world_modality.tools.record_metaworld",
                    f"--dataset.repo_id=local/{root.name}", f"--dataset.root={root}", f"--tasks={args.tasks}",
                    f"--episodes_per_task={args.episodes}", f"--seed={args.seed}", f"--max_steps={args.max_steps}",
                    f"--use_videos={str(use_videos).lower()}"], check=True)  # fmt: skip


def frames(root: Path) -> tuple[torch.Tensor, np.ndarray]:
    """All frames of the camera (uint8 -> float in [0, 1], as LeRobot returns them) and their episodes."""
    from lerobot.datasets.lerobot_dataset import LeRobotDataset

    ds = LeRobotDataset(f"local/{root.name}", root=root, video_backend="pyav")
    items = [ds[i] for i in range(len(ds))]
    return torch.stack([it[CAMERA] for it in items]), np.array([int(it["episode_index"]) for it in items])


def main(argv: list[str] | None = None) -> None:
    """Record, encode, print the table and write `--out`."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--encoders", default="pixels", help="comma-separated encoder names or directories")
    p.add_argument("--tasks", default="pick-place-v3,assembly-v3")
    p.add_argument("--episodes", type=int, default=2, help="episodes per task")
    p.add_argument("--max_steps", type=int, default=120)
    p.add_argument("--seed", type=int, default=7)
    p.add_argument("--work_dir", default="outputs/codec_shift")
    p.add_argument("--out", default="benchmarks/results/encoder_codec_shift.json")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    work = Path(args.work_dir).expanduser().resolve()
    video_root, image_root = work / "codec_video", work / "codec_images"
    record(video_root, True, args)
    record(image_root, False, args)
    coded, episodes = frames(video_root)
    raw, episodes_raw = frames(image_root)
    if coded.shape != raw.shape or not (episodes == episodes_raw).all():
        raise SystemExit("The two recordings differ in frames: record both with the same settings (delete work_dir).")
    same_episode = episodes[1:] == episodes[:-1]
    rows = []
    for name in [s.strip() for s in args.encoders.split(",") if s.strip()]:
        enc = load_encoder(name)
        with torch.no_grad():
            z_raw, z_coded = enc.encode(raw).float().numpy(), enc.encode(coded).float().numpy()
        codec = float(np.linalg.norm(z_raw - z_coded, axis=1).mean())
        step = float(np.linalg.norm(z_raw[1:] - z_raw[:-1], axis=1)[same_episode].mean())
        spread = float(np.linalg.norm(z_raw - z_raw.mean(0), axis=1).mean())
        offset = float(np.linalg.norm((z_coded - z_raw).mean(0)))
        rows.append({"encoder": name, "dim": enc.identity.dim, "codec": round(codec, 4), "step": round(step, 4),
                     "spread": round(spread, 4), "codec_over_step": round(codec / step, 3),
                     "codec_over_spread": round(codec / spread, 4), "mean_offset": round(offset, 4)})  # fmt: skip
    import pandas as pd

    print(pd.DataFrame(rows).to_string(index=False))
    out = Path(args.out)
    atomic_write_text(out, json.dumps({
        "benchmark": "encoder_codec_shift", "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "frames": int(len(raw)), "pixel_abs_diff": round(float((raw - coded).abs().mean()), 5),
        "command": " ".join(["benchmarks/encoder_codec_shift.py", *(argv if argv is not None else sys.argv[1:])]),
        "rows": rows,
    }, indent=1) + "\n")  # fmt: skip
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
