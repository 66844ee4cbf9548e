"""The `world_f` policy: a compact transformer policy whose action queries read Prophet world memory.

    world latent z_t ─┐                                          ┌─> Prophet(history, obs states) ─> memory
    robot state    ───┤
    instruction*   ───┴─> trunk over [obs tokens, H action queries] ──> query states ──┐        │
                                                                                        v        v
                                                          GatedCrossAttention(query states, memory)
                                                                                        │
                                                                        action head ─> chunk [B, H, A]

Variant A drops the Prophet and the cross-attention; B_cont keeps the Prophet and its loss only.
* The instruction (`task`, through a frozen text encoder) is an input only when `language_encoder` is set.
"""

from __future__ import annotations

import logging
from collections import deque

import torch
import torch.nn.functional as F  # noqa: N812
from lerobot.policies.pretrained import PreTrainedPolicy
from lerobot.utils.constants import ACTION, OBS_STATE
from torch import Tensor, nn

from ..constants import OBS_WORLD_FUTURE, OBS_WORLD_FUTURE_VALID, OBS_WORLD_HISTORY, OBS_WORLD_LATENT
from ..language import FrozenTextEncoder, bind_language_encoder, instructions_from_batch
from ..world.fusion import GatedCrossAttention
from ..world.memory import per_horizon_cosine, scheduled_oracle_prob, select_memory, world_loss, world_targets
from ..world.prophet import Prophet, TransformerBlock
from .configuration_world_f import WorldFConfig

logger = logging.getLogger(__name__)


class ActionTrunk(nn.Module):
    """Observation tokens + H learned action queries through a pre-norm transformer (reusable trunk).

    Observation tokens: the world latent (LayerNorm'd, since encoder latents come at any scale, then
    projected to `width`), when given the robot state (projected) and, with `language_dim`, the
    instruction embedding (LayerNorm'd and projected, like the latent). Each token type has a learned
    embedding. Callers may insert extra tokens (e.g. world tokens) between observations and queries.
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
    ):
        super().__init__()
        self.latent_norm = nn.LayerNorm(latent_dim)
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

    def observation_tokens(self, latent: Tensor, state: Tensor | None, language: Tensor | None = None) -> Tensor:
        """[B, num_obs_tokens, W] from the world latent [B, D], the state [B, S] and the instruction [B, L].

        State and instruction are read only when the trunk was built with them.
        """
        dtype = self.latent_proj.weight.dtype
        tokens = [self.latent_proj(self.latent_norm(latent.to(dtype)))]
        if self.state_proj is not None:
            if state is None:
                raise KeyError(f"The policy was built with a robot state but the batch has no '{OBS_STATE}'.")
            tokens.append(self.state_proj(state.to(dtype)))
        if self.language_proj is not None:
            if language is None:
                raise ValueError("The trunk was built with a language input but got no instruction embedding.")
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


class WorldFPolicy(PreTrainedPolicy):
    """LeRobot policy `world_f` (see `WorldFConfig` for the variants A / B_cont / F and memory modes).

    Training batches carry OBS_WORLD_LATENT [B, D], OBS_WORLD_HISTORY [B, T, D], OBS_WORLD_FUTURE
    [B, K, D] and OBS_WORLD_FUTURE_VALID [B, K] (from the world-latent step), the state, the action
    chunk and, with the language input on, the instructions `task` (list of B strings). Evaluation
    batches carry OBS_WORLD_LATENT (and the state and `task`) only: the policy keeps the history of
    the last T latents itself, repeat-padded at an episode's first frame exactly like the training
    windows, and clears it with the action queue in `reset()`.
    """

    config_class = WorldFConfig
    name = "world_f"

    def __init__(self, config: WorldFConfig, dataset_stats=None, dataset_meta=None, **kwargs):
        """Build the policy; with `dataset_meta` (given by lerobot-train) bind it to the training dataset.

        Binding records the dataset in the config and fails fast when its latent cache is missing or
        stale. `dataset_stats` is accepted for LeRobot's factory; normalisation lives in the processors.
        """
        super().__init__(config)
        config.validate_features()
        self.config = config
        # Imported lazily: the latent pipeline pulls in encoders and caches, which a policy rebuilt from a
        # saved config (world_latent_dim already filled, no dataset) does not need.
        if dataset_meta is not None:
            # First, so the dimension below is resolved for the cameras of the dataset actually trained on.
            from ..latents.processor import bind_training_dataset

            bind_training_dataset(config, dataset_meta)
        if config.world_latent_dim is None or dataset_meta is not None:
            from ..latents.processor import resolve_world_latent_dim

            dim = resolve_world_latent_dim(config)
            if config.world_latent_dim is not None and config.world_latent_dim != dim:
                raise ValueError(
                    f"world_latent_dim={config.world_latent_dim} in the config, but encoder '{config.encoder}' "
                    f"with cameras {config.resolved_world_cameras()} gives {dim}. Leave world_latent_dim "
                    "unset (it is filled from the encoder) or train a new policy for this encoder."
                )
            config.world_latent_dim = dim
        # Language input: only the identity is resolved here (cheap, and it fills or checks the recorded
        # revision); the text model itself loads on first use and never enters the state dict.
        self.language_identity = bind_language_encoder(config)
        self._text_encoder: list[FrozenTextEncoder] = []  # a plain list: never a registered submodule
        state = config.robot_state_feature
        self.state_dim = state.shape[0] if state is not None else None
        self.action_dim = config.action_feature.shape[0]
        d = config.world_latent_dim
        self.trunk = ActionTrunk(
            d, self.state_dim, config.chunk_size, config.width, config.depth, config.heads,
            config.ffn_dim, config.dropout,
            language_dim=self.language_identity.dim if self.language_identity else None,
        )  # fmt: skip
        self.prophet = (
            Prophet(
                d, config.history_frames, config.future_frames, config.prophet_width, config.prophet_depth,
                config.prophet_heads, None, config.dropout, config.delta_prediction,
                context_dim=config.width if config.prophet_reads_trunk else None,
            )  # fmt: skip
            if config.use_prophet
            else None
        )
        self.fusion = (
            GatedCrossAttention(
                config.width, d, config.fusion_heads, config.gate_init, config.gate_per_channel,
                num_slots=config.future_frames, dropout=config.dropout,
            )  # fmt: skip
            if config.inject_memory
            else None
        )
        self.action_head = nn.Linear(config.width, self.action_dim)
        # Training steps seen by forward(); drives scheduled sampling and is saved with the weights.
        self.register_buffer("world_train_step", torch.zeros((), dtype=torch.long))
        self._history: Tensor | None = None
        self.reset()

    # ------------------------------------------------------------------ LeRobot interface
    def get_optim_params(self) -> list[dict]:
        """Two AdamW groups: matrices with weight decay; biases, norm scales and gates without it."""
        decay, no_decay = [], []
        for name, p in self.named_parameters():
            if not p.requires_grad:
                continue
            (no_decay if p.ndim < 2 or "gate" in name else decay).append(p)
        return [{"params": decay}, {"params": no_decay, "weight_decay": 0.0}]

    def reset(self):
        """Start a new episode: clear the latent history, the action queue and the encoders' frame buffers."""
        self._history = None
        self._action_queue = deque([], maxlen=self.config.n_action_steps)
        try:
            from ..latents import processor as latent_processor
        except ImportError:  # the latent pipeline is optional for the pure model (e.g. unit tests)
            return
        reset_online = getattr(latent_processor, "reset_online_state", None)
        if reset_online is not None:
            reset_online()

    @property
    def world_history(self) -> Tensor | None:
        """The [B, T, D] latent history the policy holds at evaluation (None right after reset)."""
        return self._history

    def _push_history(self, latent: Tensor) -> Tensor:
        """Append z_t [B, D] to the eval history; the first frame of an episode fills all T slots."""
        latent = latent.detach()
        t = self.config.history_frames
        if self._history is not None and self._history.shape[0] != latent.shape[0]:
            logger.warning(
                "world_f: batch size changed from %d to %d without reset(); restarting the latent history.",
                self._history.shape[0], latent.shape[0],
            )  # fmt: skip
            self._history = None
        if self._history is None:
            # Same as the training windows: indices before the episode start clamp to its first frame.
            self._history = latent.unsqueeze(1).repeat(1, t, 1)
        else:
            self._history = torch.cat([self._history[:, 1:], latent.unsqueeze(1).to(self._history.dtype)], dim=1)
        return self._history

    @property
    def text_encoder(self) -> FrozenTextEncoder | None:
        """The frozen text encoder (loaded on first access), or None when the language input is off."""
        if self.language_identity is None:
            return None
        if not self._text_encoder:
            cfg = self.config
            self._text_encoder.append(
                FrozenTextEncoder(cfg.language_encoder, cfg.language_encoder_revision, cfg.language_max_length)
            )
        return self._text_encoder[0]

    def _language(self, batch: dict, batch_size: int, device: torch.device) -> Tensor | None:
        """Instruction embeddings [B, L] on `device`, or None when the language input is off."""
        if self.language_identity is None:
            return None
        return self.text_encoder.encode(instructions_from_batch(batch, batch_size), device=device)

    @staticmethod
    def _latent(batch: dict[str, Tensor]) -> Tensor:
        if OBS_WORLD_LATENT not in batch:
            raise KeyError(
                f"The batch has no '{OBS_WORLD_LATENT}'. It is added by the world-latent processor step: run "
                "the policy through its preprocessor (make_pre_post_processors / lerobot-train / lerobot-eval)."
            )
        latent = batch[OBS_WORLD_LATENT]
        return latent.unsqueeze(0) if latent.ndim == 1 else latent

    @torch.no_grad()
    def select_action(self, batch: dict[str, Tensor], **kwargs) -> Tensor:
        """One action [B, A] per environment step; a new chunk is predicted when the queue runs out.

        The latent history is advanced at every call, including those served from the queue.
        """
        self.eval()
        history = self._push_history(self._latent(batch)) if self.prophet is not None else None
        if len(self._action_queue) == 0:
            actions = self._actions(batch, history)[:, : self.config.n_action_steps]
            self._action_queue.extend(actions.transpose(0, 1))
        return self._action_queue.popleft()

    @torch.no_grad()
    def predict_action_chunk(self, batch: dict[str, Tensor], **kwargs) -> Tensor:
        """Action chunk [B, H, A] for one observation.

        Uses OBS_WORLD_HISTORY when the batch has it; otherwise treats the call as the next step of the
        episode and advances the policy's own history with the batch's latent.
        """
        self.eval()
        history = None
        if self.prophet is not None:
            history = batch.get(OBS_WORLD_HISTORY)
            if history is None:
                history = self._push_history(self._latent(batch))
        return self._actions(batch, history)

    def _actions(self, batch: dict[str, Tensor], history: Tensor | None) -> Tensor:
        out = self._run(batch, history, self.config.memory_mode_rollout, oracle=None, oracle_prob=0.0, stats=False)
        return out["actions"]

    def forward(self, batch: dict[str, Tensor]) -> tuple[Tensor, dict]:
        """Training loss = action loss + lambda_world * world loss, and a dict of floats for logging."""
        cfg = self.config
        history = targets = valid = None
        oracle_prob = 0.0
        if self.prophet is not None:
            for key in (OBS_WORLD_HISTORY, OBS_WORLD_FUTURE):
                if key not in batch:
                    raise KeyError(
                        f"Training batch has no '{key}'. The world-latent step adds it from the latent cache "
                        "when the batch carries the dataset's 'index'; train through lerobot-train with this "
                        "policy's preprocessor (and run lerobot-wm-precompute for the dataset first)."
                    )
            history = batch[OBS_WORLD_HISTORY]
            current = history[:, -1]
            targets = world_targets(batch[OBS_WORLD_FUTURE], current, cfg.delta_prediction).float()
            valid = batch.get(OBS_WORLD_FUTURE_VALID)
            if cfg.memory_mode_train == "scheduled":
                oracle_prob = scheduled_oracle_prob(
                    int(self.world_train_step), cfg.scheduled_prob_start, cfg.scheduled_prob_end,
                    cfg.scheduled_decay_steps, cfg.scheduled_warmup_steps, cfg.scheduled_shape,
                )  # fmt: skip
        out = self._run(batch, history, cfg.memory_mode_train, targets, oracle_prob, stats=True)
        if self.training:
            self.world_train_step += 1

        actions_hat = out["actions"]
        target_actions = batch[ACTION]
        if cfg.action_loss == "l1":
            err = F.l1_loss(actions_hat, target_actions, reduction="none")
        else:
            err = F.mse_loss(actions_hat, target_actions, reduction="none")
        if "action_is_pad" in batch:
            keep = (~batch["action_is_pad"]).unsqueeze(-1).expand_as(err)
            action_loss = torch.where(keep, err, torch.zeros_like(err)).sum() / keep.sum().clamp(min=1)
        else:
            action_loss = err.mean()
        loss = action_loss
        info = {"action_loss": action_loss.item()}

        if self.prophet is not None:
            pred = out["prediction"]
            w_loss = world_loss(pred, targets, valid)
            loss = loss + cfg.lambda_world * w_loss
            info["world_loss"] = w_loss.item()
            for k, c in enumerate(per_horizon_cosine(pred, targets, valid).tolist(), start=1):
                info[f"world_cos_h{k}"] = c
        if self.fusion is not None:
            gate = self.fusion.gate_value().detach()
            info["gate"] = gate.mean().item()
            if gate.numel() > 1:
                info["gate_abs_max"] = gate.abs().max().item()
            info["memory_norm"] = out["memory_norm"]
            info["attn_entropy"] = out["attn_entropy"]
        if cfg.memory_mode_train == "scheduled":
            info["oracle_prob"] = oracle_prob
        info["loss"] = loss.item()
        return loss, info

    # ------------------------------------------------------------------ model
    def _run(
        self,
        batch: dict[str, Tensor],
        history: Tensor | None,
        memory_mode: str,
        oracle: Tensor | None,
        oracle_prob: float,
        stats: bool,
    ) -> dict:
        """Trunk -> (Prophet -> memory -> gated cross-attention) -> action head.

        With `stats`, also the logged memory norm and attention entropy (skipped at rollout, where
        reading them back would cost a device sync per inference).
        """
        latent = self._latent(batch)
        language = self._language(batch, latent.shape[0], latent.device)
        obs = self.trunk.observation_tokens(latent, batch.get(OBS_STATE), language)
        n_obs = obs.shape[1]
        states = self.trunk(torch.cat([obs, self.trunk.queries(obs.shape[0])], dim=1))
        query_states = states[:, n_obs:]
        out: dict = {}
        # B_cont's Prophet only matters for its loss: skip it at rollout, where nothing reads it.
        if self.prophet is not None and (stats or self.fusion is not None):
            if history is None:
                raise KeyError(f"The Prophet needs '{OBS_WORLD_HISTORY}' [B, T, D].")
            context = states[:, :n_obs] if self.config.prophet_reads_trunk else None
            pred = self.prophet(history, context).prediction()
            out["prediction"] = pred
            if self.fusion is not None:
                memory = pred.detach() if self.config.detach_memory else pred
                memory = select_memory(memory_mode, memory, oracle, oracle_prob)
                fused = self.fusion(query_states, memory)
                query_states = fused.hidden
                if stats:
                    out["attn_entropy"] = fused.attn_entropy.item()
                    with torch.no_grad():
                        finite = fused.valid_slots
                        norms = torch.where(finite, memory.float().nan_to_num().norm(dim=-1), 0.0)
                        out["memory_norm"] = (norms.sum() / finite.sum().clamp(min=1)).item()
        out["actions"] = self.action_head(query_states)
        return out
