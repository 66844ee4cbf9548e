"""The world-latent history a policy keeps at evaluation, and reading the current latent from a batch.

In training the world-latent step hands the policy ready-made history windows from the cache; at
evaluation only the current latent arrives, so the policy accumulates the last T itself, padded at an
episode's first frame exactly as the training windows are clamped to the episode start.
"""

from __future__ import annotations

import logging

import torch
from torch import Tensor

from ..constants import OBS_WORLD_LATENT

logger = logging.getLogger(__name__)


def latent_from_batch(batch: dict) -> Tensor:
    """The current world latent [B, D] of a batch, with a clear error when the world step did not run."""
    if OBS_WORLD_LATENT not in batch:
        raise KeyError(
            f"The batch has no '{OBS_WORLD_LATENT}'. It is added by the world-latent processor step: run "
            "the policy through its preprocessor (make_pre_post_processors / lerobot-train / lerobot-eval)."
        )
    latent = batch[OBS_WORLD_LATENT]
    return latent.unsqueeze(0) if latent.ndim == 1 else latent


class LatentHistory:
    """The last `frames` world latents of the current episode, [B, T, D], oldest first.

    The first latent after `reset()` fills all T slots (repeat padding), which is what the training
    windows hold at an episode's first frame (indices before the start clamp to it).
    """

    def __init__(self, frames: int):
        self.frames = frames
        self.value: Tensor | None = None

    def reset(self) -> None:
        """Forget the episode (the next push starts a new, repeat-padded window)."""
        self.value = None

    def push(self, latent: Tensor) -> Tensor:
        """Append z_t [B, D] and return the window [B, T, D]."""
        latent = latent.detach()
        if self.value is not None and self.value.shape[0] != latent.shape[0]:
            logger.warning(
                "Batch size changed from %d to %d without reset(); restarting the latent history.",
                self.value.shape[0], latent.shape[0],
            )  # fmt: skip
            self.value = None
        if self.value is None:
            self.value = latent.unsqueeze(1).repeat(1, self.frames, 1)
        else:
            self.value = torch.cat([self.value[:, 1:], latent.unsqueeze(1).to(self.value.dtype)], dim=1)
        return self.value
