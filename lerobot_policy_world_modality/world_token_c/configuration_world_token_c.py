"""Configuration of the `world_token_c` policy: world tokens as an input modality plus future-token prediction."""

from __future__ import annotations

from dataclasses import dataclass

from lerobot.configs.policies import PreTrainedConfig

from ..cli_errors import policy_config_errors
from ..language import LanguageOptions
from ..latents.config import WorldLatentOptions
from ..trunk_policy import TrunkPolicyOptions
from ..world.codebook import FACTORISATIONS

# Presets of the research line, as world_token_input: C reads the current world token, B only predicts.
VARIANTS = {"C": True, "B": False}


@PreTrainedConfig.register_subclass("world_token_c")
@dataclass
class WorldTokenCConfig(TrunkPolicyOptions, WorldLatentOptions, LanguageOptions, PreTrainedConfig):
    """Config of `world_token_c` (model C of the research line): discrete world tokens in the trunk.

    Each frame's world latent is quantised to a world token with a codebook fitted beforehand by
    `lerobot-wm-fit-codebook` (k-means, or a factorised codebook: product quantisation of latent
    parts or residual quantisation, G codebooks of v codes). The trunk reads the sequence
    [observation tokens, WORLD_CUR, K future queries, H action queries]: WORLD_CUR embeds the current
    token, each future query predicts the token of frame t+k (cross-entropy over the codebook, one
    v-way head per factor, masked at episode ends, weighted by `lambda_world`), and the action queries
    produce the action chunk (L1 or MSE as in `world_f`).

    The codebook is a buffer of the policy, so checkpoints carry it: `lerobot-eval --policy.path`
    tokenises live frames with exactly the training codebook and never needs the cache or the file.
    The codebook_* fields below the path are filled from the file at training time and then tell a
    reloaded policy the codebook's shape.

    Variants: C (`world_token_input=True`) reads WORLD_CUR; B (`world_token_input=False`) has no
    WORLD_CUR token and keeps only the future-token prediction. Not a subclass of a LeRobot built-in
    config: LeRobot 0.4.4 would then hand it the built-in processors and the world step would not run.
    """

    # Preset "C" (reads the current world token) or "B" (prediction only); overrides world_token_input.
    variant: str | None = None

    # T: the policy reads only the current latent, so the world step needs no longer history.
    history_frames: int = 1
    # K: future frames whose world tokens are predicted (one future-query token each).
    future_frames: int = 4

    # Codebook file written by lerobot-wm-fit-codebook; read when training starts (not needed at eval).
    codebook_path: str | None = None
    # v: codes per codebook; filled from the codebook file (a different value there is an error).
    codebook_size: int | None = None
    # G: number of codebooks (1 = plain k-means); filled from the codebook file.
    codebook_factors: int | None = None
    # Codebook layout "none", "product" or "residual"; filled from the codebook file.
    codebook_factorisation: str | None = None
    # Whether latents are L2-normalised before assignment; filled from the codebook file.
    codebook_normalise: bool | None = None
    # sha256 of the codebook's centroids; filled from the codebook file, for reference.
    codebook_digest: str | None = None

    # Read the current world token as the WORLD_CUR input token (variant C); False = variant B.
    world_token_input: bool = True
    # Multiplier of the WORLD_CUR embedding (after the optional layer norm).
    world_token_scale: float = 1.0
    # Training only: probability per sample of replacing WORLD_CUR by a learned null embedding.
    world_token_dropout: float = 0.0
    # Layer-normalise the WORLD_CUR embedding before scaling it.
    world_token_layernorm: bool = False
    # Attention mask: action queries and observation tokens cannot read WORLD_CUR (only future queries can).
    mask_world_from_actions: bool = False
    # Weight of the future-token cross-entropy added to the action loss.
    lambda_world: float = 1.0

    def __post_init__(self):
        with policy_config_errors(self.type):
            super().__post_init__()
            preset = self.variant_preset(VARIANTS)
            if preset is not None:
                self.world_token_input = preset
            self.validate_trunk()
            self.validate_future_stride()
            if self.future_frames < 1 or self.history_frames < 1:
                raise ValueError(
                    f"world_token_c predicts the tokens of the next K frames: set --policy.future_frames >= 1 "
                    f"(got {self.future_frames}) and --policy.history_frames >= 1 (got {self.history_frames})."
                )
            if not 0.0 <= self.world_token_dropout < 1.0:
                raise ValueError(f"world_token_dropout must lie in [0, 1), got {self.world_token_dropout}.")
            if self.codebook_factorisation is not None and self.codebook_factorisation not in FACTORISATIONS:
                raise ValueError(
                    f"codebook_factorisation must be one of {FACTORISATIONS}, got '{self.codebook_factorisation}'."
                )
