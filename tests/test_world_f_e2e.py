"""world_f through the stock LeRobot entry points: factory, lerobot-train, lerobot-eval in MetaWorld."""

import json
import os
import subprocess
from pathlib import Path

import pytest
import torch
from support.cli import BIN, TINY_WORLD_F, capped_eval_cmd, short_train_flags
from support.datasets import make_synthetic_dataset

REPO = "local/world_f_e2e"


def _run(cmd, timeout=600, env_extra=None):
    env = {**os.environ, "MUJOCO_GL": "egl", **(env_extra or {})}
    return subprocess.run([str(c) for c in cmd], capture_output=True, text=True, timeout=timeout, env=env)


def _train_cmd(root, out, steps=6):
    return [
        BIN / "lerobot-train",
        "--policy.type=world_f",
        "--policy.encoder=pixels",
        *TINY_WORLD_F,
        f"--dataset.repo_id={REPO}",
        f"--dataset.root={root}",
        *short_train_flags(out, steps),
    ]


@pytest.fixture
def dataset_root(tmp_path):
    root = tmp_path / "ds"
    make_synthetic_dataset(root, repo_id=REPO, episode_lengths=(12, 1, 9), image_hw=(48, 48))
    return root


def test_stock_factory_builds_world_f_with_the_world_step(dataset_root, tmp_path):
    from lerobot.datasets.lerobot_dataset import LeRobotDatasetMetadata
    from lerobot.policies.factory import (
        get_policy_class,
        make_policy,
        make_policy_config,
        make_pre_post_processors,
    )

    import lerobot_policy_world_modality  # noqa: F401
    from lerobot_policy_world_modality.latents.cache import LatentCacheError
    from lerobot_policy_world_modality.latents.processor import WorldLatentStep
    from lerobot_policy_world_modality.world_f.modeling_world_f import WorldFPolicy

    assert get_policy_class("world_f") is WorldFPolicy
    meta = LeRobotDatasetMetadata(REPO, root=dataset_root)
    cfg = make_policy_config("world_f", device="cpu", width=32, depth=1, heads=2, fusion_heads=2)
    # No cache yet: building the policy for training must stop with the command that fixes it.
    with pytest.raises(LatentCacheError, match="lerobot-wm-precompute"):
        make_policy(cfg, ds_meta=meta)

    res = _run([BIN / "lerobot-wm-precompute", f"--dataset.repo_id={REPO}", f"--dataset.root={dataset_root}"])
    assert res.returncode == 0, res.stderr
    cfg = make_policy_config("world_f", device="cpu", width=32, depth=1, heads=2, fusion_heads=2)
    policy = make_policy(cfg, ds_meta=meta)
    assert isinstance(policy, WorldFPolicy)
    assert cfg.dataset_repo_id == REPO and Path(cfg.dataset_root) == dataset_root
    pre, post = make_pre_post_processors(cfg, dataset_stats=meta.stats)
    steps = [s for s in pre.steps if isinstance(s, WorldLatentStep)]
    assert len(steps) == 1 and steps[0].dataset_repo_id == REPO
    assert steps[0].history_frames == cfg.history_frames and steps[0].future_frames == cfg.future_frames


def test_train_without_cache_fails_fast_with_the_fix(dataset_root, tmp_path):
    res = _run(_train_cmd(dataset_root, tmp_path / "out"))
    assert res.returncode != 0
    assert "lerobot-wm-precompute" in res.stdout + res.stderr
    assert not (tmp_path / "out" / "checkpoints").exists()


@pytest.mark.slow
def test_precompute_train_eval_metaworld(dataset_root, tmp_path):
    res = _run([BIN / "lerobot-wm-precompute", f"--dataset.repo_id={REPO}", f"--dataset.root={dataset_root}"])
    assert res.returncode == 0, res.stderr
    view_line = next(line for line in res.stdout.splitlines() if "training view" in line)
    view = Path(view_line.split(": ", 1)[1].strip())
    assert (view / "meta" / "info.json").exists()

    out = tmp_path / "train"
    res = _run(_train_cmd(view, out, steps=6))
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-5000:]
    ckpt = out / "checkpoints" / "last" / "pretrained_model"
    cfg = json.loads((ckpt / "config.json").read_text())
    assert cfg["type"] == "world_f" and cfg["dataset_repo_id"] == REPO
    assert "observation.image" in cfg["input_features"]  # the camera the view dropped stays an input
    pre = json.loads((ckpt / "policy_preprocessor.json").read_text())
    assert any(s.get("registry_name") == "world_modality_latents" for s in pre["steps"])

    # Stock lerobot-eval through the launcher that caps MetaWorld's episodes at --env.episode_length (LeRobot
    # 0.4.4's MetaWorld env ignores it and runs 500 rendered steps: ~2 minutes here for the same code path).
    # The refused run below goes through the lerobot-eval executable itself.
    eval_dir = tmp_path / "eval"
    res = _run(capped_eval_cmd(ckpt, eval_dir, episode_length=6))
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-5000:]
    info = json.loads((eval_dir / "eval_info.json").read_text())
    overall = info.get("overall", info.get("aggregated", {}))
    assert "pc_success" in json.dumps(overall)
    assert torch.isfinite(torch.tensor(float(overall["avg_sum_reward"])))

    # Another encoder at eval is refused by name (the saved preprocessor would silently keep the old one).
    assert cfg["trained_encoder"] == "pixels"
    res = _run([BIN / "lerobot-eval", f"--policy.path={ckpt}", "--policy.encoder=/models/other_encoder",
                "--policy.device=cpu", "--env.type=metaworld", "--env.task=button-press-v3", "--eval.n_episodes=1",
                "--eval.batch_size=1", f"--output_dir={tmp_path / 'eval_other'}"])  # fmt: skip
    assert res.returncode != 0
    assert "--policy.encoder=/models/other_encoder differs from the encoder this checkpoint was trained with ('pixels')" in res.stderr


@pytest.mark.slow
def test_train_with_language_input(dataset_root, tmp_path):
    """Two lerobot-train steps with a (tiny, local) text encoder: `task` reaches the policy from the
    dataset through the stock data path, and the checkpoint records the encoder but not its weights.

    The eval side (`add_envs_task` -> preprocessor -> policy) is covered by a unit test of the
    preprocessor; a full lerobot-eval run would add ~2.5 minutes here for the same path.
    """
    from safetensors import safe_open
    from support.text import make_tiny_text_encoder

    text_dir = make_tiny_text_encoder(tmp_path / "tiny_bert")
    res = _run([BIN / "lerobot-wm-precompute", f"--dataset.repo_id={REPO}", f"--dataset.root={dataset_root}"])
    assert res.returncode == 0, res.stderr
    out = tmp_path / "train"
    res = _run([*_train_cmd(dataset_root, out, steps=2), f"--policy.language_encoder={text_dir}"])
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-5000:]
    ckpt = out / "checkpoints" / "last" / "pretrained_model"
    cfg = json.loads((ckpt / "config.json").read_text())
    assert cfg["language_encoder"] == str(text_dir) and cfg["language_encoder_revision"].startswith("sha256:")
    with safe_open(str(ckpt / "model.safetensors"), "pt") as f:
        keys = list(f.keys())
    assert "trunk.language_proj.weight" in keys
    assert not any("word_embeddings" in k or "encoder.layer" in k for k in keys)


@pytest.mark.slow
def test_in_trunk_train_and_eval_metaworld(dataset_root, tmp_path):
    """world_path=in_trunk through stock lerobot-train and lerobot-eval (MetaWorld, one capped episode)."""
    from safetensors import safe_open

    res = _run([BIN / "lerobot-wm-precompute", f"--dataset.repo_id={REPO}", f"--dataset.root={dataset_root}"])
    assert res.returncode == 0, res.stderr
    view = Path(next(ln for ln in res.stdout.splitlines() if "training view" in ln).split(": ", 1)[1].strip())
    out = tmp_path / "train"
    res = _run([*_train_cmd(view, out, steps=4), "--policy.world_path=in_trunk", "--policy.depth=2",
                "--policy.delta_prediction=true"])  # fmt: skip
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-5000:]
    ckpt = out / "checkpoints" / "last" / "pretrained_model"
    cfg = json.loads((ckpt / "config.json").read_text())
    assert cfg["world_path"] == "in_trunk" and cfg["foresight_tokens"] == 1
    with safe_open(str(ckpt / "model.safetensors"), "pt") as f:
        keys = list(f.keys())
    assert "world.prophet.tokens" in keys and "trunk.motion.lag_weight" in keys
    assert not any(k.startswith("world.fusion.") for k in keys)

    eval_dir = tmp_path / "eval"
    res = _run(capped_eval_cmd(ckpt, eval_dir, episode_length=10))
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-5000:]
    info = json.loads((eval_dir / "eval_info.json").read_text())
    overall = info.get("overall", info.get("aggregated", {}))
    assert torch.isfinite(torch.tensor(float(overall["avg_sum_reward"])))
