"""The `world_token_c` policy: the current world token as an input, the next K tokens as an auxiliary task.

    world latent z_t ──> codebook ──> token_t ──> embedding ──> WORLD_CUR ─┐
    world latent, state, instruction* ──> observation tokens ──────────────┤
                                          K learned future queries ─────────┤──> ActionTrunk blocks
                                          H learned action queries ─────────┘        │
        future-query states ──> G v-way heads ──> CE vs tokens of z_{t+1..t+K}  (masked at episode ends)
        action-query states ──> action head ──> chunk [B, H, A]

Training tokenises the cached z_t and z_{t+1..t+K} (OBS_WORLD_LATENT / OBS_WORLD_FUTURE from the
world-latent step); evaluation tokenises the online z_t with the same codebook buffer and function.
Variant B drops WORLD_CUR. * The instruction is an input only when `language_encoder` is set.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F  # noqa: N812
from lerobot.utils.constants import ACTION, OBS_STATE
from torch import Tensor, nn

from ..constants import OBS_WORLD_FUTURE, OBS_WORLD_FUTURE_VALID
from ..latents.binding import open_world_caches
from ..trunk_policy import TrunkWorldPolicy, ensure_eval
from ..world.codebook import Codebook, CodebookError, load_codebook
from ..world.history import latent_from_batch
from ..world.trunk import ActionTrunk, action_loss
from .configuration_world_token_c import WorldTokenCConfig

_CODEBOOK_FIELDS = ("codebook_size", "codebook_factors", "codebook_factorisation", "codebook_normalise")


def bind_codebook(config: WorldTokenCConfig, training: bool) -> Codebook:
    """The policy's codebook: read from `codebook_path` in training or while none is bound to the config
    yet (no `codebook_digest`); else (a saved checkpoint) an empty buffer of the recorded shape that
    the checkpoint's weights fill, so evaluation never needs the file.

    A file that disagrees with the config (latent dim, codes, factors, layout) or, in training, was
    fitted on other caches than the training dataset's raises CodebookError naming the fix.
    """
    if config.codebook_path and (training or config.codebook_digest is None):
        book, meta = load_codebook(config.codebook_path)
        found = dict(zip(_CODEBOOK_FIELDS, (book.codes, book.factors, book.factorisation, book.normalise)))
        wrong = {
            k: (getattr(config, k), v)
            for k, v in found.items()
            if getattr(config, k) is not None and getattr(config, k) != v
        }
        if wrong:
            raise CodebookError(
                f"Codebook {config.codebook_path} does not match the config (field: (config, file) = {wrong}). "
                "Drop those --policy.codebook_* flags (they are filled from the file) or pass the codebook "
                "fitted with those options."
            )
        if book.dim != config.world_latent_dim:
            raise CodebookError(
                f"Codebook {config.codebook_path} holds codes of dim {book.dim}, but the world latent of "
                f"encoder '{config.encoder}' with cameras {config.resolved_world_cameras()} has dim "
                f"{config.world_latent_dim}. Fit a codebook on this encoder's cache: lerobot-wm-fit-codebook "
                f"--dataset.repo_id=... --encoder={config.encoder}."
            )
        if training:
            _check_codebook_cache(config, meta)
        for k, v in found.items():
            setattr(config, k, v)
        config.codebook_digest = meta["digest"]
        return book
    if config.codebook_size is None:
        raise CodebookError(
            "world_token_c needs a world-token codebook. Fit one on the training dataset's latent cache with "
            "`lerobot-wm-fit-codebook --dataset.repo_id=<repo> [--dataset.root=<root>]` and pass the path it "
            "prints as --policy.codebook_path=<file>."
        )
    return Codebook(
        config.world_latent_dim, config.codebook_size, config.codebook_factors or 1,
        config.codebook_factorisation or "none", bool(config.codebook_normalise),
    )  # fmt: skip


def _check_codebook_cache(config: WorldTokenCConfig, meta: dict) -> None:
    """Fail when the codebook was fitted on other latents than the training dataset's caches."""
    cameras = config.resolved_world_cameras()
    now = [cache.meta["fingerprint"] for cache in open_world_caches(config)]
    fitted = [c.get("fingerprint") for c in meta.get("caches", [])]
    if meta.get("cameras") != cameras or fitted != now:
        raise CodebookError(
            f"Codebook {config.codebook_path} was fitted on other latents (cameras {meta.get('cameras')}, "
            f"dataset {meta.get('dataset')}) than this training run reads (cameras {cameras}, dataset "
            f"'{config.dataset_repo_id}' at {config.dataset_root}, encoder '{config.encoder}'). Refit it: "
            f"lerobot-wm-fit-codebook --dataset.repo_id={config.dataset_repo_id} --dataset.root={config.dataset_root} "
            f"--encoder={config.encoder} --camera={','.join(cameras)}"
            + (f" --cache_root={config.latent_cache_root}" if config.latent_cache_root else "")
        )


class WorldTokenCPolicy(TrunkWorldPolicy):
    """LeRobot policy `world_token_c` (see `WorldTokenCConfig` and the module docstring).

    Training batches carry OBS_WORLD_LATENT [B, D], OBS_WORLD_FUTURE [B, K, D] and
    OBS_WORLD_FUTURE_VALID [B, K] from the world-latent step; evaluation batches only OBS_WORLD_LATENT.
    The codebook is the buffer `codebook.centroids`.
    """

    config_class = WorldTokenCConfig
    name = "world_token_c"

    def __init__(self, config: WorldTokenCConfig, dataset_stats=None, dataset_meta=None, **kwargs):
        """Build the policy; with `dataset_meta` (lerobot-train) bind it to the dataset and load the codebook."""
        super().__init__(config, dataset_meta)
        self.codebook = bind_codebook(config, training=dataset_meta is not None)
        w, g, v, k = config.width, self.codebook.factors, self.codebook.codes, config.future_frames
        self.trunk = ActionTrunk(
            config.world_latent_dim, self.state_dim, config.chunk_size, w,
            config.depth, config.heads, config.ffn_dim, config.dropout, language_dim=self.language_dim,
            latent_input=config.latent_input_norm, input_stats=self.latent_input_stats,
        )  # fmt: skip
        if config.world_token_input:
            # One table of v rows per factor (offset g * v); WORLD_CUR is the sum over the G factors.
            self.token_embed = nn.Embedding(g * v, w)
            self.token_norm = nn.LayerNorm(w) if config.world_token_layernorm else None
            self.token_type = nn.Parameter(torch.randn(w) * 0.02)
            # What a dropped WORLD_CUR reads (only with token dropout: no parameter that never trains).
            self.token_null = nn.Parameter(torch.zeros(w)) if config.world_token_dropout > 0 else None
        self.future_queries = nn.Parameter(torch.randn(k, w) * 0.02)
        self.future_head = nn.Linear(w, g * v)  # G v-way heads, shared over the K horizons
        self.action_head = nn.Linear(w, self.action_dim)
        # Histogram of the current tokens seen in training (this process only), for usage/perplexity logs.
        self.register_buffer("token_counts", torch.zeros(g, v), persistent=False)
        self.reset()

    # ------------------------------------------------------------------ LeRobot interface
    @torch.no_grad()
    def select_action(self, batch: dict[str, Tensor], **kwargs) -> Tensor:
        """One action [B, A] per environment step; a new chunk is predicted when the queue runs out."""
        ensure_eval(self)
        if len(self._action_queue) == 0:
            actions = self.predict_action_chunk(batch)[:, : self.config.n_action_steps]
            self._action_queue.extend(actions.transpose(0, 1))
        return self._action_queue.popleft()

    @torch.no_grad()
    def predict_action_chunk(self, batch: dict[str, Tensor], **kwargs) -> Tensor:
        """Action chunk [B, H, A] for one observation (its latent tokenised online)."""
        ensure_eval(self)
        return self._run(batch, self.tokens(latent_from_batch(batch)))["actions"]

    def tokens(self, latent: Tensor) -> Tensor:
        """World tokens [..., G] of latents [..., D] (nearest code; identical in training and at eval)."""
        return self.codebook.encode(latent)

    def forward(self, batch: dict[str, Tensor]) -> tuple[Tensor, dict]:
        """Loss = action loss + lambda_world * future-token CE; info has accuracy per horizon and usage."""
        cfg = self.config
        if OBS_WORLD_FUTURE not in batch:
            raise KeyError(
                f"Training batch has no '{OBS_WORLD_FUTURE}'. The world-latent step adds it from the latent "
                "cache when the batch carries the dataset's 'index'; train through lerobot-train with this "
                "policy's preprocessor (and run lerobot-wm-precompute for the dataset first)."
            )
        # One assignment pass for z_t and z_{t+1..t+K} (the token of a latent does not depend on its batch).
        latents = torch.cat([latent_from_batch(batch).unsqueeze(1), batch[OBS_WORLD_FUTURE]], dim=1)
        both = self.tokens(latents)  # [B, 1 + K, G]
        current, future = both[:, 0], both[:, 1:]
        valid = batch.get(OBS_WORLD_FUTURE_VALID)
        valid = (
            torch.ones(future.shape[:2], dtype=torch.bool, device=future.device)
            if valid is None
            else valid.bool()
        )
        out = self._run(batch, current)
        logits = out["logits"]  # [B, K, G, v]
        a_loss = action_loss(out["actions"], batch[ACTION], batch.get("action_is_pad"), cfg.action_loss)
        # NLL of the whole token under the factorised head: the sum of the G factors' cross-entropies.
        ce = (
            F.cross_entropy(logits.flatten(0, 2).float(), future.flatten(), reduction="none")
            .view(future.shape)
            .sum(-1)
        )
        w_loss = (ce * valid).sum() / valid.sum().clamp(min=1)
        loss = a_loss + cfg.lambda_world * w_loss
        info = {
            "action_loss": a_loss.item(),
            "world_ce": w_loss.item(),
            **self._token_stats(logits, future, valid, current),
        }
        info["loss"] = loss.item()
        self.training_figures.record(info)
        return loss, info

    # ------------------------------------------------------------------ model
    def _world_cur(self, tokens: Tensor) -> Tensor:
        """WORLD_CUR [B, 1, W] from the current tokens [B, G] (scale, layer norm, token dropout)."""
        cfg = self.config
        offsets = torch.arange(tokens.shape[-1], device=tokens.device) * self.codebook.codes
        emb = self.token_embed(tokens + offsets).sum(-2)
        if self.token_norm is not None:
            emb = self.token_norm(emb)
        emb = emb * cfg.world_token_scale
        if self.training and self.token_null is not None:
            drop = torch.rand(emb.shape[0], 1, device=emb.device) < cfg.world_token_dropout
            emb = torch.where(drop, self.token_null.expand_as(emb), emb)
        return (emb + self.token_type).unsqueeze(1)

    def attention_mask(self, n_obs: int, device: torch.device) -> Tensor | None:
        """Bool [N, N] (True = may attend) hiding WORLD_CUR from every token but itself and the future
        queries, when `mask_world_from_actions` (world information then reaches the actions only
        through the future queries); None otherwise."""
        cfg = self.config
        if not (cfg.mask_world_from_actions and cfg.world_token_input):
            return None
        n = n_obs + 1 + cfg.future_frames + cfg.chunk_size
        mask = torch.ones(n, n, dtype=torch.bool, device=device)
        mask[:, n_obs] = False
        mask[n_obs : n_obs + 1 + cfg.future_frames, n_obs] = True
        return mask

    def _run(self, batch: dict[str, Tensor], tokens: Tensor) -> dict:
        """Trunk over [obs, WORLD_CUR?, K future queries, H action queries] -> action chunk and token logits."""
        cfg = self.config
        latent = latent_from_batch(batch)
        b = latent.shape[0]
        language = self._language(batch, b, latent.device)
        obs = self.trunk.observation_tokens(latent, batch.get(OBS_STATE), language)
        parts = [obs]
        if cfg.world_token_input:
            parts.append(self._world_cur(tokens))
        parts += [self.future_queries.unsqueeze(0).expand(b, -1, -1), self.trunk.queries(b)]
        states = self.trunk(torch.cat(parts, dim=1), self.attention_mask(obs.shape[1], latent.device))
        h, k = cfg.chunk_size, cfg.future_frames
        logits = self.future_head(states[:, -h - k : -h]).view(
            b, k, self.codebook.factors, self.codebook.codes
        )
        return {"actions": self.action_head(states[:, -h:]), "logits": logits}

    @torch.no_grad()
    def _token_stats(self, logits: Tensor, future: Tensor, valid: Tensor, current: Tensor) -> dict:
        """Future-token accuracy per horizon (all G factors right; NaN when no frame is valid at that
        horizon), the copy baseline `world_copy_acc_h{k}` (how often the token of frame t+ks is the
        current token, i.e. what "predict no change" scores) and codebook usage / perplexity of the
        current tokens seen in training so far."""
        hit = (logits.argmax(-1) == future).all(-1) & valid  # [B, K]
        copy = (current.unsqueeze(1) == future).all(-1) & valid  # [B, K]
        count = valid.sum(0).float()  # 0/0 = NaN where no frame is valid
        info = {f"world_acc_h{i}": a for i, a in enumerate((hit.sum(0) / count).tolist(), start=1)}
        info.update({f"world_copy_acc_h{i}": a for i, a in enumerate((copy.sum(0) / count).tolist(), start=1)})
        info["world_acc"] = (hit.sum() / valid.sum().clamp(min=1)).item()
        if self.training:
            for g in range(self.codebook.factors):
                self.token_counts[g] += torch.bincount(current[:, g], minlength=self.codebook.codes).to(
                    self.token_counts
                )
        p = self.token_counts / self.token_counts.sum(-1, keepdim=True).clamp(min=1)
        entropy = -(p * p.clamp(min=1e-12).log()).sum(-1)
        info["codebook_usage"] = (self.token_counts > 0).float().mean().item()
        info["codebook_perplexity"] = entropy.exp().mean().item()
        return info
