"""Frozen world encoders by name: the built-in `pixels`, fitted encoders and transformers checkpoints.

`load_encoder` and `resolve_encoder_identity` dispatch a name (built-in, fitted-encoder directory, Hub
id or `save_pretrained` directory) to its family; the shared types live in `encoder_base`.
"""

from __future__ import annotations

import re

import torch

from .encoder_base import EncoderIdentity, WorldEncoder
from .fitted import fitted_identity, is_fitted_dir, load_fitted_encoder
from .hf_encoders import load_hf_encoder, resolve_hf_encoder_identity


class PixelThumbnailEncoder(WorldEncoder):
    """Built-in offline encoder: the frame shrunk to an n x n RGB thumbnail, flattened.

    It needs no weights and no download, so it is the default of the offline demo and the tests.
    It carries no semantics; it is a fair encoder for single-task MetaWorld scenes where the
    position of a few coloured objects is what matters, and a poor one anywhere else.
    """

    VERSION = "pixels-v1"

    def __init__(self, side: int = 16):
        super().__init__(self.make_identity(side))

    @classmethod
    def make_identity(cls, side: int) -> EncoderIdentity:
        """Identity of the n x n thumbnail encoder (no model needed)."""
        if side < 1:
            raise ValueError(f"Built-in encoder 'pixels-{side}': the thumbnail side must be >= 1.")
        return EncoderIdentity(
            name=f"pixels-{side}",
            kind="builtin",
            revision=cls.VERSION,
            pooling="none",
            window=1,
            image_size=(side, side),
            # Centre [0, 1] and spread it to about unit scale; the values are a convention, not learned.
            image_mean=(0.5, 0.5, 0.5),
            image_std=(0.25, 0.25, 0.25),
            dim=3 * side * side,
        )

    def _forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return pixels.flatten(1)


_BUILTIN_PATTERN = re.compile(r"^pixels(?:-(\d+))?$")


def builtin_encoder_names() -> list[str]:
    """Names accepted as built-in encoders (besides `pixels-<n>` variants)."""
    return ["pixels", "pixels-16", "pixels-24", "pixels-32"]


def _builtin_side(name_or_path: str, pooling: str | None, window: int | None) -> int | None:
    """Thumbnail side if `name_or_path` names the built-in encoder (options checked), else None."""
    match = _BUILTIN_PATTERN.match(name_or_path)
    if not match:
        return None
    if window not in (None, 1):
        raise ValueError(f"Built-in encoder '{name_or_path}' encodes single frames; window must be 1.")
    if pooling not in (None, "none"):
        raise ValueError(f"Built-in encoder '{name_or_path}' has no pooling choice; leave pooling unset.")
    return int(match.group(1) or 16)


def resolve_encoder_identity(
    name_or_path: str,
    pooling: str | None = None,
    window: int | None = None,
    dtype: torch.dtype | str | None = None,
) -> EncoderIdentity:
    """The identity `load_encoder` would give, computed cheaply (config files + revision, no weights).

    Training uses it to find the latent cache without loading the encoder. `dtype` only matters
    for transformers encoders (half-precision weights give different latents).
    """
    side = _builtin_side(name_or_path, pooling, window)
    if side is not None:
        return PixelThumbnailEncoder.make_identity(side)
    if is_fitted_dir(name_or_path):
        return fitted_identity(name_or_path, pooling=pooling, window=window)
    return resolve_hf_encoder_identity(name_or_path, pooling=pooling, window=window, dtype=dtype)


def load_encoder(
    name_or_path: str,
    pooling: str | None = None,
    window: int | None = None,
    device: str | torch.device = "cpu",
    dtype: torch.dtype | str | None = None,
) -> WorldEncoder:
    """Build a frozen, eval-mode world encoder from a built-in name, a Hub id or a local path.

    A local path is either a transformers `save_pretrained` directory or a directory written by
    `lerobot-wm-fit-encoder` (recognised by its `wm_encoder.json` marker, see `latents/fitted.py`).

    `pooling` and `window` default per family (see docs/encoders.md); `dtype` applies to model
    weights only (default float32), outputs are always float32. The encoder's `.identity` equals
    `resolve_encoder_identity(name_or_path, pooling, window, dtype)`.
    """
    side = _builtin_side(name_or_path, pooling, window)
    if side is not None:
        encoder: WorldEncoder = PixelThumbnailEncoder(side)
    elif is_fitted_dir(name_or_path):
        encoder = load_fitted_encoder(name_or_path, pooling=pooling, window=window)
    else:
        encoder = load_hf_encoder(name_or_path, pooling=pooling, window=window, dtype=dtype)
    encoder.eval().requires_grad_(False)
    return encoder.to(device)
