"""`lerobot-wm-precompute`: encode every frame of a LeRobotDataset camera into the latent cache.

    lerobot-wm-precompute --dataset.repo_id=local/drawer --dataset.root=/data/drawer --encoder=pixels

Frames are read exactly as `LeRobotDataset.__getitem__` returns them (same decoder call, same
timestamps), so cached latents equal online encodings of the dataset's frames. Videos are decoded
in contiguous runs by background threads while the encoder works on the previous batch.

The cache is cut into shards (`--shard_frames` rows each) written atomically; batches always start
at a shard start, so a killed run resumes with the missing shards and produces the same bytes as an
uninterrupted run. `--num_shards N --shard_index i` lets N processes or machines split the shards
of one cache; whichever finishes last marks the cache complete, and rerunning any of them
finishes what is missing.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import os
import shutil
import sys
import warnings
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch

from .cache import (
    DEFAULT_SHARD_FRAMES,
    META_FILE,
    DatasetIdentity,
    EpisodeBounds,
    LatentCacheError,
    build_meta,
    cache_dir_for,
    default_cache_root,
    precompute_command,
    read_meta,
    write_meta,
    write_shard,
)
from .encoder_base import WorldEncoder
from .encoders import load_encoder
from .train_view import default_view_root, write_training_view

# LeRobotDataset's default timestamp tolerance; lerobot-train uses the same default.
TOLERANCE_S = 1e-4


class FrameSource:
    """Reads one camera's frames by global index, bit-identical to what LeRobotDataset returns.

    Video: `decode_video_frames(path, from_timestamp + timestamp, tolerance_s, backend)` as in
    `LeRobotDataset._query_videos`, one call per contiguous run of an episode. Images: the
    parquet image column through the dataset's own transform (float32 in [0, 1]).
    """

    def __init__(self, dataset, camera: str, video_backend: str):
        """`dataset` is an opened `LeRobotDataset`; `camera` one of its camera keys."""
        self.dataset = dataset
        self.camera = camera
        self.video_backend = video_backend
        meta = dataset.meta
        self.is_video = camera in meta.video_keys
        table = dataset.hf_dataset.data  # the raw arrow table: no per-row python transform
        index = np.asarray(table.column("index").to_numpy())
        if not np.array_equal(index, np.arange(len(index))):
            raise LatentCacheError(
                f"Dataset '{dataset.repo_id}' rows are not ordered by global index 0..N-1, and the latent cache "
                "stores the latent of global index i at row i. Rewrite it as a LeRobotDataset whose rows run "
                "0..N-1 in order (as lerobot-record and LeRobot's dataset tools write them), then rerun "
                "lerobot-wm-precompute."
            )
        self.episode_of = np.asarray(table.column("episode_index").to_numpy())
        # float32 timestamps widened to Python floats, exactly like `item["timestamp"].item()`.
        self.timestamps = np.asarray(table.column("timestamp").to_numpy()).astype(np.float32)
        if self.is_video:
            episodes = meta.episodes
            self.from_ts = [float(x) for x in episodes[f"videos/{camera}/from_timestamp"]]
            self.paths = [dataset.root / meta.get_video_file_path(e, camera) for e in range(len(episodes))]

    def read(self, start: int, end: int) -> torch.Tensor:
        """Frames [end - start, C, H, W] float32 in [0, 1] of global indices start..end-1 (one episode)."""
        if self.is_video:
            from lerobot.datasets.video_utils import decode_video_frames

            ep = int(self.episode_of[start])
            ts = [self.from_ts[ep] + float(t) for t in self.timestamps[start:end]]
            return decode_video_frames(self.paths[ep], ts, TOLERANCE_S, self.video_backend)
        return torch.stack(self.dataset.hf_dataset[start:end][self.camera])


class BatchLoader:
    """Builds encoder inputs for a batch of global indices: windows gathered inside each episode."""

    def __init__(self, source: FrameSource, bounds: EpisodeBounds, window: int):
        """`window` m > 1 gives [n, m, C, H, W] windows t-m+1..t repeat-padded at the episode start."""
        self.source = source
        self.bounds = bounds
        self.window = window

    def load(self, start: int, end: int) -> torch.Tensor:
        """Encoder input for frames start..end-1: [n, C, H, W] (window 1) or [n, m, C, H, W]."""
        index = torch.arange(start, end)
        win = self.bounds.window_indices(index, self.window)  # [n, m]
        first = int(win.min())
        # The frames needed form the contiguous range [first, end): read it one episode piece at a time.
        pieces, pos = [], first
        while pos < end:
            piece_end = min(end, int(self.bounds.end[pos]) + 1)
            pieces.append(self.source.read(pos, piece_end))
            pos = piece_end
        frames = torch.cat(pieces) if len(pieces) > 1 else pieces[0]
        gathered = frames[win - first]  # [n, m, C, H, W]
        return gathered[:, 0] if self.window == 1 else gathered


def _shard_done(cache_dir: Path, shard: dict, dim: int) -> bool:
    """A shard counts as done when its file exists with the right shape (writes are atomic)."""
    path = cache_dir / shard["file"]
    if not path.is_file():
        return False
    try:
        rows = np.load(path, mmap_mode="r", allow_pickle=False)
    except (OSError, ValueError):
        return False
    return rows.shape == (shard["end"] - shard["start"], dim)


def _remove_stale_temp_files(cache_dir: Path, names: set[str]) -> None:
    """Delete temp files of `names` left by killed runs (never those of a live process)."""
    for tmp in cache_dir.glob(".*.tmp-*"):
        target, _, pid = tmp.name[1:].rpartition(".tmp-")
        if target not in names:
            continue
        try:
            os.kill(int(pid), 0)
            continue  # that writer is still alive
        except (ValueError, ProcessLookupError):
            pass
        except PermissionError:
            continue
        tmp.unlink(missing_ok=True)


CODEBOOK_DIR = "codebooks"  # fitted by lerobot-wm-fit-codebook inside the cache it was fitted on


def _rebuild_keeping_codebooks(cache_dir: Path) -> None:
    """Empty `cache_dir` for a rebuild, but keep its fitted codebooks.

    Our own errors tell users to rerun with --overwrite; that must not destroy a codebook a world_token_c
    run still needs. A codebook records the fingerprint of the cache it was fitted on, so one that no
    longer matches the rebuilt cache is refused by name when a policy loads it (never used silently).
    """
    books = cache_dir / CODEBOOK_DIR
    for entry in cache_dir.iterdir() if cache_dir.is_dir() else ():
        if entry != books:
            shutil.rmtree(entry) if entry.is_dir() else entry.unlink()
    if books.is_dir() and any(books.iterdir()):
        print(f"Kept the fitted codebooks in {books}.", file=sys.stderr)


def _prepare_cache_dir(cache_dir: Path, expected: dict, overwrite: bool, shard_frames_given: bool) -> dict:
    """Create or reuse the cache directory; returns the meta whose shard table this run follows."""
    meta = read_meta(cache_dir)
    if meta is not None and not overwrite and meta.get("fingerprint") == expected["fingerprint"] and (
        meta.get("format_version") == expected["format_version"]
    ):
        if shard_frames_given and meta.get("shard_frames") != expected["shard_frames"]:
            print(
                f"Note: keeping the existing cache's shard size {meta['shard_frames']} "
                f"(use --overwrite to rebuild with {expected['shard_frames']}).",
                file=sys.stderr,
            )
        return meta
    # Only a meta.json that is stale or unreadable (or --overwrite) wipes the directory: a directory
    # without one may be a sibling --shard_index process that has just created it.
    if cache_dir.exists() and (overwrite or (cache_dir / META_FILE).exists()):
        reason = "--overwrite" if overwrite else ("stale fingerprint" if meta else "unreadable meta.json")
        print(f"Rebuilding latent cache at {cache_dir} ({reason}).", file=sys.stderr)
        _rebuild_keeping_codebooks(cache_dir)
    cache_dir.mkdir(parents=True, exist_ok=True)
    write_meta(cache_dir, expected)
    return expected


def _finish_if_complete(cache_dir: Path, meta: dict, dim: int) -> bool:
    """Mark the cache complete when every shard exists and is finite; True when it is complete."""
    shards = meta["shards"]
    if not all(_shard_done(cache_dir, s, dim) for s in shards):
        return False
    checked = []
    for s in shards:
        data = (cache_dir / s["file"]).read_bytes()
        rows = np.load(io.BytesIO(data), allow_pickle=False)
        if not np.isfinite(rows).all():
            (cache_dir / s["file"]).unlink()
            raise LatentCacheError(f"Shard {s['file']} holds NaN/Inf latents; removed it, rerun to recompute.")
        checked.append({**s, "sha256": hashlib.sha256(data).hexdigest()})
    _remove_stale_temp_files(cache_dir, {META_FILE} | {s["file"] for s in shards})
    if not meta.get("complete") or shards != checked:
        write_meta(cache_dir, {**meta, "shards": checked, "complete": True})
    return True


def precompute_camera(
    dataset,
    camera: str,
    encoder: WorldEncoder,
    cache_root: str | Path | None,
    batch_size: int = 32,
    num_workers: int = 2,
    num_shards: int = 1,
    shard_index: int = 0,
    shard_frames: int | None = None,
    video_backend: str = "pyav",
    overwrite: bool = False,
    progress: bool = True,
) -> tuple[Path, bool]:
    """Fill this process's shards of one camera's cache; returns (cache dir, whether it is complete)."""
    from tqdm import tqdm

    identity = DatasetIdentity.from_meta(dataset.meta)
    enc_id = encoder.identity
    cache_dir = cache_dir_for(cache_root, identity, camera, enc_id)
    expected = build_meta(identity, camera, enc_id, shard_frames or DEFAULT_SHARD_FRAMES)
    meta = _prepare_cache_dir(cache_dir, expected, overwrite, shard_frames is not None)
    mine = [s for i, s in enumerate(meta["shards"]) if i % num_shards == shard_index]
    _remove_stale_temp_files(cache_dir, {s["file"] for s in mine})
    todo = [s for s in mine if not _shard_done(cache_dir, s, enc_id.dim)]

    bounds = EpisodeBounds.from_identity(identity)
    loader = BatchLoader(FrameSource(dataset, camera, video_backend), bounds, enc_id.window)
    # Batches start at shard starts so batch composition, and hence every byte, is the same whatever
    # was done before a kill or however the shards are split between processes.
    batches = [(s, b, min(b + batch_size, s["end"])) for s in todo for b in range(s["start"], s["end"], batch_size)]
    bar = tqdm(
        total=sum(s["end"] - s["start"] for s in todo),
        desc=f"{camera} -> {enc_id.name}",
        unit="frame",
        disable=not progress,
    )
    pending: dict[str, list[np.ndarray]] = {}
    with ThreadPoolExecutor(max_workers=max(1, num_workers)) as pool:
        # Bounded look-ahead: decoding runs ahead of encoding by a few batches, not the whole dataset.
        queue: deque = deque()
        it = iter(batches)
        for _ in range(max(2, 2 * num_workers)):
            nxt = next(it, None)
            if nxt is not None:
                queue.append((nxt, pool.submit(loader.load, nxt[1], nxt[2])))
        while queue:
            (shard, start, end), future = queue.popleft()
            frames = future.result()
            nxt = next(it, None)
            if nxt is not None:
                queue.append((nxt, pool.submit(loader.load, nxt[1], nxt[2])))
            z = encoder.encode(frames).cpu().numpy()
            bad = np.nonzero(~np.isfinite(z).all(axis=1))[0]
            if bad.size:
                raise LatentCacheError(
                    f"Encoder '{enc_id.name}' produced NaN/Inf latents for frames {(bad[:5] + start).tolist()} "
                    f"of camera '{camera}'; nothing was written for them. Check the frames and the encoder "
                    f"(half precision can overflow: try --dtype=float32)."
                )
            pending.setdefault(shard["file"], []).append(z)
            bar.update(end - start)
            if end == shard["end"]:
                write_shard(cache_dir, shard["file"], np.concatenate(pending.pop(shard["file"])))
    bar.close()
    return cache_dir, _finish_if_complete(cache_dir, meta, enc_id.dim)


def _train_flags(args, cameras: list[str], view: Path | None) -> str:
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
    caches this tool wrote from the same flags, and `_train_flags` reads them. The help is worded for
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
        print(f"All caches complete under {root}. Train with:\n  lerobot-train {_train_flags(args, cameras, view)} ...")
        if view is not None:
            print(
                "Policies that read camera images in training (smolvla_world) train on the dataset itself:\n"
                f"  lerobot-train {_train_flags(args, cameras, None)} ..."
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
