"""FLARE-style alignment of an action path's hidden states with the cached future world latents.

The hidden states of the action tokens (e.g. SmolVLA's action expert right before `action_out_proj`)
are mean-pooled over the chunk and linearly projected to K latents, one per future step; each is
pulled by cosine towards the cached latent z_{t+k} (OBS_WORLD_FUTURE). Steps past the episode end
(OBS_WORLD_FUTURE_VALID false) take no part. The projection is trained with the policy; the targets
are fixed cache values, so no gradient reaches the encoder.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def validate_alignment(config) -> None:
    """Refuse a `lambda_align` that cannot train (negative, or no future latents to align with)."""
    if config.lambda_align < 0:
        raise ValueError(f"lambda_align must be >= 0, got {config.lambda_align}.")
    if config.lambda_align > 0 and config.future_frames < 1:
        raise ValueError("lambda_align > 0 aligns with the future world latents: it needs --policy.future_frames >= 1.")


def alignment_targets(batch: dict, future_frames: int) -> tuple[Tensor, Tensor | None]:
    """(OBS_WORLD_FUTURE [B, K, D], OBS_WORLD_FUTURE_VALID [B, K] or None) of a training batch, checked."""
    from ..constants import OBS_WORLD_FUTURE, OBS_WORLD_FUTURE_VALID

    if OBS_WORLD_FUTURE not in batch:
        raise KeyError(
            f"lambda_align > 0 needs '{OBS_WORLD_FUTURE}' in the training batch (the world-latent step adds it "
            "from the latent cache): train through lerobot-train with this policy's preprocessor."
        )
    future = batch[OBS_WORLD_FUTURE]
    if future.shape[1] != future_frames:
        raise ValueError(
            f"'{OBS_WORLD_FUTURE}' holds {future.shape[1]} future latents but the policy was built for "
            f"future_frames={future_frames}; use the policy's own preprocessor."
        )
    return future, batch.get(OBS_WORLD_FUTURE_VALID)


class FutureAlignment(nn.Module):
    """Linear projection of pooled action-path states [B, N, W] to K future latents, scored by cosine."""

    def __init__(self, width: int, future_frames: int, latent_dim: int):
        """`width`: hidden size of the action path; K = `future_frames` latents of `latent_dim`."""
        super().__init__()
        self.future_frames, self.latent_dim = future_frames, latent_dim
        self.proj = nn.Linear(width, future_frames * latent_dim)

    def forward(self, hidden: Tensor, future: Tensor, valid: Tensor | None) -> tuple[Tensor, dict]:
        """(alignment loss = mean over valid (b, k) of 1 - cos, logs `align_loss` and `align_cos`)."""
        pooled = hidden.float().mean(dim=1)
        pred = self.proj(pooled).view(-1, self.future_frames, self.latent_dim)
        cos = F.cosine_similarity(pred, future.float().to(pred.device), dim=-1)  # [B, K]
        weight = torch.ones_like(cos) if valid is None else valid.to(cos.device, cos.dtype)
        count = weight.sum().clamp_min(1.0)
        loss = ((1.0 - cos) * weight).sum() / count
        return loss, {"align_loss": loss.item(), "align_cos": float((cos.detach() * weight).sum() / count)}
