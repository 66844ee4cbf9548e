"""Where a pretrained model or checkpoint comes from: a local directory or a Hugging Face Hub id.

One rule for every `name_or_path` the plugin accepts (world encoders, text encoders, SmolVLA
checkpoints): an existing directory is local; anything spelled like a filesystem path must exist, so
a mistyped path fails with a clear message instead of a Hub lookup error; the rest is a Hub id.
"""

from __future__ import annotations

from pathlib import Path


def resolve_source(
    name_or_path: str, what: str, expected: str, error: type[Exception] = FileNotFoundError
) -> tuple[str, bool]:
    """(what to load from, is_local_dir); raise `error` naming `what` and `expected` for a bad path."""
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        return str(path), True
    # A Hub id is "org/name"; anything spelled like a filesystem path must exist locally.
    looks_local = name_or_path.startswith(("/", "./", "../", "~", ".\\")) or name_or_path.count("/") > 1
    if looks_local or path.exists():
        raise error(f"{what} '{name_or_path}' is not a directory. Pass {expected}.")
    return name_or_path, False


def checkpoint_file(name_or_path: str, filename: str, what: str, expected: str) -> str:
    """Local path of `filename` in a checkpoint directory, or of its download from the Hub."""
    source, is_local = resolve_source(name_or_path, what, expected)
    if is_local:
        path = Path(source) / filename
        if not path.is_file():
            raise FileNotFoundError(f"{what} '{name_or_path}' has no {filename}. Pass {expected}.")
        return str(path)
    from huggingface_hub import hf_hub_download

    return hf_hub_download(repo_id=source, filename=filename)
