"""Model cards of the plugin's checkpoints: what a reader of a pushed checkpoint needs to reproduce it.

Every `save_pretrained` of a world policy (each `lerobot-train` checkpoint, and the folder LeRobot's
`push_model_to_hub` uploads) writes `README.md` from here: the install and `lerobot-eval` commands,
the world settings (encoder and revision, pooling, cameras, window, cache fingerprints), the training
dataset and its fingerprint, and the training's world figures (gate opening, world loss, motion cosine).

The card is built from a checkpoint's config as a plain dict plus figures and results handed in, so the
same builder serves a live policy (`ModelCardMixin`) and a folder on disk (`lerobot-wm-card`, in
tools/, which adds probe and evaluation results with their intervals: the statistics live up there).
Machine-readable figures go into the card's metadata under `world_modality`, which is also how a refresh
keeps the training figures that only the training process knew.
"""

from __future__ import annotations

import math
from collections import deque
from pathlib import Path
from typing import Any

import torch

from .latents.binding import open_world_caches
from .world.fusion import GatedCrossAttention

NOT_RECORDED = "not recorded"
# Training batches whose world figures are averaged into the card (the last ones before the save).
FIGURE_WINDOW = 100
# Card metadata key of the machine-readable world figures.
CARD_KEY = "world_modality"
DISTRIBUTION = "lerobot_policy_world_modality"

_SUMMARIES = {
    "world_f": "a compact transformer policy on frozen-encoder world latents and the robot state, whose "
    "action queries read the Prophet's predicted future latents through a gated cross-attention",
    "world_token_c": "a compact transformer policy that reads world tokens (k-means codes of frozen-encoder "
    "latents) as an input modality and predicts the tokens of future frames",
    "smolvla_world": "LeRobot's SmolVLA whose action expert reads the Prophet's predicted future world "
    "latents through gated cross-attention",
}


# Figures of the Chain-of-Causality losses (smolvla_world's text pass and alignment) kept for the card too.
COC_FIGURES = ("text_loss", "text_labelled", "align_loss", "align_cos")


class TrainingFigures:
    """The world figures (`world_*` scalars, and the COC_FIGURES) of the last `FIGURE_WINDOW` training
    batches, for the card.

    A plain object, not a module: it never enters the state dict. A policy rebuilt from a checkpoint
    starts empty; its card then keeps the figures recorded in the previous card.
    """

    def __init__(self, window: int = FIGURE_WINDOW):
        """Keep the figures of at most `window` batches."""
        self._rows: deque[dict[str, float]] = deque(maxlen=window)

    def record(self, info: dict) -> None:
        """Keep the finite `world_*` (and COC_FIGURES) floats of one training step's logged dict."""
        row = {k: float(v) for k, v in info.items() if (k.startswith("world_") or k in COC_FIGURES) and _finite(v)}
        if row:
            self._rows.append(row)

    def summary(self) -> dict[str, float]:
        """Mean of each figure over the kept batches, plus `batches`; {} when none was recorded."""
        if not self._rows:
            return {}
        keys = sorted({k for r in self._rows for k in r})
        out = {k: sum(r[k] for r in self._rows if k in r) / sum(k in r for r in self._rows) for k in keys}
        out["batches"] = len(self._rows)
        return out


def _finite(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def gate_opening(policy) -> dict[str, float] | None:
    """tanh(gate) of every gated cross-attention of `policy`: mean and max |.|; None when it has none."""
    values = [
        m.gate_value().detach().float().flatten()
        for m in policy.modules()
        if isinstance(m, GatedCrossAttention)
    ]
    if not values:
        return None
    gates = torch.cat(values)
    return {"mean": float(gates.mean()), "abs_max": float(gates.abs().max())}


def record_training_provenance(config) -> None:
    """Fill the config's `encoder_revision`, `latent_fingerprints` and `dataset_fingerprint` from the
    training dataset's latent caches (already opened and validated by the binding, so this is cheap).
    """
    caches = open_world_caches(config)
    config.latent_fingerprints = [c.meta["fingerprint"] for c in caches]
    config.encoder_revision = caches[0].meta["encoder"].get("revision")
    config.dataset_fingerprint = caches[0].meta["dataset"].get("content") or None


def _text(value: Any) -> str:
    if value is None or value == [] or value == "":
        return NOT_RECORDED
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, (list, tuple)):
        return ", ".join(f"`{v}`" for v in value)
    return f"`{value}`"


def eval_command(policy_path: str, env_type: str | None = None, env_task: str | None = None,
                 n_episodes: int | None = None) -> str:  # fmt: skip
    """The `lerobot-eval` command line of a checkpoint (placeholders where the environment is unknown)."""
    return (
        f"lerobot-eval --policy.path={policy_path} --env.type={env_type or '<env>'} "
        f"--env.task={env_task or '<task>'} --eval.n_episodes={n_episodes or 50} --eval.batch_size=1"
    )


def _horizons(figures: dict, prefix: str) -> str:
    keys = sorted((k for k in figures if k.startswith(prefix) and k[len(prefix) :].isdigit()),
                  key=lambda k: int(k[len(prefix) :]))  # fmt: skip
    if not keys:
        return NOT_RECORDED
    return ", ".join(f"h{k[len(prefix) :]} {figures[k]:.3f}" for k in keys)


def _hub_id(name: str | None) -> str | None:
    """`name` when it reads as a Hub repo id (the Hub refuses a local path as `base_model`), else None."""
    if not name or Path(name).exists() or name.startswith((".", "/", "~")) or name.count("/") != 1:
        return None
    return name


def _type_rows(config: dict) -> list[str]:
    """World-settings rows of one policy type: the codebook of world_token_c, the VLM of smolvla_world."""
    if config.get("type") == "world_token_c":
        return [
            f"| codebook (inside model.safetensors) | {config.get('codebook_factors')} x {config.get('codebook_size')} "
            f"codes, {config.get('codebook_factorisation')}, digest {_text(config.get('codebook_digest'))} |"
        ]
    if config.get("type") == "smolvla_world":
        return [
            f"| initialised from | {_text(config.get('init_from'))} |",
            f"| VLM | {_text(config.get('vlm_model_name'))} |",
        ]
    return []


def _training_lines(training: dict, gate: dict | None, policy_type: str) -> list[str]:
    if gate is None:
        gate_text = "no gated cross-attention" if policy_type == "world_token_c" else NOT_RECORDED
    else:
        gate_text = f"{gate['mean']:.4g} (max abs {gate['abs_max']:.4g}); 0 means the memory is not read"
    loss_key = "world_ce" if "world_ce" in training else "world_loss"
    window = f"mean of the last {training['batches']} training batches" if training.get("batches") else ""
    return [
        "| figure | value |",
        "|---|---|",
        f"| gate opening tanh(g), at save | {gate_text} |",
        f"| world loss (`{loss_key}`) | {_text(training.get(loss_key))} |",
        f"| motion cosine per horizon (`world_motion_cos_h*`) | {_horizons(training, 'world_motion_cos_h')} |",
        f"| world cosine per horizon (`world_cos_h*`) | {_horizons(training, 'world_cos_h')} |",
        # The CoC rows only for policies trained with them (a text or alignment loss).
        *[f"| {label} (`{key}`) | {_text(training[key])} |" for key, label in
          (("text_loss", "CoC text loss"), ("align_loss", "future alignment loss")) if key in training],
        "",
        f"Training figures: {window or NOT_RECORDED}.",
    ]


def _result_lines(results: dict) -> list[str]:
    lines: list[str] = []
    probe = results.get("probe")
    if probe:
        lines += [
            f"**Probe** (`lerobot-wm-probe`, {probe.get('source', 'probe JSON')}): {probe['verdict']}",
            "",
        ]
    evals = results.get("evals") or []
    if evals:
        lines += ["| evaluation | task | successes / episodes | rate | Wilson 95% |", "|---|---|---|---|---|"]
        for e in evals:
            low, high = e["wilson95"]
            lines.append(f"| {e['source']} | {e.get('task') or NOT_RECORDED} | {e['successes']} / {e['episodes']} | "
                         f"{100 * e['rate']:.1f}% | {100 * low:.1f}% to {100 * high:.1f}% |")  # fmt: skip
        lines.append("")
    if not lines:
        lines = ["No probe or evaluation result next to this checkpoint yet; `lerobot-wm-card <this folder>` "
                 "adds them once `lerobot-wm-probe --out` / `lerobot-eval` have written theirs.", ""]  # fmt: skip
    return lines


def build_model_card(config: dict, *, training: dict | None = None, gate: dict | None = None,
                     results: dict | None = None, policy_path: str | None = None,
                     license: str | None = None, extra_tags: list[str] | None = None):  # fmt: skip
    """The `huggingface_hub.ModelCard` of a world-policy checkpoint whose `config.json` is `config`.

    `training`: `TrainingFigures.summary()`; `gate`: `gate_opening`; `results`: {"probe": {...},
    "evals": [...], "env": {"type", "task"}} as `lerobot-wm-card` collects them. Missing figures read
    "not recorded": nothing is estimated.
    """
    from huggingface_hub import ModelCard, ModelCardData

    from . import __version__

    training, results = dict(training or {}), dict(results or {})
    ptype = config.get("type", "unknown")
    encoder = config.get("trained_encoder") or config.get("encoder")
    path = policy_path or config.get("repo_id") or "<path to this folder or its Hub id>"
    dataset = config.get("dataset_repo_id")
    tags = ["robotics", "lerobot", "world-modality", ptype, f"encoder-{encoder}".replace("/", "-")]
    tags += [t for t in (extra_tags or []) if t not in tags]
    figures = {"training": training, "gate_opening": gate,
               "probe_verdict": (results.get("probe") or {}).get("verdict"),
               "evaluations": results.get("evals") or []}  # fmt: skip
    data = ModelCardData(
        license=license or config.get("license") or "apache-2.0",
        library_name="lerobot",
        pipeline_tag="robotics",
        tags=tags,
        model_name=ptype,
        datasets=[dataset] if dataset else None,
        base_model=_hub_id(config.get("init_from")),
        **{CARD_KEY: figures},
    )
    env = results.get("env") or {}
    cameras = config.get("world_cameras") or []
    lines = [
        "---", data.to_yaml(), "---", "",
        f"# {ptype}: a world-modality policy for LeRobot", "",
        f"`{ptype}` is {_SUMMARIES.get(ptype, 'a policy of the world-modality plugin')} "
        f"(`{DISTRIBUTION}`, a plugin that the stock `lerobot-train` / `lerobot-eval` of "
        "[LeRobot](https://github.com/huggingface/lerobot) discover).", "",
        "## Install and evaluate", "",
        "```bash",
        f"pip install \"{DISTRIBUTION}[metaworld,libero]=={__version__}\"   # next to lerobot; drop the simulator extras you do not need",
        "export MUJOCO_GL=egl",
        eval_command(path, env.get("type"), env.get("task"), env.get("n_episodes")),
        "```", "",
        "The world latents of the live camera frames are computed by the checkpoint's own preprocessor with the "
        "encoder below; no latent cache and no training dataset are needed.", "",
        "## World settings", "",
        "| setting | value |", "|---|---|",
        f"| encoder | {_text(encoder)} |",
        f"| encoder revision | {_text(config.get('encoder_revision'))} |",
        f"| pooling | {_text(config.get('encoder_pooling') or 'family default')} |",
        f"| frames per latent | {_text(config.get('encoder_window') or 'family default')} |",
        f"| encoder dtype | {_text(config.get('encoder_dtype') or 'float32')} |",
        f"| cameras | {_text(cameras) if cameras else '`first image input`'} |",
        f"| world latent dim | {_text(config.get('world_latent_dim'))} |",
        f"| history / future / stride | {config.get('history_frames')} / {config.get('future_frames')} / "
        f"{config.get('future_stride', 1)} |",
        f"| latent cache fingerprint(s) | {_text(config.get('latent_fingerprints'))} |",
        *_type_rows(config),
        "",
        "## Training data", "",
        f"- dataset: {_text(dataset)}",
        f"- dataset fingerprint (content digest): {_text(config.get('dataset_fingerprint'))}",
        "",
        "## Training figures", "",
        *_training_lines(training, gate, ptype), "",
        "## Results", "",
        *_result_lines(results),
        f"Written by {DISTRIBUTION} {__version__}.",
    ]  # fmt: skip
    return ModelCard("\n".join(lines) + "\n")


def read_card_figures(folder: str | Path) -> dict:
    """The `world_modality` metadata of the card in `folder` ({} when there is none)."""
    from huggingface_hub import ModelCard

    readme = Path(folder) / "README.md"
    if not readme.is_file():
        return {}
    return ModelCard.load(readme).data.to_dict().get(CARD_KEY) or {}


class ModelCardMixin:
    """For the plugin's policies (before `PreTrainedPolicy` in the bases): every save writes README.md,
    and LeRobot's `push_model_to_hub` (which writes its own generic card over it) gets the same card.

    The policy's `forward` feeds `self.training_figures.record(info)`.
    """

    @property
    def training_figures(self) -> TrainingFigures:
        """The world figures of the recent training batches (created on first use)."""
        if "_training_figures" not in self.__dict__:
            self.__dict__["_training_figures"] = TrainingFigures()
        return self.__dict__["_training_figures"]

    def model_card(self, previous: dict | None = None, license: str | None = None, extra_tags=None):
        """This policy's card; `previous` (a card's `world_modality` metadata) fills training figures
        this process did not see (a policy reloaded from a checkpoint)."""
        training = self.training_figures.summary() or (previous or {}).get("training") or {}
        return build_model_card(_config_dict(self.config), training=training, gate=gate_opening(self), license=license,
                                extra_tags=extra_tags)  # fmt: skip

    def _save_pretrained(self, save_directory: Path) -> None:
        """LeRobot's save (config + weights), then the model card next to them."""
        previous = read_card_figures(save_directory)
        super()._save_pretrained(save_directory)
        self.model_card(previous).save(str(Path(save_directory) / "README.md"))

    def generate_model_card(self, dataset_repo_id, model_type, license, tags):
        """LeRobot's push hook: the world card instead of LeRobot's generic template."""
        return self.model_card(license=license, extra_tags=tags)


def _config_dict(config) -> dict:
    """A PreTrainedConfig as the dict its config.json holds (draccus encoding, like LeRobot's save)."""
    import draccus

    return draccus.encode(config)
