"""The wheel: built from this tree, installed into a fresh venv next to the CI venv's LeRobot, it
registers the three policy types with the stock `lerobot-train` / `lerobot-eval` from outside the repo.
"""

import os
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
TYPES = ("world_f", "world_token_c", "smolvla_world")
# Runs a console script of the venv's visible distributions by name: LeRobot's own scripts live in the CI
# venv's bin/, which the fresh venv does not have, while their entry points are found through its path.
RUN_ENTRY_POINT = (
    "import sys; from importlib.metadata import entry_points; "
    "(ep,) = entry_points(group='console_scripts', name=sys.argv[1]); sys.argv = sys.argv[1:]; sys.exit(ep.load()())"
)


def _clean_env() -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV", "PYTHONHOME")}
    env["HF_HUB_OFFLINE"] = "1"
    return env


@pytest.mark.slow
def test_wheel_installs_next_to_lerobot_and_registers_the_policy_types(tmp_path):
    dist = tmp_path / "dist"
    # A copy: setuptools writes build/ and *.egg-info next to the sources, and a stale build/lib would ship.
    src = tmp_path / "src"
    shutil.copytree(REPO_ROOT, src, ignore=shutil.ignore_patterns(".git", "build", "dist", "*.egg-info", "__pycache__",
                                                                   "outputs", ".pytest_cache"))  # fmt: skip
    # No build isolation: the build backend (setuptools) comes from the CI venv, so this runs offline.
    res = subprocess.run([sys.executable, "-m", "pip", "wheel", str(src), "--no-deps", "--no-build-isolation",
                          "--no-index", "-w", str(dist)], capture_output=True, text=True, cwd=tmp_path)  # fmt: skip
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-3000:]
    (wheel,) = dist.glob("lerobot_policy_world_modality-*.whl")
    with zipfile.ZipFile(wheel) as z:
        names = z.namelist()
        meta = z.read(next(n for n in names if n.endswith(".dist-info/METADATA"))).decode()
    # The distribution name LeRobot's plugin discovery imports (`lerobot_policy_*`, underscores).
    assert "\nName: lerobot_policy_world_modality\n" in meta and "License-Expression: Apache-2.0" in meta
    assert any(n.endswith(".dist-info/licenses/LICENSE") for n in names)
    assert not any(n.startswith(("tests/", "benchmarks/")) for n in names)

    venv = tmp_path / "venv"
    subprocess.run(
        [sys.executable, "-m", "venv", "--system-site-packages", "--without-pip", str(venv)], check=True
    )
    # `python -m venv` from inside a venv builds on the base interpreter, whose site-packages lack LeRobot;
    # this .pth adds the CI venv's site-packages after the new venv's own, so the wheel's copy wins.
    site = Path(subprocess.check_output([venv / "bin" / "python", "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                                        text=True).strip())  # fmt: skip
    ci_site = sysconfig.get_paths()["purelib"]
    (site / "ci_venv.pth").write_text(f"import site; site.addsitedir({ci_site!r})\n")
    py = venv / "bin" / "python"
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    env = _clean_env()
    res = subprocess.run([py, "-m", "pip", "install", "--no-deps", "--no-index", str(wheel)], capture_output=True,
                         text=True, cwd=outside, env=env)  # fmt: skip
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-3000:]
    assert (venv / "bin" / "lerobot-wm-card").exists()

    where = subprocess.run([py, "-c", "import lerobot_policy_world_modality as m, lerobot; print(m.__file__); print(lerobot.__file__)"],
                           capture_output=True, text=True, cwd=outside, env=env)  # fmt: skip
    assert where.returncode == 0, where.stderr
    plugin_file, lerobot_file = where.stdout.split()
    assert Path(plugin_file).is_relative_to(site) and not Path(plugin_file).is_relative_to(REPO_ROOT)
    assert Path(lerobot_file).is_relative_to(ci_site)
    for script in ("lerobot-train", "lerobot-eval"):
        res = subprocess.run([py, "-c", RUN_ENTRY_POINT, script, "--help"], capture_output=True, text=True,
                             cwd=outside, env=env, timeout=300)  # fmt: skip
        assert res.returncode == 0, res.stderr[-3000:]
        choices = next(ln for ln in res.stdout.splitlines() if "--policy.type {" in ln)
        for policy_type in TYPES:
            assert policy_type in choices, (script, choices)
