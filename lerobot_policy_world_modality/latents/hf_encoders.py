"""Frozen world encoders loaded through transformers: DINOv2, SigLIP (vision tower) and V-JEPA 2.

Each encoder is loaded with `from_pretrained(name_or_path)`, so a Hub id and a local directory
saved with `save_pretrained` take the same path. The family is read from the checkpoint config's
`model_type`; the latent dimension, the image size and the normalisation are read from the
checkpoint (model config and image / video processor config), never hard-coded.

`resolve_hf_encoder_identity` computes the `EncoderIdentity` from the config files and the revision
alone, without building the model; `load_hf_encoder` builds the identity through that same code,
so the identity a training run computes to find its latent cache is exactly the one the encoder
that filled the cache carried.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError

from ..sources import resolve_source
from ..fileio import files_revision
from .encoder_base import EncoderIdentity, WorldEncoder

# model_type values of each supported family (the config's `model_type`).
FAMILY_MODEL_TYPES = {
    "dinov2": ("dinov2", "dinov2_with_registers"),
    "siglip": ("siglip", "siglip_vision_model"),
    "vjepa2": ("vjepa2",),
}
# Valid poolings per family; the first one is the default.
FAMILY_POOLINGS = {
    "dinov2": ("cls", "mean", "pooler"),
    "siglip": ("pooler", "mean"),
    "vjepa2": ("mean",),
}
# ImageNet statistics: what DINOv2 and V-JEPA 2 were trained with.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# SigLIP maps [0, 1] to [-1, 1]; ImageNet statistics would be wrong for it.
SIGLIP_MEAN = (0.5, 0.5, 0.5)
SIGLIP_STD = (0.5, 0.5, 0.5)
# Default frames per V-JEPA 2 latent when no window is given. The checkpoints' frames_per_clip
# (64) is the pretraining clip length: far more context than one control step needs, and 16x the
# compute of 4 frames. 4 frames = 2 temporal tokens with the usual tubelet of 2.
DEFAULT_VIDEO_WINDOW = 4

_DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "float16": torch.float16,
    "fp16": torch.float16,
    "half": torch.float16,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
}


class EncoderLoadError(ValueError):
    """A checkpoint or an encoder option that cannot be used; the message names the fix."""


def normalize_dtype(dtype: torch.dtype | str | None) -> torch.dtype:
    """Weights dtype from a torch dtype, a name ("bf16", "float16", ...) or None (float32)."""
    if dtype is None:
        return torch.float32
    if isinstance(dtype, torch.dtype):
        if dtype not in _DTYPES.values():
            raise EncoderLoadError(f"Encoder dtype must be float32, float16 or bfloat16, got {dtype}.")
        return dtype
    key = str(dtype).lower().removeprefix("torch.")
    if key not in _DTYPES:
        raise EncoderLoadError(f"Unknown encoder dtype '{dtype}'; use one of {sorted(_DTYPES)}.")
    return _DTYPES[key]


@dataclass(frozen=True)
class _Resolved:
    """What resolving a checkpoint yields: its identity plus what loading needs next."""

    identity: EncoderIdentity
    family: str
    source: str  # the path or Hub id handed to from_pretrained
    commit: str | None  # Hub commit hash the config came from (None for a local dir)
    config: object  # the transformers config (full SigLIP config included)


# ---------------------------------------------------------------------------------------------
# Resolution: config, family, processor settings, revision (cheap: no model is built)
# ---------------------------------------------------------------------------------------------


def _source(name_or_path: str) -> tuple[str, bool]:
    """Return (what to give from_pretrained, is_local_dir); catch mistyped local paths early."""
    return resolve_source(
        name_or_path, "Encoder path",
        "a directory written by `save_pretrained` (with config.json and weights) or a Hub id such as "
        "'facebook/dinov2-small'", EncoderLoadError,
    )  # fmt: skip


def _load_config(source: str, is_local: bool):
    """The checkpoint's transformers config, with a clear error when it cannot be found."""
    from transformers import AutoConfig

    # Checked first because AutoConfig falls back to guessing the model type from the directory
    # name (a folder called "empty" loads as "mpt"), which would hide the real problem.
    if is_local and not (Path(source) / "config.json").is_file():
        raise EncoderLoadError(
            f"Cannot load encoder config: the directory '{source}' has no readable config.json. "
            "Fix: pass a directory written by `save_pretrained` (config.json plus weights)."
        )
    try:
        return AutoConfig.from_pretrained(source)
    except (OSError, ValueError, KeyError) as err:
        where = (
            f"the directory '{source}' has no readable config.json"
            if is_local
            else f"'{source}' is not a local directory and its config could not be fetched from the Hub"
        )
        raise EncoderLoadError(
            f"Cannot load encoder config: {where} ({err}). Fix: pass a directory written by "
            f"`save_pretrained`, or download it first (`huggingface-cli download {source}`) on a machine "
            "with internet and point HF_HOME at that cache."
        ) from err


def _family(config, name: str) -> str:
    """Family from the config's model_type; unsupported types get the list of supported ones."""
    model_type = getattr(config, "model_type", None)
    for family, types in FAMILY_MODEL_TYPES.items():
        if model_type in types:
            return family
    supported = ", ".join(f"{f} ({'/'.join(t)})" for f, t in FAMILY_MODEL_TYPES.items())
    raise EncoderLoadError(
        f"Encoder '{name}' has model_type '{model_type}', which is not supported. Supported families "
        f"(model_type): {supported}, plus the built-in 'pixels'. Pick a checkpoint of one of these."
    )


def _vision_config(config, family: str):
    """The config that describes the vision tower (a full SigLIP config nests it)."""
    if family == "siglip" and getattr(config, "model_type", "") == "siglip":
        return config.vision_config
    return config


def _read_processor_config(source: str, commit: str | None, family: str) -> dict | None:
    """The checkpoint's image (or video) processor settings as a dict, or None when it has none."""
    from transformers.utils import cached_file

    names = ["preprocessor_config.json"]
    if family == "vjepa2":
        names.insert(0, "video_preprocessor_config.json")
    for fname in names:
        path = cached_file(
            source,
            fname,
            revision=commit,
            _raise_exceptions_for_missing_entries=False,
            _raise_exceptions_for_connection_errors=False,
        )
        if path:
            with open(path) as f:
                return json.load(f)
    return None


def _as_hw(value) -> tuple[int, int] | None:
    """(H, W) from a processor size entry: int, {height, width} or {shortest_edge}."""
    if value is None:
        return None
    if isinstance(value, int):
        return (value, value)
    if isinstance(value, dict):
        if "height" in value and "width" in value:
            return (int(value["height"]), int(value["width"]))
        # We resize the whole frame to a square, so one edge length defines the square.
        for key in ("shortest_edge", "longest_edge"):
            if key in value:
                return (int(value[key]), int(value[key]))
    return None


def _as_channels(value, default: tuple[float, ...]) -> tuple[float, ...]:
    """Per-channel tuple from a processor mean/std entry (scalar or list)."""
    if value is None:
        return default
    if isinstance(value, (int, float)):
        return (float(value),) * 3
    return tuple(float(v) for v in value)


def _preprocessing(family: str, config, proc: dict | None) -> tuple[tuple[int, int], tuple, tuple]:
    """Image size, mean and std for `preprocess_frames`, from the processor config when present.

    The processor's crop size wins when it crops (that is what the model saw), else its resize
    size. We resize the whole frame to that size instead of cropping: robot cameras put task
    objects near the borders. Our frames are in [0, 1] already, so the processor's rescale is
    folded into mean/std rather than applied again (no double 1/255).
    """
    vision = _vision_config(config, family)
    if family == "vjepa2":
        default_size = (vision.crop_size, vision.crop_size)
    else:
        default_size = (vision.image_size, vision.image_size)
    default_mean, default_std = (SIGLIP_MEAN, SIGLIP_STD) if family == "siglip" else (IMAGENET_MEAN, IMAGENET_STD)
    if proc is None:
        return tuple(default_size), default_mean, default_std

    size = None
    if proc.get("do_center_crop"):
        size = _as_hw(proc.get("crop_size"))
    if size is None:
        size = _as_hw(proc.get("size")) or tuple(default_size)
    if proc.get("do_normalize", True):
        mean = _as_channels(proc.get("image_mean"), default_mean)
        std = _as_channels(proc.get("image_std"), default_std)
    else:
        mean, std = (0.0, 0.0, 0.0), (1.0, 1.0, 1.0)
    # The model saw (x255 * k - mean) / std with x255 in [0, 255] and k the rescale factor (1 when
    # the processor does not rescale). With x in [0, 1] that equals (x - mean/c) / (std/c), c = 255k.
    scale = 255.0 * (float(proc.get("rescale_factor", 1 / 255)) if proc.get("do_rescale", True) else 1.0)
    if abs(scale - 1.0) > 1e-9:
        mean = tuple(m / scale for m in mean)
        std = tuple(s / scale for s in std)
    return (int(size[0]), int(size[1])), mean, std


def local_revision(directory: str | Path) -> str:
    """sha256 over a local checkpoint's weight files (sorted by name) and its config.json."""
    directory = Path(directory)
    weights = sorted(
        (p for p in directory.iterdir() if p.is_file() and p.suffix in (".safetensors", ".bin")),
        key=lambda p: p.name,
    )
    if not weights:
        raise EncoderLoadError(
            f"Encoder directory '{directory}' holds no weight files (*.safetensors / *.bin). "
            "Fix: save the model there with `model.save_pretrained(dir)`."
        )
    return files_revision([*weights, directory / "config.json"])


def _default_window(config) -> int:
    """Default V-JEPA 2 window: DEFAULT_VIDEO_WINDOW frames, at most frames_per_clip, whole tubelets."""
    tubelet = int(config.tubelet_size)
    m = min(DEFAULT_VIDEO_WINDOW, int(config.frames_per_clip))
    return max(tubelet, m // tubelet * tubelet)


def _resolve(name_or_path: str, pooling: str | None, window: int | None, dtype) -> _Resolved:
    """Everything but the weights: config, family, options checks, preprocessing, revision."""
    source, is_local = _source(name_or_path)
    config = _load_config(source, is_local)
    family = _family(config, name_or_path)
    commit = None if is_local else getattr(config, "_commit_hash", None)

    choices = FAMILY_POOLINGS[family]
    pooling = pooling or choices[0]
    if pooling not in choices:
        why = " SigLIP has no CLS token." if family == "siglip" and pooling == "cls" else ""
        raise EncoderLoadError(
            f"Pooling '{pooling}' is not valid for {family} encoder '{name_or_path}'.{why} "
            f"Choose one of {list(choices)} (default '{choices[0]}')."
        )
    vision = _vision_config(config, family)
    if family == "siglip" and pooling == "pooler" and not getattr(vision, "vision_use_head", True):
        raise EncoderLoadError(
            f"SigLIP checkpoint '{name_or_path}' has no attention-pooling head (vision_use_head=False), "
            "so pooling 'pooler' is unavailable. Use pooling 'mean'."
        )

    if family == "vjepa2":
        tubelet = int(vision.tubelet_size)
        window = _default_window(vision) if window is None else int(window)
        if window < tubelet or window % tubelet:
            raise EncoderLoadError(
                f"V-JEPA 2 window must be a positive multiple of its tubelet_size ({tubelet}) so every "
                f"frame lands in a whole tubelet; got {window}. Use e.g. window={tubelet * 2}."
            )
    elif window not in (None, 1):
        raise EncoderLoadError(
            f"{family} encoder '{name_or_path}' encodes single images; window must be 1 (got {window}). "
            "Use a V-JEPA 2 checkpoint for multi-frame latents."
        )
    else:
        window = 1

    proc = _read_processor_config(source, commit, family)
    image_size, mean, std = _preprocessing(family, config, proc)
    if family == "vjepa2" and image_size != (vision.crop_size, vision.crop_size):
        # V-JEPA 2's rotary positions assume a crop_size x crop_size grid; any other size would
        # silently scramble token positions.
        raise EncoderLoadError(
            f"V-JEPA 2 checkpoint '{name_or_path}' was built for {vision.crop_size}x{vision.crop_size} "
            f"frames but its video processor config asks for {image_size}. Fix the processor's crop_size."
        )

    if is_local:
        revision = local_revision(source)
    elif commit:
        revision = commit
    else:
        raise EncoderLoadError(
            f"Could not determine the Hub revision of encoder '{name_or_path}'. Fix: download it with "
            f"`huggingface-cli download {name_or_path}` and pass the local snapshot directory instead."
        )

    identity = EncoderIdentity(
        # A local checkpoint is named by its absolute path, so `./ckpt` and `/abs/ckpt` share one cache.
        name=str(Path(source).resolve()) if is_local else name_or_path,
        kind=family,
        revision=revision,
        pooling=pooling,
        window=window,
        image_size=image_size,
        image_mean=tuple(mean),
        image_std=tuple(std),
        dim=int(vision.hidden_size),
        extra={"model_type": config.model_type, "dtype": str(normalize_dtype(dtype)).removeprefix("torch.")},
    )
    return _Resolved(identity=identity, family=family, source=source, commit=commit, config=config)


def resolve_hf_encoder_identity(
    name_or_path: str,
    pooling: str | None = None,
    window: int | None = None,
    dtype: torch.dtype | str | None = None,
) -> EncoderIdentity:
    """Identity of a transformers encoder from its config files and revision, without loading weights.

    Equal to `load_hf_encoder(name_or_path, pooling, window, dtype).identity`.
    """
    return _resolve(name_or_path, pooling, window, dtype).identity


# ---------------------------------------------------------------------------------------------
# Encoders
# ---------------------------------------------------------------------------------------------


class Dinov2Encoder(WorldEncoder):
    """DINOv2 image encoder: CLS token, mean of patch tokens, or the model's pooler output.

    In transformers the DINOv2 pooler output *is* the layer-normed CLS token, so 'pooler' and
    'cls' give the same numbers; both names are accepted because both appear in the wild.
    """

    def __init__(self, identity: EncoderIdentity, model):
        super().__init__(identity)
        self.model = model
        # Register tokens (dinov2_with_registers) sit between CLS and the patches; 'mean' skips them.
        self.num_prefix = 1 + int(getattr(model.config, "num_register_tokens", 0) or 0)

    def _forward(self, pixels: torch.Tensor) -> torch.Tensor:
        out = self.model(pixel_values=pixels.to(self.model.dtype))
        pooling = self.identity.pooling
        if pooling == "pooler":
            return out.pooler_output
        tokens = out.last_hidden_state
        if pooling == "cls":
            return tokens[:, 0]
        return tokens[:, self.num_prefix :].float().mean(dim=1)


class SiglipVisionEncoder(WorldEncoder):
    """SigLIP vision tower: the MAP attention-pooling head ('pooler') or the mean of patch tokens."""

    def __init__(self, identity: EncoderIdentity, model):
        super().__init__(identity)
        self.model = model
        # Position embeddings are learned for one size; another size needs interpolation.
        self.interpolate = tuple(identity.image_size) != (model.config.image_size,) * 2

    def _forward(self, pixels: torch.Tensor) -> torch.Tensor:
        out = self.model(pixel_values=pixels.to(self.model.dtype), interpolate_pos_encoding=self.interpolate)
        if self.identity.pooling == "pooler":
            return out.pooler_output
        return out.last_hidden_state.float().mean(dim=1)


class VJEPA2VideoEncoder(WorldEncoder):
    """V-JEPA 2 video encoder: mean of the encoder's tokens over a window of m frames.

    Only the encoder is kept: the predictor (a second transformer that predicts masked tokens) is
    not needed for features, so it is dropped after loading to save memory.
    """

    def __init__(self, identity: EncoderIdentity, encoder):
        super().__init__(identity)
        self.encoder = encoder

    def _forward(self, pixels: torch.Tensor) -> torch.Tensor:
        # pixels: [B, m, C, H, W], oldest frame first, which is V-JEPA 2's pixel_values_videos layout.
        weight = self.encoder.embeddings.patch_embeddings.proj.weight
        out = self.encoder(pixel_values_videos=pixels.to(weight.dtype))
        return out.last_hidden_state.float().mean(dim=1)


def load_hf_encoder(
    name_or_path: str,
    pooling: str | None = None,
    window: int | None = None,
    dtype: torch.dtype | str | None = None,
) -> WorldEncoder:
    """Load a DINOv2 / SigLIP / V-JEPA 2 checkpoint (Hub id or local dir) as a frozen world encoder.

    `dtype` sets the weights' precision (default float32); `encode` always returns float32.
    """
    resolved = _resolve(name_or_path, pooling, window, dtype)
    torch_dtype = normalize_dtype(dtype)
    # Pin the weights to the commit the identity names, so config and weights cannot diverge.
    kwargs = {"dtype": torch_dtype}
    if resolved.commit:
        kwargs["revision"] = resolved.commit
    try:
        if resolved.family == "dinov2":
            from transformers import AutoModel

            model = AutoModel.from_pretrained(resolved.source, **kwargs)
            encoder: WorldEncoder = Dinov2Encoder(resolved.identity, model)
        elif resolved.family == "siglip":
            from transformers import SiglipVisionModel

            # Accepts a vision-only checkpoint and a full SigLIP one (its text tower is skipped).
            model = SiglipVisionModel.from_pretrained(resolved.source, **kwargs)
            encoder = SiglipVisionEncoder(resolved.identity, model)
        else:
            from transformers import VJEPA2Model

            model = VJEPA2Model.from_pretrained(resolved.source, **kwargs)
            encoder = VJEPA2VideoEncoder(resolved.identity, model.encoder)
            del model
    except (OSError, ValueError, RuntimeError, SafetensorError) as err:
        raise EncoderLoadError(
            f"Cannot load the weights of encoder '{name_or_path}' ({err}). Fix: make sure the directory "
            "or Hub snapshot holds the weights written by `save_pretrained`."
        ) from err
    return encoder.eval().requires_grad_(False)
