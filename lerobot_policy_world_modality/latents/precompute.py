"""Encoding every frame of a LeRobotDataset camera into the latent cache (the work behind
`lerobot-wm-precompute`, whose command line is `tools/precompute.py`).

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

import hashlib
import io
import os
import shutil
import sys
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
    read_meta,
    write_meta,
    write_shard,
)
from .encoder_base import WorldEncoder

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
