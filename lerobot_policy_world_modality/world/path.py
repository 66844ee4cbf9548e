"""`WorldPath`: the Prophet, the memory modes, the gated cross-attention and the world loss as one module.

Every policy type owns one `WorldPath` and calls it at two points: `predict` (history -> K predicted
future latents) and `inject` (a stream of hidden states reads the selected memory through the gate).
`loss_terms` gives the world loss and the scalars all policy types log under the same names:
`world_loss`, `world_cos_h{k}`, `gate` (mean tanh(gate)), `gate_abs_max` (per-channel gates),
`memory_norm`, `attn_entropy`, `oracle_prob` (scheduled sampling).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ..constants import OBS_WORLD_FUTURE, OBS_WORLD_FUTURE_VALID, OBS_WORLD_HISTORY
from .fusion import GatedCrossAttention
from .memory import per_horizon_cosine, scheduled_oracle_prob, select_memory, world_loss, world_targets
from .options import WorldMemoryOptions
from .prophet import Prophet


def build_fusion(
    options: WorldMemoryOptions, width: int, latent_dim: int, dropout: float = 0.0
) -> GatedCrossAttention:
    """A gated cross-attention from a stream of width `width` into the world memory, set by `options`.

    For policies with extra fusion points (e.g. smolvla_world's early and prefix injections): every
    fusion point reads the memory with the same heads, inner dimension, gate initialisation and slots.
    """
    return GatedCrossAttention(
        width, latent_dim, options.fusion_heads, options.gate_init, options.gate_per_channel,
        num_slots=options.future_frames, dropout=dropout, attn_dim=options.fusion_dim,
    )  # fmt: skip


class WorldPath(nn.Module):
    """Prophet (when `use_prophet`) + gated cross-attention into `hidden_width` (when `inject_memory`).

    latent_dim: world latent dimension D; hidden_width: width of the states the memory is injected
    into; context_dim: width of optional context tokens the Prophet also reads (e.g. trunk states).
    Keeps the count of training forward passes (`train_step`, saved with the weights) that drives
    scheduled sampling, so a resumed run continues its schedule.
    """

    def __init__(
        self,
        options: WorldMemoryOptions,
        latent_dim: int,
        hidden_width: int,
        context_dim: int | None = None,
        dropout: float = 0.0,
    ):
        super().__init__()
        self.options = options
        o = options
        self.prophet = (
            Prophet(
                latent_dim,
                o.history_frames,
                o.future_frames,
                o.prophet_width,
                o.prophet_depth,
                o.prophet_heads,
                None,
                dropout,
                o.delta_prediction,
                context_dim=context_dim,
            )  # fmt: skip
            if o.use_prophet
            else None
        )
        self.fusion = build_fusion(o, hidden_width, latent_dim, dropout) if o.inject_memory else None
        self.register_buffer("train_step", torch.zeros((), dtype=torch.long))

    def predict(self, history: Tensor, context: Tensor | None = None) -> Tensor:
        """K predicted future latents (or deltas, with delta_prediction) [B, K, D] from history [B, T, D]."""
        if self.prophet is None:
            raise RuntimeError("This policy was built without a Prophet (use_prophet=False).")
        return self.prophet(history, context).prediction()

    def training_inputs(self, batch: dict) -> tuple[Tensor, Tensor, Tensor | None]:
        """(history [B, T, D], world-loss targets [B, K, D] float32, valid [B, K]) of a training batch.

        Targets are in the space the Prophet predicts (future latents, or their deltas to z_t).
        """
        for key in (OBS_WORLD_HISTORY, OBS_WORLD_FUTURE):
            if key not in batch:
                raise KeyError(
                    f"Training batch has no '{key}'. The world-latent step adds it from the latent cache "
                    "when the batch carries the dataset's 'index'; train through lerobot-train with this "
                    "policy's preprocessor (and run lerobot-wm-precompute for the dataset first)."
                )
        history = batch[OBS_WORLD_HISTORY]
        targets = world_targets(
            batch[OBS_WORLD_FUTURE], history[:, -1], self.options.delta_prediction
        ).float()
        return history, targets, batch.get(OBS_WORLD_FUTURE_VALID)

    def oracle_prob(self) -> float:
        """Oracle probability of the scheduled memory mode at the current training step (0 otherwise)."""
        o = self.options
        if o.memory_mode_train != "scheduled":
            return 0.0
        return scheduled_oracle_prob(
            int(self.train_step), o.scheduled_prob_start, o.scheduled_prob_end,
            o.scheduled_decay_steps, o.scheduled_warmup_steps, o.scheduled_shape,
        )  # fmt: skip

    def step(self) -> None:
        """Count one training forward pass (call once per training-mode forward, after `loss_terms`)."""
        if self.training:
            self.train_step += 1

    def select(
        self, prediction: Tensor, mode: str, oracle: Tensor | None = None, oracle_prob: float = 0.0
    ) -> Tensor:
        """The memory [B, K, D] the action path reads under `mode` (detached with `detach_memory`).

        Chosen once per policy call, so every fusion point (and every denoising step) reads the same.
        """
        memory = prediction.detach() if self.options.detach_memory else prediction
        return select_memory(mode, memory, oracle, oracle_prob)

    def inject(self, hidden: Tensor, memory: Tensor, stats: bool = False) -> tuple[Tensor, dict]:
        """hidden [B, N, W] after reading `memory` (from `select`) through the gated cross-attention.

        With `stats`, also returns `memory_norm` and `attn_entropy` (skipped at rollout, where reading
        them back would cost a device sync per inference).
        """
        if self.fusion is None:
            raise RuntimeError("This policy was built without memory injection (inject_memory=False).")
        fused = self.fusion(hidden, memory, with_entropy=stats)
        info: dict = {}
        if stats:
            info["attn_entropy"] = fused.attn_entropy.item()
            with torch.no_grad():
                finite = fused.valid_slots
                norms = torch.where(finite, memory.float().nan_to_num().norm(dim=-1), 0.0)
                info["memory_norm"] = (norms.sum() / finite.sum().clamp(min=1)).item()
        return fused.hidden, info

    def loss_terms(
        self, prediction: Tensor | None, targets: Tensor | None, valid: Tensor | None
    ) -> tuple[Tensor | None, dict]:
        """(world loss or None, logged scalars): world loss and cosine per horizon, gate opening, oracle p."""
        info: dict = {}
        loss = None
        if self.prophet is not None and prediction is not None:
            loss = world_loss(prediction, targets, valid)
            info["world_loss"] = loss.item()
            for k, c in enumerate(per_horizon_cosine(prediction, targets, valid).tolist(), start=1):
                info[f"world_cos_h{k}"] = c
        if self.fusion is not None:
            gate = self.fusion.gate_value().detach()
            info["gate"] = gate.mean().item()
            if gate.numel() > 1:
                info["gate_abs_max"] = gate.abs().max().item()
        if self.options.memory_mode_train == "scheduled":
            info["oracle_prob"] = self.oracle_prob()
        return loss, info
