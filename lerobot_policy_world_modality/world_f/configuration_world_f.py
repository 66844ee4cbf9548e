"""Configuration of the `world_f` policy: a compact transformer policy with Prophet world memory."""

from __future__ import annotations

from dataclasses import dataclass

from lerobot.configs.policies import PreTrainedConfig

from ..language import LanguageOptions
from ..latents.config import WorldLatentOptions
from ..trunk_policy import TrunkPolicyOptions
from ..world.options import WorldMemoryOptions

# The baselines of the research line, as (use_prophet, inject_memory).
VARIANTS = {"A": (False, False), "B_cont": (True, False), "F": (True, True)}


@PreTrainedConfig.register_subclass("world_f")
@dataclass
class WorldFConfig(
    TrunkPolicyOptions, WorldLatentOptions, WorldMemoryOptions, LanguageOptions, PreTrainedConfig
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

    # The Prophet also reads the trunk's observation-token states (world loss shapes the trunk).
    prophet_reads_trunk: bool = True

    def __post_init__(self):
        super().__post_init__()
        preset = self.variant_preset(VARIANTS)
        if preset is not None:
            self.use_prophet, self.inject_memory = preset
        self.validate_trunk()
        self.validate_world_memory("For the baseline without world prediction use --policy.variant=A.")
