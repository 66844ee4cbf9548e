"""The `world_f` policy: a compact transformer policy whose action queries read Prophet world memory.

    world latent z_t ─┐                                          ┌─> Prophet(history, obs states) ─> memory
    robot state    ───┤
    instruction*   ───┴─> trunk over [obs tokens, H action queries] ──> query states ──┐        │
                                                                                        v        v
                                                          GatedCrossAttention(query states, memory)
                                                                                        │
                                                                        action head ─> chunk [B, H, A]

Variant A drops the Prophet and the cross-attention; B_cont keeps the Prophet and its loss only;
A_hist is A whose trunk also reads the motion of the latent history.
* The instruction (`task`, through a frozen text encoder) is an input only when `language_encoder` is set.

The in-trunk path (`world_path=in_trunk`, see `world/foresight.py`) replaces the Prophet and the
cross-attention by foresight tokens inside the trunk:

    [z_t + motion(z_{t-T+1..t}), state, instruction*] [foresight tokens] [H action queries]  (one-way mask)
                                                        │                  │
                                        head -> K predicted latents    action head -> chunk [B, H, A]
"""

from __future__ import annotations

import dataclasses

import torch
from lerobot.utils.constants import ACTION, OBS_STATE
from torch import Tensor, nn

from ..constants import OBS_WORLD_GOAL, OBS_WORLD_HISTORY
from ..latents.train_view import EpisodeSuccess
from ..trunk_policy import TrunkWorldPolicy, ensure_eval
from ..world.align import FutureAlignment, alignment_targets
from ..world.foresight import ForesightPredictor, StagedMask, run_staged
from ..world.fusion import GatedCrossAttention
from ..world.history import LatentHistory, latent_from_batch
from ..world.path import WorldPath
from ..world.planner import plan_chunk
from ..world.prophet import Prophet
from ..world.trunk import ActionTrunk, action_loss
from .configuration_world_f import WorldFConfig


class WorldFPolicy(TrunkWorldPolicy):
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

        `dataset_stats` is accepted for LeRobot's factory; normalisation lives in the processors.
        """
        super().__init__(config, dataset_meta)
        d = config.world_latent_dim
        self.trunk = ActionTrunk(
            d, self.state_dim, config.chunk_size, config.width, config.depth, config.heads,
            config.ffn_dim, config.dropout,
            language_dim=self.language_dim,
            history_frames=config.history_frames if config.reads_history else None,
            latent_input=config.latent_input_norm, input_stats=self.latent_input_stats,
        )  # fmt: skip
        self.world = WorldPath(
            config, d, config.width, context_dim=config.width if config.prophet_reads_trunk else None,
            dropout=config.dropout, target_stats=self.world_target_stats, action_dim=self.action_dim,
        )  # fmt: skip
        self._masks = StagedMask()
        if config.in_trunk:
            # The foresight tokens take the Prophet's slot, so WorldPath's targets, loss and logged
            # scalars apply to their prediction unchanged; the trunk itself replaces the cross-attention.
            self.world.prophet = ForesightPredictor(
                d, config.future_frames, config.foresight_tokens, config.width, config.delta_prediction
            )
            self.world.fusion = None
        self.action_head = nn.Linear(config.width, self.action_dim)
        # FLARE-style alignment head (lambda_align > 0): action-query states -> future latents.
        self.align = FutureAlignment(config.width, config.future_frames, d) if config.lambda_align > 0 else None
        self._history = LatentHistory(config.history_frames)
        self._planner_rng = torch.Generator()
        # Per-episode success of the training dataset (recordings that keep failures): the progress head
        # learns that failed episodes never get closer to success, and with imitate_failures=false the
        # action loss skips them. Not saved: only training reads it.
        self._success = EpisodeSuccess.for_policy(config, dataset_meta)
        self.reset()

    # ------------------------------------------------------------------ LeRobot interface
    def reset(self):
        """Start a new episode: clear the latent history, the action queue and the encoders' frame
        buffers, and re-seed the planner (the same episode seed gives the same plans)."""
        self._history.reset()
        self._planner_rng.manual_seed(self.config.planner_seed)
        super().reset()

    @property
    def prophet(self) -> Prophet | None:
        """The Prophet (None in variants A / A_hist and on the in-trunk path)."""
        return None if self.config.in_trunk else self.world.prophet

    @property
    def foresight(self) -> ForesightPredictor | None:
        """The in-trunk foresight tokens and head (None on the cross-attention path and in A / A_hist)."""
        return self.world.prophet if self.config.in_trunk else None

    @property
    def fusion(self) -> GatedCrossAttention | None:
        """The gated cross-attention into the action queries (None in A, A_hist, B_cont and in_trunk)."""
        return self.world.fusion

    @property
    def reads_history(self) -> bool:
        """Whether any module reads the latent history (Prophet, foresight tokens, world model, A_hist trunk)."""
        return self.world.prophet is not None or self.world.dynamics is not None or self.config.reads_history

    @property
    def world_train_step(self) -> Tensor:
        """Training forward passes seen so far (drives scheduled sampling; saved with the weights)."""
        return self.world.train_step

    @property
    def world_history(self) -> Tensor | None:
        """The [B, T, D] latent history the policy holds at evaluation (None right after reset)."""
        return self._history.value

    @torch.no_grad()
    def select_action(self, batch: dict[str, Tensor], **kwargs) -> Tensor:
        """One action [B, A] per environment step; a new chunk is predicted when the queue runs out.

        The latent history is advanced at every call, including those served from the queue.
        """
        ensure_eval(self)
        history = self.advance_history(batch)
        if len(self._action_queue) == 0:
            actions = self._actions(batch, history)[:, : self.config.n_action_steps]
            self._action_queue.extend(actions.transpose(0, 1))
        return self._action_queue.popleft()

    def advance_history(self, batch: dict[str, Tensor]) -> Tensor | None:
        """Push the batch's latent onto the episode's history and return it [B, T, D] (None for a policy
        that reads no history). `select_action` calls it once per environment step."""
        return self._history.push(latent_from_batch(batch)) if self.reads_history else None

    @torch.no_grad()
    def propose(self, batch: dict[str, Tensor], history: Tensor | None) -> Tensor:
        """The policy's own chunk [B, H, A] (normalised actions) before any planning."""
        return self._run(
            batch, history, self.config.memory_mode_rollout, oracle=None, oracle_prob=0.0, stats=False
        )["actions"]

    @torch.no_grad()
    def plan_candidates(self, batch: dict[str, Tensor], history: Tensor | None) -> tuple[Tensor, None]:
        """The planner's starting point: the proposal [B, H, A], and no first round of its own (the
        planner draws Gaussian perturbations of the proposal; smolvla_world returns flow samples here)."""
        return self.propose(batch, history), None

    @property
    def planner_rng(self) -> torch.Generator:
        """The planner's generator (re-seeded with `planner_seed` at every `reset`)."""
        return self._planner_rng

    @torch.no_grad()
    def predict_action_chunk(self, batch: dict[str, Tensor], **kwargs) -> Tensor:
        """Action chunk [B, H, A] for one observation.

        Uses OBS_WORLD_HISTORY when the batch has it; otherwise treats the call as the next step of the
        episode and advances the policy's own history with the batch's latent.
        """
        ensure_eval(self)
        history = None
        if self.reads_history:
            history = batch.get(OBS_WORLD_HISTORY)
            if history is None:
                history = self.advance_history(batch)
        return self._actions(batch, history)

    def _actions(self, batch: dict[str, Tensor], history: Tensor | None) -> Tensor:
        proposal = self.propose(batch, history)
        if self.config.planner == "none":
            return proposal
        return self.plan(proposal, history, batch.get(OBS_WORLD_GOAL))[0]

    @torch.no_grad()
    def plan(self, proposal: Tensor, history: Tensor, goal: Tensor | None = None) -> tuple[Tensor, dict]:
        """The chunk [B, H, A] the planner picks around the policy's `proposal` (normalised actions),
        rolling every candidate through the world model from `history` [B, T, D]; and the planner's
        scores (`world.planner.plan_chunk`). Uses the configured planner (rerank when none is set)."""
        cfg = self.config
        horizon = cfg.planner_horizon or cfg.future_frames
        settings = cfg.planner_settings()
        if settings.kind == "none":  # plan() called directly on a policy evaluated without a planner
            settings = dataclasses.replace(settings, kind="rerank")
        return plan_chunk(
            proposal, lambda chunks: self.world.score_chunks(history, chunks, goal, horizon), settings,
            self.planner_rng,
        )  # fmt: skip

    def forward(self, batch: dict[str, Tensor]) -> tuple[Tensor, dict]:
        """Training loss = action loss + lambda_world * world loss (+ the world model's losses and
        lambda_align * future alignment), and a dict of floats for logging."""
        cfg = self.config
        if not cfg.imitate_failures:
            batch = self._success.imitation_batch(batch)
        history = targets = valid = None
        if self.world.prophet is not None or self.world.dynamics is not None:
            history, targets, valid = self.world.training_inputs(batch)
        elif self.config.reads_history:
            history = self.world.training_inputs(batch)[0]
        oracle_prob = self.world.oracle_prob()
        out = self._run(batch, history, cfg.memory_mode_train, targets, oracle_prob, stats=True)
        a_loss = action_loss(out["actions"], batch[ACTION], batch.get("action_is_pad"), cfg.action_loss)
        w_loss, world_info = self.world.loss_terms(out.get("prediction"), targets, valid)
        self.world.step()
        loss = a_loss if w_loss is None else a_loss + cfg.lambda_world * w_loss
        if self.world.dynamics is not None:
            d_loss, d_info = self.world.dynamics_loss_terms(batch, history, targets, valid, self._success(batch))
            loss = loss + d_loss
            world_info |= d_info
        if self.align is not None:
            align_loss, align_info = self.align(out["query_states"], *alignment_targets(batch, cfg.future_frames))
            loss = loss + cfg.lambda_align * align_loss
            world_info |= align_info
        info = {"action_loss": a_loss.item(), **world_info, **out["stats"], "loss": loss.item()}
        self.training_figures.record(info)
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
        latent = latent_from_batch(batch)
        language = self._language(batch, latent.shape[0], latent.device)
        obs = self.trunk.observation_tokens(latent, batch.get(OBS_STATE), language, history)
        if self.config.in_trunk:
            return self._run_in_trunk(obs, history, memory_mode, stats)
        n_obs = obs.shape[1]
        states = self._trunk_without_foresight(obs)
        query_states = states[:, n_obs:]
        # The queries' own states, before they read the memory (which may hold the true future): aligned.
        out: dict = {"stats": {}, "query_states": query_states}
        # B_cont's Prophet only matters for its loss: skip it at rollout, where nothing reads it.
        if self.prophet is not None and (stats or self.fusion is not None):
            context = states[:, :n_obs] if self.config.prophet_reads_trunk else None
            out["prediction"] = pred = self.world.predict(history, context)
            if self.fusion is not None:
                memory = self.world.select(pred, memory_mode, oracle, oracle_prob)
                query_states, out["stats"] = self.world.inject(query_states, memory, stats)
        out["actions"] = self.action_head(query_states)
        return out

    def _trunk_without_foresight(self, obs: Tensor) -> Tensor:
        """Trunk states of [obs, action queries].

        A trunk that reads the history (A_hist, in_trunk) keeps its observation tokens from seeing the
        action queries, as on the in-trunk path; so in_trunk F with its foresight blocked (memory zero) is
        exactly A_hist with the same weights. A / F on the cross-attention path keep their full attention.
        """
        x = torch.cat([obs, self.trunk.queries(obs.shape[0])], dim=1)
        if not self.config.reads_history:
            return self.trunk(x)
        n_obs = obs.shape[1]
        return self.trunk(x, self._masks(n_obs, 0, x.shape[1] - n_obs, True, x.device))

    def _run_in_trunk(self, obs: Tensor, history: Tensor, memory_mode: str, stats: bool) -> dict:
        """[obs, foresight tokens, action queries] through the trunk -> prediction and action chunk.

        The action queries read the foresight tokens by `memory_mode` (variant B_cont: never). When
        nothing reads the prediction (B_cont at rollout), the foresight tokens are left out: under the
        one-way mask they cannot change the observation or query states.
        """
        b = obs.shape[0]
        queries = self.trunk.queries(b)
        reads = self.config.inject_memory
        # At rollout nothing reads the predicted latents (the queries read the foresight states in the
        # trunk), so the head runs only when the world loss / logged scalars need it.
        out: dict = {"stats": {}}
        if not (reads or stats):
            out["query_states"] = self._trunk_without_foresight(obs)[:, obs.shape[1] :]
            out["actions"] = self.action_head(out["query_states"])
            return out
        fore = self.foresight.queries(b)
        states = run_staged(
            self.trunk, obs, fore, queries, self._masks, memory_mode if reads else "zero",
            detach=self.config.detach_memory and reads,
        )  # fmt: skip
        n_obs, n_fore = obs.shape[1], fore.shape[1]
        if stats:
            out["prediction"] = self.foresight.predict(states[:, n_obs : n_obs + n_fore], history)
        out["query_states"] = states[:, n_obs + n_fore :]
        out["actions"] = self.action_head(out["query_states"])
        return out
