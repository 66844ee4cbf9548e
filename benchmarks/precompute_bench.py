"""Benchmark: encoder forward throughput vs the whole precompute pipeline on the same frames.

    ~/wmvenv/bin/python benchmarks/precompute_bench.py --out benchmarks/results/precompute_bench.json

Builds a randomly initialised encoder with DINOv2-small's architecture (hidden 384, 12 layers,
6 heads, patch 14, 224x224 input) saved to a temp dir and loaded through the product path, and a
recorded 480x480 AV1 video dataset (synthetic, or `--dataset.root` for an existing one). Then, in
one run, it measures on the same frames:

- raw forward: `encoder.encode` on frames already decoded into memory (preprocessing + model), and
  the bare model forward on already-preprocessed pixels;
- precompute (in-process): `precompute_camera`, i.e. decode + encode + shard writes, timed after
  the dataset is opened;
- precompute (command): the `lerobot-wm-precompute` console script as a subprocess, wall clock
  including interpreter start-up and imports.

The target of issue 3 is precompute >= 0.8x the raw forward rate. Prints a table and writes JSON.
"""

from __future__ import annotations

import argparse
import platform
import shutil
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch
from bench_io import write_result  # sibling module: benchmarks run as scripts from this folder

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))  # the synthetic dataset writer lives with the tests


def build_dinov2_small(directory: Path) -> Path:
    """Save a random DINOv2-small-shaped model (no download) and return its directory."""
    from transformers import Dinov2Config, Dinov2Model

    torch.manual_seed(0)
    config = Dinov2Config(hidden_size=384, num_hidden_layers=12, num_attention_heads=6, patch_size=14, image_size=224)
    Dinov2Model(config).save_pretrained(directory)
    return directory


def main() -> None:
    """Run the benchmark and write its JSON."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dataset.repo_id", dest="repo_id", default="local/precompute_bench")
    p.add_argument("--dataset.root", dest="root", default=None, help="Existing dataset (default: write a synthetic one).")
    p.add_argument("--camera", default="observation.image")
    p.add_argument("--episodes", type=int, default=3, help="Synthetic dataset: number of episodes.")
    p.add_argument("--episode_length", type=int, default=100, help="Synthetic dataset: frames per episode.")
    p.add_argument("--batch_size", type=int, default=32)
    p.add_argument("--num_workers", type=int, default=2)
    p.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "precompute_bench.json"))
    args = p.parse_args()
    warnings.filterwarnings("ignore", message="The video decoding and encoding capabilities of torchvision")

    from lerobot.datasets.lerobot_dataset import LeRobotDataset

    from lerobot_policy_world_modality.latents.cache import DatasetIdentity, EpisodeBounds
    from lerobot_policy_world_modality.latents.encoders import load_encoder
    from lerobot_policy_world_modality.latents.precompute import BatchLoader, FrameSource, precompute_camera

    tmp = Path(tempfile.mkdtemp(prefix="wm_precompute_bench_"))
    root = args.root
    if root is None:
        from support.datasets import make_synthetic_dataset

        root = tmp / "dataset"
        t0 = time.perf_counter()
        make_synthetic_dataset(
            root, repo_id=args.repo_id, episode_lengths=(args.episode_length,) * args.episodes,
            image_hw=(480, 480), fps=30,
        )
        print(f"wrote synthetic 480x480 video dataset in {time.perf_counter() - t0:.1f}s: {root}")
    model_dir = build_dinov2_small(tmp / "dinov2_small_random")
    encoder = load_encoder(str(model_dir))
    dataset = LeRobotDataset(args.repo_id, root=root, video_backend="pyav")
    n = len(dataset)
    bs = args.batch_size

    # Decode every frame once, outside any timing, for the raw forward measurement.
    identity = DatasetIdentity.from_meta(dataset.meta)
    loader = BatchLoader(FrameSource(dataset, args.camera, "pyav"), EpisodeBounds.from_identity(identity), 1)
    t0 = time.perf_counter()
    frames = torch.cat([(loader.load(s, min(s + bs, n)) * 255).round().to(torch.uint8) for s in range(0, n, bs)])
    decode_s = time.perf_counter() - t0
    encoder.encode(frames[:bs])  # warm-up (allocator, kernels)

    t0 = time.perf_counter()
    for s in range(0, n, bs):
        encoder.encode(frames[s : s + bs])
    encode_s = time.perf_counter() - t0

    from lerobot_policy_world_modality.latents.encoder_base import preprocess_frames

    eid = encoder.identity
    pixels = preprocess_frames(frames, eid.image_size, eid.image_mean, eid.image_std)
    t0 = time.perf_counter()
    with torch.no_grad():
        for s in range(0, n, bs):
            encoder._forward(pixels[s : s + bs])
    forward_s = time.perf_counter() - t0
    del pixels, frames

    t0 = time.perf_counter()
    precompute_camera(dataset, args.camera, encoder, tmp / "cache_inproc", batch_size=bs,
                      num_workers=args.num_workers, progress=False)
    inproc_s = time.perf_counter() - t0

    cmd = [
        str(Path(sys.executable).parent / "lerobot-wm-precompute"), f"--dataset.repo_id={args.repo_id}",
        f"--dataset.root={root}", f"--encoder={model_dir}", f"--camera={args.camera}", f"--batch_size={bs}",
        f"--num_workers={args.num_workers}", f"--cache_root={tmp / 'cache_cmd'}", "--no_progress",
    ]
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True, capture_output=True)
    cmd_s = time.perf_counter() - t0

    raw_fps = n / encode_s
    rows = {
        "decode only (pyav, sequential, 1 thread)": n / decode_s,
        "raw encode() on decoded frames (resize+model)": raw_fps,
        "bare model forward on preprocessed pixels": n / forward_s,
        "precompute in-process (decode+encode+write)": n / inproc_s,
        "precompute command (incl. ~start-up/imports)": n / cmd_s,
    }
    result = {
        "frames": n,
        "frame_hw": list(dataset[0][args.camera].shape[-2:]),
        "batch_size": bs,
        "num_workers": args.num_workers,
        "encoder": "random DINOv2-small architecture (384 hidden, 12 layers, 6 heads, patch 14, 224 input)",
        "torch_threads": torch.get_num_threads(),
        "machine": f"{platform.machine()} {platform.processor() or ''}".strip(),
        "frames_per_s": rows,
        "ratio_inprocess_vs_raw_encode": (n / inproc_s) / raw_fps,
        "ratio_inprocess_vs_bare_forward": (n / inproc_s) / (n / forward_s),
        "ratio_command_vs_raw_encode": (n / cmd_s) / raw_fps,
        "target_ratio": 0.8,
    }
    print(f"\n{n} frames {result['frame_hw']} batch {bs}, {args.num_workers} decode threads, {result['torch_threads']} torch threads")
    print(f"{'measurement':50s} {'frames/s':>10s}")
    for name, fps in rows.items():
        print(f"{name:50s} {fps:10.2f}")
    print(f"precompute / raw encode(): in-process {result['ratio_inprocess_vs_raw_encode']:.2f}, "
          f"command {result['ratio_command_vs_raw_encode']:.2f} (target >= 0.8)")
    write_result(args.out, result)
    shutil.rmtree(tmp, ignore_errors=True)  # the 480x480 dataset and caches are throwaway


if __name__ == "__main__":
    main()
