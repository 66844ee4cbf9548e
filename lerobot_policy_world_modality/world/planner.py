"""Planning over action chunks: rerank perturbations of the policy's proposal, or refine them (CEM).

Pure torch. The planner never sees the world model: it gets `score`, a function from candidate chunks
[B, N, H, A] to scores [B, N] (higher is better; e.g. roll each chunk through the action-conditioned
dynamics and compare the imagined end with a goal), and returns the best chunk per sample. All
candidates go through `score` in one call, so a batched world model sees one batch of B x N.

- `rerank`: the proposal itself plus N - 1 Gaussian perturbations of it (scale `noise`, in the
  policy's normalised action units), or N candidates the caller samples itself (`first_round`: a
  flow-matching policy's N samples); the best-scoring one is executed.
- `cem`: the cross-entropy method: `iterations` rounds of N samples from a diagonal Gaussian that
  starts at (proposal, noise) and is refitted to the `elite_frac` best each round. The proposal is a
  candidate of the first round, and the best chunk scored in any round is executed.

With the same generator state both return the same chunk: the noise is drawn on the CPU from the
generator and moved to the proposal's device.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

# Planner choices at rollout.
PLANNERS = ("none", "rerank", "cem")


@dataclass(frozen=True)
class PlannerSettings:
    """The planner's knobs (see the module docstring)."""

    kind: str = "rerank"  # "rerank" or "cem"
    samples: int = 16  # N candidate chunks per round
    iterations: int = 3  # CEM rounds (rerank: one)
    elite_frac: float = 0.25  # CEM: fraction of the candidates the Gaussian is refitted to
    noise: float = 0.3  # standard deviation of the perturbations, normalised action units

    def validate(self) -> None:
        """Raise ValueError naming the knob for settings that cannot plan."""
        if self.kind not in PLANNERS[1:]:
            raise ValueError(f"planner '{self.kind}' is not one of {PLANNERS[1:]}.")
        if self.samples < 2:
            raise ValueError(f"planner_samples must be >= 2 (the proposal and one alternative), got {self.samples}.")
        if self.iterations < 1:
            raise ValueError(f"planner_iterations must be >= 1, got {self.iterations}.")
        if not 0.0 < self.elite_frac <= 1.0:
            raise ValueError(f"planner_elite_frac must lie in (0, 1], got {self.elite_frac}.")
        if not self.noise > 0.0:
            raise ValueError(f"planner_noise must be > 0, got {self.noise}.")


def _noise(shape: tuple[int, ...], generator: torch.Generator | None, like: Tensor) -> Tensor:
    return torch.randn(shape, generator=generator).to(device=like.device, dtype=like.dtype)


def _best(candidates: Tensor, scores: Tensor) -> tuple[Tensor, Tensor]:
    """Per sample, the highest-scoring candidate [B, H, A] and its score [B]."""
    idx = scores.argmax(dim=1)
    rows = torch.arange(candidates.shape[0], device=candidates.device)
    return candidates[rows, idx], scores[rows, idx]


def plan_chunk(
    proposal: Tensor,
    score: Callable[[Tensor], Tensor],
    settings: PlannerSettings,
    generator: torch.Generator | None = None,
    first_round: Tensor | None = None,
) -> tuple[Tensor, dict]:
    """The chunk [B, H, A] to execute, and `{"score": [B], "proposal_score": [B]}`.

    proposal: the policy's own chunk [B, H, A]; score: candidates [B, N, H, A] -> [B, N].
    first_round: candidates [B, N, H, A] to score in the first round instead of Gaussian perturbations
    of the proposal (e.g. N samples of a flow-matching policy; the proposal is `first_round[:, 0]`).
    """
    settings.validate()
    b, h, a = proposal.shape
    n = settings.samples
    mean = proposal.unsqueeze(1)
    std = torch.full_like(mean, settings.noise)
    best = best_score = proposal_score = None
    rounds = 1 if settings.kind == "rerank" else settings.iterations
    for r in range(rounds):
        if r == 0 and first_round is not None:
            candidates = first_round
        else:
            draws = n - 1 if r == 0 else n
            candidates = mean + std * _noise((b, draws, h, a), generator, proposal)
            if r == 0:
                candidates = torch.cat([proposal.unsqueeze(1), candidates], dim=1)
        scores = score(candidates)
        if scores.shape != candidates.shape[:2]:
            raise ValueError(f"The planner's score function returned {tuple(scores.shape)}, expected {tuple(candidates.shape[:2])}.")
        if r == 0:
            proposal_score = scores[:, 0]
        round_best, round_score = _best(candidates, scores)
        if best is None:
            best, best_score = round_best, round_score
        else:
            better = round_score > best_score
            best = torch.where(better[:, None, None], round_best, best)
            best_score = torch.where(better, round_score, best_score)
        if r + 1 < rounds:
            k = max(1, math.ceil(settings.elite_frac * candidates.shape[1]))
            top = scores.topk(k, dim=1).indices
            elites = candidates.gather(1, top[:, :, None, None].expand(-1, -1, h, a))
            mean = elites.mean(dim=1, keepdim=True)
            # A floor keeps one lucky elite from collapsing the search to a point.
            std = elites.std(dim=1, unbiased=False, keepdim=True).clamp_min(0.05 * settings.noise)
    return best, {"score": best_score, "proposal_score": proposal_score}


def reference_rank(
    reference: Tensor,
    score: Callable[[Tensor], Tensor],
    samples: int,
    noise: float,
    generator: torch.Generator | None = None,
) -> tuple[Tensor, Tensor]:
    """How a planner's `score` ranks a reference chunk [B, H, A] (e.g. the expert's own) against
    `samples` - 1 Gaussian perturbations of it (scale `noise`), the candidates a rerank planner draws.

    Returns ([B] fraction of the perturbations the reference outscores, ties counted half: about 0.5
    for a score that cannot tell them apart, 1 when it always prefers the reference; [B] whether the
    reference is the single best candidate: chance is 1 / samples). A score that does not prefer the
    expert's chunk to its perturbations can only pick a perturbation at random when it plans.
    """
    b, h, a = reference.shape
    perturbed = reference.unsqueeze(1) + noise * _noise((b, samples - 1, h, a), generator, reference)
    scores = score(torch.cat([reference.unsqueeze(1), perturbed], dim=1))
    ref, others = scores[:, :1], scores[:, 1:]
    beats = (ref > others).float().mean(dim=1) + 0.5 * (ref == others).float().mean(dim=1)
    return beats, (ref > others).all(dim=1)


def mirrored_slope(
    reference: Tensor,
    score: Callable[[Tensor], Tensor],
    pairs: int,
    noise: float,
    generator: torch.Generator | None = None,
) -> Tensor:
    """Is `score` a slope or a peak at a reference chunk [B, H, A]? Scores `pairs` mirrored perturbations
    reference +/- eps (scale `noise`) and returns [B] the fraction of pairs whose two scores lie on either
    side of the reference's (strictly).

    About 1 for a score that changes almost linearly through the reference (reranking then executes the
    perturbation that goes farthest along the slope, whatever the demonstration did), about 0 for a score
    that peaks (or dips) at the reference, 0.5 for a score unrelated to the chunk's distance from it.
    """
    b, h, a = reference.shape
    eps = noise * _noise((b, pairs, h, a), generator, reference)
    ref = reference.unsqueeze(1)
    scores = score(torch.cat([ref, ref + eps, ref - eps], dim=1))
    s0, plus, minus = scores[:, :1], scores[:, 1 : 1 + pairs], scores[:, 1 + pairs :]
    between = ((plus > s0) & (minus < s0)) | ((plus < s0) & (minus > s0))
    return between.float().mean(dim=1)


def toward_reference(
    reference: Tensor,
    score: Callable[[Tensor], Tensor],
    settings: PlannerSettings,
    offset: float,
    span: int,
    generator: torch.Generator | None = None,
) -> Tensor:
    """Does planning with `score` move a proposal toward a reference chunk [B, H, A] (e.g. the expert's)?
    The proposal is the reference knocked off by Gaussian noise of scale `offset`; the planner then
    picks around it as it would at rollout. Returns [B] the squared distance of the planned chunk to the
    reference over the first `span` actions (those the world model reads), divided by the proposal's.

    Below 1: planning corrects the proposal; about 1: it keeps it; above 1: it strays farther. Rerank
    draws its N - 1 alternatives around the proposal, so at equal noise they lie about twice as far (in
    squared distance) from the reference as the proposal does: a score picking at random gives about 2,
    and only one that ranks candidates well gives less than 1.
    """
    proposal = reference + offset * _noise(tuple(reference.shape), generator, reference)
    planned, _ = plan_chunk(proposal, score, settings, generator)

    def dist(chunk: Tensor) -> Tensor:
        return (chunk[:, :span] - reference[:, :span]).float().pow(2).sum(dim=(1, 2))

    return dist(planned) / dist(proposal).clamp_min(1e-12)
