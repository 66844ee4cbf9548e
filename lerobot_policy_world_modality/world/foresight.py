"""The in-trunk foresight path: foresight tokens in the action trunk's own sequence (Seer-style).

Pure torch. The trunk runs one sequence in three stages,

    [observation tokens (latent history through the trunk's temporal filter, state, instruction)]
    [F foresight tokens]  -> head -> K predicted future latents (the world loss is applied here)
    [H action queries]    -> action head

under a one-way (block-causal) mask: observation tokens attend to observation tokens only, foresight
tokens to observations and foresight tokens, action queries to everything. So neither the foresight
tokens nor the observation tokens ever see the action queries, and the only way the foresight reaches
the actions is the action queries' attention to the foresight tokens. That makes the interventions of
the probe and of `memory_mode_rollout` exact:

- `pred`:    the mask above, one pass (the default and the cheap path).
- `zero`:    the action queries' attention to the foresight tokens is blocked (the same one pass with
             those mask entries off): the actions see no foresight, and nothing else carries it.
- `shuffle`: at every block, the action queries read the foresight tokens' states of another sample
             of the batch (one derangement for all blocks); `random`: at every block they read noise
             with each foresight state's root-mean-square instead. The foresight tokens themselves
             compute exactly what they compute under `pred` (their rows never see the queries), so
             their prediction and world loss do not change. These two run each block twice (once for
             the observation and foresight rows, once for the query rows); they are diagnostics.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from .memory import derangement, select_memory

# Memory modes the in-trunk path implements (the foresight states are trunk hidden states, not
# latents, so there is no true future to put in their place: no oracle, no scheduled sampling).
IN_TRUNK_MEMORY_MODES = ("pred", "zero", "random", "shuffle")


def window_scale(history: Tensor) -> Tensor:
    """Per-sample root-mean-square of a latent window [B, T, D] -> [B, 1, 1] (detached, >= 1e-6).

    The same normalisation as the Prophet's: it makes the foresight head scale-equivariant.
    """
    return history.detach().pow(2).mean(dim=(1, 2), keepdim=True).clamp_min(1e-12).sqrt()


class ForesightPredictor(nn.Module):
    """F learned foresight tokens and the head that turns their trunk states into K future latents.

    Each foresight token predicts K / F consecutive horizons: its state, scaled per channel by a learned
    gain of each horizon (initialised to the horizon index, as a constant velocity would be), goes
    through one shared width -> D projection. A width -> (K / F) D head would be (K / F) times larger,
    and on a CPU the optimiser step and gradient clipping cost in proportion to the parameter count.
    The head follows the Prophet's output convention: its output is scaled by the history window's
    RMS; with `delta` it is the predicted z_{t+k} - z_t, otherwise z_t is added back (absolute
    latents, residual parameterisation).
    Sits in `WorldPath`'s predictor slot, so `WorldPath.loss_terms` supervises its prediction.
    """

    def __init__(self, latent_dim: int, num_future: int, num_tokens: int, width: int, delta: bool):
        super().__init__()
        if num_tokens < 1 or num_future % num_tokens:
            raise ValueError(
                f"future_frames ({num_future}) must be a multiple of foresight_tokens ({num_tokens}) >= 1: "
                "each foresight token predicts the same number of horizons."
            )
        self.latent_dim = latent_dim
        self.num_future = num_future
        self.num_tokens = num_tokens
        self.delta = delta
        self.tokens = nn.Parameter(torch.randn(num_tokens, width) * 0.02)
        per_token = num_future // num_tokens
        self.horizon_gain = nn.Parameter(torch.arange(1.0, per_token + 1).unsqueeze(1).repeat(1, width))
        self.head = nn.Linear(width, latent_dim)

    def queries(self, batch_size: int) -> Tensor:
        """The foresight tokens, [B, F, W]."""
        return self.tokens.unsqueeze(0).expand(batch_size, -1, -1)

    def predict(self, states: Tensor, history: Tensor) -> Tensor:
        """Foresight token states [B, F, W] (trunk output) -> prediction [B, K, D] in the world-loss space."""
        b = states.shape[0]
        history = history.to(states.dtype)
        out = self.head(states.unsqueeze(2) * self.horizon_gain)  # [B, F, K / F, D]
        out = out.reshape(b, self.num_future, self.latent_dim) * window_scale(history)
        return out if self.delta else history[:, -1:] + out


class StagedMask:
    """The one-way [N, N] bool masks (True = may attend) of the three-stage sequence, built once per shape."""

    def __init__(self):
        self._cache: dict = {}

    def __call__(self, n_obs: int, n_fore: int, n_query: int, read_foresight: bool, device) -> Tensor:
        """Mask of [n_obs observations, n_fore foresight, n_query queries]; `read_foresight=False` = zero mode."""
        key = (n_obs, n_fore, n_query, read_foresight, str(device))
        mask = self._cache.get(key)
        if mask is None:
            stage = torch.tensor([0] * n_obs + [1] * n_fore + [2] * n_query, device=device)
            mask = stage[:, None] >= stage[None, :]
            if not read_foresight:
                mask[n_obs + n_fore :, n_obs : n_obs + n_fore] = False
            self._cache[key] = mask
        return mask


def run_staged(
    trunk, obs: Tensor, foresight: Tensor, queries: Tensor, masks: StagedMask, mode: str = "pred",
    detach: bool = False,
) -> Tensor:  # fmt: skip
    """Trunk states [B, N, W] of [obs, foresight, queries] with the action queries reading the foresight by `mode`.

    `trunk` is an `ActionTrunk` (its `blocks` and final `norm`). `detach`: the action loss does not flow
    into the foresight states through the queries' attention (like `detach_memory` on the cross-attention
    path); it takes the two-pass route, as do `shuffle` and `random`.
    """
    if mode not in IN_TRUNK_MEMORY_MODES:
        raise ValueError(
            f"The in-trunk foresight path supports memory modes {IN_TRUNK_MEMORY_MODES}, not '{mode}': its "
            "foresight states are trunk hidden states, so there is no true future to substitute. Train the "
            "oracle upper bound with --policy.world_path=cross_attn --policy.memory_mode_train=oracle."
        )
    n_obs, n_fore, n_query = obs.shape[1], foresight.shape[1], queries.shape[1]
    x = torch.cat([obs, foresight, queries], dim=1)
    if mode in ("pred", "zero") and not detach:
        return trunk(x, masks(n_obs, n_fore, n_query, mode == "pred", x.device))
    full = masks(n_obs, n_fore, n_query, mode != "zero", x.device)
    n_ctx = n_obs + n_fore
    ctx_mask = full[:n_ctx, :n_ctx]
    perm = derangement(x.shape[0], device=x.device) if mode == "shuffle" else None
    for block in trunk.blocks:
        ctx = x[:, :n_ctx]
        fore = ctx[:, n_obs:]
        if perm is not None:
            fore = fore[perm]
        elif mode == "random":
            fore = select_memory("random", fore)
        if detach:
            fore = fore.detach()
        seen = torch.cat([ctx[:, :n_obs], fore, x[:, n_ctx:]], dim=1)
        # Observation and foresight rows never see the queries: computing them apart from the
        # (altered) sequence the queries read leaves them exactly as under `pred`.
        x = torch.cat([block(ctx, ctx_mask), block(seen, full, last=n_query)], dim=1)
    return trunk.norm(x)
