"""Shared by the benchmark scripts: writing their result JSON."""

from __future__ import annotations

import json
from pathlib import Path


def write_result(path: str | Path, result: dict) -> Path:
    """Write `result` as indented JSON to `path` atomically (a killed run never leaves half a file)."""
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(out.suffix + ".tmp")
    tmp.write_text(json.dumps(result, indent=2) + "\n")
    tmp.replace(out)
    print(f"wrote {out}")
    return out
