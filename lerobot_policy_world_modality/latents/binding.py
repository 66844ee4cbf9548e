"""Binding a policy config to its training data: the latent caches, the encoder identity, the dimension.

The policies' constructors call `bind_policy_world_latents` (and `bind_world_target_stats`,
`bind_latent_input_stats`) with the `dataset_meta` that `lerobot-train` passes them; the world-latent
step and `lerobot-wm-fit-codebook` open the same validated caches through `open_latent_cache`.
"""

from __future__ import annotations

import logging
from typing import Any

import torch
from lerobot.configs.types import FeatureType, PolicyFeature

from .cache import DatasetIdentity, LatentCache, default_cache_root, latent_input_statistics
from .config import WorldLatentOptions
from .encoder_base import EncoderIdentity
from .encoders import resolve_encoder_identity
from .train_view import source_of_view

# Validated caches, shared by bind_training_dataset (fail fast at policy construction) and the step,
# so a large cache is read and checked once per process.
_OPEN_CACHES: dict[tuple, LatentCache] = {}


def open_latent_cache(
    cache_root: str | None,
    repo_id: str,
    root: str | None,
    camera: str,
    identity: EncoderIdentity,
) -> LatentCache:
    """Open (once per process) and validate the cache of one camera; raises LatentCacheError."""
    dataset = DatasetIdentity.from_dataset(repo_id, root)
    key = (str(cache_root), dataset.repo_id, str(dataset.root), camera, repr(identity))
    if key not in _OPEN_CACHES:
        root_dir = cache_root if cache_root is not None else default_cache_root()
        _OPEN_CACHES[key] = LatentCache.open(root_dir, dataset, camera, identity)
    return _OPEN_CACHES[key]


def world_encoder_identity(config: WorldLatentOptions) -> EncoderIdentity:
    """The identity of the config's world encoder (cheap: no model is built)."""
    return resolve_encoder_identity(
        config.encoder, config.encoder_pooling, config.encoder_window, config.encoder_dtype
    )


def open_world_caches(config: WorldLatentOptions) -> list[LatentCache]:
    """The validated latent cache of each world camera of the config's training dataset, in camera order."""
    identity = world_encoder_identity(config)
    return [
        open_latent_cache(
            config.latent_cache_root, config.dataset_repo_id, config.dataset_root, cam, identity
        )
        for cam in config.resolved_world_cameras()
    ]


def resolve_world_latent_dim(config: WorldLatentOptions) -> int:
    """Dimension of the concatenated world latent of all world cameras, read from the encoder."""
    return world_encoder_identity(config).dim * len(config.resolved_world_cameras())


def world_target_stats(config: Any) -> dict[str, torch.Tensor]:
    """Standardisation statistics of the config's world targets, from its training dataset's latent caches.

    Per-dimension statistics are separable, so those of several world cameras are computed per cache
    and concatenated in camera order, like the latents. The target space follows the config
    (future_frames, future_stride, world_target); see `cache.target_statistics`.
    """
    delta = bool(config.delta_prediction or getattr(config, "world_target", "absolute") == "delta")
    parts = [c.target_stats(config.future_frames, config.future_stride, delta) for c in open_world_caches(config)]
    return {name: torch.cat([p[name] for p in parts], dim=-1) for name in parts[0]}


def bind_world_target_stats(config: Any, dataset_meta: Any = None) -> dict[str, torch.Tensor] | None:
    """The statistics a policy with `standardise_targets` builds its world path with: computed from the
    training dataset's caches when `lerobot-train` gives `dataset_meta`; None otherwise (not
    standardised, or a policy rebuilt from a checkpoint, whose buffers carry them)."""
    predicts = getattr(config, "use_prophet", False) or getattr(config, "dynamics", "none") != "none"
    wanted = getattr(config, "standardise_targets", False) and predicts
    return world_target_stats(config) if wanted and dataset_meta is not None else None


def bind_latent_input_stats(config: Any, dataset_meta: Any = None) -> dict[str, torch.Tensor] | None:
    """The statistics a trunk with `latent_input_norm="dataset"` standardises its latent input with:
    computed from the training dataset's caches (per camera, concatenated in camera order) when
    `lerobot-train` gives `dataset_meta`; None otherwise (another norm, or a policy rebuilt from a
    checkpoint, whose buffers carry them)."""
    if getattr(config, "latent_input_norm", "layer") != "dataset" or dataset_meta is None:
        return None
    parts = [latent_input_statistics(c.latents) for c in open_world_caches(config)]
    return {name: torch.cat([p[name] for p in parts], dim=-1) for name in parts[0]}


def warn_if_no_future_fits(config: WorldLatentOptions, dataset_meta: Any) -> bool:
    """Warn (and return True) when no episode is long enough for the furthest predicted future.

    Windows past an episode's end are masked out of the world loss, so a horizon longer than every
    episode trains no Prophet at all while training itself runs normally.
    """
    if not getattr(config, "use_prophet", True):
        return False
    horizon = config.future_frames * config.future_stride
    try:
        lengths = [int(n) for n in dataset_meta.episodes["length"]]
    except (AttributeError, KeyError, TypeError):  # metadata without per-episode lengths: nothing to check
        return False
    if not lengths or max(lengths) > horizon:
        return False
    logging.getLogger(__name__).warning(
        "future_frames x future_stride = %d x %d = %d frames, but the longest episode of %s has %d: no frame "
        "has its furthest future inside its episode, so the last horizons get no world loss (with "
        "future_stride >= that length, none does). Lower --policy.future_frames or --policy.future_stride.",
        config.future_frames, config.future_stride, horizon, dataset_meta.repo_id, max(lengths),
    )  # fmt: skip
    return True


def bind_training_dataset(config: WorldLatentOptions, dataset_meta: Any) -> None:
    """Record the training dataset in `config` and fail fast when its latent cache is missing or stale.

    Called by the policies' constructors with the `dataset_meta` that `lerobot-train` passes them;
    the world-latent step built from the same config then reads that dataset's cache.
    """
    warn_if_no_future_fits(config, dataset_meta)
    view = source_of_view(dataset_meta.info)
    if view is None:
        config.dataset_repo_id = dataset_meta.repo_id
        config.dataset_root = str(dataset_meta.root)
    else:
        # A latent-only training view: read the source dataset's caches, and keep the cameras the
        # view dropped as the policy's visual inputs, since evaluation encodes them online.
        config.dataset_repo_id = view["repo_id"]
        config.dataset_root = view["root"]
        if not config.world_cameras:
            config.world_cameras = list(view["cameras"][:1])
        for cam in config.world_cameras:
            if cam not in view["camera_features"]:
                raise ValueError(
                    f"World camera '{cam}' is not a camera of the dataset behind this training view "
                    f"(cameras: {view['cameras']}): set --policy.world_cameras to some of those."
                )
            if cam not in config.input_features:
                shape = view["camera_features"][cam]["shape"]
                # Dataset features store images as (H, W, C); policy features are channel-first.
                chw = (shape[2], shape[0], shape[1]) if shape[-1] in (1, 3) else tuple(shape)
                config.input_features[cam] = PolicyFeature(type=FeatureType.VISUAL, shape=tuple(chw))
    open_world_caches(config)


def bind_policy_world_latents(config: WorldLatentOptions, dataset_meta: Any = None) -> int:
    """What every policy constructor does first: bind the training dataset (when `lerobot-train` gives
    `dataset_meta`) and fill, or check, `config.world_latent_dim` from the encoder; returns the dim.

    A config rebuilt from a checkpoint (dim already filled, no dataset) is left untouched, so loading a
    policy never needs the encoder or the cache.
    """
    if dataset_meta is not None:
        # First, so the dimension below is resolved for the cameras of the dataset actually trained on.
        bind_training_dataset(config, dataset_meta)
        config.trained_encoder = config.encoder
    elif config.trained_encoder and config.encoder != config.trained_encoder:
        # The saved preprocessor encodes with the training encoder whatever the config says: refuse the
        # override rather than print one encoder and run another.
        raise ValueError(
            f"--policy.encoder={config.encoder} differs from the encoder this checkpoint was trained with "
            f"('{config.trained_encoder}'): its actions only make sense on latents of that encoder, and its saved "
            "preprocessor encodes with it. Drop --policy.encoder, or train a policy on latents of the new encoder."
        )
    if config.world_latent_dim is None or dataset_meta is not None:
        dim = resolve_world_latent_dim(config)
        if config.world_latent_dim is not None and config.world_latent_dim != dim:
            raise ValueError(
                f"world_latent_dim={config.world_latent_dim} in the config, but encoder '{config.encoder}' "
                f"with cameras {config.resolved_world_cameras()} gives {dim}. Leave world_latent_dim "
                "unset (it is filled from the encoder) or train a new policy for this encoder."
            )
        config.world_latent_dim = dim
    return config.world_latent_dim
