"""Publishing a world_f checkpoint: its model card, the push to the Hub (up to the HTTP client), the
push-without-repo-id check, `--policy.path` overrides, and loading the pushed folder alone.

One tiny `lerobot-train --policy.push_to_hub=true` run (module fixture) serves every test; the Hub's
HTTP client is replaced by the recording stand-in of `support/hub.py`, nothing of LeRobot's.
"""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from support.cli import BIN, TINY_WORLD_F, capped_eval_cmd, short_train_flags
from support.datasets import make_synthetic_dataset

REPO = "local/publish"
HUB_REPO = "tester/world_f_tiny"
TESTS = Path(__file__).resolve().parent
RECORDING = f"import sys; sys.path.insert(0, {str(TESTS)!r}); from support.hub import recording_main; recording_main()"


def _run(cmd, env, cwd=None, timeout=600):
    return subprocess.run(
        [str(c) for c in cmd], capture_output=True, text=True, timeout=timeout, env=env, cwd=cwd
    )


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """Dataset -> precompute -> 4 training steps pushed to a recorded Hub; the paths of everything."""
    base = tmp_path_factory.mktemp("publish")
    env = {**os.environ, "LEROBOT_WM_CACHE": str(base / "wm_cache"), "HF_LEROBOT_HOME": str(base / "home"),
           "WM_TEST_HUB_RECORD": str(base / "hub"), "MUJOCO_GL": "egl"}  # fmt: skip
    root = base / "ds"
    make_synthetic_dataset(root, repo_id=REPO, episode_lengths=(12, 9), image_hw=(48, 48))
    res = _run([BIN / "lerobot-wm-precompute", f"--dataset.repo_id={REPO}", f"--dataset.root={root}"], env)
    assert res.returncode == 0, res.stderr
    view = Path(next(ln for ln in res.stdout.splitlines() if "training view" in ln).split(": ", 1)[1].strip())
    out = base / "train"
    flags = [f for f in short_train_flags(out, 4) if not f.startswith("--policy.push_to_hub")]
    res = _run([sys.executable, "-c", RECORDING, "lerobot-train", "--policy.type=world_f", *TINY_WORLD_F,
                f"--dataset.repo_id={REPO}", f"--dataset.root={view}", *flags,
                "--policy.push_to_hub=true", f"--policy.repo_id={HUB_REPO}"], env)  # fmt: skip
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-5000:]
    return {"base": base, "env": env, "root": root, "view": view,
            "ckpt": out / "checkpoints" / "last" / "pretrained_model", "hub": base / "hub"}  # fmt: skip


def test_checkpoint_card_reads_back_its_world_settings_and_figures(run):
    from huggingface_hub import ModelCard

    ckpt = run["ckpt"]
    cfg = json.loads((ckpt / "config.json").read_text())
    card = ModelCard.load(ckpt / "README.md")
    data = card.data.to_dict()
    assert data["library_name"] == "lerobot" and data["datasets"] == [REPO]
    assert {"world-modality", "world_f", "encoder-pixels"} <= set(data["tags"])
    # The provenance recorded at training is that of the cache the run read.
    meta = json.loads(next(Path(run["env"]["LEROBOT_WM_CACHE"]).rglob("meta.json")).read_text())
    assert cfg["latent_fingerprints"] == [meta["fingerprint"]] and cfg["latent_fingerprints"][0] in card.text
    assert (
        cfg["dataset_fingerprint"] == meta["dataset"]["content"] and cfg["dataset_fingerprint"] in card.text
    )
    assert cfg["encoder_revision"] == meta["encoder"]["revision"]
    text = card.text
    assert 'pip install "lerobot_policy_world_modality[metaworld,libero]==0.1.0"' in text
    assert "lerobot-eval --policy.path=tester/world_f_tiny --env.type=<env>" in text
    assert "| history / future / stride | 3 / 2 / 1 |" in text
    # The world figures are those of the training batches, not placeholders.
    figures = data["world_modality"]
    assert figures["training"]["batches"] == 4 and figures["training"]["world_loss"] > 0
    assert "world_motion_cos_h1" in figures["training"] and figures["gate_opening"]["mean"] is not None
    assert f"{figures['training']['world_loss']:.4g}" in text


def test_card_tool_adds_the_probe_verdict_and_success_rates_with_intervals(run, tmp_path, monkeypatch):
    from huggingface_hub import ModelCard

    from lerobot_policy_world_modality.tools.report import probe_verdict
    from lerobot_policy_world_modality.tools.stats import wilson_interval

    ckpt = tmp_path / "pretrained_model"
    shutil.copytree(run["ckpt"], ckpt)
    before = ModelCard.load(ckpt / "README.md").data.to_dict()["world_modality"]
    # The tools' own entry functions in-process (their console scripts are checked by test_wheel): saves the
    # ~8 s import of a subprocess each.
    from lerobot_policy_world_modality.tools import card as card_tool
    from lerobot_policy_world_modality.tools import probe as probe_tool

    monkeypatch.setenv("LEROBOT_WM_CACHE", run["env"]["LEROBOT_WM_CACHE"])
    monkeypatch.setenv("HF_LEROBOT_HOME", run["env"]["HF_LEROBOT_HOME"])
    probe_tool.main([f"--policy.path={ckpt}", f"--dataset.root={run['view']}", "--batches=1", "--batch_size=4",
                     "--episodes=1:2", f"--out={tmp_path / 'probe.json'}"])  # fmt: skip
    # The layout of lerobot-eval's eval_info.json (a real one is checked in test_pushed_folder_evaluates_alone).
    eval_dir = ckpt / "eval_mw"
    eval_dir.mkdir()
    outcomes = [True, False, False, True, False, False, False, True, False, False]
    (eval_dir / "eval_info.json").write_text(json.dumps({
        "per_task": [{"task_group": "button-press-v3", "task_id": 0, "metrics": {"successes": outcomes}}],
        "per_group": {}, "overall": {"pc_success": 30.0, "n_episodes": 10}}))  # fmt: skip
    assert card_tool.main([str(ckpt), "--env_type=metaworld", "--env_task=button-press-v3"]) == 0
    card = ModelCard.load(ckpt / "README.md")
    figures = card.data.to_dict()["world_modality"]
    probe = json.loads((tmp_path / "probe.json").read_text())
    verdict = figures["probe_verdict"]
    assert verdict == probe_verdict(probe) and verdict in card.text
    assert probe["policy_path"] == str(ckpt)
    # A probe of another checkpoint of the same run is not this checkpoint's.
    (tmp_path / "other_probe.json").write_text(json.dumps({**probe, "policy_path": str(tmp_path / "other")}))
    assert card_tool.find_results(ckpt) == ([tmp_path / "probe.json"], [eval_dir / "eval_info.json"])
    low, high = wilson_interval(3, 10)
    assert f"| 3 / 10 | 30.0% | {100 * low:.1f}% to {100 * high:.1f}% |" in card.text
    assert "--env.type=metaworld --env.task=button-press-v3 --eval.n_episodes=10" in card.text
    # What only the training process knew survives the refresh.
    assert figures["training"] == before["training"] and figures["gate_opening"] == before["gate_opening"]


def test_push_uploads_a_complete_folder(run):
    calls = [json.loads(ln) for ln in (run["hub"] / "calls.jsonl").read_text().splitlines()]
    assert [c["call"] for c in calls].count("upload_folder") == 3  # policy, preprocessor, postprocessor
    assert {c["repo_id"] for c in calls} == {HUB_REPO}
    pushed = run["hub"] / HUB_REPO
    names = {p.name for p in pushed.iterdir()}
    assert {"config.json", "model.safetensors", "README.md", "train_config.json",
            "policy_preprocessor.json", "policy_postprocessor.json"} <= names  # fmt: skip
    for side in ("preprocessor", "postprocessor"):
        spec = json.loads((pushed / f"policy_{side}.json").read_text())
        for step in spec["steps"]:
            if "state_file" in step:
                assert step["state_file"] in names, step
    # The pushed card is the world card (LeRobot's push writes its own over the saved one otherwise).
    assert "## World settings" in (pushed / "README.md").read_text()


def test_push_without_repo_id_fails_before_training(run, tmp_path):
    out = tmp_path / "out"
    flags = [f for f in short_train_flags(out, 2) if not f.startswith("--policy.push_to_hub")]
    res = _run([BIN / "lerobot-train", "--policy.type=world_f", *TINY_WORLD_F, f"--dataset.repo_id={REPO}",
                f"--dataset.root={run['view']}", *flags, "--policy.push_to_hub=true"], run["env"])  # fmt: skip
    assert res.returncode != 0
    assert "'policy.repo_id' argument missing" in res.stderr
    assert not (out / "checkpoints").exists()


def test_path_overrides_are_honoured_or_refused_by_name(run):
    from lerobot.configs.policies import PreTrainedConfig

    from lerobot_policy_world_modality.checkpoints import CheckpointMismatchError
    from lerobot_policy_world_modality.world_f.modeling_world_f import WorldFPolicy

    ckpt = run["ckpt"]
    # As lerobot-eval --policy.path=<ckpt> --policy.n_action_steps=1 builds it.
    cfg = PreTrainedConfig.from_pretrained(
        ckpt, cli_overrides=["--n_action_steps=1", "--memory_mode_rollout=zero"]
    )
    policy = WorldFPolicy.from_pretrained(ckpt, config=cfg)
    assert policy.config.n_action_steps == 1 and policy.config.memory_mode_rollout == "zero"
    for flag, saved in (("history_frames=5", "history_frames=3"), ("width=64", "width=32")):
        cfg = PreTrainedConfig.from_pretrained(ckpt, cli_overrides=[f"--{flag}"])
        with pytest.raises(
            CheckpointMismatchError, match=f"--policy.{flag} contradicts the weights .*{saved}"
        ):
            WorldFPolicy.from_pretrained(ckpt, config=cfg)


LOAD_ALONE = """
import sys, torch
import lerobot_policy_world_modality  # noqa: F401  (lerobot-eval imports it through the plugin discovery)
from lerobot.configs.policies import PreTrainedConfig
from lerobot.policies.factory import get_policy_class, make_pre_post_processors
path = sys.argv[1]
cfg = PreTrainedConfig.from_pretrained(path)
cfg.pretrained_path = path
policy = get_policy_class(cfg.type).from_pretrained(path, config=cfg)
pre, post = make_pre_post_processors(cfg, pretrained_path=path)
obs = {"observation.image": torch.rand(1, 3, 48, 48), "observation.state": torch.randn(1, 4), "task": ["x"]}
for _ in range(3):
    action = post(policy.select_action(pre(obs)))
assert action.shape == (1, 4) and torch.isfinite(action).all(), action
print("loaded", type(policy).__name__)
"""


@pytest.fixture
def orphaned_push(run, tmp_path):
    """The pushed folder copied to a fresh directory, with the training dataset, view and latent cache deleted."""
    for key in ("root", "view"):
        shutil.rmtree(run[key], ignore_errors=True)
    shutil.rmtree(run["env"]["LEROBOT_WM_CACHE"], ignore_errors=True)
    copy = tmp_path / "downloaded"
    shutil.copytree(run["hub"] / HUB_REPO, copy)
    (tmp_path / "cwd").mkdir()
    return copy


def test_pushed_folder_loads_and_acts_alone(orphaned_push, tmp_path, monkeypatch, capsys):
    # In-process from a fresh directory (the slow test below runs lerobot-eval on it in a subprocess).
    monkeypatch.chdir(tmp_path / "cwd")
    monkeypatch.setattr(sys, "argv", ["load", str(orphaned_push)])
    exec(compile(LOAD_ALONE, "load_alone", "exec"), {})
    assert "loaded WorldFPolicy" in capsys.readouterr().out


@pytest.mark.slow
def test_pushed_folder_evaluates_alone(run, orphaned_push, tmp_path):
    res = _run(
        capped_eval_cmd(orphaned_push, tmp_path / "eval", episode_length=4), run["env"], cwd=tmp_path / "cwd"
    )
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-4000:]
    assert (tmp_path / "eval" / "eval_info.json").exists()
