"""Gated cross-attention: lets a stream of hidden states read a world memory through a tanh gate.

Pure torch. Two traps from earlier world-modality code are designed out here:
- the gated residual is ALWAYS computed: a gate at exactly 0 still gets a gradient (d/dg of
  tanh(g) * ctx is ctx at g = 0), whereas skipping the branch at g == 0 would keep the gate shut forever;
- non-finite memory never reaches the output: `0 * NaN = NaN`, so a closed gate is no protection.
  Non-finite memory rows are masked out of the attention, and a sample with no finite row gets an
  exact zero context, so its output equals the closed-gate output (the input) whatever the gate.

The memory is normalised before the keys and values (`memory_norm`): "layer" (the original) is a
LayerNorm per memory row, which keeps each row's pattern but drops its scale, so slots that differ
mostly by how much changed look alike; "rms" divides the whole memory of a sample by one RMS (over its
finite rows and all dimensions), keeping the relative size of rows and dimensions; "none" leaves it as
is (for memories already on a known scale, e.g. standardised targets).
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F  # noqa: N812
from torch import Tensor, nn

# Normalisations of the memory before the keys and values (see the module docstring).
MEMORY_NORMS = ("layer", "rms", "none")


class MemoryRMSNorm(nn.Module):
    """memory / RMS(memory) * weight, the RMS taken over a sample's finite rows and all dimensions.

    One scale per sample keeps what a per-row LayerNorm loses: how large one slot (or one dimension)
    is next to the others. The learned per-dimension weight starts at 1.
    """

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, memory: Tensor, valid: Tensor) -> Tensor:
        """memory [B, M, D] (zeros in invalid rows); valid [B, M] bool."""
        count = valid.sum(dim=-1).clamp(min=1).to(memory.dtype) * memory.shape[-1]
        ms = memory.pow(2).sum(dim=(1, 2)) / count
        return memory * torch.rsqrt(ms + self.eps)[:, None, None] * self.weight


def fusion_gates(module: nn.Module) -> list[nn.Parameter]:
    """The gate parameters of every `GatedCrossAttention` inside `module` (for their own optimiser group)."""
    return [m.gate for m in module.modules() if isinstance(m, GatedCrossAttention)]


class FusionOutput(NamedTuple):
    """Result of `GatedCrossAttention.forward`.

    hidden: [B, H, W] updated states. attn_entropy: detached scalar, mean entropy (nats) of the
    attention over memory slots, averaged over samples that have at least one finite slot (0 if none,
    or when it was not asked for).
    valid_slots: [B, M] bool, which memory rows were finite.
    """

    hidden: Tensor
    attn_entropy: Tensor
    valid_slots: Tensor


class GatedCrossAttention(nn.Module):
    """hidden + tanh(gate) * CrossAttn(LN(hidden), LN(memory)), with a learnable gate.

    hidden [B, H, W] (e.g. action-query states) attends to memory [B, M, memory_dim] (e.g. predicted
    future latents). Attention runs in `attn_dim` channels (default W): queries are projected W ->
    attn_dim, the LayerNorm'd memory (plus an optional learned per-slot embedding, so attention can
    tell horizons apart) straight to keys and values, and the result back to W. A narrow `attn_dim`
    keeps the world path cheap next to the stream it writes into. `gate` is a scalar, or one value
    per channel with `per_channel=True`, initialised to `gate_init` (0 = the block starts as the identity).
    `memory_norm`: "layer", "rms" or "none" (see the module docstring).
    """

    def __init__(
        self,
        width: int,
        memory_dim: int,
        heads: int = 4,
        gate_init: float = 0.0,
        per_channel: bool = False,
        num_slots: int | None = None,
        dropout: float = 0.0,
        attn_dim: int | None = None,
        memory_norm: str = "layer",
    ):
        super().__init__()
        if memory_norm not in MEMORY_NORMS:
            raise ValueError(f"Unknown memory norm '{memory_norm}'; use one of {MEMORY_NORMS}.")
        attn_dim = attn_dim or width
        if attn_dim % heads != 0:
            raise ValueError(
                f"Cross-attention dimension {attn_dim} is not divisible by its number of heads {heads}."
            )
        self.heads = heads
        self.width = width
        self.attn_dim = attn_dim
        self.dropout = dropout
        self.memory_norm_kind = memory_norm
        # "layer" keeps the attribute name of the original LayerNorm, so older checkpoints load.
        self.memory_norm: nn.Module | None = None
        if memory_norm == "layer":
            self.memory_norm = nn.LayerNorm(memory_dim)
        elif memory_norm == "rms":
            self.memory_norm = MemoryRMSNorm(memory_dim)
        self.slot_embed = nn.Parameter(torch.randn(num_slots, memory_dim) * 0.02) if num_slots else None
        self.query_norm = nn.LayerNorm(width)
        self.q = nn.Linear(width, attn_dim)
        self.kv = nn.Linear(memory_dim, 2 * attn_dim)
        # Default (non-zero) init on purpose: a zero-initialised output projection together with a
        # zero gate gives both of them zero gradient, and the world path could never switch on.
        self.out = nn.Linear(attn_dim, width)
        self.gate = nn.Parameter(torch.full((width if per_channel else 1,), float(gate_init)))

    def gate_value(self) -> Tensor:
        """tanh(gate): the factor the cross-attention result is scaled by ([1] or [W])."""
        return torch.tanh(self.gate)

    def forward(self, hidden: Tensor, memory: Tensor, with_entropy: bool = True) -> FusionOutput:
        """hidden: [B, H, W]; memory: [B, M, memory_dim] (any float dtype; non-finite rows allowed).

        with_entropy=False skips the attention-entropy statistic (returned as 0): the cheaper path for
        rollout.
        """
        b, h, _ = hidden.shape
        m = memory.shape[1]
        memory = memory.to(hidden.dtype)
        # A row with any NaN/Inf is unusable; replace it by zeros (finite) and mask it out of attention.
        valid = torch.isfinite(memory).all(dim=-1)  # [B, M]
        memory = torch.where(valid.unsqueeze(-1), memory, torch.zeros_like(memory))
        if self.memory_norm_kind == "layer":
            mem = self.memory_norm(memory)
        elif self.memory_norm_kind == "rms":
            mem = self.memory_norm(memory, valid)
        else:
            mem = memory
        if self.slot_embed is not None:
            mem = mem + self.slot_embed[:m]
        hd = self.attn_dim // self.heads
        q = self.q(self.query_norm(hidden)).view(b, h, self.heads, hd).transpose(1, 2)  # [B, nh, H, hd]
        k, v = self.kv(mem).view(b, m, 2, self.heads, hd).permute(2, 0, 3, 1, 4)  # [B, nh, M, hd] each
        any_valid = valid.any(dim=-1)  # [B]
        # Samples without any finite row would softmax over all -inf (NaN); let them attend to the zeroed
        # rows instead and discard their context below.
        key_ok = (valid | ~any_valid.unsqueeze(-1))[:, None, None, :]
        p_drop = self.dropout if self.training else 0.0
        # The fused kernel carries the gradient; the entropy statistic is read off detached scores, so
        # asking for it adds no autograd nodes to the training step.
        ctx = F.scaled_dot_product_attention(q, k, v, attn_mask=key_ok, dropout_p=p_drop)
        if with_entropy:
            with torch.no_grad():
                scores = (q @ k.transpose(-1, -2)) / math.sqrt(hd)  # [B, nh, H, M]
                probs = scores.masked_fill(~key_ok, float("-inf")).softmax(dim=-1)
                ent = -torch.special.xlogy(probs, probs).sum(-1).mean(dim=(1, 2))  # [B]
                entropy = (ent * any_valid).sum() / any_valid.sum().clamp(min=1)
        else:
            entropy = hidden.new_zeros(())
        ctx = self.out(ctx.transpose(1, 2).reshape(b, h, self.attn_dim))
        # where(), not multiplication: the context of a sample with no finite memory is exactly zero.
        ctx = torch.where(any_valid[:, None, None], ctx, torch.zeros_like(ctx))
        out = hidden + torch.tanh(self.gate) * ctx
        return FusionOutput(hidden=out, attn_entropy=entropy, valid_slots=valid)
