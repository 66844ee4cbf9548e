"""`lerobot-wm-record-metaworld` end to end: the console script in a subprocess, the real MetaWorld simulator,
the dataset reloaded through LeRobot, frames compared with what LeRobot's MetaWorld env hands `lerobot-eval`.

Replaying the recorded actions through the public `MetaworldEnv.reset/step` (after seeding np.random the way
the recorder does) must reproduce every recorded state and frame: that checks orientation, frame/action
alignment and the seeding in one go.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from lerobot.datasets.lerobot_dataset import LeRobotDataset
from lerobot.envs.configs import MetaworldEnv as MetaworldEnvConfig
from lerobot.envs.metaworld import TASK_DESCRIPTIONS, MetaworldEnv

from lerobot_policy_world_modality.tools.record_metaworld import (
    STAGING_SUFFIX,
    episode_seed,
)

CLI = str(Path(sys.executable).parent / "lerobot-wm-record-metaworld")
EVAL_FPS = MetaworldEnvConfig.__dataclass_fields__["fps"].default


def _run(*args: str, timeout: int = 600) -> subprocess.CompletedProcess:
    """Run the console script with the test's environment (temp HF_LEROBOT_HOME, MUJOCO_GL=egl)."""
    return subprocess.run([CLI, *args], capture_output=True, text=True, timeout=timeout, env=dict(os.environ),
                          check=False)


def _eval_frame(obs: dict) -> torch.Tensor:
    """The `observation.image` lerobot-eval builds from an env observation (CHW float in [0, 1])."""
    return torch.from_numpy(obs["pixels"]).permute(2, 0, 1).float() / 255


def _replay(ds: LeRobotDataset, episode: int, task: str, seed: int, attempt: int, check) -> int:
    """Reset a fresh LeRobot MetaworldEnv like the recorder, replay the episode's actions, `check` each frame.

    Returns the number of frames checked (replay stops where MetaworldEnv.step auto-resets on success).
    """
    start = ds.meta.episodes["dataset_from_index"][episode]
    stop = ds.meta.episodes["dataset_to_index"][episode]
    env = MetaworldEnv(task=task, obs_type="pixels_agent_pos")
    try:
        np.random.seed(episode_seed(seed, task, attempt))
        obs, _ = env.reset()
        for i in range(start, stop):
            item = ds[i]
            check(item, obs)
            obs, reward, terminated, _, _ = env.step(item["action"].numpy())
            # The recorded reward is the one this step earns (float32, as stored).
            assert float(item["next.reward"]) == pytest.approx(float(np.float32(reward)), abs=1e-6)
            if terminated:
                return i - start + 1
    finally:
        env.close()
    return stop - start


def _check_layout(ds: LeRobotDataset, image_dtype: str) -> None:
    """Documented features, shapes, fps and the LeRobot instruction as `task`."""
    feats = ds.meta.features
    assert feats["observation.image"]["dtype"] == image_dtype
    assert tuple(feats["observation.image"]["shape"]) == (480, 480, 3)
    assert tuple(feats["observation.state"]["shape"]) == (4,)
    assert tuple(feats["action"]["shape"]) == (4,)
    assert ds.fps == EVAL_FPS == 80
    item = ds[0]
    assert item["observation.image"].shape == (3, 480, 480)
    assert item["observation.state"].shape == (4,) and item["action"].shape == (4,)
    assert float(item["action"].abs().max()) <= 1.0


def test_record_images_exact_eval_frames(tmp_path):
    """Fast path: one short PNG-stored episode; every frame equals the eval frame for that state, bit for bit."""
    task, seed, root = "drawer-close-v3", 3, tmp_path / "ds"
    res = _run("--dataset.repo_id=local/rec_img", f"--dataset.root={root}", f"--env.task={task}",
               "--episodes_per_task=1", "--max_steps=12", "--success_only=false", "--use_videos=false",
               f"--seed={seed}")
    assert res.returncode == 0, res.stderr[-3000:]
    assert "Recording finished: 1 episodes, 12 frames of drawer-close-v3" in res.stdout
    assert "expert success rate: 0/1" in res.stdout and str(root) in res.stdout
    assert not root.with_name(root.name + STAGING_SUFFIX).exists()  # staging removed after the merge

    ds = LeRobotDataset("local/rec_img", root=root, video_backend="pyav")
    _check_layout(ds, "image")
    assert len(ds) == 12 and ds.meta.total_episodes == 1
    assert ds[0]["task"] == TASK_DESCRIPTIONS[task] == "Push and close a drawer"
    frames = torch.stack([ds[i]["observation.image"] for i in range(len(ds))])
    assert frames.std(dim=(1, 2, 3)).min() > 0.05  # real renders, not blank images
    assert (frames[0] - frames[-1]).abs().mean() > 1e-3  # the arm moves between frames

    def exact(item, obs):
        np.testing.assert_array_equal((item["observation.image"] * 255).round().to(torch.uint8).numpy(),
                                      obs["pixels"].transpose(2, 0, 1))
        np.testing.assert_array_equal(item["observation.state"].numpy(), obs["agent_pos"].astype(np.float32))

    assert _replay(ds, 0, task, seed, 0, exact) == 12


def test_bad_input_is_refused_with_the_fix(tmp_path):
    """An unknown task is refused with a suggestion before anything is written."""
    bad = _run("--dataset.repo_id=local/x", f"--dataset.root={tmp_path / 'x'}", "--env.task=drawer-clos-v3")
    assert bad.returncode == 2 and "Did you mean drawer-close-v3" in bad.stderr
    assert not any(tmp_path.iterdir())


@pytest.mark.slow
def test_failing_expert_with_success_only(tmp_path):
    """An expert that cannot succeed within --max_steps: clear error naming the knobs, no dataset at the root."""
    root = tmp_path / "fail"
    res = _run("--dataset.repo_id=local/fail", f"--dataset.root={root}", "--env.task=handle-press-v3",
               "--episodes_per_task=1", "--max_steps=3", "--max_attempts_per_task=2", "--success_only=true")
    assert res.returncode == 2, res.stderr[-2000:]
    assert "0/1 episodes of handle-press-v3 in 2 attempts" in res.stderr and "--max_steps" in res.stderr
    assert not root.exists()  # nothing half-made where the dataset would go
    staging = root.with_name(root.name + STAGING_SUFFIX)
    records = sorted(staging.glob("attempts/*.json"))
    assert [json.loads(r.read_text())["success"] for r in records] == [False, False]
    first_mtime = records[0].stat().st_mtime_ns
    # More attempts allowed: the rerun resumes (attempts 0 and 1 are not repeated) and tries attempt 2 only.
    more = _run("--dataset.repo_id=local/fail", f"--dataset.root={root}", "--env.task=handle-press-v3",
                "--episodes_per_task=1", "--max_steps=3", "--max_attempts_per_task=3", "--success_only=true")
    assert more.returncode == 2 and "0/1 episodes of handle-press-v3 in 3 attempts" in more.stderr
    assert max(p.name for p in staging.glob("attempts/*.json")) == "handle-press-v3__00002.json"
    assert records[0].stat().st_mtime_ns == first_mtime  # attempt 0 was not redone
    changed = _run("--dataset.repo_id=local/fail", f"--dataset.root={root}", "--env.task=handle-press-v3",
                   "--episodes_per_task=1", "--max_steps=4", "--success_only=true")
    assert changed.returncode == 2 and "max_steps: recorded 3, now 4" in changed.stderr
    # A staging dir left by a version that recorded no next.reward is refused, not mixed with new episodes.
    plan_file = staging / "plan.json"
    old_plan = json.loads(plan_file.read_text())
    old_plan.pop("store_reward")
    plan_file.write_text(json.dumps(old_plan))
    old = _run("--dataset.repo_id=local/fail", f"--dataset.root={root}", "--env.task=handle-press-v3",
               "--episodes_per_task=1", "--max_steps=3", "--max_attempts_per_task=3", "--success_only=true")
    assert old.returncode == 2 and "store_reward: recorded False, now True" in old.stderr and "--overwrite" in old.stderr


@pytest.mark.slow
def test_record_videos_success_only(tmp_path):
    """Two successful expert episodes as AV1 video; merged video decodes to the eval frames of each episode."""
    task, seed, root = "handle-press-v3", 0, tmp_path / "vid"
    t0 = time.time()
    res = _run("--dataset.repo_id=local/rec_vid", f"--dataset.root={root}", f"--env.task={task}",
               "--episodes_per_task=2", "--max_steps=60", "--steps_after_success=3", f"--seed={seed}")
    assert res.returncode == 0, res.stderr[-3000:]
    print(f"recorded 2 video episodes in {time.time() - t0:.1f} s")
    assert "Recording finished: 2 episodes" in res.stdout and "expert success rate: 2/2" in res.stdout

    ds = LeRobotDataset("local/rec_vid", root=root, video_backend="pyav")
    _check_layout(ds, "video")
    assert ds.meta.total_episodes == 2 and ds[0]["task"] == TASK_DESCRIPTIONS[task]
    info = json.loads((root / "meta/wm_recording.json").read_text())
    for ep in range(2):
        n_frames = ds.meta.episodes["dataset_to_index"][ep] - ds.meta.episodes["dataset_from_index"][ep]
        # success at step s, then 3 more steps: the replay auto-resets exactly 3 frames before the end
        diffs: list[tuple[float, float]] = []

        def close(item, obs, diffs=diffs):
            img = _eval_frame(obs)
            diffs.append((float((item["observation.image"] - img).abs().mean()),
                          float((item["observation.image"] - img.flip(1).flip(2)).abs().mean())))
            np.testing.assert_array_equal(item["observation.state"].numpy(), obs["agent_pos"].astype(np.float32))

        checked = _replay(ds, ep, task, seed, ep, close)
        assert checked == n_frames - 3
        assert info["summary"]["per_task"][task]["frames"] == len(ds)
        same, flipped = np.array(diffs).T
        assert same.max() < 0.03, same  # lossy video, but the same image
        assert flipped.min() > 5 * same.max()  # and not the raw (flipped) MetaWorld render


@pytest.mark.slow
def test_sigkill_then_resume(tmp_path):
    """SIGKILL mid-recording leaves no dataset at the root; the rerun keeps finished episodes and completes."""
    task, root = "drawer-close-v3", tmp_path / "kill"
    args = ["--dataset.repo_id=local/rec_kill", f"--dataset.root={root}", f"--env.task={task}",
            "--episodes_per_task=3", "--max_steps=20", "--success_only=false", "--seed=5"]
    staging = root.with_name(root.name + STAGING_SUFFIX)
    proc = subprocess.Popen([CLI, *args], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=dict(os.environ))
    try:
        deadline = time.time() + 300
        # Kill once the first episode is committed and the second one is under way.
        while time.time() < deadline and proc.poll() is None:
            if list((staging / "attempts").glob("*.json")) and list((staging / "episodes").glob(".tmp-*")):
                break
            time.sleep(0.2)
        assert proc.poll() is None, proc.stdout.read().decode()[-3000:]
        time.sleep(1.0)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    committed = len(list((staging / "attempts").glob("*.json")))
    assert 1 <= committed < 3
    assert not root.exists()  # a killed run never exposes a half-written dataset

    res = _run(*args)
    assert res.returncode == 0, res.stderr[-3000:]
    assert f"Resuming {staging}: {committed}/3 episodes already recorded." in res.stdout
    assert "Recording finished: 3 episodes, 60 frames" in res.stdout
    assert not staging.exists()

    ds = LeRobotDataset("local/rec_kill", root=root, video_backend="pyav")
    assert ds.meta.total_episodes == 3 and len(ds) == 60
    assert list(ds.meta.episodes["episode_index"]) == [0, 1, 2]
    # Episodes recorded before and after the kill both start from their own seeded reset.
    for ep in (0, 2):
        start = ds.meta.episodes["dataset_from_index"][ep]
        env = MetaworldEnv(task=task, obs_type="pixels_agent_pos")
        np.random.seed(episode_seed(5, task, ep))
        obs, _ = env.reset()
        env.close()
        item = ds[start]
        np.testing.assert_array_equal(item["observation.state"].numpy(), obs["agent_pos"].astype(np.float32))
        assert float((item["observation.image"] - _eval_frame(obs)).abs().mean()) < 0.03

    # Same flags again: nothing to record; other flags: a clear refusal naming the fix.
    again = _run(*args)
    assert again.returncode == 0 and "Dataset already recorded (nothing to do): 3 episodes" in again.stdout
    other = _run(*args[:3], "--episodes_per_task=4")
    assert other.returncode == 2 and "--overwrite true" in other.stderr
