"""A recording stand-in for the Hugging Face Hub's HTTP client, for push tests run in a subprocess.

`recording_main` replaces only `HfApi.create_repo` and `HfApi.upload_folder` (the two calls LeRobot's
`push_model_to_hub` and its processors' `push_to_hub` make) and then runs a stock entry point. Each
upload copies the files `upload_folder` would send (same allow / ignore filtering, through
huggingface_hub's own `filter_repo_objects`) into `$WM_TEST_HUB_RECORD/<repo_id>/`, so that folder is
what the Hub repository would hold, and appends one JSON line per call to `$WM_TEST_HUB_RECORD/calls.jsonl`.

Launch: `python -c "<sys.path insert>; from support.hub import recording_main; recording_main()" <entry point> <args>`.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
from pathlib import Path
from types import SimpleNamespace


def _log(record: Path, call: dict) -> None:
    with open(record / "calls.jsonl", "a") as f:
        f.write(json.dumps(call) + "\n")


def install(record: Path) -> None:
    """Patch HfApi's two network calls to record into `record` instead."""
    from huggingface_hub import HfApi, RepoUrl
    from huggingface_hub.utils import filter_repo_objects

    record.mkdir(parents=True, exist_ok=True)

    def create_repo(self, repo_id, **kwargs):
        _log(record, {"call": "create_repo", "repo_id": repo_id})
        return RepoUrl(f"https://huggingface.co/{repo_id}")

    def upload_folder(self, *, repo_id, folder_path, allow_patterns=None, ignore_patterns=None, **kwargs):
        folder = Path(folder_path)
        files = sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file())
        sent = list(
            filter_repo_objects(files, allow_patterns=allow_patterns, ignore_patterns=ignore_patterns)
        )
        dest = record / repo_id
        for rel in sent:
            (dest / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(folder / rel, dest / rel)
        _log(record, {"call": "upload_folder", "repo_id": repo_id, "files": sent})
        return SimpleNamespace(repo_url=RepoUrl(f"https://huggingface.co/{repo_id}"), oid="0" * 40)

    HfApi.create_repo = create_repo
    HfApi.upload_folder = upload_folder


def recording_main() -> None:
    """Run the console entry point named by argv[1] with the recording stand-in installed."""
    from importlib.metadata import entry_points

    install(Path(os.environ["WM_TEST_HUB_RECORD"]))
    name = sys.argv[1]
    (ep,) = entry_points(group="console_scripts", name=name)
    sys.argv = [name, *sys.argv[2:]]
    sys.exit(ep.load()())
