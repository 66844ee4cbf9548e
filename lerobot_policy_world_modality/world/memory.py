"""Memory modes (what the action path reads as world memory) and the world loss.

Pure torch. The memory lives in the space the world loss supervises: predicted future latents, or
predicted deltas z_{t+k} - z_t under the delta parameterisation (see `world_targets`).

Memory modes, chosen separately for training and rollout:
- `pred`:      the Prophet's prediction.
- `oracle`:    the true future (the world-loss targets); training only, the future is unknown at rollout.
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
) -> Tensor:
    """The memory [B, K, D] the action path reads under `mode` (see the module docstring).

    pred: the Prophet's prediction [B, K, D]; oracle: the world-loss targets [B, K, D] (needed by
    "oracle" and "scheduled"); oracle_prob: p of "scheduled". Noise, shuffling and the scheduled
    choice are drawn with `generator` when given (a CPU generator; results move to pred's device).
    """
    if mode == "pred":
        return pred
    if mode in ("oracle", "scheduled") and oracle is None:
        raise ValueError(
            f"Memory mode '{mode}' needs the true future latents (a training batch with "
            "observation.world.future); at rollout use one of " + ", ".join(ROLLOUT_MEMORY_MODES) + "."
        )
    if mode == "oracle":
        return oracle.to(pred.dtype)
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
        return torch.where(use_oracle[:, None, None], oracle.to(pred.dtype), pred)
    raise ValueError(f"Unknown memory mode '{mode}'; use one of {MEMORY_MODES}.")


def cosine_per_slot(pred: Tensor, target: Tensor) -> Tensor:
    """Cosine similarity [B, K] between predicted and target rows [B, K, D] (computed in float32)."""
    return F.cosine_similarity(pred.float(), target.float(), dim=-1, eps=1e-8)


def _masked_target(pred: Tensor, target: Tensor, valid: Tensor) -> Tensor:
    """Target with invalid rows replaced by finite values: where() alone zeroes the forward value, but the
    cosine's backward still multiplies by the (possibly NaN) target, and 0 * NaN = NaN."""
    return torch.where(valid.unsqueeze(-1), target.to(pred.dtype), pred.detach())


def world_loss(pred: Tensor, target: Tensor, valid: Tensor | None = None) -> Tensor:
    """Masked mean of 1 - cosine(pred, target) over valid (sample, horizon) pairs; 0 when none is valid.

    valid: [B, K] bool, False where t+k lies past the episode end (the target there is a clamped
    copy of the last frame and must not be learned). Invalid entries are removed with `where`, so
    even a non-finite target there contributes nothing, gradient included.
    """
    if valid is None:
        return (1.0 - cosine_per_slot(pred, target)).mean()
    valid = valid.to(torch.bool)
    loss = 1.0 - cosine_per_slot(pred, _masked_target(pred, target, valid))
    loss = torch.where(valid, loss, torch.zeros_like(loss))
    return loss.sum() / valid.sum().clamp(min=1)


@torch.no_grad()
def per_horizon_cosine(pred: Tensor, target: Tensor, valid: Tensor | None = None) -> Tensor:
    """Mean cosine per horizon [K] over the samples valid at that horizon; NaN where none is valid."""
    if valid is None:
        return cosine_per_slot(pred, target).mean(dim=0)
    valid = valid.to(torch.bool)
    cos = cosine_per_slot(pred, _masked_target(pred, target, valid))
    total = torch.where(valid, cos, torch.zeros_like(cos)).sum(dim=0)
    count = valid.sum(dim=0)
    return torch.where(count > 0, total / count.clamp(min=1), torch.full_like(total, float("nan")))
