"""The `smolvla_world` policy: LeRobot's SmolVLA whose action expert reads Prophet world memory.

    images, instruction, state ──> VLM prefix ──(kv)──> action expert ──> hidden ──> action_out_proj ──> v_t
                                      ^ [prefix]          ^ [expert_input]   ^ [expert_output, default]
    world-latent history ──> Prophet ──> memory ──────────┴──────────────────┘  (gated cross-attention)

The SmolVLA part is a stock `SmolVLAPolicy` held inside (composition); the world path is the shared
`WorldPath` (Prophet, memory modes, gated cross-attention, world loss) of `world_f`. The memory enters
SmolVLA's unchanged forward and sampling code through PyTorch module hooks at the three fusion
points, so the late injection acts at every denoising step, and with every gate at 0 the actions are
exactly SmolVLA's.
"""

from __future__ import annotations

import contextlib
import functools
import json
from collections import deque
from pathlib import Path

import torch
from lerobot.policies.pretrained import PreTrainedPolicy
from lerobot.policies.smolvla.modeling_smolvla import SmolVLAPolicy
from torch import Tensor

from ..checkpoints import StrictCheckpointLoading
from ..constants import OBS_WORLD_GOAL, OBS_WORLD_HISTORY
from ..latents.binding import bind_policy_world_latents, bind_world_target_stats
from ..latents.processor import reset_online_state
from ..latents.train_view import EpisodeSuccess, source_of_view
from ..model_card import ModelCardMixin, record_training_provenance
from ..sources import checkpoint_file
from ..trunk_policy import ensure_eval, gate_param_group
from ..world.align import FutureAlignment, alignment_targets
from ..world.fusion import GatedCrossAttention, fusion_gates
from ..world.history import LatentHistory, latent_from_batch
from ..world.path import WorldPath, build_fusion
from ..world.planner import plan_chunk
from .coc import CocLabels, CocText, generate_text
from .configuration_smolvla_world import ARCHITECTURE_FIELDS, INIT_FROM_EXPECTED, SmolVLAWorldConfig


def init_weights_file(init_from: str) -> str:
    """Path of the `model.safetensors` of a SmolVLA checkpoint given as a local directory or Hub id."""
    from huggingface_hub.constants import SAFETENSORS_SINGLE_FILE

    return checkpoint_file(init_from, SAFETENSORS_SINGLE_FILE, "--policy.init_from", INIT_FROM_EXPECTED)


def refuse_training_view(dataset_meta) -> None:
    """Stop with the fix when lerobot-train was pointed at a latent-only training view (it has no images)."""
    view = source_of_view(dataset_meta.info)
    if view is not None:
        raise ValueError(
            f"smolvla_world reads camera images in training, but {dataset_meta.root} is a latent-only "
            f"training view without them. Train on the source dataset: --dataset.root={view['root']} "
            "(its latent caches are the ones lerobot-wm-precompute wrote)."
        )


class SmolVLAWorldPolicy(ModelCardMixin, StrictCheckpointLoading, PreTrainedPolicy):
    """LeRobot policy `smolvla_world` (see `SmolVLAWorldConfig` for the fusion points and `init_from`).

    Training batches carry SmolVLA's inputs (images, state, tokenised instruction, action chunk) and
    the world-latent step's OBS_WORLD_HISTORY / OBS_WORLD_FUTURE / OBS_WORLD_FUTURE_VALID; evaluation
    batches carry OBS_WORLD_LATENT, whose last T values the policy keeps itself (`LatentHistory`).
    Chain-of-Causality (docs/coc.md): a text loss on the labels of `coc_path` in a VLM pass of its own,
    a FLARE-style alignment of the expert's states, and explanations generated at rollout (`explain`).
    """

    config_class = SmolVLAWorldConfig
    name = "smolvla_world"

    def __init__(self, config: SmolVLAWorldConfig, dataset_stats=None, dataset_meta=None, **kwargs):
        """Build SmolVLA + world path; with `dataset_meta` (from lerobot-train) bind the training dataset.

        With `init_from` not yet loaded, the SmolVLA part is initialised from that checkpoint.
        `dataset_stats` is accepted for LeRobot's factory; normalisation lives in the processors.
        """
        super().__init__(config)
        if dataset_meta is not None:
            refuse_training_view(dataset_meta)
        config.validate_features()
        self.config = config
        bind_policy_world_latents(config, dataset_meta)
        if dataset_meta is not None:
            record_training_provenance(config)
        self.smolvla = SmolVLAPolicy(config.smolvla_config())
        model = self.smolvla.model
        expert_width = model.vlm_with_expert.expert_hidden_size
        vlm_width = model.vlm_with_expert.config.text_config.hidden_size
        d = config.world_latent_dim
        self.world = WorldPath(
            config, d, expert_width, dropout=config.world_dropout,
            target_stats=bind_world_target_stats(config, dataset_meta),
            action_dim=config.action_feature.shape[0],
        )  # fmt: skip
        self._success = EpisodeSuccess.for_policy(config, dataset_meta)
        self._planner_rng = torch.Generator()
        drop = config.world_dropout
        self.expert_input_fusion = (
            build_fusion(config, expert_width, d, drop) if config.inject_expert_input else None
        )
        self.prefix_fusion = build_fusion(config, vlm_width, d, drop) if config.inject_prefix else None
        # FLARE-style alignment head (lambda_align > 0): expert states -> future latents.
        self.align = FutureAlignment(expert_width, config.future_frames, d) if config.lambda_align > 0 else None
        # The CoC text pass (lambda_text > 0); its labels are bound to the training dataset.
        self.coc = self._bind_coc(config, dataset_meta)
        # The memory the hooks inject during the current call (None: SmolVLA runs untouched).
        self._memory: Tensor | None = None
        self._stats: dict | None = None
        # Expert states before the late injection, collected during a training forward for the alignment.
        self._captured: list | None = None
        model.action_out_proj.register_forward_pre_hook(self._expert_output_hook)
        model.action_time_mlp_out.register_forward_hook(self._expert_input_hook)
        if self.prefix_fusion is not None:
            # The prefix is assembled by a method, not one module: wrap that method of the held model.
            model.embed_prefix = functools.partial(self._embed_prefix, model.embed_prefix)
        self.history = LatentHistory(config.history_frames)
        self._action_queue: deque = deque(maxlen=config.n_action_steps)
        # Explanations (explain=True): {episode, step, env, text} per new chunk, oldest first.
        self.explanations: list[dict] = []
        self._episode, self._step, self._episode_open, self._explain_file_open = -1, 0, False, False
        if config.init_from and not config.init_from_loaded:
            self.load_init_weights(config.init_from)
            config.init_from_loaded = True
        self.reset()

    def _bind_coc(self, config: SmolVLAWorldConfig, dataset_meta) -> CocText | None:
        """The text pass over `config.coc_path`'s labels of the training dataset (None: no text loss)."""
        if config.lambda_text <= 0:
            return None
        # SmolVLA freezes the LM head because its action loss never reaches it; the text loss does.
        self.smolvla.model.vlm_with_expert.vlm.lm_head.weight.requires_grad_(True)
        if dataset_meta is None:
            return None  # a loaded checkpoint (rollout): no training dataset, so nothing to look labels up in
        tokenizer = self.smolvla.model.vlm_with_expert.processor.tokenizer
        return CocText(CocLabels.load(config.coc_path, dataset_meta), tokenizer)

    def load_init_weights(self, init_from: str) -> None:
        """Load a SmolVLA checkpoint's weights into the SmolVLA part; clear error when they do not fit."""
        from safetensors import safe_open
        from safetensors.torch import load_model

        path = init_weights_file(init_from)
        own = self.smolvla.state_dict()
        with safe_open(path, "pt") as f:
            shapes = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
        wrong = [f"{k}: checkpoint {s} vs model {tuple(own[k].shape)}"
                 for k, s in shapes.items() if k in own and tuple(own[k].shape) != s]  # fmt: skip
        missing, unexpected = ([], []) if wrong else load_model(self.smolvla, path, strict=False)
        if wrong or missing or unexpected:
            raise ValueError(
                f"The weights of --policy.init_from={init_from} do not fit the SmolVLA built from this config "
                f"(shape mismatches: {wrong[:3]}, unexpected: {sorted(unexpected)[:3]}, missing: "
                f"{sorted(missing)[:3]}). Use the checkpoint's VLM (vlm_model_name) and architecture options "
                f"({', '.join(ARCHITECTURE_FIELDS)}): drop the --policy flags that change them."
            )

    # ------------------------------------------------------------------ fusion hooks
    def _fuse(self, fusion: GatedCrossAttention, hidden: Tensor) -> Tensor:
        """hidden after reading this call's memory through `fusion` (fused kernel: no statistics needed)."""
        out = fusion(hidden.float(), self._memory, with_entropy=False).hidden
        return out.to(hidden.dtype)

    def _expert_output_hook(self, module, args):
        """Late injection: the expert's hidden states right before `action_out_proj`."""
        if self._captured is not None:
            self._captured.append(args[0])  # the expert's own states: the memory may hold the true future
        if self._memory is None or self.world.fusion is None:
            return None
        hidden, info = self.world.inject(args[0], self._memory, stats=self._stats is not None)
        if self._stats is not None:
            self._stats.update(info)
        return (hidden.to(args[0].dtype),)

    def _expert_input_hook(self, module, args, output):
        """Early injection: the expert's input (suffix) embeddings, the output of `action_time_mlp_out`."""
        if self._memory is None or self.expert_input_fusion is None:
            return None
        return self._fuse(self.expert_input_fusion, output)

    def _embed_prefix(self, embed_prefix, *args, **kwargs):
        """Prefix injection: SmolVLA's `embed_prefix`, then the prefix tokens read the memory."""
        embs, pad_masks, att_masks = embed_prefix(*args, **kwargs)
        if self._memory is not None:
            embs = self._fuse(self.prefix_fusion, embs)
        return embs, pad_masks, att_masks

    @contextlib.contextmanager
    def _reading(self, memory: Tensor | None, stats: dict | None = None, capture: list | None = None):
        """Let the hooks inject `memory` (and collect the expert states into `capture`) during the
        SmolVLA call inside the block."""
        self._memory, self._stats, self._captured = memory, stats, capture
        try:
            yield
        finally:
            self._memory, self._stats, self._captured = None, None, None

    @property
    def injects(self) -> bool:
        """Whether any fusion point reads the memory."""
        return any(m is not None for m in (self.world.fusion, self.expert_input_fusion, self.prefix_fusion))

    # ------------------------------------------------------------------ LeRobot interface
    def get_optim_params(self):
        """All parameters, as SmolVLA (frozen ones carry no gradient); with `gate_lr_mult` != 1 the
        gates of every fusion point in a group of their own (lr x gate_lr_mult, no weight decay)."""
        if self.config.gate_lr_mult == 1.0:
            return self.parameters()
        gates = fusion_gates(self)
        gate_ids = {id(p) for p in gates}
        rest = [p for p in self.parameters() if id(p) not in gate_ids]
        return [{"params": rest}, gate_param_group(gates, self.config.optimizer_lr, self.config.gate_lr_mult)]

    def reset(self):
        """Start a new episode: clear the latent history, the action queues and the encoders' frame
        buffers, and re-seed the planner (the same episode seed gives the same plans)."""
        self.history.reset()
        self._planner_rng.manual_seed(self.config.planner_seed)
        self._action_queue.clear()
        self.smolvla.reset()
        reset_online_state()
        self._step, self._episode_open = 0, False

    @property
    def reads_history(self) -> bool:
        """Whether anything reads the latent history at rollout (an injected memory, or the planner's world model)."""
        return self.injects or (self.config.planner != "none" and self.world.dynamics is not None)

    def _rollout_history(self, batch: dict[str, Tensor], history: Tensor | None) -> Tensor | None:
        if history is None and self.reads_history:
            history = batch.get(OBS_WORLD_HISTORY)
            if history is None:
                history = self.history.push(latent_from_batch(batch))
        return history

    def _rollout_memory(self, history: Tensor | None) -> Tensor | None:
        """The memory this call injects (None when nothing reads it)."""
        if not self.injects:
            return None
        return self.world.select(self.world.predict(history), self.config.memory_mode_rollout)

    def _chunk(self, batch: dict[str, Tensor], history: Tensor | None, noise: Tensor | None, **kwargs) -> Tensor:
        """SmolVLA's chunk with this call's memory injected; with a planner, the best of its candidates."""
        if self.config.planner == "none":
            with self._reading(self._rollout_memory(history)):
                return self.smolvla.predict_action_chunk(batch, noise, **kwargs)
        return self._planned_chunk(batch, history)

    @torch.no_grad()
    def plan_candidates(
        self, batch: dict[str, Tensor], history: Tensor | None, share_prefix: bool = True
    ) -> tuple[Tensor, Tensor | None]:
        """The planner's first round: N flow samples of every observation [B, N, H, A] (one SmolVLA call
        on B x N, with this call's memory injected), and the proposal [B, H, A] (the first sample).
        Draws its noise from `planner_rng`, so the same seed gives the same candidates. With
        `planner_candidates="perturbed"`: one flow sample, the proposal, and no first round of its own
        (the planner perturbs the proposal, as for world_f).

        share_prefix: the N samples of one observation share its prefix (images, instruction, state), so
        the VLM encodes it once and its key/value cache is repeated for the N denoising runs
        (`_sharing_prefix`); False runs the whole SmolVLA call on the repeated batch (the same samples up
        to float rounding, N times the VLM's cost)."""
        cfg = self.config
        n = 1 if cfg.planner_candidates == "perturbed" else cfg.planner_samples
        b = latent_from_batch(batch).shape[0]
        wide = dict(batch) if n == 1 else {k: _repeat_rows(v, b, n) for k, v in batch.items()}
        device = latent_from_batch(batch).device
        memory = self._rollout_memory(history)
        noise = torch.randn((b * n, cfg.chunk_size, cfg.max_action_dim), generator=self._planner_rng).to(device)
        sharing = self._sharing_prefix(n, b * n) if share_prefix and n > 1 else contextlib.nullcontext()
        with self._reading(None if memory is None else memory.repeat_interleave(n, dim=0)), sharing:
            samples = self.smolvla.predict_action_chunk(wide, noise)
        samples = samples.view(b, n, *samples.shape[1:])
        return samples[:, 0], (None if cfg.planner_candidates == "perturbed" else samples)

    @contextlib.contextmanager
    def _sharing_prefix(self, n: int, rows: int):
        """Within the block, SmolVLA's batch of `rows` rows holds each observation n times in a row
        (`_repeat_rows`): the prefix is embedded and run through the VLM for one row of each group, and
        its outputs and key/value cache are repeated n times, so only the denoising runs on all rows."""
        model = self.smolvla.model
        vlm = model.vlm_with_expert
        # Instance attributes to restore (embed_prefix may already be the prefix fusion's wrapper).
        own = {"embed_prefix": model.__dict__.get("embed_prefix"), "forward": vlm.__dict__.get("forward")}
        embed_prefix, forward = model.embed_prefix, vlm.forward

        def first_rows(v):
            if isinstance(v, Tensor) and v.ndim > 0 and v.shape[0] == rows:
                return v[::n]
            if isinstance(v, (list, tuple)):
                return type(v)(first_rows(x) for x in v)
            return v

        def repeated(v):
            if isinstance(v, Tensor) and v.ndim > 0 and v.shape[0] == rows // n:
                return v.repeat_interleave(n, dim=0)
            if isinstance(v, dict):
                return {k: repeated(x) for k, x in v.items()}
            if isinstance(v, (list, tuple)):
                return type(v)(repeated(x) for x in v)
            return v

        def shared_embed_prefix(*args, **kwargs):
            memory = self._memory
            self._memory = None if memory is None else memory[::n]  # what the prefix fusion reads
            try:
                out = embed_prefix(*first_rows(args), **{k: first_rows(v) for k, v in kwargs.items()})
            finally:
                self._memory = memory
            return repeated(out)

        def shared_forward(*args, **kwargs):
            embeds = kwargs.get("inputs_embeds")
            if args or not kwargs.get("fill_kv_cache") or embeds is None or embeds[1] is not None:
                return forward(*args, **kwargs)  # a denoising step: every row
            return repeated(forward(**{k: first_rows(v) for k, v in kwargs.items()}))

        model.embed_prefix, vlm.forward = shared_embed_prefix, shared_forward
        try:
            yield
        finally:
            for obj, name in ((model, "embed_prefix"), (vlm, "forward")):
                if own[name] is None:
                    delattr(obj, name)  # back to the class's method
                else:
                    setattr(obj, name, own[name])

    def _planned_chunk(self, batch: dict[str, Tensor], history: Tensor) -> Tensor:
        """The planner's chunk: the candidates of `plan_candidates` (N flow samples, or perturbations of
        one) scored through the world model (`WorldPath.score_chunks`); CEM then refines around the best."""
        cfg = self.config
        proposal, samples = self.plan_candidates(batch, history)
        horizon = cfg.planner_horizon or cfg.future_frames
        goal = batch.get(OBS_WORLD_GOAL)
        chunk, _ = plan_chunk(
            proposal, lambda c: self.world.score_chunks(history, c, goal, horizon), cfg.planner_settings(),
            self._planner_rng, first_round=samples,
        )  # fmt: skip
        return chunk

    def advance_history(self, batch: dict[str, Tensor]) -> Tensor | None:
        """Push the batch's latent onto the episode's history and return it [B, T, D] (None for a policy
        that reads no history). `select_action` calls it once per environment step."""
        return self.history.push(latent_from_batch(batch)) if self.reads_history else None

    @property
    def planner_rng(self) -> torch.Generator:
        """The planner's generator (re-seeded with `planner_seed` at every `reset`)."""
        return self._planner_rng

    @torch.no_grad()
    def predict_action_chunk(self, batch: dict[str, Tensor], noise: Tensor | None = None, **kwargs) -> Tensor:
        """Action chunk [B, H, A]; SmolVLA's keyword options (e.g. RTC's) pass through.

        Uses OBS_WORLD_HISTORY when the batch has it; otherwise the call is the next step of the
        episode and advances the policy's own latent history.
        """
        ensure_eval(self)
        return self._chunk(batch, self._rollout_history(batch, None), noise, **kwargs)

    @torch.no_grad()
    def select_action(self, batch: dict[str, Tensor], noise: Tensor | None = None, **kwargs) -> Tensor:
        """One action [B, A] per environment step; the latent history advances at every call."""
        if self.smolvla._rtc_enabled():
            raise ValueError(
                "RTC is not supported by select_action (as in SmolVLA): use predict_action_chunk."
            )
        ensure_eval(self)
        history = self.advance_history(batch)
        if len(self._action_queue) == 0:
            chunk = self._chunk(batch, history, noise)
            self._action_queue.extend(chunk.transpose(0, 1)[: self.config.n_action_steps])
            if self.config.explain:
                self._explain(batch)  # after the chunk, drawing no random numbers: the actions are unchanged
        self._step += 1
        return self._action_queue.popleft()

    def _explain(self, batch: dict[str, Tensor]) -> None:
        """Generate this step's CoC texts, keep them in `explanations` and append them to `explain_path`."""
        if not self._episode_open:
            self._episode, self._episode_open = self._episode + 1, True
        texts = generate_text(self.smolvla, batch, self.config.explain_max_tokens)
        rows = [{"episode": self._episode, "step": self._step, "env": i, "text": t} for i, t in enumerate(texts)]
        self.explanations += rows
        if self.config.explain_path:
            path = Path(self.config.explain_path).expanduser()
            path.parent.mkdir(parents=True, exist_ok=True)
            # Written as they come (lerobot-eval has no hook at its end); a new policy starts a new file.
            with path.open("a" if self._explain_file_open else "w") as f:
                f.writelines(json.dumps(r) + "\n" for r in rows)
            self._explain_file_open = True

    def forward(self, batch: dict[str, Tensor], noise=None, time=None, reduction: str = "mean"):
        """SmolVLA's flow-matching loss (with the memory injected) + lambda_world * world loss, plus the
        CoC text loss of its own VLM pass (lambda_text) and the future alignment (lambda_align); and logs."""
        cfg = self.config
        prediction = targets = valid = memory = None
        if self.world.prophet is not None or self.world.dynamics is not None:
            history, targets, valid = self.world.training_inputs(batch)
        if self.world.prophet is not None:
            prediction = self.world.predict(history)
            if self.injects:
                memory = self.world.select(
                    prediction, cfg.memory_mode_train, targets, self.world.oracle_prob(), valid
                )
        stats: dict = {}
        captured: list | None = [] if self.align is not None else None
        # imitate_failures=false: per-sample flow losses, failed episodes' frames weighted 0 (LeRobot 0.4.4's
        # SmolVLA never reads `action_is_pad`, so padding them would not leave them out).
        success = None if cfg.imitate_failures else self._success(batch)
        with self._reading(memory, stats, captured):
            if success is None:
                loss, info = self.smolvla.forward(batch, noise, time, reduction)
            else:
                per_sample, info = self.smolvla.forward(batch, noise, time, "none")
                keep = success.to(per_sample)
                per_sample = per_sample * keep
                mean = per_sample.sum() / keep.sum().clamp(min=1)
                loss = per_sample if reduction == "none" else mean
                info["loss"] = float(mean)
        info = {"action_loss": info["loss"], **info}
        # Added after the action pass, never mixed into it: the actions and their loss are unchanged.
        if self.coc is not None:
            text_loss, text_info = self.coc.loss(self.smolvla, batch)
            info.update(text_info)
            if text_loss is not None:
                loss = loss + cfg.lambda_text * text_loss
        if self.align is not None:
            align_loss, align_info = self._align_loss(batch, captured)
            loss = loss + cfg.lambda_align * align_loss
            info.update(align_info)
        world_loss, world_info = self.world.loss_terms(prediction, targets, valid)
        if world_loss is not None:
            loss = loss + cfg.lambda_world * world_loss
        if self.world.dynamics is not None:
            dyn_loss, dyn_info = self.world.dynamics_loss_terms(batch, history, targets, valid, self._success(batch))
            loss = loss + dyn_loss
            info.update(dyn_info)
        info.update(world_info)
        info.update(stats)
        for name, fusion in (
            ("gate_expert_input", self.expert_input_fusion),
            ("gate_prefix", self.prefix_fusion),
        ):
            if fusion is not None:
                info[name] = fusion.gate_value().detach().mean().item()
        info["loss"] = loss.mean().item()
        self.world.step()
        self.training_figures.record(info)
        return loss, info

    def _align_loss(self, batch: dict[str, Tensor], captured: list) -> tuple[Tensor, dict]:
        """FLARE-style alignment of this forward's expert states with the batch's future latents."""
        (hidden,) = captured  # one action_out_proj call per training forward
        return self.align(hidden, *alignment_targets(batch, self.config.future_frames))


def _repeat_rows(v, b: int, n: int):
    """A batch value with each of its b rows repeated n times in a row (tensors and per-row lists)."""
    if isinstance(v, Tensor) and v.ndim > 0 and v.shape[0] == b:
        return v.repeat_interleave(n, dim=0)
    if isinstance(v, list) and len(v) == b:
        return [x for x in v for _ in range(n)]
    return v
