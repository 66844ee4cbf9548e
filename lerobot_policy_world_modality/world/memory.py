"""Memory modes (what the action path reads as world memory), the world loss and its diagnostics.

Pure torch. The memory lives in the space the world loss supervises (the *target space*): predicted
future latents, or deltas z_{t+ks} - z_t under the delta parameterisation (see `world_targets`),
optionally standardised per dimension (`standardise`, `unstandardise`).

Memory modes, chosen separately for training and rollout:
- `pred`:      the Prophet's prediction.
- `oracle`:    the true future (the world-loss targets); training only, the future is unknown at rollout.
               Rows past the episode end are replaced by the prediction (see `select_memory`).
- `zero`:      zeros of the prediction's shape (the world path reads nothing).
- `random`:    Gaussian noise with, per memory row, the root-mean-square of the prediction's row
               (noise "at the prediction's scale": same expected row norm, no information).
- `shuffle`:   the predictions of other samples: a random derangement across the batch, so no sample
               keeps its own memory when B > 1 (identity when B == 1).
- `scheduled`: scheduled sampling; each sample reads its oracle memory with probability p(step) and its
               predicted memory otherwise, p decaying over training (see `scheduled_oracle_prob`).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F  # noqa: N812
from torch import Tensor

MEMORY_MODES = ("pred", "oracle", "zero", "random", "shuffle", "scheduled")
# What the Prophet predicts: future latents, or their change since the current frame.
WORLD_TARGETS = ("absolute", "delta")
# World losses: scale-free cosine (the original), or losses that see the size of the change.
WORLD_LOSS_TYPES = ("cosine", "mse", "smooth_l1")
# Modes usable at rollout: the oracle (and a schedule that mixes it in) needs the true future.
ROLLOUT_MEMORY_MODES = ("pred", "zero", "random", "shuffle")
SCHEDULE_SHAPES = ("linear", "cosine", "exponential")


def scheduled_oracle_prob(
    step: int,
    prob_start: float = 1.0,
    prob_end: float = 0.0,
    decay_steps: int = 10_000,
    warmup_steps: int = 0,
    shape: str = "linear",
) -> float:
    """Oracle probability of scheduled sampling at training step `step`.

    p = prob_start for the first `warmup_steps` steps, then moves from prob_start to prob_end over
    `decay_steps` steps and stays at prob_end. `shape` of the move, with s = progress in [0, 1]:
    "linear": start + (end - start) * s; "cosine": end + (start - end) * (1 + cos(pi * s)) / 2;
    "exponential": start * (end / start) ** s (needs start, end > 0).
    """
    if shape not in SCHEDULE_SHAPES:
        raise ValueError(f"Unknown schedule shape '{shape}'; use one of {SCHEDULE_SHAPES}.")
    if decay_steps <= 0:
        s = 1.0 if step >= warmup_steps else 0.0
    else:
        s = min(max((step - warmup_steps) / decay_steps, 0.0), 1.0)
    if shape == "linear":
        return prob_start + (prob_end - prob_start) * s
    if shape == "cosine":
        return prob_end + (prob_start - prob_end) * (1.0 + math.cos(math.pi * s)) / 2.0
    if prob_start <= 0 or prob_end <= 0:
        raise ValueError("The exponential schedule needs prob_start > 0 and prob_end > 0.")
    return prob_start * (prob_end / prob_start) ** s


def world_targets(future: Tensor, current: Tensor, delta: bool) -> Tensor:
    """World-loss targets: future latents [B, K, D], or future - current ([B, D] or [B, 1, D]) when `delta`."""
    if not delta:
        return future
    if current.ndim == 2:
        current = current.unsqueeze(1)
    return future - current


def standardise(raw: Tensor, mean: Tensor | None, std: Tensor | None) -> Tensor:
    """(raw - mean) / std per dimension ([K, D] statistics broadcast over the batch); identity without stats."""
    if mean is None:
        return raw
    return (raw - mean.to(raw)) / std.to(raw)


def copy_statistics(module, stats: dict, names, what: str, fix: str) -> None:
    """Copy `stats[name]` into each buffer `name` of `module` (float32, on the buffer's device), refusing
    a shape that differs from the buffer's; the error names `what` the statistic is and the `fix`."""
    for name in names:
        value = torch.as_tensor(stats[name], dtype=torch.float32)
        buffer = getattr(module, name)
        if value.shape != buffer.shape:
            raise ValueError(
                f"{what} '{name}' has shape {tuple(value.shape)}, the policy needs {tuple(buffer.shape)} {fix}"
            )
        buffer.copy_(value.to(buffer.device))


def unstandardise(value: Tensor, mean: Tensor | None, std: Tensor | None) -> Tensor:
    """Inverse of `standardise`."""
    if mean is None:
        return value
    return value * std.to(value) + mean.to(value)


def derangement(n: int, generator: torch.Generator | None = None, device=None) -> Tensor:
    """A random permutation of range(n) without fixed points (identity for n == 1)."""
    perm = torch.randperm(n, generator=generator).to(device)
    if n < 2:
        return perm
    # Each element takes the slot of the next one in a random cycle order: no element maps to itself.
    out = torch.empty_like(perm)
    out[perm] = perm.roll(-1)
    return out


def select_memory(
    mode: str,
    pred: Tensor,
    oracle: Tensor | None = None,
    oracle_prob: float = 0.0,
    generator: torch.Generator | None = None,
    valid: Tensor | None = None,
) -> Tensor:
    """The memory [B, K, D] the action path reads under `mode` (see the module docstring).

    pred: the Prophet's prediction [B, K, D]; oracle: the world-loss targets [B, K, D] (needed by
    "oracle" and "scheduled"); oracle_prob: p of "scheduled". Noise, shuffling and the scheduled
    choice are drawn with `generator` when given (a CPU generator; results move to pred's device).
    valid: [B, K] bool of the targets; oracle rows past the episode end (clamped copies of its last
    frame) are replaced by the prediction, so the teacher-forced memory never tells the action path
    where the episode ends, and the fusion sees K slots as at rollout.
    """
    if mode == "pred":
        return pred
    if mode in ("oracle", "scheduled") and oracle is None:
        raise ValueError(
            f"Memory mode '{mode}' needs the true future latents (a training batch with "
            "observation.world.future); at rollout use one of " + ", ".join(ROLLOUT_MEMORY_MODES) + "."
        )
    if mode in ("oracle", "scheduled"):
        oracle = oracle.to(pred.dtype)
        if valid is not None:
            oracle = torch.where(valid.to(torch.bool).unsqueeze(-1), oracle, pred)
    if mode == "oracle":
        return oracle
    if mode == "zero":
        return torch.zeros_like(pred)
    if mode == "random":
        scale = pred.detach().float().pow(2).mean(dim=-1, keepdim=True).sqrt()
        if generator is None:
            noise = torch.randn(pred.shape, device=pred.device)
        else:  # a seeded generator lives on the CPU; draw there for reproducibility across devices
            noise = torch.randn(pred.shape, generator=generator).to(pred.device)
        return (noise * scale).to(pred.dtype)
    if mode == "shuffle":
        return pred[derangement(pred.shape[0], generator, pred.device)]
    if mode == "scheduled":
        use_oracle = torch.rand(pred.shape[0], generator=generator).to(pred.device) < oracle_prob
        return torch.where(use_oracle[:, None, None], oracle, pred)
    raise ValueError(f"Unknown memory mode '{mode}'; use one of {MEMORY_MODES}.")


def cosine_per_slot(pred: Tensor, target: Tensor) -> Tensor:
    """Cosine similarity [B, K] between predicted and target rows [B, K, D] (computed in float32)."""
    return F.cosine_similarity(pred.float(), target.float(), dim=-1, eps=1e-8)


def _masked_target(pred: Tensor, target: Tensor, valid: Tensor) -> Tensor:
    """Target with invalid rows replaced by finite values: where() alone zeroes the forward value, but the
    cosine's backward still multiplies by the (possibly NaN) target, and 0 * NaN = NaN."""
    return torch.where(valid.unsqueeze(-1), target.to(pred.dtype), pred.detach())


def loss_per_slot(pred: Tensor, target: Tensor, kind: str = "cosine") -> Tensor:
    """World loss [B, K] of each (sample, horizon): 1 - cosine, or the mean over D of the squared
    error ("mse") or of the smooth L1 error with beta 1 ("smooth_l1", meant for standardised targets)."""
    if kind == "cosine":
        return 1.0 - cosine_per_slot(pred, target)
    if kind == "mse":
        return F.mse_loss(pred.float(), target.float(), reduction="none").mean(-1)
    if kind == "smooth_l1":
        return F.smooth_l1_loss(pred.float(), target.float(), reduction="none", beta=1.0).mean(-1)
    raise ValueError(f"Unknown world loss '{kind}'; use one of {WORLD_LOSS_TYPES}.")


def world_loss(pred: Tensor, target: Tensor, valid: Tensor | None = None, kind: str = "cosine") -> Tensor:
    """Masked mean of the per-slot world loss (`loss_per_slot`, 1 - cosine by default) over valid
    (sample, horizon) pairs; 0 when none is valid.

    valid: [B, K] bool, False where t+ks lies past the episode end (the target there is a clamped
    copy of the last frame and must not be learned). Invalid entries are removed with `where`, so
    even a non-finite target there contributes nothing, gradient included.
    """
    if valid is None:
        return loss_per_slot(pred, target, kind).mean()
    valid = valid.to(torch.bool)
    loss = loss_per_slot(pred, _masked_target(pred, target, valid), kind)
    loss = torch.where(valid, loss, torch.zeros_like(loss))
    return loss.sum() / valid.sum().clamp(min=1)


def _horizon_mean(values: Tensor, valid: Tensor | None) -> Tensor:
    """Mean [K] over the samples of [B, K] `values` valid at each horizon; NaN where none is valid."""
    if valid is None:
        return values.mean(dim=0)
    valid = valid.to(torch.bool)
    total = torch.where(valid, values, torch.zeros_like(values)).sum(dim=0)
    count = valid.sum(dim=0)
    return torch.where(count > 0, total / count.clamp(min=1), torch.full_like(total, float("nan")))


@torch.no_grad()
def per_horizon_cosine(pred: Tensor, target: Tensor, valid: Tensor | None = None) -> Tensor:
    """Mean cosine per horizon [K] over the samples valid at that horizon; NaN where none is valid."""
    if valid is not None:
        target = _masked_target(pred, target, valid.to(torch.bool))
    return _horizon_mean(cosine_per_slot(pred, target), valid)


@torch.no_grad()
def horizon_diagnostics(
    pred_abs: Tensor, target_abs: Tensor, current: Tensor, valid: Tensor | None = None
) -> dict[str, float]:
    """Per-horizon cosines that tell a Prophet that models motion from one that copies the present.

    pred_abs, target_abs: predicted and true future latents [B, K, D] in absolute-latent space;
    current: z_t [B, D]; valid: [B, K] (False past the episode end). Returns, for k = 1..K, means
    over the valid samples of
    - `world_cos_h{k}`:        cos(pred_abs, z_{t+k}), the model;
    - `world_copy_cos_h{k}`:   cos(z_t, z_{t+k}), what "predict no change" scores (the copy baseline);
    - `world_motion_cos_h{k}`: cos(pred_abs - z_t, z_{t+k} - z_t), the direction of the predicted change
      (0 for a model that copies, 1 when the change is predicted exactly up to its size).
    A world_cos_h{k} at or below world_copy_cos_h{k} means the Prophet has learnt nothing about motion.
    Horizon k is the k-th predicted frame (t + k * future_stride). NaN where no sample is valid.
    """
    current = current.float().unsqueeze(1).expand_as(target_abs)
    if valid is not None:
        valid = valid.to(torch.bool)
        # Finite stand-ins where the target is past the episode end (masked out of the means below).
        target_abs = torch.where(valid.unsqueeze(-1), target_abs.float(), current)
    pred_abs, target_abs = pred_abs.float(), target_abs.float()
    scores = {
        "world_cos": cosine_per_slot(pred_abs, target_abs),
        "world_copy_cos": cosine_per_slot(current, target_abs),
        "world_motion_cos": cosine_per_slot(pred_abs - current, target_abs - current),
    }
    info: dict[str, float] = {}
    for name, per_slot in scores.items():
        for k, value in enumerate(_horizon_mean(per_slot, valid).tolist(), start=1):
            info[f"{name}_h{k}"] = value
    return info
