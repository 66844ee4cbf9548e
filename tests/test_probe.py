"""lerobot-wm-probe on checkpoints written by the stock lerobot-train: reads / ignores the memory, refusals."""

from __future__ import annotations

import json
import subprocess

import pytest
from support.cli import BIN, TINY_WORLD_F, short_train_flags
from support.datasets import make_synthetic_dataset


def _run(cmd, timeout=600) -> subprocess.CompletedProcess:
    return subprocess.run([str(c) for c in cmd], capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def view(tmp_path_factory):
    """A precomputed synthetic dataset: (latent-only training view, cache root)."""
    base = tmp_path_factory.mktemp("probe")
    root = base / "dataset"
    make_synthetic_dataset(root, episode_lengths=(12, 9, 14), image_hw=(32, 32))
    res = _run([BIN / "lerobot-wm-precompute", "--dataset.repo_id=local/synthetic", f"--dataset.root={root}",
                "--encoder=pixels", f"--cache_root={base / 'cache'}", "--no_progress"])  # fmt: skip
    assert res.returncode == 0, res.stderr[-3000:]
    view_root = next(ln for ln in res.stdout.splitlines() if "training view" in ln).split(": ", 1)[1].strip()
    return view_root, base / "cache"


def _train(view, out, *flags, steps=3):
    view_root, cache = view
    res = _run([BIN / "lerobot-train", "--policy.type=world_f", "--dataset.repo_id=local/synthetic",
                f"--dataset.root={view_root}", *TINY_WORLD_F, *short_train_flags(out, steps), *flags],
               )  # fmt: skip
    assert res.returncode == 0, res.stderr[-3000:]
    return out / "checkpoints" / f"{steps:06d}" / "pretrained_model"


def _probe(ckpt, view, tmp_path, *flags):
    out = tmp_path / "probe.json"
    res = _run([BIN / "lerobot-wm-probe", f"--policy.path={ckpt}", f"--dataset.root={view[0]}",
                "--batches=2", "--batch_size=8", f"--out={out}", *flags])  # fmt: skip
    return res, (json.loads(out.read_text()) if out.exists() else None)


@pytest.mark.slow
def test_probe_tells_a_policy_that_reads_its_memory_from_one_that_ignores_it(view, tmp_path, monkeypatch):
    """Open gate: zeroed / shuffled memory raises the action loss; closed gate: exactly no change."""
    monkeypatch.setenv("LEROBOT_WM_CACHE", str(view[1]))
    reads = _train(view, tmp_path / "open", "--policy.gate_init=1.0")
    # Three steps from a random init: the effect is real but small, hence a low threshold.
    res, r = _probe(reads, view, tmp_path, "--threshold=0.002")
    assert res.returncode == 0, res.stderr[-3000:]
    assert r["reads_memory"] is True and r["threshold"] == 0.002
    assert set(r["action_loss"]) == {"pred", "zero", "shuffle", "random", "oracle"}
    assert r["action_loss_change_vs_pred"]["zero"] != 0.0 and r["action_loss_change_vs_pred"]["shuffle"] != 0.0
    assert r["gate"] == pytest.approx(0.76, abs=0.05)  # tanh(1.0) after 3 small steps
    assert "reads the world memory" in res.stdout and "--policy.memory_mode_rollout=zero" in res.stdout
    assert r["frames"] == 16 and set(r["world_cosine"]) == {"world_cos_h1", "world_cos_h2"}
    assert set(r["world_copy_cosine"]) == {"world_copy_cos_h1", "world_copy_cos_h2"}
    assert set(r["world_motion_cosine"]) == {"world_motion_cos_h1", "world_motion_cos_h2"}
    assert "copy baseline (z_t vs true future): h1" in res.stdout and "motion cosine" in res.stdout
    # Trained on every episode: the probe says it reads training frames, and the oracle row is off-distribution.
    assert r["held_out"] is False and r["episodes"] is None and "TRAINING FRAMES" in res.stdout
    assert r["summary"][0].startswith("Not held out") and r["oracle_off_distribution"] is True
    assert "OFF-DISTRIBUTION" in res.stdout and "(off-distribution)" in res.stdout

    # A closed gate (tanh(0) = 0, learning rate 0): no memory reaches the actions, so every mode gives
    # exactly the same action loss, and the probe says the memory is ignored.
    ignores = _train(view, tmp_path / "closed", "--policy.optimizer_lr=0")
    res, r = _probe(ignores, view, tmp_path, "--modes=pred,zero,shuffle")
    assert res.returncode == 0, res.stderr[-3000:]
    assert r["reads_memory"] is False and r["gate"] == 0.0
    assert r["action_loss_change_vs_pred"] == {"zero": 0.0, "shuffle": 0.0}
    assert "ignores the world memory" in res.stdout


@pytest.mark.slow
def test_probe_reads_held_out_episodes_and_intervenes_on_the_in_trunk_path(view, tmp_path, monkeypatch):
    """in_trunk F trained on episodes 0 and 1: the probe reads episode 2 by default, without an oracle row."""
    monkeypatch.setenv("LEROBOT_WM_CACHE", str(view[1]))
    ckpt = _train(view, tmp_path / "in_trunk", "--policy.world_path=in_trunk", "--policy.depth=2",
                  "--dataset.episodes=[0,1]", "--policy.dynamics=action_conditioned")  # fmt: skip
    res, r = _probe(ckpt, view, tmp_path, "--threshold=0.0001")
    assert res.returncode == 0, res.stderr[-3000:]
    assert r["held_out"] is True and r["episodes"] == [2] and r["frames"] == 14  # episode 2 has 14 frames
    assert "held-out episodes 2..2" in res.stdout and r["world_path"] == "in_trunk"
    assert set(r["action_loss"]) == {"pred", "zero", "shuffle", "random"} and r["gate"] is None
    assert all(r["action_loss_change_vs_pred"][m] != 0.0 for m in ("zero", "shuffle", "random"))
    assert r["reads_memory"] is True
    # Its action-conditioned world model is scored on the same held-out frames, next to the copy baseline.
    assert set(r["dynamics_cosine"]) == {"dyn_cos_h1", "dyn_cos_h2"} and set(r["dynamics_motion_cosine"]) == {
        "dyn_motion_cos_h1", "dyn_motion_cos_h2"}
    assert "world model (action-conditioned) vs true future: h1" in res.stdout

    res, r = _probe(ckpt, view, tmp_path, "--episodes=0:2", "--modes=pred,zero")
    assert res.returncode == 0 and r["held_out"] is False and r["episodes"] == [0, 1]
    assert "2 of them were trained on" in res.stdout
    res, _ = _probe(ckpt, view, tmp_path, "--modes=pred,oracle")
    assert res.returncode != 0 and "in-trunk path has no oracle memory" in res.stderr

    # The A_hist control trains through lerobot-train, and the probe refuses it, naming what to compare.
    a_hist = _train(view, tmp_path / "a_hist", "--policy.variant=A_hist")
    res, r = _probe(a_hist, view, tmp_path / "refused")
    assert res.returncode != 0 and r is None and "A_hist is the control for F's history" in res.stderr


def test_episode_selection():
    from lerobot_policy_world_modality.tools.probe import ProbeError, choose_episodes, parse_episodes

    assert parse_episodes("40:43", 50) == [40, 41, 42] and parse_episodes("3,1,3", 5) == [1, 3]
    assert parse_episodes("8:", 10) == [8, 9] and parse_episodes("all", 3) == [0, 1, 2]
    for bad in ("4:9", "x", "2:2"):
        with pytest.raises(ProbeError, match="--episodes="):
            parse_episodes(bad, 5)
    episodes, held_out, note = choose_episodes("/nonexistent", 5, None)  # no train_config.json: all, flagged
    assert episodes is None and held_out is False and note.startswith("TRAINING FRAMES")


def test_probe_refuses_policies_without_memory_and_bad_input(tmp_path):
    """Variant A / B_cont and world_token_c have no memory to probe; bad modes and paths fail clearly."""
    from lerobot_policy_world_modality.tools.probe import ProbeError, check_probe_target
    from lerobot_policy_world_modality.world_f.configuration_world_f import WorldFConfig
    from lerobot_policy_world_modality.world_token_c.configuration_world_token_c import WorldTokenCConfig

    for variant in ("A", "A_hist", "B_cont"):
        with pytest.raises(ProbeError, match=r"trained without memory injection \(variant A or B_cont\)"):
            check_probe_target(WorldFConfig(variant=variant))
    with pytest.raises(ProbeError, match="'world_token_c' checkpoint has no injected world memory"):
        check_probe_target(WorldTokenCConfig(codebook_path=str(tmp_path / "book.safetensors")))
    with pytest.raises(ProbeError, match="A_hist is the control for F's history"):
        check_probe_target(WorldFConfig(variant="B_cont", world_path="in_trunk", depth=2))
    with pytest.raises(ProbeError, match="--policy.dynamics=action_conditioned the probe reports the world model"):
        check_probe_target(WorldFConfig(variant="A"))
    check_probe_target(WorldFConfig(variant="A", dynamics="action_conditioned"))  # a world model to report: accepted
    check_probe_target(WorldFConfig())  # F: accepted
    check_probe_target(WorldFConfig(world_path="in_trunk"))

    from lerobot_policy_world_modality.tools.probe import main

    with pytest.raises(SystemExit, match=r"Unknown memory mode\(s\) \['sideways'\]"):
        main([f"--policy.path={tmp_path}", f"--dataset.root={tmp_path}", "--modes=pred,sideways"])
    res, r = _probe(tmp_path / "nowhere", ("unused",), tmp_path)  # the console script: exit code and message
    assert res.returncode != 0 and r is None and "is not a policy checkpoint" in res.stderr


def test_summary_reads_a_falling_loss_as_a_memory_that_hurts():
    """The verdict uses the size of the change; its sign says whether the memory helps or hurts."""
    from lerobot_policy_world_modality.tools.probe import summarise

    r = {"action_loss_change_vs_pred": {"zero": -0.05, "shuffle": 0.004, "oracle": -0.02}, "reads_memory": True,
         "threshold": 0.01, "gate": 0.3, "attn_entropy": None}  # fmt: skip
    lines = summarise(r)
    assert "does better without it" in lines[0] and "falls by 5.0%" in lines[0]
    assert "2.0% lower: a better Prophet would help" in lines[1]
    r["action_loss_change_vs_pred"]["zero"] = 0.05
    assert "rises by 5.0%" in summarise(r)[0]


def test_planner_override_points_the_planning_check_elsewhere_or_names_the_missing_head():
    """--planner / --planner_score change the rollout-time fields the planning check reads; a score whose
    head the checkpoint lacks, or a checkpoint without a world model, is refused by flag name."""
    from lerobot_policy_world_modality.tools.probe import ProbeError, override_planner
    from lerobot_policy_world_modality.world_f.configuration_world_f import WorldFConfig

    cfg = WorldFConfig(device="cpu", dynamics="action_conditioned", progress_head=True, plan_critic=True)
    override_planner(cfg, "cem", "progress")
    assert (cfg.planner, cfg.planner_score) == ("cem", "progress")
    override_planner(cfg, None, None)
    assert (cfg.planner, cfg.planner_score) == ("cem", "progress")
    with pytest.raises(ProbeError, match="reward_head=true"):
        override_planner(cfg, None, "reward")
    with pytest.raises(ProbeError, match="dynamics=action_conditioned"):
        override_planner(WorldFConfig(device="cpu"), "cem", None)
