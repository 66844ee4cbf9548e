"""Configuration of the `world_f` policy: a compact transformer policy with Prophet world memory."""

from __future__ import annotations

from dataclasses import dataclass, field

from lerobot.configs.policies import PreTrainedConfig
from lerobot.configs.types import NormalizationMode
from lerobot.optim.optimizers import AdamWConfig

from ..language import LanguageOptions
from ..latents.config import WorldLatentOptions
from ..world.options import WorldMemoryOptions

# The baselines of the research line, as (use_prophet, inject_memory).
VARIANTS = {"A": (False, False), "B_cont": (True, False), "F": (True, True)}


@PreTrainedConfig.register_subclass("world_f")
@dataclass
class WorldFConfig(WorldLatentOptions, WorldMemoryOptions, LanguageOptions, PreTrainedConfig):
    """Config of `world_f`: world latent + state -> trunk -> action chunk, with optional Prophet memory.

    Inputs are the frozen-encoder world latent of the configured cameras (added to the batch by the
    world-latent processor step), the robot state and, when `language_encoder` is set, the instruction
    (`task`) embedded by a frozen text encoder (see `language.py`). Does not subclass a LeRobot
    built-in config: LeRobot 0.4.4 would then hand it the built-in processors and the world-latent
    step would never run.

    Baselines of the research line are switches of this one class (or set `variant`):
    - A      (use_prophet=False, inject_memory=False): the trunk alone, no world prediction.
    - B_cont (use_prophet=True,  inject_memory=False): the Prophet is trained with the world loss (it
             reads the trunk's observation states when `prophet_reads_trunk`, so the loss shapes the
             trunk) but its memory is not injected into the action path.
    - F      (use_prophet=True,  inject_memory=True): the full model; the action queries read the memory
             through gated cross-attention whose gate starts closed (gate_init = 0), so an untrained
             world path leaves F's actions equal to A's.

    Memory modes (`memory_mode_train`, `memory_mode_rollout`): pred, oracle (training only), zero,
    random, shuffle, scheduled (training only); see `world/memory.py`. Scheduled sampling: each
    training sample reads its oracle memory with probability p(step), where p starts at
    `scheduled_prob_start`, stays there for `scheduled_warmup_steps` policy training steps, then moves
    to `scheduled_prob_end` over `scheduled_decay_steps` steps along `scheduled_shape`
    (linear / cosine / exponential) and stays there. The step is counted by the policy itself (one per
    training-mode `forward`) and saved with its weights, so a resumed run continues the schedule.
    """

    # Baseline preset "A", "B_cont" or "F"; when set it overrides use_prophet and inject_memory.
    variant: str | None = None

    # Action chunk length H predicted per inference (one action-query token per step).
    chunk_size: int = 20
    # Actions of each chunk executed before the next inference (<= chunk_size).
    n_action_steps: int = 10

    normalization_mapping: dict[str, NormalizationMode] = field(
        default_factory=lambda: {
            "VISUAL": NormalizationMode.IDENTITY,  # images only feed the frozen world encoder
            "STATE": NormalizationMode.MEAN_STD,
            "ACTION": NormalizationMode.MEAN_STD,
        }
    )

    # Trunk: model width.
    width: int = 256
    # Trunk: number of transformer blocks.
    depth: int = 4
    # Trunk: attention heads (width must be divisible by it).
    heads: int = 8
    # Trunk: hidden size of the MLPs; None = 4 x width.
    ffn_dim: int | None = None
    # Dropout in the trunk, the Prophet and the cross-attention.
    dropout: float = 0.1
    # Action loss: "l1" or "mse", averaged over non-padded steps.
    action_loss: str = "l1"

    # The Prophet also reads the trunk's observation-token states (world loss shapes the trunk).
    prophet_reads_trunk: bool = True

    # Dimension of the world latent (all world cameras concatenated); filled at construction from the encoder.
    world_latent_dim: int | None = None

    # AdamW learning rate (constant: no schedule).
    optimizer_lr: float = 1e-4
    # AdamW weight decay (not applied to biases, norms, gates).
    optimizer_weight_decay: float = 1e-4
    # Gradient-norm clipping.
    optimizer_grad_clip_norm: float = 10.0

    def __post_init__(self):
        super().__post_init__()
        if self.variant is not None:
            if self.variant not in VARIANTS:
                raise ValueError(
                    f"Unknown variant '{self.variant}'; use one of {sorted(VARIANTS)} or leave it unset."
                )
            self.use_prophet, self.inject_memory = VARIANTS[self.variant]
        if self.n_action_steps > self.chunk_size:
            raise ValueError(
                f"n_action_steps ({self.n_action_steps}) cannot exceed chunk_size ({self.chunk_size}): "
                "set --policy.n_action_steps <= --policy.chunk_size."
            )
        if self.n_obs_steps != 1:
            raise ValueError(
                "world_f reads one observation step (its history comes from the world latents): set n_obs_steps=1."
            )
        if self.action_loss not in ("l1", "mse"):
            raise ValueError(f"action_loss must be 'l1' or 'mse', got '{self.action_loss}'.")
        if self.width % self.heads:
            raise ValueError(f"width ({self.width}) must be divisible by heads ({self.heads}).")
        self.validate_world_memory("For the baseline without world prediction use --policy.variant=A.")
        if self.language_max_length < 1:
            raise ValueError(f"language_max_length must be >= 1, got {self.language_max_length}.")

    def get_optimizer_preset(self) -> AdamWConfig:
        """AdamW with this config's learning rate, weight decay and clipping."""
        return AdamWConfig(
            lr=self.optimizer_lr,
            weight_decay=self.optimizer_weight_decay,
            grad_clip_norm=self.optimizer_grad_clip_norm,
        )

    def get_scheduler_preset(self) -> None:
        """No learning-rate schedule (constant), as in LeRobot's ACT."""
        return None

    def validate_features(self) -> None:
        """world_f needs an action output; the world latent comes from the processor step, not a feature."""
        if self.action_feature is None:
            raise ValueError(
                "world_f needs an 'action' output feature: train on a dataset with an 'action' column."
            )

    @property
    def observation_delta_indices(self) -> None:
        """One observation frame: the world history comes from the latent cache, not from decoded frames."""
        return None

    @property
    def action_delta_indices(self) -> list[int]:
        """The action chunk a_t .. a_{t+H-1}."""
        return list(range(self.chunk_size))

    @property
    def reward_delta_indices(self) -> None:
        """Rewards are not used."""
        return None
