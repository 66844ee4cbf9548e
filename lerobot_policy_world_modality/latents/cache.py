"""On-disk latent cache: layout, identity, fingerprint, atomic shards, validation, episode windows.

One cache directory holds the world latents of every frame of one dataset for one (camera,
encoder, pooling, window) combination, row i being the latent of global frame `index` i:

    <cache_root>/<slug(repo_id)>/<slug(camera)>/<hash of repo_id, root, camera, encoder, pooling, window>/
        meta.json            identities (the dataset's with a digest of its files), shard table with each
                             shard's sha256, fingerprint, completion flag (deterministic bytes)
        shard-00000.npy ...  float32 [end - start, dim] rows of the global frame range [start, end)

Shards are written atomically (temp file, fsync, rename), so a killed `lerobot-wm-precompute`
leaves only complete shards and resumes where it stopped. `meta.json` has no timestamps, so a
resumed or split run produces exactly the bytes of an uninterrupted one. `LatentCache.open`
validates everything and every failure raises `LatentCacheError` naming the command that fixes it.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..constants import CACHE_ENV_VAR
from ..fileio import atomic_write_bytes, atomic_write_json, file_digest
from .encoder_base import EncoderIdentity

# Bumped when the on-disk layout changes; caches of another version are rebuilt.
# 2: shard checksums in meta.json, dataset content digest in the identity.
CACHE_FORMAT_VERSION = 2
# Bytes hashed at each end of a video file for the content digest: re-encoded videos differ there
# (container header, index), and hashing whole videos of a large dataset would cost minutes.
VIDEO_HASH_BYTES = 1 << 16
META_FILE = "meta.json"
# Rows per shard by default: large enough for few files, small enough that a kill loses little.
DEFAULT_SHARD_FRAMES = 1024


class LatentCacheError(RuntimeError):
    """A latent cache is missing, stale, unfinished or corrupt; the message names the fixing command."""


def default_cache_root() -> Path:
    """Root of all latent caches: $LEROBOT_WM_CACHE, else ~/.cache/lerobot_policy_world_modality/latents."""
    env = os.environ.get(CACHE_ENV_VAR)
    if env:
        return Path(env).expanduser()
    return Path.home() / ".cache" / "lerobot_policy_world_modality" / "latents"


@dataclass(frozen=True)
class DatasetIdentity:
    """What identifies a dataset's frames for the cache: where it lives and how its episodes are cut."""

    repo_id: str  # dataset repo id, e.g. "local/metaworld_drawer_close"
    root: str  # resolved local root of the dataset
    num_frames: int  # total number of frames (rows indexed by global `index`)
    fps: int  # recording frame rate
    episode_from: list[int] = field(default_factory=list)  # first global index of each episode
    episode_to: list[int] = field(default_factory=list)  # one past the last global index of each episode
    content: str = ""  # digest of the dataset's files (see `dataset_content_digest`): catches a re-recording

    @classmethod
    def from_meta(cls, meta: Any) -> DatasetIdentity:
        """Identity of an opened `LeRobotDatasetMetadata` (what `lerobot-train` hands policies)."""
        episodes = meta.episodes
        root = Path(meta.root).expanduser().resolve()
        return cls(
            repo_id=str(meta.repo_id),
            root=str(root),
            num_frames=int(meta.total_frames),
            fps=int(meta.fps),
            episode_from=[int(x) for x in episodes["dataset_from_index"]],
            episode_to=[int(x) for x in episodes["dataset_to_index"]],
            content=dataset_content_digest(root),
        )

    @classmethod
    def from_dataset(cls, repo_id: str, root: str | Path | None = None) -> DatasetIdentity:
        """Load the dataset's metadata (not its frames) and return its identity."""
        from lerobot.datasets.lerobot_dataset import LeRobotDatasetMetadata

        return cls.from_meta(LeRobotDatasetMetadata(repo_id, root=root))

    def to_dict(self) -> dict:
        """JSON-serialisable form, as stored in meta.json."""
        return asdict(self)


def dataset_content_digest(root: str | Path) -> str:
    """Digest of what a dataset's frames are: its tabular files in full, its videos by size and ends.

    Two recordings with the same episode lengths (a re-recording with another seed at the same root)
    have the same frame counts and boundaries, so without this their caches would look interchangeable.
    Digests are kept per process by (path, size, mtime), so opening several caches hashes each file once.
    """
    root = Path(root)
    parts = []
    for sub, partial in (("data", False), ("videos", True)):
        for path in sorted((root / sub).rglob("*")) if (root / sub).is_dir() else ():
            if path.is_file():
                parts.append([path.relative_to(root).as_posix(), file_digest(path, VIDEO_HASH_BYTES if partial else 0)])
    return _digest(parts)


def _slug(text: str) -> str:
    """A file-system-safe folder name for a repo id or a camera key."""
    return re.sub(r"[^A-Za-z0-9._-]+", "_", text).strip("_") or "_"


def _digest(obj: Any) -> str:
    """sha256 of the canonical JSON form of `obj` (stable across runs and machines)."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def cache_dir_for(
    cache_root: str | Path | None, dataset: DatasetIdentity, camera: str, encoder: EncoderIdentity
) -> Path:
    """Directory of the cache of (`dataset`, `camera`, `encoder` name/pooling/window) under `cache_root`.

    The revision is deliberately not part of the directory name: a new encoder revision finds the
    old directory and reports it as stale instead of silently computing a second cache beside it.
    """
    root = Path(cache_root).expanduser() if cache_root is not None else default_cache_root()
    key = _digest([dataset.repo_id, dataset.root, camera, encoder.name, encoder.pooling, encoder.window])[:16]
    return root / _slug(dataset.repo_id) / _slug(camera) / key


def cache_fingerprint(dataset: DatasetIdentity, camera: str, encoder: EncoderIdentity) -> str:
    """Hash of everything that decides the cached bytes: encoder identity (with revision), dataset, camera."""
    return _digest({"encoder": encoder.to_dict(), "dataset": dataset.to_dict(), "camera": camera})


def precompute_command(
    dataset: DatasetIdentity,
    camera: str,
    encoder: EncoderIdentity,
    cache_root: str | Path | None = None,
    overwrite: bool = False,
) -> str:
    """The exact `lerobot-wm-precompute` command that (re)builds this cache."""
    parts = [
        "lerobot-wm-precompute",
        f"--dataset.repo_id={dataset.repo_id}",
        f"--dataset.root={dataset.root}",
        f"--encoder={encoder.name}",
        f"--camera={camera}",
    ]
    # Only options that differ from the defaults, so the command stays readable.
    if encoder.pooling not in ("none", "", None):
        parts.append(f"--pooling={encoder.pooling}")
    if encoder.window != 1:
        parts.append(f"--window={encoder.window}")
    dtype = (encoder.extra or {}).get("dtype")
    if dtype not in (None, "float32"):
        parts.append(f"--dtype={dtype}")
    if cache_root is not None and Path(cache_root).expanduser().resolve() != default_cache_root().resolve():
        parts.append(f"--cache_root={cache_root}")
    if overwrite:
        parts.append("--overwrite")
    return " ".join(parts)


def plan_shards(num_frames: int, shard_frames: int = DEFAULT_SHARD_FRAMES) -> list[dict]:
    """The shard table: contiguous global-index ranges of `shard_frames` rows (the last may be shorter)."""
    if shard_frames < 1:
        raise ValueError(f"shard_frames must be >= 1, got {shard_frames}.")
    return [
        {"file": f"shard-{i:05d}.npy", "start": start, "end": min(start + shard_frames, num_frames)}
        for i, start in enumerate(range(0, num_frames, shard_frames))
    ]


def build_meta(
    dataset: DatasetIdentity,
    camera: str,
    encoder: EncoderIdentity,
    shard_frames: int = DEFAULT_SHARD_FRAMES,
    complete: bool = False,
) -> dict:
    """The content of meta.json for a cache (no timestamps, hosts or pids: identical on every run)."""
    return {
        "format_version": CACHE_FORMAT_VERSION,
        "fingerprint": cache_fingerprint(dataset, camera, encoder),
        "camera": camera,
        "encoder": encoder.to_dict(),
        "dim": encoder.dim,
        "dtype": "float32",
        "window": encoder.window,
        "pooling": encoder.pooling,
        "dataset": dataset.to_dict(),
        "shard_frames": shard_frames,
        "shards": plan_shards(dataset.num_frames, shard_frames),
        "complete": complete,
    }


def write_meta(cache_dir: Path, meta: dict) -> None:
    """Atomically write meta.json with deterministic formatting."""
    atomic_write_json(cache_dir / META_FILE, meta, sort_keys=True)


def read_meta(cache_dir: Path) -> dict | None:
    """meta.json of `cache_dir`, or None when there is none or it cannot be parsed."""
    try:
        return json.loads((cache_dir / META_FILE).read_text())
    except (OSError, ValueError):
        return None


def write_shard(cache_dir: Path, file: str, rows: np.ndarray) -> None:
    """Atomically write one shard as a float32 .npy file."""
    import io

    buf = io.BytesIO()
    np.save(buf, np.ascontiguousarray(rows, dtype=np.float32), allow_pickle=False)
    atomic_write_bytes(cache_dir / file, buf.getvalue())


def _describe_changes(old: dict, new: dict) -> list[str]:
    """Human-readable differences between a stored meta.json and the current identities."""
    changes: list[str] = []
    if old.get("format_version") != CACHE_FORMAT_VERSION:
        changes.append(f"cache format version {old.get('format_version')} -> {CACHE_FORMAT_VERSION}")
    if old.get("camera") != new["camera"]:
        changes.append(f"camera {old.get('camera')!r} -> {new['camera']!r}")
    old_enc, new_enc = old.get("encoder") or {}, new["encoder"]
    for key in sorted(set(old_enc) | set(new_enc)):
        if old_enc.get(key) != new_enc.get(key):
            changes.append(f"encoder {key} {old_enc.get(key)!r} -> {new_enc.get(key)!r}")
    old_ds, new_ds = old.get("dataset") or {}, new["dataset"]
    for key in ("repo_id", "root", "num_frames", "fps"):
        if old_ds.get(key) != new_ds.get(key):
            changes.append(f"dataset {key} {old_ds.get(key)!r} -> {new_ds.get(key)!r}")
    if old_ds.get("content") != new_ds.get("content"):
        changes.append("dataset content changed (its data or video files differ: re-recorded or edited)")
    if (old_ds.get("episode_from"), old_ds.get("episode_to")) != (new_ds["episode_from"], new_ds["episode_to"]):
        n_old, n_new = len(old_ds.get("episode_from") or []), len(new_ds["episode_from"])
        changes.append(
            f"dataset episodes changed ({n_old} -> {n_new} episodes)"
            if n_old != n_new
            else f"dataset episode boundaries changed ({n_new} episodes)"
        )
    return changes or ["fingerprint differs (unknown field)"]


class EpisodeBounds:
    """Per-frame episode boundaries and vectorised history/future window lookups in global indices."""

    def __init__(self, episode_from: list[int] | torch.Tensor, episode_to: list[int] | torch.Tensor):
        """Build from the episodes' [from, to) global-index ranges (`meta.episodes` columns)."""
        ep_from = torch.as_tensor(episode_from, dtype=torch.long).flatten()
        ep_to = torch.as_tensor(episode_to, dtype=torch.long).flatten()
        if ep_from.numel() != ep_to.numel() or bool((ep_to <= ep_from).any()):
            raise ValueError("Episode bounds need matching from/to lists with to > from for every episode.")
        self.num_frames = int(ep_to.max()) if ep_to.numel() else 0
        # Fill per-frame tables; frames no episode covers keep -1 and are rejected on lookup.
        self.start = torch.full((self.num_frames,), -1, dtype=torch.long)
        self.end = torch.full((self.num_frames,), -1, dtype=torch.long)  # last frame of the episode (inclusive)
        lengths = ep_to - ep_from
        owner_from = torch.repeat_interleave(ep_from, lengths)
        owner_to = torch.repeat_interleave(ep_to - 1, lengths)
        frames = torch.cat(
            [torch.arange(a, b) for a, b in zip(ep_from.tolist(), ep_to.tolist())] + [torch.empty(0, dtype=torch.long)]
        )
        self.start[frames] = owner_from
        self.end[frames] = owner_to

    @classmethod
    def from_identity(cls, dataset: DatasetIdentity) -> EpisodeBounds:
        """Bounds of a dataset identity."""
        return cls(dataset.episode_from, dataset.episode_to)

    def _check(self, index: torch.Tensor) -> torch.Tensor:
        index = torch.as_tensor(index, dtype=torch.long).flatten().cpu()
        if index.numel() and (int(index.min()) < 0 or int(index.max()) >= self.num_frames):
            raise IndexError(f"Frame index out of range [0, {self.num_frames}): got {index.tolist()[:8]}...")
        if index.numel() and bool((self.start[index] < 0).any()):
            raise IndexError("Frame index not covered by any episode.")
        return index

    def history_indices(self, index: torch.Tensor, T: int) -> torch.Tensor:
        """[B, T] indices t-T+1..t, clamped to each frame's episode start (repeat-padded)."""
        index = self._check(index)
        offsets = torch.arange(-T + 1, 1, dtype=torch.long)
        return torch.maximum(index[:, None] + offsets[None, :], self.start[index][:, None])

    def future_indices(
        self, index: torch.Tensor, K: int, stride: int = 1
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """([B, K] indices t+s, t+2s, ..., t+Ks (s = `stride`) clamped to the episode's last frame,
        [B, K] bool valid = not clamped)."""
        if stride < 1:
            raise ValueError(f"The future stride must be >= 1, got {stride}.")
        index = self._check(index)
        raw = index[:, None] + stride * torch.arange(1, K + 1, dtype=torch.long)[None, :]
        last = self.end[index][:, None]
        return torch.minimum(raw, last), raw <= last

    def remaining_fraction(self, index: torch.Tensor) -> torch.Tensor:
        """[B] float fraction of each frame's episode still to go: 1 at its first frame, 0 at its last."""
        index = self._check(index)
        span = (self.end[index] - self.start[index]).clamp(min=1)
        return (self.end[index] - index).float() / span.float()

    def window_indices(self, index: torch.Tensor, m: int) -> torch.Tensor:
        """[B, m] frames that make a video encoder's window for t (same as `history_indices(index, m)`)."""
        return self.history_indices(index, m)


def _first_bad_rows(latents: torch.Tensor, limit: int = 5) -> list[int]:
    bad = (~torch.isfinite(latents)).any(dim=1).nonzero().flatten()
    return bad[:limit].tolist()


class LatentCache:
    """A validated, fully loaded latent cache: `.latents` float32 [N, D], `.bounds`, `.meta`, `.lookup`."""

    def __init__(self, cache_dir: Path, latents: torch.Tensor, bounds: EpisodeBounds, meta: dict):
        """Use `LatentCache.open`; this constructor does no validation."""
        self.cache_dir = cache_dir
        self.latents = latents
        self.bounds = bounds
        self.meta = meta
        self._target_stats: dict[tuple, dict] = {}

    @property
    def dim(self) -> int:
        """Latent dimension."""
        return int(self.latents.shape[1])

    def target_stats(self, K: int, stride: int, delta: bool) -> dict[str, torch.Tensor]:
        """`target_statistics` of this cache (computed once per (K, stride, delta))."""
        key = (K, stride, delta)
        if key not in self._target_stats:
            self._target_stats[key] = target_statistics(self.latents, self.bounds, K, stride, delta)
        return self._target_stats[key]

    @classmethod
    def open(
        cls,
        cache_root: str | Path | None,
        dataset: DatasetIdentity,
        camera: str,
        encoder: EncoderIdentity,
    ) -> LatentCache:
        """Find, validate and load the cache; raises `LatentCacheError` naming the fixing command.

        Checks, in order: the directory and meta.json exist; the fingerprint matches the current
        dataset (content included) and encoder (else reports what changed); every shard is finished;
        the shard table is the one the dataset's frame count gives; row count and dimension match; no
        NaN/Inf rows; every shard's bytes match their recorded sha256.
        """
        cache_dir = cache_dir_for(cache_root, dataset, camera, encoder)
        fix = precompute_command(dataset, camera, encoder, cache_root)
        what = f"camera '{camera}' of dataset '{dataset.repo_id}' ({dataset.root}) with encoder '{encoder.name}'"
        meta = read_meta(cache_dir)
        if meta is None:
            if (cache_dir / META_FILE).exists():
                raise LatentCacheError(
                    f"Corrupt latent cache for {what}: {cache_dir / META_FILE} cannot be read. "
                    f"Rebuild it with:\n  {precompute_command(dataset, camera, encoder, cache_root, overwrite=True)}"
                )
            raise LatentCacheError(
                f"Missing latent cache for {what}: nothing at {cache_dir}. Build it with:\n  {fix}"
            )
        expected = build_meta(dataset, camera, encoder, int(meta.get("shard_frames") or DEFAULT_SHARD_FRAMES))
        if meta.get("fingerprint") != expected["fingerprint"] or meta.get("format_version") != CACHE_FORMAT_VERSION:
            changes = "; ".join(_describe_changes(meta, expected))
            raise LatentCacheError(
                f"Stale latent cache for {what} at {cache_dir}: it was built for different inputs "
                f"({changes}). Rebuild it with:\n  {fix}"
            )
        shards = meta.get("shards") or []
        missing = [s for s in shards if not (cache_dir / s["file"]).is_file()]
        if missing or not meta.get("complete"):
            ranges = ", ".join(f"{s['file']} [{s['start']}, {s['end']})" for s in missing[:5])
            detail = f"{len(missing)} of {len(shards)} shards missing ({ranges})" if missing else "never marked complete"
            raise LatentCacheError(
                f"Unfinished latent cache for {what} at {cache_dir}: {detail}. "
                f"Finish it (completed shards are kept) with:\n  {fix}"
            )
        rebuild = precompute_command(dataset, camera, encoder, cache_root, overwrite=True)
        plan = plan_shards(dataset.num_frames, int(meta.get("shard_frames") or DEFAULT_SHARD_FRAMES))
        if [{k: s.get(k) for k in ("file", "start", "end")} for s in shards] != plan:
            raise LatentCacheError(
                f"Corrupt latent cache at {cache_dir}: the shard table in {META_FILE} does not match the "
                f"dataset's {dataset.num_frames} frames (entries edited, reordered or missing). Rebuild the "
                f"cache with:\n  {rebuild}"
            )
        parts = []
        for s in shards:
            try:
                rows = np.load(cache_dir / s["file"], allow_pickle=False)
            except (OSError, ValueError) as err:
                raise LatentCacheError(
                    f"Corrupt shard {cache_dir / s['file']} ({err}). Rebuild the cache with:\n  {rebuild}"
                ) from err
            if rows.ndim != 2 or rows.shape[1] != encoder.dim:
                raise LatentCacheError(
                    f"Latent dim mismatch in {cache_dir / s['file']}: shard holds shape {tuple(rows.shape)}, "
                    f"encoder '{encoder.name}' gives dim {encoder.dim}. Rebuild the cache with:\n  {rebuild}"
                )
            if rows.shape[0] != s["end"] - s["start"]:
                raise LatentCacheError(
                    f"Frame count mismatch in {cache_dir / s['file']}: {rows.shape[0]} rows for frames "
                    f"[{s['start']}, {s['end']}). Rebuild the cache with:\n  {rebuild}"
                )
            parts.append(rows.astype(np.float32, copy=False))
        latents = torch.from_numpy(np.concatenate(parts, axis=0)) if parts else torch.empty(0, encoder.dim)
        if latents.shape[0] != dataset.num_frames:
            raise LatentCacheError(
                f"Frame count mismatch: cache at {cache_dir} holds {latents.shape[0]} latents, dataset "
                f"'{dataset.repo_id}' has {dataset.num_frames} frames. Rebuild the cache with:\n  {rebuild}"
            )
        bad = _first_bad_rows(latents)
        if bad:
            raise LatentCacheError(
                f"NaN/Inf latents in cache at {cache_dir}, first bad frame indices {bad}. "
                f"Rebuild the cache with:\n  {rebuild}"
            )
        # Last, so the damage the checks above describe more precisely is reported as such. Each file is
        # hashed once per process and version (digests are kept by path, size and mtime).
        for s in shards:
            if file_digest(cache_dir / s["file"]) != s.get("sha256"):
                raise LatentCacheError(
                    f"Corrupt shard {cache_dir / s['file']}: its checksum differs from the one recorded in "
                    f"{META_FILE} (the file was changed after precompute wrote it). Rebuild the cache with:\n  {rebuild}"
                )
        return cls(cache_dir, latents, EpisodeBounds.from_identity(dataset), meta)

    def lookup(self, index: torch.Tensor, T: int, K: int, stride: int = 1) -> dict[str, torch.Tensor]:
        """Latents of frames `index` [B]: latent [B,D], history [B,T,D], future [B,K,D], future_valid [B,K],
        and remaining [B] (the fraction of the episode still to go, `EpisodeBounds.remaining_fraction`).

        History is repeat-padded at the episode start, future (every `stride`-th frame) clamped to the
        episode end (with future_valid False there); results live on the cache's device (CPU).
        """
        index = torch.as_tensor(index, dtype=torch.long).flatten().cpu()
        hist = self.bounds.history_indices(index, T)
        fut, valid = self.bounds.future_indices(index, K, stride)
        return {
            "latent": self.latents[index],
            "history": self.latents[hist],
            "future": self.latents[fut],
            "future_valid": valid,
            "remaining": self.bounds.remaining_fraction(index),
        }


# Rows per chunk when summing statistics: a whole cache in float64 would double its memory.
STATS_CHUNK_ROWS = 65_536


def _mean_std(
    latents: torch.Tensor, rows: torch.Tensor, minus: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-dimension mean and population std (float64) of latents[rows] (- latents[minus]), summed in
    chunks; (0, 1) when there are no rows."""
    dim = latents.shape[1]
    total = torch.zeros(dim, dtype=torch.float64)
    squares = torch.zeros(dim, dtype=torch.float64)
    for i in range(0, rows.numel(), STATS_CHUNK_ROWS):
        chunk = latents[rows[i : i + STATS_CHUNK_ROWS]].double()
        if minus is not None:
            chunk = chunk - latents[minus[i : i + STATS_CHUNK_ROWS]].double()
        total += chunk.sum(0)
        squares += chunk.pow(2).sum(0)
    if rows.numel() == 0:
        return torch.zeros(dim, dtype=torch.float64), torch.ones(dim, dtype=torch.float64)
    mean = total / rows.numel()
    return mean, (squares / rows.numel() - mean.pow(2)).clamp(min=0).sqrt()


def latent_input_statistics(latents: torch.Tensor) -> dict[str, torch.Tensor]:
    """Per-dimension mean and std [D] (float32) of every latent of a cache, for standardising a trunk's
    input (`latent_input_norm="dataset"`).

    A dimension that varies less than the median dimension gets the median std: standardising must
    balance the dimensions that carry the scene, not blow near-constant ones (a thumbnail's background)
    up to the scale of the rest.
    """
    mean, std = _mean_std(latents, torch.arange(latents.shape[0]))
    floor = max(float(std.median()), 1e-8)
    return {"input_mean": mean.float(), "input_std": std.clamp(min=floor).float()}


def target_statistics(latents: torch.Tensor, bounds: EpisodeBounds, K: int, stride: int, delta: bool) -> dict:
    """Per-dimension statistics of the world targets over every frame of a cache, for standardisation.

    Returns float32 tensors: latent_mean / latent_std [D] of the latents themselves (what the Prophet
    reads), step_mean / step_std [D] of one-frame changes z_t - z_{t-1} inside episodes, and
    target_mean / target_std [K, D] of the target at each horizon k = 1..K (z_{t+ks}, or
    z_{t+ks} - z_t with `delta`) over the frames t whose t+ks lies inside t's episode (the pairs the
    world loss trains on). Sums run in float64, in chunks. A dimension that never varies gets a small
    floor (1e-3 of the median std of the others) instead of std 0, so standardising never divides by zero.
    """
    frames = torch.arange(bounds.num_frames)
    latent_mean, latent_std = _mean_std(latents, frames)
    # One-frame changes inside episodes (what prophet_input="motion" reads).
    inside = frames[bounds.start[frames] < frames]
    step_mean, step_std = _mean_std(latents, inside, inside - 1)
    fut, valid = bounds.future_indices(frames, K, stride)
    target_mean, target_std = [], []
    for k in range(K):
        m, s = _mean_std(latents, fut[valid[:, k], k], frames[valid[:, k]] if delta else None)
        target_mean.append(m)
        target_std.append(s)

    def floored(std: torch.Tensor) -> torch.Tensor:
        floor = max(float(std.median()) * 1e-3, 1e-8)
        return std.clamp(min=floor).float()

    return {
        "latent_mean": latent_mean.float(),
        "latent_std": floored(latent_std),
        "target_mean": torch.stack(target_mean).float(),
        "target_std": torch.stack([floored(s) for s in target_std]),
        "step_mean": step_mean.float(),
        "step_std": floored(step_std),
    }
