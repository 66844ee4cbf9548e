"""`smolvla_world` through the stock LeRobot entry points with the tiny SmolVLM: factory, train, eval."""

import json
import math
import os
import subprocess

import numpy as np
import pytest
import torch
from safetensors import safe_open
from support import vlm
from support.cli import BIN, capped_eval_cmd, replay_with_planner, short_train_flags
from support.datasets import make_synthetic_dataset
from support.vlm import TINY_SMOLVLA

tiny_vlm = vlm.tiny_vlm  # the session fixture: one tiny SmolVLM for every test

REPO = "local/smolvla_world_e2e"


def _run(cmd, timeout=600):
    env = {**os.environ, "MUJOCO_GL": "egl", "OMP_NUM_THREADS": "1"}
    return subprocess.run([str(c) for c in cmd], capture_output=True, text=True, timeout=timeout, env=env)


def _tiny_flags(vlm_dir) -> list[str]:
    """--policy flags that set the tiny SmolVLA options (what a user passes for a real backbone)."""
    flags = [f"--policy.vlm_model_name={vlm_dir}"]
    for k, v in TINY_SMOLVLA.items():
        flags.append(f"--policy.{k}=" + (f"[{v[0]},{v[1]}]" if isinstance(v, tuple) else str(v).lower()))
    return flags


def _train_cmd(policy_flags, root, out, steps):
    return [
        BIN / "lerobot-train",
        *policy_flags,
        f"--dataset.repo_id={REPO}",
        f"--dataset.root={root}",
        *short_train_flags(out, steps, batch_size=2, log_freq=1),
    ]


@pytest.fixture
def dataset_root(tmp_path):
    root = tmp_path / "ds"
    make_synthetic_dataset(
        root, repo_id=REPO, episode_lengths=(8, 1, 6), image_hw=(48, 48), task="press the button"
    )
    return root


def test_factory_binds_the_camera_dataset_and_refuses_the_latent_only_view(dataset_root, tiny_vlm, capsys):
    from lerobot.datasets.lerobot_dataset import LeRobotDatasetMetadata
    from lerobot.policies.factory import make_policy, make_policy_config, make_pre_post_processors

    from lerobot_policy_world_modality.tools.precompute import main as precompute
    from lerobot_policy_world_modality.latents.processor import WorldLatentStep
    from lerobot_policy_world_modality.smolvla_world.modeling_smolvla_world import SmolVLAWorldPolicy

    assert precompute([f"--dataset.repo_id={REPO}", f"--dataset.root={dataset_root}", "--no_progress"]) == 0
    view = next(line for line in capsys.readouterr().out.splitlines() if "training view" in line).split(
        ": ", 1
    )[1]

    def config():
        return make_policy_config("smolvla_world", device="cpu", vlm_model_name=str(tiny_vlm), **TINY_SMOLVLA)

    with pytest.raises(ValueError, match=f"--dataset.root={dataset_root.resolve()}"):
        make_policy(config(), ds_meta=LeRobotDatasetMetadata(REPO, root=view.strip()))

    cfg = config()
    meta = LeRobotDatasetMetadata(REPO, root=dataset_root)
    policy = make_policy(cfg, ds_meta=meta)
    assert isinstance(policy, SmolVLAWorldPolicy) and cfg.dataset_repo_id == REPO
    pre, _ = make_pre_post_processors(cfg, dataset_stats=meta.stats)
    (step,) = [s for s in pre.steps if isinstance(s, WorldLatentStep)]
    assert step.dataset_repo_id == REPO and step.cameras == ["observation.image"]
    assert step.history_frames == cfg.history_frames and step.future_frames == cfg.future_frames


@pytest.mark.slow
def test_precompute_then_e0_smolvla_then_e2_smolvla_world_from_it_then_metaworld_eval(
    dataset_root, tiny_vlm, tmp_path
):
    res = _run([BIN / "lerobot-wm-precompute", f"--dataset.repo_id={REPO}", f"--dataset.root={dataset_root}"])
    assert res.returncode == 0, res.stderr

    # E0: a plain SmolVLA fine-tune; its checkpoint is the init weights of the world variant.
    e0 = tmp_path / "e0"
    res = _run(_train_cmd(["--policy.type=smolvla", *_tiny_flags(tiny_vlm)], dataset_root, e0, steps=1))
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-5000:]
    init = e0 / "checkpoints" / "last" / "pretrained_model"

    # E2: smolvla_world from the same weights, on the dataset with its cameras (SmolVLA reads images).
    e2 = tmp_path / "e2"
    world_flags = ["--policy.type=smolvla_world", f"--policy.init_from={init}", "--policy.n_action_steps=1",
                   "--policy.history_frames=2", "--policy.future_frames=2", "--policy.prophet_width=32",
                   "--policy.prophet_heads=2", "--policy.prophet_depth=1",
                   "--policy.dynamics=action_conditioned", "--policy.progress_head=true"]  # fmt: skip
    res = _run(_train_cmd(world_flags, dataset_root, e2, steps=3))
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-5000:]
    ckpt = e2 / "checkpoints" / "last" / "pretrained_model"
    with safe_open(str(ckpt / "model.safetensors"), "pt") as f:
        keys = set(f.keys())
    assert "world.fusion.gate" in keys and any(k.startswith("world.prophet.") for k in keys)
    assert any(k.startswith("world.dynamics.") for k in keys) and any(k.startswith("world.progress.") for k in keys)
    assert any(k.startswith("smolvla.model.vlm_with_expert.lm_expert.") for k in keys)
    cfg = json.loads((ckpt / "config.json").read_text())
    assert cfg["type"] == "smolvla_world" and cfg["init_from_loaded"] and cfg["dataset_repo_id"] == REPO
    assert cfg["n_action_steps"] == 1 and cfg["num_steps"] == TINY_SMOLVLA["num_steps"]  # user's / init's
    # The card a push would upload: fingerprints recorded by lerobot-train, the world loss of its batches.
    card = (ckpt / "README.md").read_text()
    assert cfg["latent_fingerprints"] and cfg["latent_fingerprints"][0] in card and "world_loss:" in card
    pre = json.loads((ckpt / "policy_preprocessor.json").read_text())
    names = [s.get("registry_name") for s in pre["steps"]]
    assert "world_modality_latents" in names and "smolvla_world_instruction" in names

    eval_dir = tmp_path / "eval"
    res = _run(capped_eval_cmd(ckpt, eval_dir, episode_length=6))
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-5000:]
    info = json.loads((eval_dir / "eval_info.json").read_text())
    overall = info.get("overall", info.get("aggregated", {}))
    assert torch.isfinite(torch.tensor(float(overall["avg_sum_reward"])))

    # The probe reloads the checkpoint and compares memories on the camera dataset (SmolVLA reads images).
    probe_json = tmp_path / "probe.json"
    res = _run([BIN / "lerobot-wm-probe", f"--policy.path={ckpt}", f"--dataset.root={dataset_root}",
                "--batches=1", "--batch_size=2", "--modes=pred,zero,oracle", f"--out={probe_json}"])  # fmt: skip
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-5000:]
    probe = json.loads(probe_json.read_text())
    assert probe["policy_type"] == "smolvla_world" and set(probe["action_loss"]) == {"pred", "zero", "oracle"}
    assert all(math.isfinite(v) for v in probe["action_loss"].values()) and abs(probe["gate"]) < 0.01
    # ... and checks whether the planner's score can rank the dataset's chunks (the world model is trained).
    check = probe["planning"]
    assert check["score"] == "progress" and 0.0 <= check["expert_beats_perturbations"] <= 1.0
    assert check["dynamics_loss"] > 0 and math.isfinite(check["dynamics_action_sensitivity"])

    # lerobot-wm-plan-check ranks the planner's flow samples against the simulator's counterfactual
    # outcomes, and lerobot-wm-fit-plan-score fits the critic on them and exports a smolvla_world checkpoint.
    res = _run([BIN / "lerobot-wm-plan-check", f"--policy.path={ckpt}", "--tasks=button-press-v3", "--episodes=2",
                "--episode_length=3", "--pick=model", "--planner_samples=3", "--planner_score=progress",
                "--save_candidates", f"--out_dir={tmp_path / 'pc'}"])  # fmt: skip
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-5000:]
    ep = json.loads((tmp_path / "pc" / "episodes" / "button-press-v3__1000.json").read_text())
    assert ep["replay_max_abs_diff"] == 0.0 and len(ep["decisions"]) == ep["steps"] == 3  # n_action_steps = 1
    assert all(d["true_picked"] == d["true_model_pick"] and 0 <= d["model_pick_true_rank"] < 3 for d in ep["decisions"]), ep["decisions"]
    # pick=model executes exactly what stock rollouts with --policy.planner=rerank execute: the best of the
    # same flow samples (same env seed, same planner generator).
    replay_with_planner(ckpt, "button-press-v3", 1000, ep["actions"], planner="rerank", planner_samples=3,
                        planner_score="progress")  # fmt: skip
    saved = np.load(tmp_path / "pc" / "candidates" / "button-press-v3__1000.npz")
    assert saved["candidates"].shape[:2] == (3, 3) and saved["candidates"].shape[-1] == 4  # decisions, samples, ..., A
    assert saved["history"].shape[:2] == (3, cfg["history_frames"])
    res = _run([BIN / "lerobot-wm-fit-plan-score", f"--policy.path={ckpt}", "--candidates", tmp_path / "pc",
                "--output_dir", tmp_path / "fit", "--steps=5", "--holdout=0.4", "--critics", "imagined", "actions"])  # fmt: skip
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-5000:]
    fitted = json.loads((tmp_path / "fit" / "pretrained_model" / "config.json").read_text())
    assert fitted["type"] == "smolvla_world" and fitted["planner_score"] == "critic" and fitted["plan_critic"]
    with safe_open(str(tmp_path / "fit" / "pretrained_model" / "model.safetensors"), "pt") as f:
        assert any(k.startswith("world.critic.") for k in f.keys())
    from lerobot_policy_world_modality.tools.record_metaworld import CheckpointActor

    reloaded = CheckpointActor(str(tmp_path / "fit" / "pretrained_model")).policy  # rebuilt from its config
    assert reloaded.world.critic.reads == "imagined" and reloaded.world.score_kind(None) == "critic"
