"""`WorldPath`: the Prophet, the memory modes, the gated cross-attention and the world loss as one module.

Every policy type owns one `WorldPath` and calls it at two points: `predict` (history -> K predicted
future latents) and `inject` (a stream of hidden states reads the selected memory through the gate).
`loss_terms` gives the world loss and the scalars all policy types log under the same names:
`world_loss`, `world_cos_h{k}`, `world_copy_cos_h{k}`, `world_motion_cos_h{k}` (see
`memory.horizon_diagnostics`), `gate` (mean tanh(gate)), `gate_abs_max` (per-channel gates),
`memory_norm`, `attn_entropy`, `oracle_prob` (scheduled sampling).

Target space. The Prophet predicts, the world loss compares and the memory holds the same tensor:
future latents z_{t+s}, ..., z_{t+Ks} (s = `future_stride`), or with world_target="delta" their change
z_{t+ks} - z_t, and with `standardise_targets` that tensor standardised per dimension and horizon
with statistics of the training dataset's latent cache (`target_mean`, `target_std`; the Prophet then
reads its history standardised with `latent_mean`, `latent_std`). The statistics are buffers: a
checkpoint carries them, and rollout and reloading need no cache.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from ..constants import (
    NEXT_REWARD,
    OBS_WORLD_FUTURE,
    OBS_WORLD_FUTURE_VALID,
    OBS_WORLD_HISTORY,
    OBS_WORLD_LATENT,
    OBS_WORLD_REMAINING,
)
from .dynamics import (
    ActionDynamics,
    OutcomeCritic,
    ProgressHead,
    RewardHead,
    critic_loss,
    goal_score,
    progress_loss,
    progress_targets,
    reward_loss,
)
from .fusion import GatedCrossAttention
from .memory import (
    horizon_diagnostics,
    per_horizon_cosine,
    scheduled_oracle_prob,
    select_memory,
    copy_statistics,
    standardise,
    unstandardise,
    world_loss,
    world_targets,
)
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
        memory_norm=getattr(options, "fusion_memory_norm", "layer"),
    )  # fmt: skip


ACTION_KEY = "action"  # LeRobot's ACTION, kept literal so this package stays LeRobot-free

# Names of the standardisation statistics (buffers of `WorldPath` with `standardise_targets`).
TARGET_STAT_NAMES = ("latent_mean", "latent_std", "target_mean", "target_std")
# With prophet_input="motion", also the statistics of one-frame differences z_t - z_{t-1}.
STEP_STAT_NAMES = ("step_mean", "step_std")


class WorldPath(nn.Module):
    """Prophet (when `use_prophet`) + gated cross-attention into `hidden_width` (when `inject_memory`).

    latent_dim: world latent dimension D; hidden_width: width of the states the memory is injected
    into; context_dim: width of optional context tokens the Prophet also reads (e.g. trunk states);
    target_stats: with `standardise_targets`, the statistics from the latent cache
    (`latents.binding.world_target_stats`; None when a checkpoint's weights will fill them).
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
        target_stats: dict[str, Tensor] | None = None,
        action_dim: int | None = None,
    ):
        super().__init__()
        self.options = options
        o = options
        self.delta = bool(o.delta_prediction or getattr(o, "world_target", "absolute") == "delta")
        has_dynamics = getattr(o, "dynamics", "none") != "none"
        self.standardised = bool(getattr(o, "standardise_targets", False)) and (o.use_prophet or has_dynamics)
        self.motion_input = self.standardised and getattr(o, "prophet_input", "latents") == "motion"
        self.loss_type = getattr(o, "world_loss_type", "cosine")
        # (targets, z_t, valid) of the last `training_inputs` call: lets `select` and `loss_terms` find
        # the validity mask and z_t of those targets when a caller passes only the targets.
        self._last_inputs: tuple | None = None
        self._stats_ready = False
        if self.standardised:
            # NaN until bound: using unbound statistics fails loudly instead of training on garbage.
            shapes = {"latent_mean": (latent_dim,), "latent_std": (latent_dim,),
                      "target_mean": (o.future_frames, latent_dim), "target_std": (o.future_frames, latent_dim)}  # fmt: skip
            if self.motion_input:
                shapes |= {"step_mean": (latent_dim,), "step_std": (latent_dim,)}
            self._stat_names = tuple(shapes)
            for name, shape in shapes.items():
                self.register_buffer(name, torch.full(shape, float("nan")))
            if target_stats is not None:
                self.set_target_stats(target_stats)
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
                self.delta,
                context_dim=context_dim,
                rescale_output=not self.standardised,
            )  # fmt: skip
            if o.use_prophet
            else None
        )
        self.fusion = build_fusion(o, hidden_width, latent_dim, dropout) if o.inject_memory else None
        # The world model of `DynamicsOptions`: in the same target space as the Prophet, never read by
        # the action path (only the planner reads it), so it cannot change the policy's own chunk.
        self.dynamics = self.progress = self.critic = self.reward = None
        if has_dynamics:
            if action_dim is None:
                raise ValueError("dynamics='action_conditioned' needs the action dimension (action_dim).")
            self.dynamics = ActionDynamics(
                latent_dim, o.history_frames, o.future_frames, action_dim, o.future_frames * o.future_stride,
                o.prophet_width, o.prophet_depth, o.prophet_heads, dropout, self.delta,
                rescale_output=not self.standardised,
            )  # fmt: skip
            if getattr(o, "progress_head", False):
                self.progress = ProgressHead(latent_dim, o.prophet_width)
            if getattr(o, "reward_head", False):
                self.reward = RewardHead(latent_dim, o.prophet_width)
            if getattr(o, "plan_critic", False):
                self.critic = OutcomeCritic(
                    latent_dim, o.future_frames, o.prophet_width, getattr(o, "critic_input", "imagined"),
                    action_dim, self.dynamics.action_len,
                )  # fmt: skip
        self.register_buffer("train_step", torch.zeros((), dtype=torch.long))

    def set_target_stats(self, stats: dict[str, Tensor]) -> None:
        """Bind the standardisation statistics (`TARGET_STAT_NAMES`, and `STEP_STAT_NAMES` with
        prophet_input="motion"; from the training latent cache)."""
        if not self.standardised:
            raise RuntimeError("set_target_stats needs a world path built with standardise_targets=True.")
        copy_statistics(self, stats, self._stat_names, "World target statistic",
                        "(future_frames x world latent dim): recompute it for this config.")  # fmt: skip
        self._stats_ready = self._stats_finite()

    def _stats_finite(self) -> bool:
        """Whether every standardisation buffer holds finite values (NaN = never bound)."""
        return all(bool(torch.isfinite(getattr(self, n)).all()) for n in self._stat_names)

    def _stats(self, name_mean: str, name_std: str) -> tuple[Tensor | None, Tensor | None]:
        """(mean, std) buffers when standardising, else (None, None); fails while they are unbound."""
        if not self.standardised:
            return None, None
        if not self._stats_ready:  # checked once (one sync), then remembered
            self._stats_ready = self._stats_finite()
            if not self._stats_ready:
                raise RuntimeError(
                    "standardise_targets=True but the policy has no target statistics: they are computed from "
                    "the latent cache when lerobot-train builds the policy (dataset_meta given) and saved in its "
                    "checkpoint. Train through lerobot-train, load a checkpoint trained with them, or call "
                    "policy.world.set_target_stats(latents.binding.world_target_stats(config))."
                )
        return getattr(self, name_mean), getattr(self, name_std)

    def prophet_tokens(self, history: Tensor) -> Tensor:
        """What the Prophet reads [B, T, D] from the raw latent history [B, T, D] (oldest first).

        Without standardisation the history itself; with it, each latent standardised per dimension;
        with prophet_input="motion", the one-frame changes z_i - z_{i-1} of the window (standardised
        with their own statistics, oldest first) followed by the standardised current latent z_t, so
        the motion the Prophet must extrapolate is on the same scale as the scene instead of being a
        small difference between large, nearly equal tokens.
        """
        mean, std = self._stats("latent_mean", "latent_std")
        if not self.motion_input:
            return standardise(history, mean, std)
        steps = standardise(history[:, 1:] - history[:, :-1], self.step_mean, self.step_std)
        return torch.cat([steps, standardise(history[:, -1:], mean, std)], dim=1)

    def predict(self, history: Tensor, context: Tensor | None = None) -> Tensor:
        """The K predicted future frames [B, K, D] in target space (see the module docstring) from the
        raw latent history [B, T, D]."""
        if self.prophet is None:
            raise RuntimeError("This policy was built without a Prophet (use_prophet=False).")
        return self.prophet(self.prophet_tokens(history), context).prediction()

    def imagine(self, history: Tensor, actions: Tensor) -> Tensor:
        """The action-conditioned dynamics' K future frames [B, K, D] in target space, from the raw latent
        history [B, T, D] and the chunk [B, H, A] (normalised actions) executed from the current frame."""
        if self.dynamics is None:
            raise RuntimeError("This policy was built without a world model (dynamics='none').")
        return self.dynamics(self.prophet_tokens(history), actions)

    def dynamics_loss_terms(
        self,
        batch: dict,
        history: Tensor,
        targets: Tensor,
        valid: Tensor | None,
        success: Tensor | None = None,
    ) -> tuple[Tensor, dict]:
        """(lambda-weighted dynamics + progress loss, logged scalars) of a training batch.

        history, targets, valid: from `training_inputs`; the batch's action chunk ("action" [B, H, A],
        normalised) drives the dynamics, whose loss uses the world loss's targets, mask and type. Logged:
        `dyn_loss`, and per horizon `dyn_cos_h{k}` / `dyn_motion_cos_h{k}` in absolute-latent space (read
        next to the Prophet's `world_cos_h{k}` and the copy baseline `world_copy_cos_h{k}`). With the
        progress head, the batch's current latent and OBS_WORLD_REMAINING (and success [B], the episodes'
        success marks, when known) give `progress_loss`.
        """
        actions = batch[ACTION_KEY]
        o = self.options
        pred = self.imagine(history, actions)
        dyn = world_loss(pred, targets, valid, self.loss_type)
        info = {"dyn_loss": dyn.item()}
        current = history[:, -1].float()
        with torch.no_grad():
            diag = horizon_diagnostics(
                self.to_absolute(pred.detach(), current), self.to_absolute(targets, current), current, valid
            )
        info |= {k.replace("world_", "dyn_", 1): v for k, v in diag.items() if not k.startswith("world_copy")}
        if self.prophet is None:  # the copy baseline the world model has to beat (else the Prophet's terms log it)
            info |= {k: v for k, v in diag.items() if k.startswith("world_copy")}
        loss = o.lambda_dynamics * dyn
        if self.progress is not None:
            latent, remaining = batch.get(OBS_WORLD_LATENT), batch.get(OBS_WORLD_REMAINING)
            if latent is None or remaining is None:
                raise KeyError(
                    "The progress head trains on the batch's current latent and 'observation.world.remaining' "
                    "(added by the world-latent step from the latent cache): train through lerobot-train."
                )
            prog = progress_loss(self.progress(latent), progress_targets(remaining, success))
            info["progress_loss"] = prog.item()
            loss = loss + o.lambda_progress * prog
        if self.reward is not None:
            latent, reward = batch.get(OBS_WORLD_LATENT), batch.get(NEXT_REWARD)
            if latent is None or reward is None:
                raise KeyError(
                    f"The reward head trains on the batch's current latent and '{NEXT_REWARD}' (the step's reward), "
                    "which this dataset does not carry: record it with lerobot-wm-record-metaworld (every frame gets "
                    "its reward), or train without --policy.reward_head."
                )
            rew = reward_loss(self.reward(latent), reward, o.reward_scale)
            info["reward_loss"] = rew.item()
            loss = loss + o.lambda_reward * rew
        if self.critic is not None:
            crit, crit_info = self._critic_loss_terms(history, actions, success)
            info |= crit_info
            loss = loss + o.lambda_critic * crit
        return loss, info

    def _critic_loss_terms(self, history: Tensor, actions: Tensor, success: Tensor | None) -> tuple[Tensor, dict]:
        """The outcome critic's loss: the dataset chunk's imagined outcome against those of
        `critic_negatives` perturbations of it (scale planner_noise, the planner's own), over frames of
        successful episodes when success marks are known. The imagined frames are computed without
        gradient, so the critic never shapes the world model, which stays a model of the world."""
        o = self.options
        b, m = len(history), o.critic_negatives
        with torch.no_grad():
            # Negatives at several distances (0.5x to 2x planner_noise, log-uniform), so the critic ranks
            # candidates by how far they stray, not only the chunk against its nearest neighbours.
            scale = o.planner_noise * torch.exp(math.log(2.0) * (2 * torch.rand(b, m, 1, 1, device=actions.device) - 1))
            noise = scale.to(actions.dtype) * torch.randn((b, m, *actions.shape[1:]), device=actions.device, dtype=actions.dtype)
            chunks = torch.cat([actions.unsqueeze(1), actions.unsqueeze(1) + noise], dim=1)
            hist = history.repeat_interleave(1 + m, dim=0)
            # The actions-only control reads no imagined frames: skip the rollout.
            imagined = self.imagine(hist, chunks.flatten(0, 1)) if self.critic.reads_imagined else None
        logits = self.critic(hist[:, -1], imagined, chunks.flatten(0, 1)).view(b, 1 + m)
        weight = None if success is None else success.to(torch.bool).reshape(b).float()
        loss = critic_loss(logits, weight)
        with torch.no_grad():  # how often the dataset's chunk is the critic's top pick (chance 1 / (1 + M))
            top = (logits.argmax(dim=1) == 0).float()
            top = top.mean() if weight is None else (top * weight).sum() / weight.sum().clamp_min(1.0)
        return loss, {"critic_loss": loss.item(), "critic_top1": top.item()}

    def score_kind(self, goal: Tensor | None) -> str:
        """Which score the planner uses (`planner_score`; "auto": goal image, else critic, else reward, else
        progress). Raises, naming the flags, when the chosen one is not available."""
        kind = getattr(self.options, "planner_score", "auto")
        if kind == "auto":
            available = [k for k, ok in (("goal", goal is not None), ("critic", self.critic is not None),
                                         ("reward", self.reward is not None), ("progress", self.progress is not None)) if ok]  # fmt: skip
            if not available:
                raise RuntimeError(
                    "The planner has no goal to score against (the observation carries no goal image, see "
                    "constants.goal_image_key) and the policy has no outcome critic, reward head or progress head: "
                    "train with --policy.plan_critic=true, --policy.reward_head=true or --policy.progress_head=true, "
                    "or evaluate with goal images."
                )
            return available[0]
        if kind == "goal" and goal is None:
            raise RuntimeError(
                "planner_score='goal' but the observation carries no goal image (see constants.goal_image_key): "
                "evaluate with goal images, or choose another --policy.planner_score."
            )
        return kind

    @torch.no_grad()
    def score_chunks(self, history: Tensor, chunks: Tensor, goal: Tensor | None, horizon: int) -> Tensor:
        """Planner scores [B, N] of candidate chunks [B, N, H, A] (higher is better), by `score_kind`.

        Every candidate is rolled through the dynamics in one batch of B x N. goal: minus the L1 distance
        of the imagined latent at predicted frame `horizon` (1..K) to the goal latent [B, D] (`goal_score`);
        critic: the outcome critic's logit of all K imagined frames (and / or the chunk, by
        `critic_input`); reward: the reward head's mean over
        the imagined frames 1..horizon (a short return); progress: minus the progress head's remaining
        fraction at frame `horizon`.
        """
        kind = self.score_kind(goal)
        b, n = chunks.shape[:2]
        hist = history.repeat_interleave(n, dim=0)
        flat = chunks.flatten(0, 1)
        # The actions-only control reads no imagined frames: skip the rollout.
        imagined = None if kind == "critic" and not self.critic.reads_imagined else self.imagine(hist, flat)
        if kind == "critic":
            return self.critic(hist[:, -1], imagined, flat).view(b, n).float()
        future = self.to_absolute(imagined, hist[:, -1])
        if kind == "reward":
            return self.reward(future[:, :horizon]).float().mean(dim=1).view(b, n)
        end = future[:, horizon - 1]
        if kind == "goal":
            return goal_score(end, goal.repeat_interleave(n, dim=0)).view(b, n)
        return -torch.sigmoid(self.progress(end)).view(b, n)

    def to_target_space(self, future: Tensor, current: Tensor) -> Tensor:
        """Future latents [B, K, D] -> the target space (delta to z_t [B, D], standardised)."""
        mean, std = self._stats("target_mean", "target_std")
        return standardise(world_targets(future, current, self.delta), mean, std)

    def to_absolute(self, value: Tensor, current: Tensor) -> Tensor:
        """Target-space values [B, K, D] -> absolute future latents, given z_t [B, D] (inverse of
        `to_target_space`)."""
        mean, std = self._stats("target_mean", "target_std")
        value = unstandardise(value.float(), mean, std)
        return value + current.float().unsqueeze(1) if self.delta else value

    def training_inputs(self, batch: dict) -> tuple[Tensor, Tensor, Tensor | None]:
        """(history [B, T, D], world-loss targets [B, K, D] float32, valid [B, K]) of a training batch.

        History is the raw latents (`predict` standardises it); targets are in target space. The
        targets' z_t and validity are remembered, so `select` (oracle rows past the episode end) and
        `loss_terms` (copy baseline) find them when given these targets.
        """
        for key in (OBS_WORLD_HISTORY, OBS_WORLD_FUTURE):
            if key not in batch:
                raise KeyError(
                    f"Training batch has no '{key}'. The world-latent step adds it from the latent cache "
                    "when the batch carries the dataset's 'index'; train through lerobot-train with this "
                    "policy's preprocessor (and run lerobot-wm-precompute for the dataset first)."
                )
        history = batch[OBS_WORLD_HISTORY]
        current = history[:, -1]
        targets = self.to_target_space(batch[OBS_WORLD_FUTURE].float(), current.float()).float()
        valid = batch.get(OBS_WORLD_FUTURE_VALID)
        self._last_inputs = (targets, current, valid)
        return history, targets, valid

    def _remembered(self, targets: Tensor | None, index: int) -> Tensor | None:
        """z_t (index 1) or valid (index 2) of `targets` when they come from the last `training_inputs`."""
        last = self._last_inputs
        return last[index] if last is not None and targets is not None and targets is last[0] else None

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
        self,
        prediction: Tensor,
        mode: str,
        oracle: Tensor | None = None,
        oracle_prob: float = 0.0,
        valid: Tensor | None = None,
    ) -> Tensor:
        """The memory [B, K, D] the action path reads under `mode` (detached with `detach_memory`).

        Chosen once per policy call, so every fusion point (and every denoising step) reads the same.
        Oracle rows past the episode end (valid False; by default the validity of the targets from
        `training_inputs`) are replaced by the prediction: the clamped rows would tell the action
        path where the episode ends, which it cannot know at rollout.
        """
        memory = prediction.detach() if self.options.detach_memory else prediction
        if valid is None:
            valid = self._remembered(oracle, 2)
        return select_memory(mode, memory, oracle, oracle_prob, valid=valid)

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
        self,
        prediction: Tensor | None,
        targets: Tensor | None,
        valid: Tensor | None,
        current: Tensor | None = None,
    ) -> tuple[Tensor | None, dict]:
        """(world loss or None, logged scalars): world loss, per-horizon cosines, gate opening, oracle p.

        prediction and targets are in target space. current: z_t [B, D] (by default the one of the
        targets from `training_inputs`); with it the cosines are computed in absolute-latent space
        next to the copy baseline and the motion cosine (`horizon_diagnostics`); without it only
        `world_cos_h{k}` in target space.
        """
        info: dict = {}
        loss = None
        if self.prophet is not None and prediction is not None:
            loss = world_loss(prediction, targets, valid, self.loss_type)
            info["world_loss"] = loss.item()
            if current is None:
                current = self._remembered(targets, 1)
            if current is None:
                for k, c in enumerate(per_horizon_cosine(prediction, targets, valid).tolist(), start=1):
                    info[f"world_cos_h{k}"] = c
            else:
                with torch.no_grad():
                    info.update(
                        horizon_diagnostics(
                            self.to_absolute(prediction.detach(), current),
                            self.to_absolute(targets, current),
                            current,
                            valid,
                        )
                    )
        if self.fusion is not None:
            gate = self.fusion.gate_value().detach()
            info["gate"] = gate.mean().item()
            if gate.numel() > 1:
                info["gate_abs_max"] = gate.abs().max().item()
        if self.options.memory_mode_train == "scheduled":
            info["oracle_prob"] = self.oracle_prob()
        return loss, info
