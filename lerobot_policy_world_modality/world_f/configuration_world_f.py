"""Configuration of the `world_f` policy: a compact transformer policy with Prophet world memory."""

from __future__ import annotations

from dataclasses import dataclass

from lerobot.configs.policies import PreTrainedConfig

from ..cli_errors import policy_config_errors
from ..language import LanguageOptions
from ..latents.config import WorldLatentOptions
from ..trunk_policy import TrunkPolicyOptions
from ..world.align import validate_alignment
from ..world.options import DynamicsOptions, WorldMemoryOptions

# The baselines of the research line, as (use_prophet, inject_memory).
VARIANTS = {"A": (False, False), "A_hist": (False, False), "B_cont": (True, False), "F": (True, True)}
# Variants whose trunk also reads the T-frame latent history (the control for "history alone").
HISTORY_VARIANTS = ("A_hist",)
# How the action queries read the predicted future (see docs/world_f.md).
WORLD_PATHS = ("cross_attn", "in_trunk")


@PreTrainedConfig.register_subclass("world_f")
@dataclass
class WorldFConfig(
    TrunkPolicyOptions, WorldLatentOptions, WorldMemoryOptions, DynamicsOptions, LanguageOptions, PreTrainedConfig
):
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
    - A_hist (use_prophet=False, inject_memory=False, trunk_reads_history=True): A whose trunk also
             reads the motion of the T history latents the Prophet reads (the control for "history").

    World paths of F / B_cont (`world_path`): `cross_attn` (above: Prophet + gated cross-attention
    behind the trunk) or `in_trunk`: `foresight_tokens` foresight tokens in the trunk's own sequence
    predict the K future latents (world loss on them; no separate Prophet), the trunk reads the
    history's motion, and the action queries attend to the foresight tokens through a one-way mask
    (see `world/foresight.py`). B_cont on `in_trunk` blocks the queries' attention to them.

    World model and planning (`DynamicsOptions`, any variant): `dynamics=action_conditioned` trains
    f(z history, action chunk) -> K future frames next to the policy (own loss, never read by the action
    path), `progress_head` a remaining-fraction head on latents, `plan_critic` an outcome critic on the
    imagined frames, and `planner=rerank|cem` makes `select_action` roll candidate chunks around the
    policy's own through that model and execute the best (scored against a goal image's latent when the
    observation has one, else by the critic when trained, else by progress).

    Memory modes (`memory_mode_train`, `memory_mode_rollout`): pred, oracle (training only), zero,
    random, shuffle, scheduled (training only); see `world/memory.py`. Scheduled sampling: each
    training sample reads its oracle memory with probability p(step), where p starts at
    `scheduled_prob_start`, stays there for `scheduled_warmup_steps` policy training steps, then moves
    to `scheduled_prob_end` over `scheduled_decay_steps` steps along `scheduled_shape`
    (linear / cosine / exponential) and stays there. The step is counted by the policy itself (one per
    training-mode `forward`) and saved with its weights, so a resumed run continues the schedule.
    """

    # Baseline preset "A", "A_hist", "B_cont" or "F"; when set it overrides use_prophet and inject_memory.
    variant: str | None = None

    # The Prophet also reads the trunk's observation-token states (world loss shapes the trunk).
    prophet_reads_trunk: bool = True
    # How the actions read the predicted future: "cross_attn" (Prophet + gated cross-attention) or "in_trunk".
    world_path: str = "cross_attn"
    # in_trunk: foresight tokens in the trunk sequence (each predicts future_frames / foresight_tokens horizons).
    foresight_tokens: int = 1
    # The trunk reads the motion of the T history latents (set by variant A_hist; always on for in_trunk).
    trunk_reads_history: bool = False
    # Weight of the FLARE-style cosine alignment of the action-query states with the future latents (0 = off).
    lambda_align: float = 0.0

    def __post_init__(self):
        with policy_config_errors(self.type):
            super().__post_init__()
            preset = self.variant_preset(VARIANTS)
            if preset is not None:
                self.use_prophet, self.inject_memory = preset
                if self.variant in HISTORY_VARIANTS:
                    self.trunk_reads_history = True
            self.validate_trunk()
            self.validate_world_memory("For the baseline without world prediction use --policy.variant=A.")
            self.validate_world_path()
            self.validate_dynamics()
            validate_alignment(self)

    @property
    def in_trunk(self) -> bool:
        """Whether the foresight tokens run inside the trunk (world_path=in_trunk with a world prediction)."""
        return self.world_path == "in_trunk" and self.use_prophet

    @property
    def reads_history(self) -> bool:
        """Whether the trunk reads the latent history (A_hist, or the in-trunk path)."""
        return self.trunk_reads_history or self.in_trunk

    def validate_world_path(self) -> None:
        """Raise ValueError, naming the flag to fix, for world-path settings that cannot work together."""
        if self.world_path not in WORLD_PATHS:
            raise ValueError(f"world_path '{self.world_path}' is not one of {WORLD_PATHS}.")
        if self.reads_history and self.history_frames < 2:
            raise ValueError(
                f"The trunk reads the motion of the latent history (variant A_hist or world_path=in_trunk), "
                f"which needs history_frames >= 2 (got {self.history_frames}): set --policy.history_frames."
            )
        if not self.in_trunk:
            return
        from ..world.foresight import IN_TRUNK_MEMORY_MODES

        for name in ("memory_mode_train", "memory_mode_rollout"):
            if getattr(self, name) not in IN_TRUNK_MEMORY_MODES:
                raise ValueError(
                    f"{name}='{getattr(self, name)}' does not exist on world_path=in_trunk (modes "
                    f"{IN_TRUNK_MEMORY_MODES}): its foresight states are trunk hidden states, so there is no true "
                    "future to put in their place. Train the oracle upper bound with --policy.world_path=cross_attn."
                )
        if self.standardise_targets:
            # The foresight head predicts in the Prophet's raw convention (latents, or deltas); it does not
            # yet read or emit standardised units, so its loss would compare different spaces.
            raise ValueError(
                "world_path=in_trunk does not support standardise_targets=True yet (nor prophet_input=motion, "
                "which needs it): use --policy.world_target=delta without standardisation, or "
                "--policy.world_path=cross_attn."
            )
        if self.depth < 2:
            raise ValueError(
                f"world_path=in_trunk needs depth >= 2 (got {self.depth}): at block l the action queries read the "
                "foresight tokens' states after l blocks, so in a one-block trunk they read only the constant "
                "foresight embeddings. Set --policy.depth=2 or more."
            )
        if self.foresight_tokens < 1 or self.future_frames % self.foresight_tokens:
            raise ValueError(
                f"future_frames ({self.future_frames}) must be a multiple of foresight_tokens "
                f"({self.foresight_tokens} >= 1): set --policy.foresight_tokens to a divisor of it."
            )
