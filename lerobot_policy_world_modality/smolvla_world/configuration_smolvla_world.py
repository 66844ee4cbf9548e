"""Configuration of `smolvla_world`: LeRobot's SmolVLA plus Prophet world memory in its action expert.

Built by composition: `SmolVLAWorldConfig` carries every SmolVLA option under SmolVLA's own name
(`SmolVLAOptions`, checked against `SmolVLAConfig` by the tests so the two cannot drift) and hands
them to a real `SmolVLAConfig` through `smolvla_config()`. It does not subclass `SmolVLAConfig`:
LeRobot 0.4.4 tests built-in classes with isinstance before the plugin fallback and would give it
SmolVLA's processors, so the world-latent step would never run.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
from dataclasses import dataclass, field

from lerobot.configs.policies import PreTrainedConfig
from lerobot.configs.types import FeatureType, NormalizationMode
from lerobot.policies.rtc.configuration_rtc import RTCConfig
from lerobot.policies.smolvla.configuration_smolvla import SmolVLAConfig

from ..cli_errors import policy_config_errors
from ..latents.config import WorldLatentOptions
from ..sources import checkpoint_file
from ..world.align import validate_alignment
from ..world.options import DynamicsOptions, WorldMemoryOptions

logger = logging.getLogger(__name__)


@dataclass
class SmolVLAOptions:
    """Every option of LeRobot's `SmolVLAConfig`, same names and defaults (see that class for details)."""

    # Action chunk length predicted per inference.
    chunk_size: int = 50
    # Actions of each chunk executed before the next inference (<= chunk_size).
    n_action_steps: int = 50
    # Normalisation per feature type; images are left in [0, 1] (SmolVLA rescales them to [-1, 1]).
    normalization_mapping: dict[str, NormalizationMode] = field(
        default_factory=lambda: {
            "VISUAL": NormalizationMode.IDENTITY,
            "STATE": NormalizationMode.MEAN_STD,
            "ACTION": NormalizationMode.MEAN_STD,
        }
    )
    # Shorter state vectors are zero-padded to this size.
    max_state_dim: int = 32
    # Shorter action vectors are zero-padded to this size.
    max_action_dim: int = 32
    # Images are resized (keeping the aspect ratio) and padded to (height, width).
    resize_imgs_with_padding: tuple[int, int] = (512, 512)
    # Extra all-padding cameras appended to the visual inputs (smolvla_aloha_sim).
    empty_cameras: int = 0
    # Convert Aloha joint/gripper values to the pi runtime space.
    adapt_to_pi_aloha: bool = False
    # Aloha delta joint actions (not ported in LeRobot; must stay False).
    use_delta_joint_actions_aloha: bool = False
    # Maximum instruction length in tokens.
    tokenizer_max_length: int = 48
    # Flow-matching denoising steps at inference.
    num_steps: int = 10
    # Cache the VLM prefix keys/values across denoising steps.
    use_cache: bool = True
    # Keep the VLM's vision encoder frozen.
    freeze_vision_encoder: bool = True
    # Train only the action expert (and projections); the VLM stays frozen.
    train_expert_only: bool = True
    # Train the state projection.
    train_state_proj: bool = True
    # AdamW learning rate (peak of the cosine schedule).
    optimizer_lr: float = 1e-4
    # AdamW betas.
    optimizer_betas: tuple[float, float] = (0.9, 0.95)
    # AdamW epsilon.
    optimizer_eps: float = 1e-8
    # AdamW weight decay.
    optimizer_weight_decay: float = 1e-10
    # Gradient-norm clipping.
    optimizer_grad_clip_norm: float = 10
    # Learning-rate warm-up steps.
    scheduler_warmup_steps: int = 1_000
    # Steps of the cosine decay.
    scheduler_decay_steps: int = 30_000
    # Learning rate at the end of the decay.
    scheduler_decay_lr: float = 2.5e-6
    # VLM backbone: Hugging Face Hub id or local directory.
    vlm_model_name: str = "HuggingFaceTB/SmolVLM2-500M-Video-Instruct"
    # Load the VLM's pretrained weights (True when training from the VLM, not needed after init_from).
    load_vlm_weights: bool = False
    # Wrap image features in the VLM's image special tokens.
    add_image_special_tokens: bool = False
    # How the expert attends to the VLM ("cross_attn" or "self_attn").
    attention_mode: str = "cross_attn"
    # Pad the prefix to this many tokens (-1: no padding).
    prefix_length: int = -1
    # Instruction padding: "longest" or "max_length".
    pad_language_to: str = "longest"
    # Expert layers (<= 0: as many as the VLM layers used).
    num_expert_layers: int = -1
    # VLM layers used (the first num_vlm_layers).
    num_vlm_layers: int = 16
    # Interleave a self-attention layer every n expert layers.
    self_attn_every_n_layers: int = 2
    # Expert hidden size relative to the VLM's.
    expert_width_multiplier: float = 0.75
    # Shortest period of the sine-cosine timestep embedding.
    min_period: float = 4e-3
    # Longest period of the sine-cosine timestep embedding.
    max_period: float = 4.0
    # Real-Time Chunking configuration (None: off).
    rtc_config: RTCConfig | None = None
    # torch.compile the model.
    compile_model: bool = False
    # torch.compile mode.
    compile_mode: str = "max-autotune"


# The SmolVLA options, in SmolVLAConfig's order; copied into the inner SmolVLAConfig.
SMOLVLA_FIELDS = tuple(f.name for f in dataclasses.fields(SmolVLAOptions))
# Options that shape SmolVLA's weights: they must equal the init_from checkpoint's. (`vlm_model_name`
# may differ, e.g. a local copy of the same VLM; the weight shapes are checked when loading.)
ARCHITECTURE_FIELDS = (
    "num_vlm_layers",
    "num_expert_layers",
    "self_attn_every_n_layers",
    "expert_width_multiplier",
    "attention_mode",
    "max_state_dim",
    "max_action_dim",
)
# Where the memory can be injected (see SmolVLAWorldConfig).
FUSION_POINTS = ("expert_output", "expert_input", "prefix")


# What --policy.init_from must name (quoted in its errors).
INIT_FROM_EXPECTED = (
    "a smolvla checkpoint directory (its pretrained_model folder, with config.json and model.safetensors) or a "
    "Hub id such as 'lerobot/smolvla_base'"
)


def read_checkpoint_config(name_or_path: str) -> PreTrainedConfig:
    """The policy config saved in a checkpoint (local directory or Hub id), decoded as LeRobot saved it."""
    import json
    from pathlib import Path

    import draccus
    from huggingface_hub.constants import CONFIG_NAME

    path = checkpoint_file(name_or_path, CONFIG_NAME, "--policy.init_from", INIT_FROM_EXPECTED)
    # decode() rather than LeRobot's from_pretrained(): the same json decoding without building a CLI
    # parser, which costs seconds.
    with draccus.config_type("json"):
        return draccus.decode(PreTrainedConfig, json.loads(Path(path).read_text()))


def user_set_fields(config: object, cli_args: list[str] | None = None) -> set[str]:
    """Fields the user chose: `--policy.<name>` on the command line, a `policy` entry of the
    `--config_path` JSON file, or a value that differs from the field's default (Python use)."""
    import json
    from pathlib import Path

    from lerobot.configs.parser import get_cli_overrides, parse_arg

    names = {a[2:].split("=", 1)[0].split(".", 1)[0] for a in get_cli_overrides("policy", cli_args) or []}
    config_path = parse_arg("config_path", cli_args)
    if config_path and config_path.endswith(".json") and Path(config_path).is_file():
        names |= set(json.loads(Path(config_path).read_text()).get("policy") or {})
    for f in dataclasses.fields(config):
        if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            continue
        default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
        if getattr(config, f.name) != default:
            names.add(f.name)
    return names


# The planner's first-round candidates (`planner_candidates`).
PLANNER_CANDIDATES = ("flow", "perturbed")


@PreTrainedConfig.register_subclass("smolvla_world")
@dataclass
class SmolVLAWorldConfig(WorldMemoryOptions, DynamicsOptions, WorldLatentOptions, SmolVLAOptions, PreTrainedConfig):
    """Config of `smolvla_world`: SmolVLA whose action expert reads Prophet memory through gated cross-attention.

    The Prophet predicts K future world latents from the last T (world latents come from the
    world-latent processor step, as in `world_f`). The memory is injected, each point a switch:
    - expert_output (`inject_memory`, default on, "late"): the expert's hidden states right before
      `action_out_proj`, in training and at every denoising step;
    - expert_input (`inject_expert_input`, "early"): the expert's input (suffix) embeddings;
    - prefix (`inject_prefix`): the VLM prefix tokens (images, instruction, state) before the VLM.
    Every gate starts at `gate_init` (0): an untrained world path gives exactly SmolVLA's actions.

    `init_from` (Hub id or local path of a SmolVLA checkpoint) loads that checkpoint's weights into
    the SmolVLA part; SmolVLA options the user did not set are taken from its config, options the user
    set stay as set, and architecture options that contradict it are refused. The world modules start
    fresh; a saved smolvla_world checkpoint carries all weights and never reads `init_from` again.

    Chain-of-Causality (docs/coc.md): `lambda_text` > 0 adds a next-token loss on the texts of
    `coc_path` through the VLM in a pass of its own; `lambda_align` > 0 aligns the expert's states with
    the future latents; `explain` generates the text at rollout.
    """

    # SmolVLA checkpoint (Hub id or local path) whose weights initialise the SmolVLA part; None = from scratch.
    init_from: str | None = None
    # Set once the init_from weights were loaded; a saved checkpoint then reloads without init_from.
    init_from_loaded: bool = False
    # Also inject the memory into the expert's input (suffix) embeddings ("early").
    inject_expert_input: bool = False
    # Also inject the memory into the VLM prefix tokens through their own gated cross-attention.
    inject_prefix: bool = False
    # Dropout in the Prophet and the cross-attentions.
    world_dropout: float = 0.0
    # Chain-of-Causality labels of the training dataset (JSONL of lerobot-wm-label-coc); None = no text loss.
    coc_path: str | None = None
    # Weight of the next-token loss on the CoC texts, computed in a VLM pass of its own (0 = off).
    lambda_text: float = 0.0
    # Weight of the FLARE-style cosine alignment of the action expert's states with the future latents (0 = off).
    lambda_align: float = 0.0
    # Generate the CoC text at every new action chunk in select_action (kept in policy.explanations).
    explain: bool = False
    # JSONL file the explanations are written to as they come (lerobot-eval cannot); None = memory only.
    explain_path: str | None = None
    # Most tokens of one explanation (greedy decoding, stops earlier at EOS).
    explain_max_tokens: int = 32
    # Planner's first round: "flow" (planner_samples flow samples) or "perturbed" (one flow sample and
    # planner_samples - 1 Gaussian perturbations of it at planner_noise, as world_f: one denoising run).
    planner_candidates: str = "flow"

    def __post_init__(self):
        with policy_config_errors(self.type):
            super().__post_init__()
            if self.init_from and not self.init_from_loaded:
                self.adopt_init_config()
            for name in ("inject_expert_input", "inject_prefix"):
                if getattr(self, name) and not self.use_prophet:
                    raise ValueError(
                        f"{name}=True needs use_prophet=True: the injected memory is the Prophet's prediction."
                    )
            self.validate_world_memory(baseline_hint="For plain SmolVLA use --policy.type=smolvla.")
            self.validate_coc()
            self.validate_dynamics()
            if self.planner_candidates not in PLANNER_CANDIDATES:
                raise ValueError(
                    f"planner_candidates '{self.planner_candidates}' is not one of {PLANNER_CANDIDATES}."
                )
            self.smolvla_config()  # SmolVLA's own validation of its options (n_action_steps <= chunk_size, ...)

    def validate_coc(self) -> None:
        """Refuse text-loss, alignment and explanation settings that cannot work (the message names the fix)."""
        validate_alignment(self)
        if self.lambda_text < 0:
            raise ValueError(f"lambda_text must be >= 0, got {self.lambda_text}.")
        if self.lambda_text > 0 and not self.coc_path:
            raise ValueError(
                "lambda_text > 0 needs the CoC labels: --policy.coc_path=<dataset root>/meta/coc_labels.jsonl "
                "(written by lerobot-wm-label-coc; see docs/coc.md)."
            )
        if self.lambda_text > 0 and self.train_expert_only:
            raise ValueError(
                "lambda_text > 0 trains the VLM through the text loss, but train_expert_only=True freezes it. "
                "Fix: --policy.train_expert_only=false (or --policy.lambda_text=0)."
            )
        if self.explain_path and not self.explain:
            raise ValueError("explain_path is where explanations go: it needs --policy.explain=true.")
        if self.explain_max_tokens < 1:
            raise ValueError(f"explain_max_tokens must be >= 1, got {self.explain_max_tokens}.")

    # ------------------------------------------------------------------ SmolVLA composition
    def smolvla_config(self) -> SmolVLAConfig:
        """A `SmolVLAConfig` with this config's SmolVLA options, features and device."""
        return SmolVLAConfig(
            **{name: copy.deepcopy(getattr(self, name)) for name in SMOLVLA_FIELDS},
            n_obs_steps=self.n_obs_steps,
            input_features=dict(self.input_features or {}),
            output_features=dict(self.output_features or {}),
            device=self.device,
            use_amp=self.use_amp,
            push_to_hub=False,
        )

    def adopt_init_config(self, cli_args: list[str] | None = None) -> None:
        """Take the SmolVLA options of the `init_from` checkpoint that the user did not set.

        Raises ValueError when `init_from` is not a SmolVLA checkpoint or when a user-set architecture
        option contradicts it (its weights would not fit).
        """
        init = read_checkpoint_config(self.init_from)
        if not isinstance(init, SmolVLAConfig):
            raise ValueError(
                f"--policy.init_from={self.init_from} is a '{init.type}' checkpoint; it must be a 'smolvla' one "
                "(e.g. lerobot/smolvla_base or the output of lerobot-train --policy.type=smolvla)."
            )
        chosen = user_set_fields(self, cli_args)
        clashes = {
            n: (getattr(self, n), getattr(init, n))
            for n in ARCHITECTURE_FIELDS
            if n in chosen and getattr(self, n) != getattr(init, n)
        }
        if clashes:
            detail = ", ".join(
                f"{n}={mine!r} (checkpoint: {theirs!r})" for n, (mine, theirs) in clashes.items()
            )
            raise ValueError(
                f"--policy.init_from={self.init_from} was trained with other architecture options: {detail}. "
                "Its weights would not fit. Drop these --policy flags (they are then read from the checkpoint) "
                "or train from scratch without --policy.init_from."
            )
        adopted = [n for n in SMOLVLA_FIELDS if n not in chosen and getattr(self, n) != getattr(init, n)]
        for name in adopted:
            setattr(self, name, copy.deepcopy(getattr(init, name)))
        if adopted:
            logger.info("smolvla_world: options read from %s: %s", self.init_from, ", ".join(adopted))

    # ------------------------------------------------------------------ LeRobot interface
    def get_optimizer_preset(self):
        """SmolVLA's AdamW preset (same learning rate, betas, decay and clipping as `smolvla`)."""
        return self.smolvla_config().get_optimizer_preset()

    def get_scheduler_preset(self):
        """SmolVLA's cosine schedule with warm-up."""
        return self.smolvla_config().get_scheduler_preset()

    def validate_features(self) -> None:
        """SmolVLA's feature rules (empty cameras added as visual inputs) plus an action output."""
        SmolVLAConfig.validate_features(self)
        if self.action_feature is None:
            raise ValueError(
                "smolvla_world needs an 'action' output feature: train on a dataset with an 'action' column."
            )
        if not any(ft.type is FeatureType.VISUAL for ft in self.input_features.values()):
            raise ValueError("smolvla_world needs at least one camera input (SmolVLA reads images).")

    @property
    def observation_delta_indices(self) -> list:
        """One observation frame, as SmolVLA (the world history comes from the latent cache)."""
        return [0]

    @property
    def action_delta_indices(self) -> list:
        """The action chunk a_t .. a_{t+H-1}."""
        return list(range(self.chunk_size))

    @property
    def reward_delta_indices(self) -> None:
        """Rewards are not used."""
        return None
