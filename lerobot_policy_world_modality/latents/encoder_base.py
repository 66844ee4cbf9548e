"""What every world encoder shares: its identity, the one image preprocessing, the module interface.

Every path that turns pixels into a world latent (the precompute command, the processor step at
evaluation, the benchmarks) goes through `WorldEncoder.encode`, and every encoder prepares its
input with the single function `preprocess_frames`. That is what makes eval latents reproduce the
cached training latents exactly. The encoder families (`encoders`, `hf_encoders`, `fitted`) build on
this module; it imports none of them.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

# Pooling choices for transformer encoders (documented in docs/encoders.md).
POOLINGS = ("cls", "mean", "pooler")


@dataclass(frozen=True)
class EncoderIdentity:
    """Everything that decides the bytes of a latent; part of the cache fingerprint and checkpoints."""

    name: str  # what the user passed: Hub id, local path or built-in name
    kind: str  # "builtin", "dinov2", "siglip", "vjepa2", "fitted"
    revision: str  # Hub commit hash, sha256 of local weights, or the built-in's version tag
    pooling: str  # one of POOLINGS, or "none" for built-ins
    window: int  # frames per latent (1 for image encoders)
    image_size: tuple[int, int]  # (H, W) the frames are resized to
    image_mean: tuple[float, ...]  # per-channel normalisation mean
    image_std: tuple[float, ...]  # per-channel normalisation std
    dim: int  # latent dimension, read from the model
    extra: dict = field(default_factory=dict)  # family-specific settings that change the output

    def to_dict(self) -> dict:
        """JSON-serialisable form (tuples become lists)."""
        d = asdict(self)
        d["image_size"] = list(self.image_size)
        d["image_mean"] = list(self.image_mean)
        d["image_std"] = list(self.image_std)
        return d


def preprocess_frames(
    frames: torch.Tensor,
    image_size: tuple[int, int],
    mean: tuple[float, ...],
    std: tuple[float, ...],
) -> torch.Tensor:
    """The one image preprocessing used everywhere: to float [0, 1], resize, normalise.

    `frames` is channel-first `[..., C, H, W]`, either uint8 in [0, 255] or floating point already
    in [0, 1] (what LeRobot's datasets and env processors deliver). Only uint8 input is divided by
    255, so float frames are never rescaled twice. The whole frame is resized to `image_size`
    (bilinear, antialiased), with no crop, so nothing of the scene is cut away.
    """
    if frames.dtype == torch.uint8:
        x = frames.float() / 255.0
    elif frames.is_floating_point():
        x = frames.float()
    else:
        raise TypeError(f"Frames must be uint8 or floating point, got {frames.dtype}.")
    if x.ndim < 3 or x.shape[-3] not in (1, 3):
        raise ValueError(
            f"Frames must be channel-first [..., C, H, W] with C in (1, 3), got shape {tuple(x.shape)}."
        )
    lead = x.shape[:-3]
    x = x.reshape(-1, *x.shape[-3:])
    if x.shape[1] == 1:
        x = x.expand(-1, 3, -1, -1)
    if tuple(x.shape[-2:]) != tuple(image_size):
        x = F.interpolate(x, size=tuple(image_size), mode="bilinear", antialias=True, align_corners=False)
    m = torch.tensor(mean, dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
    s = torch.tensor(std, dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
    x = (x - m) / s
    return x.reshape(*lead, *x.shape[-3:])


class WorldEncoder(torch.nn.Module):
    """A frozen encoder that maps frames to float32 world latents.

    Subclasses implement `_forward(pixels)` on preprocessed pixels: `[B, C, H, W]` for image encoders
    (window 1) or `[B, m, C, H, W]` for video encoders (window m > 1).
    """

    def __init__(self, identity: EncoderIdentity):
        super().__init__()
        self.identity = identity

    @property
    def dim(self) -> int:
        """Latent dimension."""
        return self.identity.dim

    @property
    def window(self) -> int:
        """Number of consecutive frames that make one latent."""
        return self.identity.window

    @property
    def device(self) -> torch.device:
        """Device of the encoder's weights (CPU for parameter-free encoders)."""
        for p in self.parameters():
            return p.device
        for b in self.buffers():
            return b.device
        return torch.device("cpu")

    def _forward(self, pixels: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    @torch.no_grad()
    def encode(self, frames: torch.Tensor) -> torch.Tensor:
        """Encode frames into latents `[B, D]`, float32, on the frames' device.

        `frames` is `[B, C, H, W]` for window-1 encoders or `[B, m, C, H, W]` for video encoders,
        uint8 or float in [0, 1]. For a window-1 encoder `[B, 1, C, H, W]` is accepted too.
        """
        expected_ndim = 4 if self.window == 1 else 5
        if self.window == 1 and frames.ndim == 5 and frames.shape[1] == 1:
            frames = frames[:, 0]
        if frames.ndim != expected_ndim or (self.window > 1 and frames.shape[1] != self.window):
            want = "[B, C, H, W]" if self.window == 1 else f"[B, {self.window}, C, H, W]"
            raise ValueError(
                f"Encoder '{self.identity.name}' (window {self.window}) expects frames {want}, "
                f"got shape {tuple(frames.shape)}."
            )
        out_device = frames.device
        pixels = preprocess_frames(
            frames.to(self.device), self.identity.image_size, self.identity.image_mean, self.identity.image_std
        )
        z = self._forward(pixels)
        # fp16/bf16 encoders must not leak their dtype into fp32 policy modules.
        return z.float().to(out_device)


