"""Action-conditioned latent dynamics and a progress head: the world model a planner rolls chunks through.

Pure torch. `ActionDynamics` is f(z_{t-T+1..t}, a_t..a_{t+Ks-1}) -> the K future frames z_{t+s}, ...,
z_{t+Ks} in the world path's target space (absolute or delta, standardised or not: the caller hands it
the Prophet's input tokens and compares its output with the Prophet's targets). Unlike the Prophet,
which forecasts from history alone, it knows which actions will be executed, so it can answer "what
happens if I execute this chunk": the information a planner needs and the policy cannot learn alone.

`ProgressHead` reads one latent and predicts the fraction of its episode still to go (0 at success,
1 at the start; failed episodes are 1 throughout): with no goal image, a planner prefers chunks whose
imagined end has the least left to go.

`RewardHead` reads one latent and predicts the environment's reward for the step taken from it: a
score of imagined outcomes that carries what the demonstrations alone do not (how good a state is).

`OutcomeCritic` reads the current latent and the K frames the dynamics imagine for a chunk, and is
trained to tell the imagined outcome of the dataset's chunk from those of perturbations of it (a
softmax over one positive and several negatives): a score that peaks where the demonstrations act,
judged through the world model, instead of a progress slope that rises without bound along some
direction of the actions. It may read the chunk's actions as well (`critic_input="both"` or
`"both_projected"`), or only them (`"actions"`: a control that judges candidates without the world
model).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F  # noqa: N812
from torch import Tensor, nn

from .prophet import Prophet

# World-model choices of a policy: none, or dynamics conditioned on the action chunk.
DYNAMICS = ("none", "action_conditioned")
# What a planner scores imagined outcomes by; "auto" takes the first available in this order.
PLANNER_SCORES = ("auto", "goal", "critic", "reward", "progress")
# What the outcome critic reads beside the current latent: the K imagined frames, the actions the dynamics
# read, or both. With "_projected", each input is projected on its own before an MLP mixes them.
CRITIC_INPUTS = ("imagined", "actions", "both", "imagined_projected", "actions_projected", "both_projected")
PROJECTED = "_projected"


class ActionDynamics(nn.Module):
    """A Prophet whose context tokens are the first `action_len` actions of the chunk, in order.

    latent_dim / history_len / num_future: as the Prophet's (D, T, K); action_dim: A; action_len: how
    many actions reach the K-th predicted frame (K x future_stride). `delta` and `rescale_output` follow
    the world path's target space.
    """

    def __init__(
        self,
        latent_dim: int,
        history_len: int,
        num_future: int,
        action_dim: int,
        action_len: int,
        width: int = 128,
        depth: int = 2,
        heads: int = 4,
        dropout: float = 0.0,
        delta: bool = False,
        rescale_output: bool = True,
    ):
        super().__init__()
        self.action_len = action_len
        self.net = Prophet(
            latent_dim, history_len, num_future, width, depth, heads, None, dropout, delta,
            context_dim=action_dim, rescale_output=rescale_output, context_len=action_len,
        )  # fmt: skip

    def forward(self, tokens: Tensor, actions: Tensor) -> Tensor:
        """tokens: the Prophet's input [B, T, D]; actions: chunk [B, H >= action_len, A] -> [B, K, D]."""
        if actions.ndim != 3 or actions.shape[1] < self.action_len:
            raise ValueError(
                f"The action-conditioned dynamics read the first {self.action_len} actions of a chunk "
                f"[B, H, A], got {tuple(actions.shape)}: future_frames x future_stride must not exceed chunk_size."
            )
        return self.net(tokens, actions[:, : self.action_len]).prediction()


class ProgressHead(nn.Module):
    """Latent [..., D] -> logit of the fraction of the episode still to go (sigmoid gives it in [0, 1]).

    The latent is layer-normalised first: progress is a property of the scene, not of the encoder's
    output scale.
    """

    def __init__(self, latent_dim: int, width: int = 128):
        super().__init__()
        self.net = nn.Sequential(
            nn.LayerNorm(latent_dim), nn.Linear(latent_dim, width), nn.GELU(), nn.Linear(width, 1)
        )

    def forward(self, latent: Tensor) -> Tensor:
        """Logits [...] of the remaining fraction."""
        return self.net(latent.to(self.net[1].weight.dtype)).squeeze(-1)


class RewardHead(ProgressHead):
    """Latent [..., D] -> the reward of the step taken from that frame, divided by `reward_scale` (the same
    MLP as the progress head, trained by regression on the dataset's `next.reward`). Unlike progress, the
    reward is a function of the scene (e.g. how close the hand is to the object), not of time, so it can
    say that an imagined outcome is better, not only further along."""


def progress_targets(remaining: Tensor, success: Tensor | None = None) -> Tensor:
    """Training targets of the progress head: the remaining fraction, and 1 for frames of failed
    episodes (they never reach success, so no frame of theirs is closer to it)."""
    remaining = remaining.float()
    if success is None:
        return remaining
    return torch.where(success.to(torch.bool).reshape(remaining.shape), remaining, torch.ones_like(remaining))


def progress_loss(logits: Tensor, targets: Tensor) -> Tensor:
    """Binary cross-entropy of the predicted remaining fraction against soft targets in [0, 1]."""
    return F.binary_cross_entropy_with_logits(logits.float(), targets.float())


def goal_score(final: Tensor, goal: Tensor) -> Tensor:
    """Score of imagined end latents [N, D] against goal latents [N, D]: minus the mean absolute
    difference (the L1 latent distance that V-JEPA 2-AC plans with); higher is better."""
    return -(final.float() - goal.float()).abs().mean(dim=-1)


class OutcomeCritic(nn.Module):
    """(current latent [N, D], imagined frames [N, K, D] in target space, chunk [N, H, A]) -> logit [N]:
    how good a candidate's outcome looks. `reads` picks the inputs beside the current latent
    (`CRITIC_INPUTS`): the imagined frames, the first `action_len` actions of the chunk, or both. Each
    input is layer-normalised on its own, so the critic judges the shape of the imagined change and of
    the actions, not their scales.

    Plain inputs are concatenated into one MLP, where the K x D imagined numbers outnumber the actions'
    few hundredfold. With the "_projected" suffix ("both_projected", and its single-input controls
    "imagined_projected" and "actions_projected") each input, the current latent included, is first
    projected to `width` and layer-normalised, so every input enters the mix with the same weight
    whatever its size."""

    def __init__(self, latent_dim: int, num_future: int, width: int = 128, reads: str = "imagined",
                 action_dim: int = 0, action_len: int = 0):  # fmt: skip
        super().__init__()
        if reads not in CRITIC_INPUTS:
            raise ValueError(f"critic_input '{reads}' is not one of {CRITIC_INPUTS}.")
        self.reads, self.action_len = reads, action_len
        if self.reads_actions and action_dim * action_len < 1:
            raise ValueError(f"critic_input '{reads}' reads the actions: action_dim and action_len must be >= 1.")
        self.current = nn.LayerNorm(latent_dim)
        widths = {"current": latent_dim}
        # The imagined input keeps its name, so checkpoints of imagined-only critics load unchanged.
        if self.reads_imagined:
            self.imagined = nn.LayerNorm(latent_dim * num_future)
            widths["imagined"] = latent_dim * num_future
        if self.reads_actions:
            self.actions = nn.LayerNorm(action_len * action_dim)
            widths["actions"] = action_len * action_dim
        if reads.endswith(PROJECTED):
            self.project = nn.ModuleDict({k: nn.Sequential(nn.Linear(w, width), nn.LayerNorm(width))
                                          for k, w in widths.items()})  # fmt: skip
            self.net = nn.Sequential(nn.GELU(), nn.Linear(width * len(widths), width), nn.GELU(), nn.Linear(width, 1))
        else:
            self.project = None
            self.net = nn.Sequential(nn.Linear(sum(widths.values()), width), nn.GELU(), nn.Linear(width, 1))

    @property
    def reads_imagined(self) -> bool:
        """Whether the critic needs the dynamics' imagined frames (an actions-only critic does not)."""
        return self.reads.removesuffix(PROJECTED) != "actions"

    @property
    def reads_actions(self) -> bool:
        """Whether the critic reads the chunk's first `action_len` actions."""
        return self.reads.removesuffix(PROJECTED) != "imagined"

    def forward(self, current: Tensor, imagined: Tensor | None = None, chunk: Tensor | None = None) -> Tensor:
        """Logits [N]; higher = a better outcome. `imagined` [N, K, D] and `chunk` [N, H >= action_len, A]
        are needed only when the critic reads them."""
        dtype = self.current.weight.dtype
        parts = {"current": self.current(current.to(dtype))}
        if self.reads_imagined:
            if imagined is None:
                raise ValueError(f"This outcome critic (critic_input '{self.reads}') reads the imagined frames.")
            parts["imagined"] = self.imagined(imagined.flatten(1).to(dtype))
        if self.reads_actions:
            if chunk is None or chunk.shape[1] < self.action_len:
                raise ValueError(f"This outcome critic (critic_input '{self.reads}') reads the first "
                                 f"{self.action_len} actions of each chunk [N, H, A].")  # fmt: skip
            parts["actions"] = self.actions(chunk[:, : self.action_len].flatten(1).to(dtype))
        if self.project is not None:
            parts = {k: self.project[k](x) for k, x in parts.items()}
        return self.net(torch.cat(list(parts.values()), dim=-1)).squeeze(-1)


def critic_loss(logits: Tensor, weight: Tensor | None = None) -> Tensor:
    """Cross-entropy of logits [B, 1 + M] whose column 0 is the dataset's chunk and the rest its
    perturbations; `weight` [B] (e.g. 0 for frames of failed episodes) weighs the samples."""
    per_sample = F.cross_entropy(logits.float(), torch.zeros(len(logits), dtype=torch.long, device=logits.device),
                                 reduction="none")  # fmt: skip
    if weight is None:
        return per_sample.mean()
    weight = weight.float()
    return (per_sample * weight).sum() / weight.sum().clamp_min(1.0)


def reward_loss(predicted: Tensor, reward: Tensor, scale: float) -> Tensor:
    """Mean squared error of the reward head [B] against the dataset's rewards [B] (or [B, 1]) / scale."""
    return F.mse_loss(predicted.float(), reward.float().reshape(predicted.shape) / scale)


def ranking_loss(scores: Tensor, truth: Tensor) -> Tensor:
    """Pairwise logistic (RankNet) loss of scores [B, N] against true outcomes [B, N] of the same N
    candidates per row: for every pair the truth orders, softplus of minus the score margin in that
    order. Only the order of the truth counts, so rows whose candidates differ by 1e-4 teach as much as
    rows that differ by 1; rows with a flat truth add nothing."""
    diff = scores.float().unsqueeze(2) - scores.float().unsqueeze(1)  # [B, N, N]: s_i - s_j
    ordered = (truth.unsqueeze(2) > truth.unsqueeze(1)).float()  # i truly better than j
    return (F.softplus(-diff) * ordered).sum() / ordered.sum().clamp_min(1.0)


def listwise_loss(scores: Tensor, truth: Tensor, temperature: float = 0.5) -> Tensor:
    """Listwise (softmax cross-entropy) loss of scores [B, N] against true outcomes [B, N]: the target is
    a softmax of each row's standardised true ranks over `temperature`, so the best candidates weigh
    most and, as in `ranking_loss`, only the order of the truth counts: tied candidates share their mean
    rank, as `ranking_loss` orders no tied pair. Rows with a flat truth add nothing."""
    t = truth.float()
    below = (t.unsqueeze(2) > t.unsqueeze(1)).float().sum(2)  # candidates each one truly beats
    ties = (t.unsqueeze(2) == t.unsqueeze(1)).float().sum(2) - 1.0
    ranks = below + 0.5 * ties
    z = (ranks - ranks.mean(1, keepdim=True)) / ranks.std(1, keepdim=True).clamp_min(1e-8)
    keep = (t.amax(1) > t.amin(1)).float()
    loss = -(torch.softmax(z / temperature, dim=1) * F.log_softmax(scores.float(), dim=1)).sum(1)
    return (loss * keep).sum() / keep.sum().clamp_min(1.0)
