"""The world-latent processor step: cached latents in training, online encoding at evaluation.

In a training batch (which carries the dataset's global frame `index`), the step reads the current
latent, the history window and the future window from the precomputed cache, clamped to each
frame's own episode. In an evaluation batch (no `index`), it encodes the live camera image with the
same encoder and preprocessing the cache was built with, and adds the current latent only; the
policy keeps its own history.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass, field
from typing import Any

import torch
from lerobot.configs.types import FeatureType, PipelineFeatureType, PolicyFeature
from lerobot.processor import ProcessorStep, ProcessorStepRegistry
from lerobot.processor.core import EnvTransition, TransitionKey

from ..constants import (
    OBS_WORLD_FUTURE,
    OBS_WORLD_FUTURE_VALID,
    OBS_WORLD_GOAL,
    OBS_WORLD_HISTORY,
    OBS_WORLD_LATENT,
    OBS_WORLD_REMAINING,
    WORLD_LATENT_STEP_NAME,
    goal_image_key,
)
from .binding import open_latent_cache, world_encoder_identity
from .cache import LatentCache, LatentCacheError
from .config import WorldLatentOptions
from .encoder_base import WorldEncoder
from .encoders import load_encoder, resolve_encoder_identity

# Steps alive in this process, so that a policy's reset() can clear their online frame buffers:
# lerobot-eval resets the policy at each rollout but never the preprocessor.
_LIVE_STEPS: weakref.WeakSet[WorldLatentStep] = weakref.WeakSet()


def reset_online_state() -> None:
    """Clear the online frame buffers of every world-latent step in this process (episode start)."""
    for step in list(_LIVE_STEPS):
        step.reset()


@ProcessorStepRegistry.register(WORLD_LATENT_STEP_NAME)
@dataclass
class WorldLatentStep(ProcessorStep):
    """Adds world latents to the observation: from the cache in training, encoded online at evaluation.

    Keys added (see `constants`): OBS_WORLD_LATENT always; OBS_WORLD_HISTORY, OBS_WORLD_FUTURE and
    OBS_WORLD_FUTURE_VALID in training batches. With several cameras, the per-camera latents are
    concatenated along the feature dimension in the order of `cameras`.
    """

    # Encoder: built-in name, Hub id or local path (the same string the cache was built with).
    encoder: str = "pixels"
    # Camera keys whose latents are concatenated, in this order.
    cameras: list[str] = field(default_factory=lambda: ["observation.image"])
    # Token pooling of the encoder; None = the family's default.
    pooling: str | None = None
    # Frames per latent for video encoders; None = the family's default.
    window: int | None = None
    # Encoder weight dtype ("bf16", "fp16"); None = float32.
    dtype: str | None = None
    # T: length of the history window added in training.
    history_frames: int = 1
    # K: length of the future window added in training.
    future_frames: int = 0
    # s: frames between the future latents (z_{t+s}, ..., z_{t+Ks}); 1 in checkpoints saved before it existed.
    future_stride: int = 1
    # Training dataset whose cache is read (set by lerobot-train through the policy config).
    dataset_repo_id: str | None = None
    # Local root of that dataset.
    dataset_root: str | None = None
    # Root folder of latent caches; None = the default cache root.
    cache_root: str | None = None
    # Device for online encoding; None = the device the frames arrive on.
    device: str | None = None
    # Encoder identity recorded at training; online encoding refuses an encoder that differs from it.
    encoder_identity: dict | None = None

    def __post_init__(self):
        self._encoder: WorldEncoder | None = None
        self._caches: list[LatentCache] | None = None
        self._frames: dict[str, list[torch.Tensor]] = {}
        # Goal image key -> (the goal frames last seen, their latent), so a constant goal is encoded once.
        self._goals: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        _LIVE_STEPS.add(self)

    def __hash__(self):
        # WeakSet membership needs hashing by identity; dataclass(eq=True) would make steps unhashable.
        return id(self)

    # ------------------------------------------------------------------ training: cached latents
    def _cached(self, index: torch.Tensor) -> dict[str, torch.Tensor]:
        if self.dataset_repo_id is None:
            raise LatentCacheError(
                "The world-latent step got a training batch but knows no dataset. It is set by "
                "lerobot-train through the policy; when building the step by hand pass dataset_repo_id "
                "(and dataset_root)."
            )
        if self._caches is None:
            identity = resolve_encoder_identity(self.encoder, self.pooling, self.window, self.dtype)
            self._caches = [
                open_latent_cache(self.cache_root, self.dataset_repo_id, self.dataset_root, cam, identity)
                for cam in self.cameras
            ]
        index = index.reshape(-1).long().cpu()
        parts = [c.lookup(index, self.history_frames, self.future_frames, self.future_stride) for c in self._caches]
        out = {
            OBS_WORLD_LATENT: torch.cat([p["latent"] for p in parts], dim=-1),
            OBS_WORLD_HISTORY: torch.cat([p["history"] for p in parts], dim=-1),
        }
        if self.future_frames > 0:
            out[OBS_WORLD_FUTURE] = torch.cat([p["future"] for p in parts], dim=-1)
            out[OBS_WORLD_FUTURE_VALID] = parts[0]["future_valid"]
            out[OBS_WORLD_REMAINING] = parts[0]["remaining"]
        return out

    # ------------------------------------------------------------------ evaluation: online encoding
    def encoder_module(self) -> WorldEncoder:
        """The frozen encoder used online, loaded on first use and checked against the training identity."""
        if self._encoder is None:
            encoder = load_encoder(self.encoder, pooling=self.pooling, window=self.window, dtype=self.dtype)
            # The name is where the weights were found, which may differ between machines; the
            # revision (commit hash or weights checksum) and the preprocessing are what must match.
            trained = {k: v for k, v in (self.encoder_identity or {}).items() if k != "name"}
            now = {k: v for k, v in encoder.identity.to_dict().items() if k != "name"}
            if self.encoder_identity is not None and now != trained:
                diff = {k: (trained.get(k), now.get(k)) for k in now if trained.get(k) != now.get(k)}
                raise ValueError(
                    f"The encoder '{self.encoder}' loaded for online encoding differs from the one the policy "
                    f"was trained with (field: (trained, now) = {diff}). Its latents would not reproduce the "
                    "training latents. Load the same encoder weights (for a Hub id pin the revision the "
                    "policy was trained with) or retrain."
                )
            self._encoder = encoder
        return self._encoder

    def _online(self, observation: dict[str, Any]) -> torch.Tensor:
        encoder = self.encoder_module()
        latents = []
        for cam in self.cameras:
            if cam not in observation:
                available = sorted(k for k in observation if k.startswith("observation.image"))
                raise KeyError(
                    f"World camera '{cam}' is not in the observation (image keys present: {available}). "
                    "Evaluate with the camera the policy was trained on, or map it with --rename_map."
                )
            latents.append(self._encode(encoder, observation[cam], cam))
        return torch.cat(latents, dim=-1)

    def _encode(self, encoder: WorldEncoder, frames: torch.Tensor, cam: str | None = None) -> torch.Tensor:
        """Latents [B, D] of frames [(B,) C, H, W] on the step's device; with `cam`, a video encoder reads
        that camera's frame window (a goal image, given without `cam`, is a single frame)."""
        if frames.ndim == 3:
            frames = frames.unsqueeze(0)
        target = torch.device(self.device) if self.device else frames.device
        if encoder.device != target:
            encoder.to(target)
        if cam is not None and encoder.window > 1:
            frames = self._frame_window(cam, frames, encoder.window)
        return encoder.encode(frames.to(target)).to(frames.device)

    def _online_goal(self, observation: dict[str, Any]) -> torch.Tensor | None:
        """Latent of the goal images (`constants.goal_image_key` of every world camera), or None when the
        observation carries none. Encoded frame by frame: a goal is a single image, not a clip."""
        keys = [goal_image_key(cam) for cam in self.cameras]
        present = [k in observation for k in keys]
        if not any(present):
            return None
        if not all(present):
            missing = [k for k, p in zip(keys, present) if not p]
            raise KeyError(f"The observation carries goal images for some world cameras but not {missing}.")
        encoder = self.encoder_module()
        if encoder.window > 1:
            raise ValueError(
                f"Goal images need a single-frame encoder; '{self.encoder}' encodes {encoder.window}-frame clips."
            )
        latents = []
        for key in keys:
            # A goal image usually stays the same for a whole episode: encode it once, not at every step.
            frames, memo = observation[key], self._goals.get(key)
            if memo is None or memo[0].shape != frames.shape or not torch.equal(memo[0], frames):
                memo = (frames.detach().clone(), self._encode(encoder, frames))
                self._goals[key] = memo
            latents.append(memo[1])
        return torch.cat(latents, dim=-1)

    def _frame_window(self, cam: str, frames: torch.Tensor, window: int) -> torch.Tensor:
        """Last `window` frames of this camera, repeat-padded at an episode's first frame like the cache."""
        buffer = self._frames.get(cam)
        if not buffer or buffer[-1].shape != frames.shape:
            buffer = [frames] * window
        else:
            buffer = (buffer + [frames])[-window:]
        self._frames[cam] = buffer
        return torch.stack(buffer, dim=1)

    # ------------------------------------------------------------------ ProcessorStep interface
    def __call__(self, transition: EnvTransition) -> EnvTransition:
        observation = transition.get(TransitionKey.OBSERVATION)
        if observation is None:
            return transition
        complementary = transition.get(TransitionKey.COMPLEMENTARY_DATA) or {}
        observation = dict(observation)
        index = complementary.get("index")
        if index is not None:
            ref = next((v for v in observation.values() if isinstance(v, torch.Tensor)), None)
            added = self._cached(torch.as_tensor(index))
            if ref is not None:
                added = {k: v.to(ref.device) for k, v in added.items()}
            observation.update(added)
        else:
            observation[OBS_WORLD_LATENT] = self._online(observation)
            goal = self._online_goal(observation)
            if goal is not None:
                observation[OBS_WORLD_GOAL] = goal
        new_transition = transition.copy()
        new_transition[TransitionKey.OBSERVATION] = observation
        return new_transition

    def reset(self) -> None:
        """Forget buffered frames and goals: the next online frame starts a new episode."""
        self._frames = {}
        self._goals = {}

    def get_config(self) -> dict[str, Any]:
        """JSON config that rebuilds this step with stock `PolicyProcessorPipeline.from_pretrained`."""
        return {
            "encoder": self.encoder,
            "cameras": list(self.cameras),
            "pooling": self.pooling,
            "window": self.window,
            "dtype": self.dtype,
            "history_frames": self.history_frames,
            "future_frames": self.future_frames,
            "future_stride": self.future_stride,
            "dataset_repo_id": self.dataset_repo_id,
            "dataset_root": self.dataset_root,
            "cache_root": self.cache_root,
            "device": self.device,
            "encoder_identity": self.encoder_identity,
        }

    def transform_features(
        self, features: dict[PipelineFeatureType, dict[str, PolicyFeature]]
    ) -> dict[PipelineFeatureType, dict[str, PolicyFeature]]:
        """Declare the latent this step adds to the observation."""
        if self.encoder_identity is not None:
            dim = int(self.encoder_identity["dim"]) * len(self.cameras)
            obs = dict(features.get(PipelineFeatureType.OBSERVATION, {}))
            obs[OBS_WORLD_LATENT] = PolicyFeature(type=FeatureType.ENV, shape=(dim,))
            features = {**features, PipelineFeatureType.OBSERVATION: obs}
        return features


def make_world_latent_step(config: WorldLatentOptions) -> WorldLatentStep:
    """Build the world-latent step from a policy config's shared world fields."""
    identity = world_encoder_identity(config)
    return WorldLatentStep(
        encoder=config.encoder,
        cameras=config.resolved_world_cameras(),
        pooling=config.encoder_pooling,
        window=config.encoder_window,
        dtype=config.encoder_dtype,
        history_frames=config.history_frames,
        future_frames=config.future_frames,
        future_stride=config.future_stride,
        dataset_repo_id=config.dataset_repo_id,
        dataset_root=config.dataset_root,
        cache_root=config.latent_cache_root,
        device=config.encoder_device,
        encoder_identity=identity.to_dict(),
    )
