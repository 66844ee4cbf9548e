"""The Prophet: a small transformer that predicts the next K world latents from the last T.

Pure torch (no LeRobot imports) so every policy type can reuse it. Also home of `TransformerBlock`,
the pre-norm block shared by the Prophet and the policy trunks.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F  # noqa: N812
from torch import Tensor, nn


class TransformerBlock(nn.Module):
    """Pre-norm transformer block: x + SelfAttn(LN(x)), then x + MLP(LN(x)).

    Written on `F.scaled_dot_product_attention` rather than `nn.TransformerEncoderLayer`, whose eval
    "fast path" changes numerics between train and eval and would make exact-equality checks flaky.
    """

    def __init__(self, width: int, heads: int, ffn_dim: int | None = None, dropout: float = 0.0):
        super().__init__()
        if width % heads != 0:
            raise ValueError(f"Transformer width {width} is not divisible by its number of heads {heads}.")
        self.heads = heads
        self.dropout = dropout
        self.norm1 = nn.LayerNorm(width)
        self.qkv = nn.Linear(width, 3 * width)
        self.out = nn.Linear(width, width)
        self.norm2 = nn.LayerNorm(width)
        ffn_dim = ffn_dim or 4 * width
        self.mlp = nn.Sequential(
            nn.Linear(width, ffn_dim), nn.GELU(), nn.Dropout(dropout), nn.Linear(ffn_dim, width)
        )
        self.drop = nn.Dropout(dropout)

    def forward(self, x: Tensor, attn_mask: Tensor | None = None, last: int | None = None) -> Tensor:
        """x: [B, N, W]; attn_mask: optional bool [N, N] or [B, 1, N, N], True = may attend.

        With `last`, only the last `last` tokens are updated and returned ([B, last, W]); they still
        attend to all N. Their values equal the full block's rows, at a fraction of the cost, for a
        final block whose other outputs nobody reads (the Prophet's query slots).
        """
        b, n, w = x.shape
        q, k, v = self.qkv(self.norm1(x)).view(b, n, 3, self.heads, w // self.heads).permute(2, 0, 3, 1, 4)
        if last is not None:
            # Keys and values of every token; queries, residual and MLP for the kept rows only.
            q, x = q[:, :, -last:], x[:, -last:]
            if attn_mask is not None:
                attn_mask = attn_mask[..., -last:, :]
        a = F.scaled_dot_product_attention(
            q, k, v, attn_mask=attn_mask, dropout_p=self.dropout if self.training else 0.0
        )
        x = x + self.drop(self.out(a.transpose(1, 2).reshape(b, x.shape[1], w)))
        return x + self.drop(self.mlp(self.norm2(x)))


class ProphetOutput(NamedTuple):
    """What the Prophet predicts for the K future frames.

    `absolute`: predicted z_{t+1..t+K} [B, K, D]. `delta`: predicted z_{t+k} - z_t [B, K, D].
    Both are always filled; `supervised` names the one the network predicts directly and the world
    loss should be applied to ("delta" under the delta parameterisation, else "absolute"). Under a
    scale-free loss (1 - cosine) only the supervised tensor's direction is trained, so the other one
    (z_t + delta, or absolute - z_t) is only as meaningful as that direction allows.
    """

    absolute: Tensor
    delta: Tensor
    supervised: str

    def prediction(self) -> Tensor:
        """The directly predicted tensor (the one the world loss and the memory use)."""
        return self.delta if self.supervised == "delta" else self.absolute


class Prophet(nn.Module):
    """Maps a history of world latents [B, T, D] to K predicted future latents [B, K, D].

    Tokens: T history tokens (latent / window RMS -> width, plus a learned position embedding), an
    optional set of context tokens (e.g. a policy trunk's observation states, so the world loss also
    shapes the trunk), and K learned query slots. A pre-norm transformer runs over all of them; the K
    slot states are projected back to the latent dimension D.

    With `delta=True` the slots predict z_{t+k} - z_t (z_t = history[:, -1]), which keeps the output
    small and removes the need to reproduce the current frame; absolute predictions are z_t + delta.
    With `rescale_output=False` the output is not multiplied back by the history's RMS: for targets
    on a fixed scale (standardised per dimension), whatever the scale of the history.
    With `context_len`, the context tokens are an ordered sequence of that length (e.g. an action
    chunk) and get a learned position embedding each; without it, one shared type embedding.
    """

    def __init__(
        self,
        latent_dim: int,
        history_len: int,
        num_future: int,
        width: int = 128,
        depth: int = 2,
        heads: int = 4,
        ffn_dim: int | None = None,
        dropout: float = 0.0,
        delta: bool = False,
        context_dim: int | None = None,
        rescale_output: bool = True,
        context_len: int | None = None,
    ):
        super().__init__()
        if history_len < 1 or num_future < 1:
            raise ValueError(
                f"Prophet needs history_len >= 1 and num_future >= 1, got {history_len}, {num_future}."
            )
        self.latent_dim = latent_dim
        self.history_len = history_len
        self.num_future = num_future
        self.delta = delta
        self.rescale_output = rescale_output
        self.in_proj = nn.Linear(latent_dim, width)
        self.history_pos = nn.Parameter(torch.randn(history_len, width) * 0.02)
        self.queries = nn.Parameter(torch.randn(num_future, width) * 0.02)
        self.context_proj = nn.Linear(context_dim, width) if context_dim else None
        self.context_len = context_len
        rows = context_len if context_len else 1
        self.context_type = nn.Parameter(torch.randn(rows, width) * 0.02) if context_dim else None
        self.blocks = nn.ModuleList(TransformerBlock(width, heads, ffn_dim, dropout) for _ in range(depth))
        self.out_norm = nn.LayerNorm(width)
        self.out_proj = nn.Linear(width, latent_dim)

    def forward(self, history: Tensor, context: Tensor | None = None) -> ProphetOutput:
        """history: [B, T, D] (oldest first, last = current frame); context: optional [B, C, context_dim]."""
        if history.ndim != 3 or history.shape[1] != self.history_len or history.shape[2] != self.latent_dim:
            raise ValueError(
                f"Prophet expects history [B, {self.history_len}, {self.latent_dim}], got {tuple(history.shape)}: "
                "history_frames and the world latent dimension must match the ones the policy was built with."
            )
        b = history.shape[0]
        dtype = self.in_proj.weight.dtype
        history = history.to(dtype)  # encoders may hand fp16 latents to fp32 modules: cast at the boundary
        # Encoder latents come at very different scales (pixel thumbnails vs ViT features). Dividing the
        # whole window by one per-sample RMS (and multiplying the output back) makes the Prophet
        # scale-equivariant while keeping frame-to-frame differences linear in its input; a per-token
        # LayerNorm would erase exactly those differences (the motion the Prophet must extrapolate).
        scale = history.detach().pow(2).mean(dim=(1, 2), keepdim=True).clamp_min(1e-12).sqrt()
        tokens = [self.in_proj(history / scale) + self.history_pos]
        if context is not None:
            if self.context_proj is None:
                raise ValueError("This Prophet was built without context_dim but was given context tokens.")
            if self.context_len and context.shape[1] != self.context_len:
                raise ValueError(
                    f"This Prophet reads a context sequence of {self.context_len} tokens, got {context.shape[1]}."
                )
            tokens.append(self.context_proj(context.to(dtype)) + self.context_type)
        tokens.append(self.queries.unsqueeze(0).expand(b, -1, -1))
        x = torch.cat(tokens, dim=1)
        # Only the K slot states leave the Prophet: the last block computes just those rows.
        for i, block in enumerate(self.blocks):
            x = block(x, last=self.num_future if i == len(self.blocks) - 1 else None)
        out = self.out_proj(self.out_norm(x))
        if self.rescale_output:
            out = out * scale
        current = history[:, -1:]
        if self.delta:
            return ProphetOutput(absolute=current + out, delta=out, supervised="delta")
        return ProphetOutput(absolute=out, delta=out - current, supervised="absolute")
