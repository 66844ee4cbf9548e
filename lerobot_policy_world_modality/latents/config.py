"""Config fields shared by every world policy type: which world latents, from which encoder and cameras."""

from __future__ import annotations

from dataclasses import dataclass, field

from lerobot.configs.types import FeatureType


@dataclass
class WorldLatentOptions:
    """Mixin dataclass for policy configs; the same field names on `world_f`, `world_token_c`, `smolvla_world`.

    `dataset_repo_id` / `dataset_root` are filled by the policy from the training dataset that
    `lerobot-train` hands it, so users never set them; they tell the world-latent step which cache
    to read and are saved with the checkpoint for reference.
    """

    # Frozen world encoder: built-in name ("pixels"), Hugging Face Hub id or local path.
    encoder: str = "pixels"
    # Token pooling of transformer encoders: "cls", "mean" or "pooler"; None = the family's default.
    encoder_pooling: str | None = None
    # Frames per latent for video encoders (V-JEPA 2); None = the family's default (1 for images).
    encoder_window: int | None = None
    # Camera keys the world latents come from, concatenated in this order; empty = first image input.
    world_cameras: list[str] = field(default_factory=list)
    # T: latents of the current and past frames given to the Prophet.
    history_frames: int = 4
    # K: future latents the Prophet predicts.
    future_frames: int = 4
    # s: frames between predicted futures, z_{t+s}, ..., z_{t+Ks} (e.g. n_action_steps // K spans the executed actions).
    future_stride: int = 1
    # Root folder of latent caches; None = $LEROBOT_WM_CACHE or ~/.cache/lerobot_policy_world_modality/latents.
    latent_cache_root: str | None = None
    # Encoder weight dtype ("bf16", "fp16"); None = float32. Part of the cache identity.
    encoder_dtype: str | None = None
    # Device for online encoding at evaluation; None = the policy's device.
    encoder_device: str | None = None
    # Training dataset the latent cache belongs to; filled automatically by lerobot-train.
    dataset_repo_id: str | None = None
    # Local root of that dataset; filled automatically by lerobot-train.
    dataset_root: str | None = None
    # Dimension of the world latent (all world cameras concatenated); filled at construction from the encoder.
    world_latent_dim: int | None = None
    # Encoder the policy was trained with; filled by lerobot-train, a different --policy.encoder at load is refused.
    trained_encoder: str | None = None
    # Revision of that encoder (Hub commit or weights sha256); filled by lerobot-train, for the model card.
    encoder_revision: str | None = None
    # Fingerprint of each world camera's latent cache; filled by lerobot-train, for the model card.
    latent_fingerprints: list[str] = field(default_factory=list)
    # Content digest of the training dataset; filled by lerobot-train, for the model card.
    dataset_fingerprint: str | None = None

    def validate_future_stride(self) -> None:
        """Raise ValueError for a future stride below 1."""
        if self.future_stride < 1:
            raise ValueError(
                f"future_stride must be >= 1 (got {self.future_stride}): the K predicted frames are "
                "z_{t+s}, ..., z_{t+Ks}; use 1 for consecutive frames."
            )

    def resolved_world_cameras(self) -> list[str]:
        """The configured world cameras, or the first visual input feature when none is configured."""
        if self.world_cameras:
            return list(self.world_cameras)
        visual = [k for k, ft in (self.input_features or {}).items() if ft.type is FeatureType.VISUAL]
        if not visual:
            raise ValueError(
                "No world camera: set --policy.world_cameras='[observation.image]' (or another image key) "
                "or train on a dataset with at least one camera."
            )
        return [visual[0]]
