"""`lerobot-wm-precompute`: encode every frame of a LeRobotDataset camera into the latent cache.

    lerobot-wm-precompute --dataset.repo_id=local/drawer --dataset.root=/data/drawer --encoder=pixels

The command line only: flags, their checks and the printed next step. The encoding, the shards and
their resume are `latents/precompute.py`. The flags that locate a cache (`add_cache_flags`) are shared
with `lerobot-wm-fit-codebook`, which must find the caches this tool wrote from the same flags.
"""

from __future__ import annotations

import argparse
import sys
import warnings
from pathlib import Path

import torch

from ..latents.cache import DEFAULT_SHARD_FRAMES, DatasetIdentity, default_cache_root, precompute_command
from ..latents.encoders import load_encoder
from ..latents.precompute import precompute_camera
from ..latents.train_view import default_view_root, write_training_view


def train_flags(args, cameras: list[str], view: Path | None) -> str:
    """The lerobot-train flags that make a world policy read these caches (through the view if any)."""
    flags = [f"--policy.encoder={args.encoder}"]
    if args.pooling:
        flags.append(f"--policy.encoder_pooling={args.pooling}")
    if args.window:
        flags.append(f"--policy.encoder_window={args.window}")
    if args.dtype:
        flags.append(f"--policy.encoder_dtype={args.dtype}")
    flags.append(f"--policy.world_cameras='[{','.join(cameras)}]'")
    if args.cache_root:
        flags.append(f"--policy.latent_cache_root={args.cache_root}")
    flags.append(f"--dataset.repo_id={args.repo_id}")
    if view is not None:
        flags.append(f"--dataset.root={view}")
    elif args.root:
        flags.append(f"--dataset.root={args.root}")
    return " ".join(flags)


def add_cache_flags(parser: argparse.ArgumentParser, help_text: dict[str, str] | None = None) -> None:
    """Add the flags that locate a camera's latent cache: dataset, encoder identity, camera(s), cache root.

    Names, dests, types and defaults live here once because `lerobot-wm-fit-codebook` must find the
    caches this tool wrote from the same flags, and `train_flags` reads them. The help is worded for
    building a cache; `help_text` rewords it, by dest, for a tool that reads one.
    """
    h = help_text or {}
    parser.add_argument("--dataset.repo_id", dest="repo_id", required=True, help="Dataset repo id.")
    parser.add_argument("--dataset.root", dest="root", default=None, help=h.get("root", "Local dataset root (default: HF_LEROBOT_HOME/repo_id)."))
    parser.add_argument("--encoder", default="pixels", help=h.get("encoder", "Built-in name ('pixels'), Hugging Face Hub id or local path."))
    parser.add_argument("--pooling", default=None, help=h.get("pooling", "Token pooling: cls, mean or pooler (default: the family's)."))
    parser.add_argument("--window", type=int, default=None, help=h.get("window", "Frames per latent for video encoders (default: the family's)."))
    parser.add_argument("--dtype", default=None, help=h.get("dtype", "Encoder weight dtype: float32 (default), float16, bfloat16."))
    parser.add_argument("--camera", default=None, help=h.get("camera", "Camera key(s), comma-separated (default: the dataset's first camera)."))
    parser.add_argument("--cache_root", default=None, help=h.get("cache_root", "Cache root (default: $LEROBOT_WM_CACHE or ~/.cache/lerobot_policy_world_modality/latents)."))


ENCODER_DTYPES = ("float32", "float16", "bfloat16")


def check_cache_flags(args: argparse.Namespace, tool: str) -> None:
    """Refuse, before any dataset is opened, cache flags that would silently do the wrong thing.

    A mistyped `--dtype` would be accepted by the built-in encoders and echoed into the printed training
    flags; a camera named twice would double the latent; a `--dataset.root` that does not exist would
    make LeRobot try the Hub and fail offline without naming the path.
    """
    if args.dtype is not None and args.dtype not in ENCODER_DTYPES:
        raise SystemExit(f"{tool}: --dtype={args.dtype} is not one of {', '.join(ENCODER_DTYPES)}.")
    if args.camera:
        named = [c.strip() for c in args.camera.split(",") if c.strip()]
        twice = sorted({c for c in named if named.count(c) > 1})
        if twice:
            raise SystemExit(
                f"{tool}: --camera names {twice} more than once, which would repeat its latent; name each "
                "camera once (several cameras are concatenated in the order given)."
            )
    if args.root is not None and not Path(args.root).is_dir():
        raise SystemExit(
            f"{tool}: --dataset.root={args.root} does not exist (or is not a directory). Give the folder "
            "that holds the dataset's meta/ and data/, or leave --dataset.root out to use "
            "HF_LEROBOT_HOME/<repo_id>."
        )


def select_cameras(camera_arg: str | None, available: list[str]) -> tuple[list[str], list[str]]:
    """The cameras a comma-separated `--camera` names (default: the first available) and the unknown ones.

    Callers raise their own error: the two tools word it differently.
    """
    cameras = [c.strip() for c in camera_arg.split(",") if c.strip()] if camera_arg else available[:1]
    return cameras, [c for c in cameras if c not in available]


def _check_device(device: str) -> None:
    """Refuse a `--device` that does not exist here instead of silently encoding on the CPU."""
    try:
        dev = torch.device(device)
    except RuntimeError as err:
        raise SystemExit(f"lerobot-wm-precompute: --device={device} is not a torch device ({err}).") from None
    available = {
        "cpu": True,
        "cuda": torch.cuda.is_available(),
        "mps": bool(getattr(torch.backends, "mps", None)) and torch.backends.mps.is_available(),
    }.get(dev.type, True)
    if not available:
        raise SystemExit(
            f"lerobot-wm-precompute: --device={device} was asked for but this machine has no {dev.type} "
            "device torch can use. Use --device=cpu, or run on a machine with one."
        )


def build_parser() -> argparse.ArgumentParser:
    """Command-line options (LeRobot-style dotted names for the dataset)."""
    p = argparse.ArgumentParser(
        prog="lerobot-wm-precompute",
        description="Encode every frame of a LeRobotDataset camera with a frozen world encoder into the latent cache.",
    )
    add_cache_flags(p)
    p.add_argument("--batch_size", type=int, default=32, help="Frames per encoder forward pass.")
    p.add_argument("--device", default="cpu", help="Encoder device, e.g. cpu or cuda.")
    p.add_argument("--num_workers", type=int, default=2, help="Background threads that decode frames ahead of the encoder.")
    p.add_argument("--num_shards", type=int, default=1, help="Number of processes splitting the cache's shards.")
    p.add_argument("--shard_index", type=int, default=0, help="Which of --num_shards this process computes (0-based).")
    p.add_argument("--shard_frames", type=int, default=None, help=f"Frames per cache shard file (default {DEFAULT_SHARD_FRAMES}).")
    p.add_argument("--video_backend", default="pyav", help="LeRobot video backend used to decode frames.")
    p.add_argument("--overwrite", action="store_true", help="Delete an existing cache and rebuild it from scratch.")
    p.add_argument("--no_progress", action="store_true", help="Hide the progress bar.")
    p.add_argument(
        "--no_training_view",
        action="store_true",
        help="Do not write the latent-only training view (a camera-free copy of the dataset's tables).",
    )
    return p


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `lerobot-wm-precompute` console script."""
    args = build_parser().parse_args(argv)
    # We use LeRobot's own pyav decoding path on purpose; its deprecation notice is noise here.
    warnings.filterwarnings("ignore", message="The video decoding and encoding capabilities of torchvision")
    if args.num_shards < 1 or not 0 <= args.shard_index < args.num_shards:
        raise SystemExit(f"--shard_index must be in [0, --num_shards={args.num_shards}), got {args.shard_index}.")
    if args.shard_frames is not None and args.shard_frames < 1:
        raise SystemExit(f"--shard_frames must be >= 1 (frames per cache shard file), got {args.shard_frames}.")
    if args.batch_size < 1:
        raise SystemExit(f"--batch_size must be >= 1 (frames per encoder forward pass), got {args.batch_size}.")
    if args.num_workers < 0:
        raise SystemExit(f"--num_workers must be >= 0 (decoding threads), got {args.num_workers}.")
    check_cache_flags(args, "lerobot-wm-precompute")
    _check_device(args.device)
    from lerobot.datasets.lerobot_dataset import LeRobotDataset

    dataset = LeRobotDataset(args.repo_id, root=args.root, video_backend=args.video_backend)
    available = list(dataset.meta.camera_keys)
    if not available:
        raise SystemExit(
            f"Dataset '{args.repo_id}' has no camera (image or video) features to encode: world latents are "
            "computed from camera frames. Use a dataset recorded with a camera (its meta/info.json lists "
            "observation.images.* or observation.image features)."
        )
    cameras, unknown = select_cameras(args.camera, available)
    if unknown:
        raise SystemExit(
            f"Unknown camera {unknown} in dataset '{args.repo_id}'. Available camera keys: {available}. "
            f"Pass one with --camera={available[0]}"
        )
    encoder = load_encoder(args.encoder, pooling=args.pooling, window=args.window, device=args.device, dtype=args.dtype)
    identity = DatasetIdentity.from_meta(dataset.meta)
    all_complete = True
    for camera in cameras:
        cache_dir, complete = precompute_camera(
            dataset,
            camera,
            encoder,
            args.cache_root,
            batch_size=args.batch_size,
            num_workers=args.num_workers,
            num_shards=args.num_shards,
            shard_index=args.shard_index,
            shard_frames=args.shard_frames,
            video_backend=args.video_backend,
            overwrite=args.overwrite,
            progress=not args.no_progress,
        )
        all_complete &= complete
        state = "complete" if complete else "partial: other --shard_index processes still have shards to do"
        print(f"Latent cache for '{camera}' ({state}): {cache_dir}")
        if not complete:
            print(f"  Rerun to finish missing shards: {precompute_command(identity, camera, encoder.identity, args.cache_root)}")
    if all_complete:
        root = args.cache_root or default_cache_root()
        view = None
        if not args.no_training_view:
            view = write_training_view(args.repo_id, dataset.root, default_view_root(root, args.repo_id, dataset.root))
            print(f"Latent-only training view (no frames to decode in training): {view}")
        print(f"All caches complete under {root}. Train with:\n  lerobot-train {train_flags(args, cameras, view)} ...")
        if view is not None:
            print(
                "Policies that read camera images in training (smolvla_world) train on the dataset itself:\n"
                f"  lerobot-train {train_flags(args, cameras, None)} ..."
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
