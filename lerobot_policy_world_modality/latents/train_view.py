"""Latent-only training views: a LeRobotDataset without its cameras, for policies that read cached latents.

LeRobotDataset 0.4.4 decodes every video key of every sample, whether or not the policy reads it,
and decoding costs far more than the tabular columns (figures in docs/benchmarks.md). `world_f` reads only
cached world latents and the robot state in training, so decoding frames would dominate its training
time for nothing. A training view is a small copy of the dataset's tabular part (parquet data and
metadata, no videos, no image columns) that stock `lerobot-train` loads like any local dataset:

    lerobot-train --policy.type=world_f --dataset.repo_id=<repo> --dataset.root=<view dir> ...

Its `meta/info.json` names the source dataset and its cameras, so the policy reads the latent cache
of the source dataset (`source_of_view`). Global frame indices are unchanged, so cache rows line up.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

import pyarrow.parquet as pq
import torch

from ..constants import EPISODE_SUCCESS

# Key added to the view's meta/info.json.
VIEW_INFO_KEY = "world_modality_view"
_VIEW_FORMAT = 1


def _slug(text: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in text)


def default_view_root(cache_root: str | Path, repo_id: str, dataset_root: str | Path) -> Path:
    """Where the training view of a dataset lives: next to its latent caches."""
    digest = hashlib.sha256(str(Path(dataset_root).resolve()).encode()).hexdigest()[:12]
    return Path(cache_root) / "views" / f"{_slug(repo_id)}-{digest}"


def _source_stamp(source_root: Path) -> str:
    """Hash of the source's metadata and data files (names and sizes): changes when the dataset does."""
    h = hashlib.sha256()
    h.update((source_root / "meta" / "info.json").read_bytes())
    for path in sorted((source_root / "data").glob("*/*.parquet")):
        h.update(f"{path.relative_to(source_root)}:{path.stat().st_size}".encode())
    return h.hexdigest()[:16]


def source_of_view(info: dict) -> dict | None:
    """The `{repo_id, root, cameras}` of the source dataset if `info` is a training view's, else None."""
    view = info.get(VIEW_INFO_KEY)
    return dict(view) if view else None


def write_training_view(repo_id: str, source_root: str | Path, view_root: str | Path) -> Path:
    """Write (or reuse, when the source is unchanged) the camera-free training view of a local dataset.

    The view is built in a temporary sibling folder and moved into place in one rename, so an
    interrupted run never leaves a half-written view behind.
    """
    source_root = Path(source_root).resolve()
    view_root = Path(view_root)
    info = json.loads((source_root / "meta" / "info.json").read_text())
    cameras = [k for k, ft in info["features"].items() if ft.get("dtype") in ("video", "image")]
    stamp = _source_stamp(source_root)

    if (view_root / "meta" / "info.json").exists():
        existing = source_of_view(json.loads((view_root / "meta" / "info.json").read_text())) or {}
        if existing.get("source_stamp") == stamp and existing.get("format") == _VIEW_FORMAT:
            return view_root

    tmp = view_root.with_name(f".{view_root.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    (tmp / "meta").mkdir(parents=True)

    for path in sorted((source_root / "data").glob("*/*.parquet")):
        table = pq.read_table(path)
        table = table.drop_columns([c for c in cameras if c in table.column_names])
        out = tmp / path.relative_to(source_root)
        out.parent.mkdir(parents=True, exist_ok=True)
        pq.write_table(table, out)
    for item in (source_root / "meta").iterdir():
        if item.name == "info.json":
            continue
        if item.is_dir():
            shutil.copytree(item, tmp / "meta" / item.name)
        else:
            shutil.copy2(item, tmp / "meta" / item.name)

    view_info = dict(info)
    view_info["features"] = {k: ft for k, ft in info["features"].items() if k not in cameras}
    if "total_videos" in info:
        view_info["total_videos"] = 0
    view_info[VIEW_INFO_KEY] = {
        "repo_id": repo_id,
        "root": str(source_root),
        "cameras": cameras,
        "camera_features": {k: info["features"][k] for k in cameras},
        "source_stamp": stamp,
        "format": _VIEW_FORMAT,
    }
    (tmp / "meta" / "info.json").write_text(json.dumps(view_info, indent=4))

    old = view_root.with_name(f".{view_root.name}.old-{os.getpid()}")
    if view_root.exists():
        view_root.rename(old)
    view_root.parent.mkdir(parents=True, exist_ok=True)
    tmp.rename(view_root)
    shutil.rmtree(old, ignore_errors=True)
    return view_root


def episode_success_table(dataset_root: str | Path, column: str = EPISODE_SUCCESS) -> torch.Tensor | None:
    """Per-episode success [num_episodes] (1.0 / 0.0; NaN for an episode with no frame) from the dataset's
    `column` (a per-frame mark written by recorders that keep failures), or None when it has none.

    Read from the parquet data, not the episode metadata: LeRobot's merge does not keep per-episode
    statistics of extra columns. A training view keeps the column, so its root works too.
    """
    files = sorted(Path(dataset_root).glob("data/*/*.parquet"))
    if not files or column not in pq.read_schema(files[0]).names:
        return None
    tables = [pq.read_table(f, columns=["episode_index", column]) for f in files]
    episodes = torch.cat([torch.tensor(t.column("episode_index").to_pylist()) for t in tables]).long()
    # A shape-(1,) feature may be stored as a scalar or a one-element list column, depending on the writer.
    marks = torch.cat([torch.tensor(t.column(column).to_pylist(), dtype=torch.float32).reshape(t.num_rows, -1)[:, 0]
                       for t in tables])  # fmt: skip
    table = torch.full((int(episodes.max()) + 1,), float("nan"))
    table[episodes] = marks
    return table


class EpisodeSuccess:
    """The success marks of a training dataset's episodes, looked up by a batch's `episode_index`.

    Built with `EpisodeSuccess.of(dataset_meta)` when a policy is constructed for training; calling it
    on a batch gives [B] bool (episodes without a mark count as successes), or None when the dataset
    has no marks (successes only) or the batch has no `episode_index`.
    """

    def __init__(self, table: torch.Tensor | None):
        self.table = table

    @classmethod
    def of(cls, dataset_meta) -> "EpisodeSuccess":
        """The marks of the dataset `dataset_meta` describes (none when it is None or has no mark column)."""
        return cls(episode_success_table(dataset_meta.root, EPISODE_SUCCESS) if dataset_meta is not None else None)

    @classmethod
    def for_policy(cls, config, dataset_meta) -> "EpisodeSuccess":
        """The marks a policy's training reads: those of `dataset_meta` when the progress head learns from
        them or `imitate_failures=false` leaves failed episodes out of the action loss (which refuses a
        training dataset without marks: it would silently imitate every episode)."""
        excludes = not getattr(config, "imitate_failures", True)
        marks = cls.of(dataset_meta if getattr(config, "progress_head", False) or excludes else None)
        if excludes and dataset_meta is not None and marks.table is None:
            raise ValueError(
                f"imitate_failures=false leaves failed episodes out of the action loss, but the training dataset "
                f"has no per-episode '{EPISODE_SUCCESS}' column to tell them apart: record it with "
                "lerobot-wm-record-metaworld (which marks every episode), or drop --policy.imitate_failures=false."
            )
        return marks

    def imitation_batch(self, batch: dict) -> dict:
        """The batch with every action step of a failed episode's frames marked as padding
        (`action_is_pad`), so the action loss imitates successes only; the batch itself when no marks."""
        success = self(batch)
        if success is None:
            return batch
        action = batch["action"]
        pad = batch.get("action_is_pad")
        if pad is None:
            pad = torch.zeros(action.shape[:2], dtype=torch.bool, device=action.device)
        return {**batch, "action_is_pad": pad | ~success.to(pad.device).view(-1, 1)}

    def __call__(self, batch: dict) -> torch.Tensor | None:
        """[B] bool success of the batch's episodes, or None (see the class docstring)."""
        episodes = batch.get("episode_index")
        if self.table is None or episodes is None:
            return None
        episodes = torch.as_tensor(episodes)
        marks = self.table[episodes.long().flatten().cpu()]
        return (marks.nan_to_num(1.0) > 0.5).to(episodes.device)

