"""The experiment configs in configs/: parsed by LeRobot's own parser, consistent, and runnable.

Fast tests parse every config the way `lerobot-train --config_path=...` does and check the A / B_cont / F
switches, the benchmark conventions (against LeRobot's own env configs) and that the three variants of
one benchmark differ only in the variant. Slow tests run two training steps from a MetaWorld and a
LIBERO config with dataset and size overrides, on synthetic datasets with those benchmarks' shapes.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from support.cli import TINY_WORLD_F
from support.datasets import make_synthetic_dataset

BIN = Path(sys.executable).parent
CONFIG_DIR = Path(__file__).resolve().parents[1] / "configs"
CONFIGS = sorted(CONFIG_DIR.glob("*.json"))
VARIANT_NAMES = ("A", "B_cont", "F")
BENCHMARKS = {
    # dataset repo id, world cameras, state dim, action dim (HuggingFaceVLA dataset conventions)
    "metaworld": ("HuggingFaceVLA/metaworld_mt50", ["observation.image"], 4, 4),
    "libero": ("HuggingFaceVLA/libero", ["observation.images.image"], 8, 7),
}


def _split_name(path: Path) -> tuple[str, str]:
    """'metaworld_world_f_B_cont.json' -> ('metaworld', 'B_cont')."""
    bench, variant = path.stem.split("_world_f_")
    return bench, variant


def _validated(cfg, tmp_path, monkeypatch, argv):
    """Run TrainPipelineConfig.validate() as lerobot-train does (it re-reads sys.argv for `--policy.path`)."""
    monkeypatch.setattr(sys, "argv", argv)
    if cfg.output_dir is None:
        cfg.output_dir = tmp_path / "out"
    cfg.validate()
    return cfg


def _load(path: Path, tmp_path, monkeypatch):
    """Decode a config file with draccus, LeRobot's config library, exactly as `--config_path` decodes it.

    `draccus.decode` is what `lerobot-train --config_path=...` runs on the file's content, without
    building the CLI argument parser (which reads every field's docstring: ~5 s per call here).
    It rejects unknown fields like the CLI path does.
    """
    import draccus
    from lerobot.configs.train import TrainPipelineConfig

    import lerobot_policy_world_modality  # noqa: F401  (registers world_f, as lerobot-train's plugin scan does)

    with draccus.config_type("json"):
        cfg = draccus.decode(TrainPipelineConfig, json.loads(path.read_text()))
    return _validated(cfg, tmp_path, monkeypatch, ["lerobot-train", f"--config_path={path}"])


def _parse_cli(path: Path, overrides, tmp_path, monkeypatch):
    """Parse exactly like `lerobot-train --config_path=<path> <overrides>`: LeRobot's CLI wrapper, then validate()."""
    from lerobot.configs import parser
    from lerobot.configs.train import TrainPipelineConfig

    import lerobot_policy_world_modality  # noqa: F401

    argv = ["lerobot-train", f"--config_path={path}", *overrides]
    monkeypatch.setattr(sys, "argv", argv)

    @parser.wrap()
    def entry(cfg: TrainPipelineConfig):
        return cfg

    return _validated(entry(), tmp_path, monkeypatch, argv)


def test_the_config_matrix_is_complete():
    names = {p.name for p in CONFIGS}
    expected = {f"{b}_world_f_{v}.json" for b in BENCHMARKS for v in VARIANT_NAMES}
    assert expected <= names, f"missing configs: {sorted(expected - names)}"


@pytest.mark.parametrize("path", CONFIGS, ids=[p.stem for p in CONFIGS])
def test_config_parses_with_lerobots_parser(path, tmp_path, monkeypatch):
    from lerobot.configs.train import TrainPipelineConfig

    from lerobot_policy_world_modality.world_f.configuration_world_f import (
        VARIANTS,
        WorldFConfig,
    )

    bench, variant = _split_name(path)
    repo_id, cameras, _, _ = BENCHMARKS[bench]
    cfg = _load(path, tmp_path, monkeypatch)
    assert isinstance(cfg, TrainPipelineConfig)
    assert isinstance(cfg.policy, WorldFConfig) and cfg.policy.type == "world_f"
    assert cfg.policy.variant == variant
    assert (cfg.policy.use_prophet, cfg.policy.inject_memory) == VARIANTS[variant]
    assert cfg.dataset.repo_id == repo_id
    assert cfg.policy.world_cameras == cameras
    assert cfg.policy.n_action_steps <= cfg.policy.chunk_size
    # The optimiser comes from the policy preset, so the config's lr is the one used.
    assert cfg.optimizer.lr == cfg.policy.optimizer_lr
    # A shared config must not push anywhere unless asked (`--policy.push_to_hub=true --policy.repo_id=...`).
    assert cfg.policy.push_to_hub is False

    raw = json.loads(path.read_text())["policy"]
    # The variant sets these two; writing them too would suggest they can disagree with it.
    assert "use_prophet" not in raw and "inject_memory" not in raw
    # Auto-filled fields stay unset in a shared config (they describe one dataset / one encoder).
    for auto in ("dataset_repo_id", "dataset_root", "world_latent_dim", "trained_encoder"):
        assert raw.get(auto) is None, auto


def test_cli_overrides_win_over_the_config_file(tmp_path, monkeypatch):
    path = CONFIG_DIR / "metaworld_world_f_F.json"
    cfg = _parse_cli(
        path,
        ["--steps=2", "--policy.device=cpu", "--policy.encoder=pixels", "--dataset.repo_id=local/x",
         "--policy.variant=B_cont", f"--output_dir={tmp_path / 'out'}"],
        tmp_path,
        monkeypatch,
    )  # fmt: skip
    assert cfg.steps == 2 and cfg.policy.device == "cpu" and cfg.policy.encoder == "pixels"
    assert cfg.dataset.repo_id == "local/x"
    # The variant override re-derives the switches it controls.
    assert cfg.policy.variant == "B_cont" and cfg.policy.use_prophet and not cfg.policy.inject_memory
    # Everything not overridden still comes from the file.
    assert cfg.policy.chunk_size == json.loads(path.read_text())["policy"]["chunk_size"]


def test_a_typo_in_a_config_is_rejected(tmp_path, monkeypatch):
    raw = json.loads((CONFIG_DIR / "metaworld_world_f_F.json").read_text())
    raw["policy"]["lamda_world"] = 0.5
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps(raw))
    with pytest.raises(Exception, match="lamda_world"):
        _load(bad, tmp_path, monkeypatch)


@pytest.mark.parametrize("bench", sorted(BENCHMARKS))
def test_variants_of_one_benchmark_differ_only_in_the_variant(bench):
    """A fair A / B_cont / F comparison: same data, model size, schedule and seed."""
    loaded = {}
    for variant in VARIANT_NAMES:
        raw = json.loads((CONFIG_DIR / f"{bench}_world_f_{variant}.json").read_text())
        assert raw["policy"].pop("variant") == variant
        assert raw.pop("job_name") == f"{bench}_world_f_{variant}"
        loaded[variant] = raw
    assert loaded["A"] == loaded["B_cont"] == loaded["F"]


@pytest.mark.parametrize("bench", sorted(BENCHMARKS))
def test_configs_match_lerobots_eval_env(bench):
    """The world cameras are keys LeRobot's eval env produces, and the action sizes agree."""
    from lerobot.envs.configs import LiberoEnv, MetaworldEnv

    env = {"metaworld": MetaworldEnv, "libero": LiberoEnv}[bench]()
    _, cameras, _, action_dim = BENCHMARKS[bench]
    raw = json.loads((CONFIG_DIR / f"{bench}_world_f_F.json").read_text())
    produced = set(env.features_map.values())
    assert raw["policy"]["world_cameras"] == cameras
    assert set(cameras) <= produced, produced
    assert env.features["action"].shape == (action_dim,)


# ------------------------------------------------------------------------------------------ slow


def _run(cmd, timeout=600):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([str(c) for c in cmd], check=False, capture_output=True, text=True, timeout=timeout, env=env)


@pytest.mark.slow
@pytest.mark.parametrize("bench", sorted(BENCHMARKS))
def test_two_training_steps_from_a_config(bench, tmp_path):
    """`lerobot-train --config_path=configs/<bench>_world_f_F.json` + overrides trains on a look-alike dataset.

    Frames are stored as images, not video: cheaper to write, and training reads only cached latents.
    """
    _, cameras, state_dim, action_dim = BENCHMARKS[bench]
    dataset_cameras = ("observation.image",) if bench == "metaworld" else (
        "observation.images.image", "observation.images.image2")  # fmt: skip
    repo = f"local/{bench}_lookalike"
    root = tmp_path / "ds"
    make_synthetic_dataset(
        root, repo_id=repo, episode_lengths=(8, 6), cameras=dataset_cameras, image_hw=(32, 32),
        state_dim=state_dim, action_dim=action_dim, use_videos=False, task="put the bowl on the plate",
    )  # fmt: skip
    res = _run([BIN / "lerobot-wm-precompute", f"--dataset.repo_id={repo}", f"--dataset.root={root}",
                f"--camera={','.join(cameras)}", "--no_progress"])  # fmt: skip
    assert res.returncode == 0, res.stderr
    view = Path(next(line for line in res.stdout.splitlines() if "training view" in line).split(": ", 1)[1].strip())

    out = tmp_path / "train"
    res = _run(
        [
            BIN / "lerobot-train",
            f"--config_path={CONFIG_DIR / f'{bench}_world_f_F.json'}",
            "--policy.encoder=pixels",  # the configs' DINOv2 cannot be downloaded here
            "--policy.device=cpu",
            *TINY_WORLD_F,
            f"--dataset.repo_id={repo}",
            f"--dataset.root={view}",
            "--batch_size=4",
            "--steps=2",
            "--log_freq=1",
            "--num_workers=0",
            f"--output_dir={out}",
        ]
    )
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-5000:]
    ckpt = out / "checkpoints" / "last" / "pretrained_model"
    saved = json.loads((ckpt / "config.json").read_text())
    assert saved["type"] == "world_f" and saved["variant"] == "F"
    assert saved["world_cameras"] == cameras and saved["dataset_repo_id"] == repo
    assert saved["output_features"]["action"]["shape"] == [action_dim]
    assert saved["input_features"]["observation.state"]["shape"] == [state_dim]
    train_cfg = json.loads((ckpt / "train_config.json").read_text())
    assert train_cfg["job_name"] == f"{bench}_world_f_F" and train_cfg["steps"] == 2


# ----------------------------------------------------------------- config reference in docs/world_f.md

DOC = CONFIG_DIR.parent / "docs" / "world_f.md"
REF_BEGIN = "<!-- config-reference:begin (generated by `python tests/test_configs.py`; do not edit) -->"
REF_END = "<!-- config-reference:end -->"
# Reference groups, in order. A field in none of them fails the test below, so new fields get documented.
GROUPS = {
    "Variant and action chunk": ["variant", "chunk_size", "n_action_steps", "action_loss"],
    "Trunk": ["width", "depth", "heads", "ffn_dim", "dropout", "latent_input_norm"],
    "World latents (shared by all world policy types)": [
        "encoder", "encoder_pooling", "encoder_window", "encoder_dtype", "encoder_device", "world_cameras",
        "history_frames", "future_frames", "future_stride", "latent_cache_root", "world_latent_dim", "dataset_repo_id",
        "dataset_root", "trained_encoder", "encoder_revision", "latent_fingerprints", "dataset_fingerprint",
    ],
    "Language input (optional; see language.py)": ["language_encoder", "language_encoder_revision", "language_max_length"],
    "Prophet and world loss": [
        "use_prophet", "prophet_reads_trunk", "prophet_width", "prophet_depth", "prophet_heads",
        "world_target", "delta_prediction", "standardise_targets", "prophet_input", "world_loss_type", "lambda_world",
    ],
    "World path (cross_attn or in_trunk) and history input": ["world_path", "foresight_tokens", "trunk_reads_history"],
    "Future alignment (FLARE-style, see docs/coc.md)": ["lambda_align"],
    "Memory and gated cross-attention": [
        "inject_memory", "memory_mode_train", "memory_mode_rollout", "detach_memory", "fusion_heads", "fusion_dim", "gate_init",
        "gate_per_channel", "fusion_memory_norm", "gate_lr_mult",
    ],
    "Scheduled sampling (memory_mode_train=scheduled)": [
        "scheduled_prob_start", "scheduled_prob_end", "scheduled_warmup_steps", "scheduled_decay_steps",
        "scheduled_shape",
    ],
    "World model and planning (see docs/planning.md)": [
        "dynamics", "lambda_dynamics", "progress_head", "lambda_progress", "plan_critic", "lambda_critic",
        "critic_negatives", "critic_input", "reward_head", "lambda_reward", "reward_scale", "planner_score", "imitate_failures",
        "planner", "planner_samples",
        "planner_iterations", "planner_elite_frac", "planner_noise", "planner_horizon", "planner_seed",
    ],
    "Optimiser (LeRobot's policy preset)": ["optimizer_lr", "optimizer_weight_decay", "optimizer_grad_clip_norm"],
    "LeRobot base fields (PreTrainedConfig)": [
        "n_obs_steps", "input_features", "output_features", "normalization_mapping", "device", "use_amp",
        "use_peft", "push_to_hub", "repo_id", "private", "tags", "license", "pretrained_path",
    ],
}  # fmt: skip
# LeRobot's own fields carry no one-line comments in its source; these say what they mean for world_f.
BASE_DOCS = {
    "n_obs_steps": "Observation steps per sample; world_f requires 1 (its history comes from the latent cache).",
    "input_features": "Inputs, filled from the dataset by lerobot-train (cameras, observation.state).",
    "output_features": "Outputs, filled from the dataset by lerobot-train (action).",
    "normalization_mapping": "Normalisation per feature type; images are not normalised (they only feed the frozen encoder).",
    "device": "Device of the policy: cuda, cuda:0, cpu, mps; None = best available.",
    "use_amp": "Automatic mixed precision in LeRobot's loops (no effect on the CPU).",
    "use_peft": "Set by LeRobot when training through PEFT (not used by world_f).",
    "push_to_hub": "Push the final checkpoint to the Hub at the end of lerobot-train (needs repo_id).",
    "repo_id": "Hub repo `<user>/<name>` the policy is pushed to.",
    "private": "Create the Hub repo as private.",
    "tags": "Tags of the Hub model card.",
    "license": "License of the Hub model card.",
    "pretrained_path": "Checkpoint the policy was loaded from (set by --policy.path).",
}


def _field_comments(cls) -> dict[str, str]:
    """{field: the `#` comment line(s) right above its declaration} from a dataclass's own source."""
    import inspect
    import re

    comments, pending = {}, []
    for line in inspect.getsource(cls).splitlines():
        s = line.strip()
        if s.startswith("#"):
            pending.append(s.lstrip("# ").strip())
            continue
        m = re.match(r"^([a-z_][a-z0-9_]*)\s*:", s)
        # A field: a class-body line (4 spaces) with a comment block right above it.
        if m and pending and line.startswith("    ") and not line.startswith("     "):
            comments[m.group(1)] = " ".join(pending)
        pending = []
    return comments


def _default_text(f) -> str:
    import dataclasses
    import enum

    value = f.default if f.default is not dataclasses.MISSING else f.default_factory()

    def plain(v):
        if isinstance(v, enum.Enum):
            return v.value
        if isinstance(v, dict):
            return {k: plain(x) for k, x in v.items()}
        if isinstance(v, (list, tuple)):
            return [plain(x) for x in v]
        return v

    return "`" + json.dumps(plain(value)) + "`"


def _type_text(annotation) -> str:
    """`int`, `str | None`, `dict[str, PolicyFeature] | None`: short names, no module paths."""
    import re

    if isinstance(annotation, type):
        return annotation.__name__
    return re.sub(r"\b(?:[A-Za-z_]\w*\.)+([A-Za-z_]\w*)", r"\1", str(annotation))


def render_config_reference() -> str:
    """The markdown tables of every WorldFConfig field (name, type, default, meaning), grouped."""
    import dataclasses

    from lerobot_policy_world_modality.language import LanguageOptions
    from lerobot_policy_world_modality.latents.config import WorldLatentOptions
    from lerobot_policy_world_modality.trunk_policy import TrunkPolicyOptions
    from lerobot_policy_world_modality.world.options import DynamicsOptions, WorldMemoryOptions
    from lerobot_policy_world_modality.world_f.configuration_world_f import WorldFConfig

    docs = {
        **BASE_DOCS,
        **_field_comments(TrunkPolicyOptions),
        **_field_comments(WorldLatentOptions),
        **_field_comments(WorldMemoryOptions),
        **_field_comments(DynamicsOptions),
        **_field_comments(LanguageOptions),
        **_field_comments(WorldFConfig),
    }
    fields = {f.name: f for f in dataclasses.fields(WorldFConfig) if f.init}
    lines = []
    for group, names in GROUPS.items():
        lines += [f"#### {group}", "", "| field | type | default | meaning |", "|---|---|---|---|"]
        for name in names:
            f = fields[name]
            meaning = docs[name].replace("|", "\\|")
            type_text = _type_text(f.type).replace("|", "\\|")
            lines.append(f"| `{name}` | `{type_text}` | {_default_text(f)} | {meaning} |")
        lines.append("")
    return "\n".join(lines).rstrip() + "\n"


def _doc_with_reference(text: str) -> str:
    head, rest = text.split(REF_BEGIN, 1)
    _, tail = rest.split(REF_END, 1)
    return f"{head}{REF_BEGIN}\n{render_config_reference()}{REF_END}{tail}"


def test_every_config_field_is_in_the_reference():
    import dataclasses

    from lerobot_policy_world_modality.world_f.configuration_world_f import WorldFConfig

    grouped = [n for names in GROUPS.values() for n in names]
    assert len(grouped) == len(set(grouped)), "a field is listed in two groups"
    init_fields = {f.name for f in dataclasses.fields(WorldFConfig) if f.init}
    assert init_fields == set(grouped), (
        f"update GROUPS in tests/test_configs.py: missing {sorted(init_fields - set(grouped))}, "
        f"gone {sorted(set(grouped) - init_fields)}"
    )
    render_config_reference()  # every field has a one-line comment (or a BASE_DOCS entry)


def test_docs_config_reference_is_current():
    text = DOC.read_text()
    assert REF_BEGIN in text and REF_END in text, f"{DOC} lost its config-reference markers"
    assert text == _doc_with_reference(text), (
        "docs/world_f.md's config reference is out of date: run `python tests/test_configs.py` to regenerate it."
    )


if __name__ == "__main__":
    # Regenerate the config reference of docs/world_f.md from the dataclass.
    DOC.write_text(_doc_with_reference(DOC.read_text()))
    print(f"Config reference rewritten in {DOC}")
