"""The action trunk shared by the compact policy types, and their masked action loss.

`ActionTrunk` turns the world latent, the robot state and (optionally) an instruction embedding into
observation tokens, appends H learned action queries, and runs a pre-norm transformer over them;
`world_f` reads the query states directly (or, on its in-trunk foresight path, runs foresight tokens
between the observations and the queries, see `world/foresight.py`), `world_token_c` inserts its world
tokens between the observations and the queries.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F  # noqa: N812
from torch import Tensor, nn

from .memory import copy_statistics, standardise
from .prophet import TransformerBlock

STATE_KEY = "observation.state"  # LeRobot's OBS_STATE, kept literal so this package stays LeRobot-free
# How the trunk brings the world latent to a known scale: "layer" LayerNorms each latent on its own
# (scale-free, no statistics); "dataset" standardises each dimension with the training cache's
# statistics (`latents.cache.latent_input_statistics`), the scaling a linear probe of the latents uses.
LATENT_INPUT_NORMS = ("layer", "dataset")


class MotionEmbedding(nn.Module):
    """The T-frame latent history as one embedding added to the trunk's current-latent token.

    sum_t c_t * P z_t / ||z_{t-T+1..t}||: one projection P (D -> width, no bias) of every frame, a learned
    per-channel weight c_t [T, width] per frame, divided by the window's norm (scale-equivariant like
    the Prophet's input; no LayerNorm, which would erase the frame-to-frame differences). c starts as
    the mean difference z_{t-i} - z_t over the lags, i.e. motion. Six ops and a D x width matrix: at
    batch 1 a policy step is bound by op count and by reading weights, not by FLOPs.
    """

    def __init__(self, latent_dim: int, history_len: int, width: int):
        super().__init__()
        if history_len < 2:
            raise ValueError(
                f"Reading motion from the history needs history_frames >= 2, got {history_len}: set "
                "--policy.history_frames=2 or more."
            )
        self.history_len = history_len
        self.proj = nn.Linear(latent_dim, width, bias=False)
        # Mean difference to the current frame, times sqrt(T D) so the window norm acts as its RMS.
        lags = torch.full((history_len, 1), 1.0 / (history_len - 1))
        lags[-1] = -1.0
        self.lag_weight = nn.Parameter(lags.expand(-1, width) * math.sqrt(history_len * latent_dim))

    def forward(self, history: Tensor | None) -> Tensor:
        """history [B, T, D] (oldest first, last = current frame) -> [B, width]."""
        if history is None or history.ndim != 3 or history.shape[1] != self.history_len:
            raise ValueError(
                f"The trunk reads a latent history [B, {self.history_len}, D] but got "
                f"{None if history is None else tuple(history.shape)}: history_frames must match the checkpoint's."
            )
        if history.dtype != self.proj.weight.dtype:  # encoders may hand fp16 latents to fp32 modules
            history = history.to(self.proj.weight.dtype)
        norm = torch.linalg.vector_norm(history, dim=(1, 2)).clamp_min(1e-6).unsqueeze(-1)
        return (self.proj(history) * self.lag_weight).sum(dim=1) / norm


class ActionTrunk(nn.Module):
    """Observation tokens + H learned action queries through a pre-norm transformer (reusable trunk).

    Observation tokens: the world latent (brought to a known scale, since encoder latents come at any
    scale: LayerNorm'd, or with `latent_input="dataset"` standardised per dimension with the buffers
    `input_mean` / `input_std` bound from `input_stats`; then projected to `width`), when given the
    robot state (projected) and, with `language_dim`, the
    instruction embedding (LayerNorm'd and projected, like the latent). Each token type has a learned
    embedding. Callers may insert extra tokens (e.g. world tokens) between observations and queries.
    With `history_frames` (>= 2), the trunk also reads the motion of the last T world latents, added to
    the current-latent token (`MotionEmbedding`: no extra sequence length).
    """

    def __init__(
        self,
        latent_dim: int,
        state_dim: int | None,
        chunk_size: int,
        width: int,
        depth: int,
        heads: int,
        ffn_dim: int | None = None,
        dropout: float = 0.0,
        language_dim: int | None = None,
        history_frames: int | None = None,
        latent_input: str = "layer",
        input_stats: dict[str, Tensor] | None = None,
    ):
        super().__init__()
        if latent_input not in LATENT_INPUT_NORMS:
            raise ValueError(f"latent_input must be one of {LATENT_INPUT_NORMS}, got '{latent_input}'.")
        self.latent_input = latent_input
        self.latent_norm = nn.LayerNorm(latent_dim) if latent_input == "layer" else None
        self.latent_proj = nn.Linear(latent_dim, width)
        self.state_proj = nn.Linear(state_dim, width) if state_dim else None
        self.num_obs_tokens = (2 if state_dim else 1) + (1 if language_dim else 0)
        self.obs_embed = nn.Parameter(torch.randn(self.num_obs_tokens, width) * 0.02)
        self.action_queries = nn.Parameter(torch.randn(chunk_size, width) * 0.02)
        self.blocks = nn.ModuleList(TransformerBlock(width, heads, ffn_dim, dropout) for _ in range(depth))
        self.norm = nn.LayerNorm(width)
        # Created after every other parameter, so a trunk without language draws exactly the same
        # initial weights as before the language input existed.
        if language_dim:
            self.language_norm = nn.LayerNorm(language_dim)
            self.language_proj = nn.Linear(language_dim, width)
        else:
            self.language_norm = self.language_proj = None
        # Last for the same reason: trunks without a history input keep their initial weights.
        self.motion = MotionEmbedding(latent_dim, history_frames, width) if history_frames else None
        self._input_stats_ready = False
        if latent_input == "dataset":
            # NaN until bound: a trunk that never got its statistics fails loudly instead of training on garbage.
            for name in ("input_mean", "input_std"):
                self.register_buffer(name, torch.full((latent_dim,), float("nan")))
            if input_stats is not None:
                self.set_input_stats(input_stats)

    def set_input_stats(self, stats: dict[str, Tensor]) -> None:
        """Bind `input_mean` / `input_std` [D] (from `latents.cache.latent_input_statistics`)."""
        if self.latent_input != "dataset":
            raise RuntimeError("set_input_stats needs a trunk built with latent_input='dataset'.")
        copy_statistics(self, stats, ("input_mean", "input_std"), "Trunk input statistic",
                        "(the world latent dim): recompute it from this encoder's cache.")  # fmt: skip
        self._input_stats_ready = False

    def scaled_latent(self, latent: Tensor) -> Tensor:
        """The world latent [B, D] on the trunk's input scale (see `LATENT_INPUT_NORMS`)."""
        if self.latent_norm is not None:
            return self.latent_norm(latent)
        if not self._input_stats_ready:  # checked once (one sync), then remembered
            stats = torch.cat([self.input_mean, self.input_std])
            self._input_stats_ready = bool(torch.isfinite(stats).all())
            if not self._input_stats_ready:
                raise RuntimeError(
                    "latent_input_norm='dataset' but the trunk has no input statistics: they are computed from "
                    "the latent cache when lerobot-train builds the policy (dataset_meta given) and saved in its "
                    "checkpoint. Train through lerobot-train or load a checkpoint trained with them."
                )
        return standardise(latent, self.input_mean, self.input_std)

    def observation_tokens(
        self,
        latent: Tensor,
        state: Tensor | None,
        language: Tensor | None = None,
        history: Tensor | None = None,
    ) -> Tensor:
        """[B, num_obs_tokens, W] from the world latent [B, D], the state [B, S], the instruction [B, L]
        and the latent history [B, T, D].

        State, instruction and history are read only when the trunk was built with them.
        """
        dtype = self.latent_proj.weight.dtype
        latent_token = self.latent_proj(self.scaled_latent(latent.to(dtype)))
        if self.motion is not None:
            latent_token = latent_token + self.motion(history)
        tokens = [latent_token]
        if self.state_proj is not None:
            if state is None:
                raise KeyError(
                    f"The policy was built with a robot state but the batch has no '{STATE_KEY}': give the "
                    "environment's state (for LeRobot envs, an obs_type with the agent position)."
                )
            tokens.append(self.state_proj(state.to(dtype)))
        if self.language_proj is not None:
            if language is None:
                raise ValueError(
                    "The trunk was built with a language input but got no instruction embedding."
                )
            tokens.append(self.language_proj(self.language_norm(language.to(dtype))))
        return torch.stack(tokens, dim=1) + self.obs_embed

    def queries(self, batch_size: int) -> Tensor:
        """The H learned action-query tokens, [B, H, W]."""
        return self.action_queries.unsqueeze(0).expand(batch_size, -1, -1)

    def forward(self, tokens: Tensor, attn_mask: Tensor | None = None) -> Tensor:
        """Run the blocks and the final norm over a token sequence [B, N, W]."""
        for block in self.blocks:
            tokens = block(tokens, attn_mask)
        return self.norm(tokens)


def action_loss(pred: Tensor, target: Tensor, is_pad: Tensor | None = None, kind: str = "l1") -> Tensor:
    """Mean L1 (`kind="l1"`) or squared error (`"mse"`) of an action chunk [B, H, A], padded steps excluded.

    is_pad: [B, H] bool (LeRobot's `action_is_pad`), True where the chunk ran past the episode end.
    """
    if kind == "l1":
        err = F.l1_loss(pred, target, reduction="none")
    elif kind == "mse":
        err = F.mse_loss(pred, target, reduction="none")
    else:
        raise ValueError(f"action_loss must be 'l1' or 'mse', got '{kind}'.")
    if is_pad is None:
        return err.mean()
    keep = (~is_pad).unsqueeze(-1).expand_as(err)
    return torch.where(keep, err, torch.zeros_like(err)).sum() / keep.sum().clamp(min=1)
