"""Shared by the benchmark scripts: writing their result JSON."""

from __future__ import annotations

from pathlib import Path

from lerobot_policy_world_modality.fileio import atomic_write_json


def write_result(path: str | Path, result: dict) -> Path:
    """Write `result` as indented JSON to `path` atomically (a killed run never leaves half a file)."""
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out, result)
    print(f"wrote {out}")
    return out
