"""Fitted world encoders: small conv nets trained by `lerobot-wm-fit-encoder` on a dataset's own frames.

A fitted encoder lives in a local directory that every `--encoder` / `--policy.encoder` flag accepts:

    <dir>/wm_encoder.json     marker + architecture + preprocessing + fit settings (deterministic bytes)
    <dir>/model.safetensors   the encoder's weights (the contrastive projection head is not kept)

The marker file is what tells this format apart from a transformers `save_pretrained` directory. It is
written last, so a directory with weights but no marker is an unfinished fit, never a half-read encoder.
The identity's revision is a sha256 over both files, so a refit (other seed, data or steps) changes the
identity, and latent caches built with the old weights are refused as stale.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from ..fileio import files_revision
from .encoder_base import EncoderIdentity, WorldEncoder

# File whose presence marks a directory as a fitted world encoder.
MARKER_FILE = "wm_encoder.json"
WEIGHTS_FILE = "model.safetensors"
# Working folder of lerobot-wm-fit-encoder (decoded frames, training checkpoint) inside the encoder dir.
STATE_DIR = "fit_state"
# The marker's "format" value; a directory claiming another format is refused.
FORMAT_NAME = "lerobot_wm_fitted_encoder"
# Bumped when the directory layout or the network definition changes incompatibly.
FORMAT_VERSION = 1
# Fixed normalisation of [0, 1] pixels: centred, about unit scale. GroupNorm inside the net makes
# dataset statistics unnecessary, and a constant keeps the identity independent of the data.
FITTED_MEAN = (0.5, 0.5, 0.5)
FITTED_STD = (0.25, 0.25, 0.25)


class FittedEncoderError(ValueError):
    """A fitted-encoder directory that cannot be used; the message names the fix."""


def default_arch(
    image_size: int = 64, dim: int = 256, channels: tuple[int, ...] = (32, 64, 128, 128), thumbnail: int = 0
) -> dict:
    """The architecture settings stored in the marker (everything `ConvEncoderNet` needs).

    `thumbnail` > 0 appends an n x n RGB thumbnail of the input to the learnt latent; the key is written
    only then, so encoders fitted without it keep the marker (and identity) they always had.
    """
    arch = {"image_size": int(image_size), "dim": int(dim), "channels": [int(c) for c in channels]}
    if thumbnail:
        if not 1 <= int(thumbnail) <= int(image_size):
            raise FittedEncoderError(
                f"--thumbnail={thumbnail}: the thumbnail side must lie in [1, --image_size={image_size}] (0: none)."
            )
        arch["thumbnail"] = int(thumbnail)
    return arch


def latent_dim(arch: dict) -> int:
    """Width of the latents an architecture gives: the learnt dims, plus 3 n^2 with an n x n thumbnail."""
    side = int(arch.get("thumbnail", 0))
    return int(arch["dim"]) + 3 * side * side


class ConvEncoderNet(nn.Module):
    """Stride-2 conv stack -> flatten -> linear -> LayerNorm, optionally followed by a raw thumbnail.

    Flattening the last feature map (instead of global pooling) keeps *where* things are, which is
    what a manipulation policy needs (gripper and object positions). GroupNorm, not BatchNorm, so an
    encoding never depends on the other frames of its batch. With `thumbnail` > 0 the latent is the learnt
    embedding followed by the area-averaged n x n input (the built-in `pixels` thumbnail, same pixel
    normalisation): the policy keeps everything the thumbnail gives and gets the learnt features on top.
    The fit objectives train `embed` only; the thumbnail has no weights.
    """

    def __init__(self, image_size: int, dim: int, channels: list[int], thumbnail: int = 0):
        super().__init__()
        self.thumbnail = int(thumbnail)
        layers: list[nn.Module] = []
        c_in = 3
        for i, c in enumerate(channels):
            # A 4x4 first kernel sees whole 2x2 pixel blocks on both sides of the stride.
            k = 4 if i == 0 else 3
            layers += [nn.Conv2d(c_in, c, k, stride=2, padding=1), nn.GroupNorm(8 if c % 8 == 0 else 1, c), nn.GELU()]
            c_in = c
        self.features = nn.Sequential(*layers)
        with torch.no_grad():
            flat = self.features(torch.zeros(1, 3, image_size, image_size)).numel()
        self.proj = nn.Linear(flat, dim)
        self.norm = nn.LayerNorm(dim)

    def embed(self, pixels: torch.Tensor) -> torch.Tensor:
        """[B, 3, S, S] normalised pixels -> [B, dim] learnt latents (what the fit objectives train)."""
        return self.norm(self.proj(self.features(pixels).flatten(1)))

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        """[B, 3, S, S] normalised pixels -> [B, dim (+ 3 n^2)] latents."""
        z = self.embed(pixels)
        if not self.thumbnail:
            return z
        return torch.cat([z, F.adaptive_avg_pool2d(pixels, self.thumbnail).flatten(1)], dim=1)


def build_net(arch: dict) -> ConvEncoderNet:
    """The network an architecture dict describes (random weights)."""
    return ConvEncoderNet(arch["image_size"], arch["dim"], list(arch["channels"]), int(arch.get("thumbnail", 0)))


def is_fitted_dir(name_or_path: str) -> bool:
    """True when `name_or_path` is a fitted-encoder directory: it has the marker, or a fit is under way there."""
    path = Path(name_or_path).expanduser()
    return path.is_dir() and ((path / MARKER_FILE).is_file() or (path / STATE_DIR).is_dir())


def read_marker(directory: str | Path) -> dict:
    """The marker's content, checked for format and version."""
    path = Path(directory).expanduser() / MARKER_FILE
    if not path.exists():
        raise FittedEncoderError(
            f"Encoder directory '{directory}' has no {MARKER_FILE}: the lerobot-wm-fit-encoder run writing it has not "
            "finished. Fix: rerun the same lerobot-wm-fit-encoder command (it resumes from its last checkpoint)."
        )
    try:
        marker = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise FittedEncoderError(f"Cannot read {path} ({err}). Fix: rerun lerobot-wm-fit-encoder into that directory.") from err
    if marker.get("format") != FORMAT_NAME or marker.get("format_version") != FORMAT_VERSION:
        raise FittedEncoderError(
            f"{path} is format {marker.get('format')!r} version {marker.get('format_version')!r}; this plugin reads "
            f"{FORMAT_NAME!r} version {FORMAT_VERSION}. Fix: refit with this plugin's lerobot-wm-fit-encoder."
        )
    return marker


def fitted_revision(directory: str | Path) -> str:
    """sha256 over the weights and the marker: any refit or edit changes it."""
    directory = Path(directory).expanduser()
    weights = directory / WEIGHTS_FILE
    if not weights.is_file():
        raise FittedEncoderError(
            f"Fitted encoder '{directory}' has a marker but no {WEIGHTS_FILE}. Fix: rerun lerobot-wm-fit-encoder "
            "with --overwrite into that directory."
        )
    return files_revision((weights, directory / MARKER_FILE))


def fitted_identity(directory: str | Path, pooling: str | None = None, window: int | None = None) -> EncoderIdentity:
    """Identity of a fitted encoder directory (reads the marker and hashes the weights; builds no model)."""
    if window not in (None, 1):
        raise FittedEncoderError(f"Fitted encoder '{directory}' encodes single frames; window must be 1 (got {window}).")
    if pooling not in (None, "none"):
        raise FittedEncoderError(f"Fitted encoder '{directory}' has no pooling choice; leave pooling unset (got {pooling!r}).")
    marker = read_marker(directory)
    arch = marker["arch"]
    side = int(arch["image_size"])
    return EncoderIdentity(
        # Named by its absolute path, so `./enc` and `/abs/enc` share one cache (as for HF local dirs).
        name=str(Path(directory).expanduser().resolve()),
        kind="fitted",
        revision=fitted_revision(directory),
        pooling="none",
        window=1,
        image_size=(side, side),
        image_mean=tuple(marker["image_mean"]),
        image_std=tuple(marker["image_std"]),
        dim=latent_dim(arch),
        extra={"format_version": FORMAT_VERSION, "objective": marker.get("objective", "")},
    )


class FittedConvEncoder(WorldEncoder):
    """A fitted conv encoder as a frozen `WorldEncoder` (same `encode` path as every other encoder)."""

    def __init__(self, identity: EncoderIdentity, net: ConvEncoderNet):
        super().__init__(identity)
        self.net = net

    def _forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.net(pixels)


def load_fitted_encoder(directory: str | Path, pooling: str | None = None, window: int | None = None) -> FittedConvEncoder:
    """Load a fitted encoder directory as a frozen, eval-mode encoder on the CPU."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    identity = fitted_identity(directory, pooling, window)
    net = build_net(read_marker(directory)["arch"])
    try:
        state = load_file(str(Path(directory).expanduser() / WEIGHTS_FILE))
        net.load_state_dict(state, strict=True)
    except (OSError, RuntimeError, SafetensorError) as err:
        raise FittedEncoderError(
            f"Cannot load the weights of fitted encoder '{directory}' ({err}). Fix: refit it with "
            "lerobot-wm-fit-encoder --overwrite (the weights do not match the marker's architecture)."
        ) from err
    return FittedConvEncoder(identity, net).eval().requires_grad_(False)


def save_fitted_encoder(directory: str | Path, net: ConvEncoderNet, marker: dict) -> None:
    """Write weights, then the marker (the commit point), each atomically."""
    from safetensors.torch import save

    from ..fileio import atomic_write_bytes

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu().contiguous() for k, v in net.state_dict().items()}
    atomic_write_bytes(directory / WEIGHTS_FILE, save(state))
    full = {"format": FORMAT_NAME, "format_version": FORMAT_VERSION, **marker}
    atomic_write_bytes(directory / MARKER_FILE, (json.dumps(full, sort_keys=True, indent=2) + "\n").encode())
