"""`WorldMemoryOptions`: the config fields of the world path, the same on every policy type.

A dataclass mixin (like `WorldLatentOptions`): `world_f` and `smolvla_world` configs inherit it, so the
Prophet, the gated cross-attention, the memory modes and scheduled sampling are set with the same
`--policy.<field>` flags everywhere and validated by one function.
"""

from __future__ import annotations

from dataclasses import dataclass

from .dynamics import CRITIC_INPUTS, DYNAMICS, PLANNER_SCORES
from .fusion import MEMORY_NORMS
from .memory import MEMORY_MODES, ROLLOUT_MEMORY_MODES, SCHEDULE_SHAPES, WORLD_LOSS_TYPES, WORLD_TARGETS
from .planner import PLANNERS, PlannerSettings


@dataclass
class WorldMemoryOptions:
    """Prophet + gated cross-attention + memory-mode fields (see `world/path.py` for what they drive)."""

    # Train a Prophet that predicts the next K world latents.
    use_prophet: bool = True
    # Inject the memory into the action path through gated cross-attention (needs use_prophet).
    inject_memory: bool = True
    # Prophet: width.
    prophet_width: int = 128
    # Prophet: number of transformer blocks.
    prophet_depth: int = 2
    # Prophet: attention heads.
    prophet_heads: int = 4
    # Old name of world_target="delta" (kept so older configs and checkpoints load; kept in sync with it).
    delta_prediction: bool = False
    # Target space: "absolute" future latents, or "delta" z_{t+ks} - z_t (loss and memory in that space).
    world_target: str = "absolute"
    # Standardise targets per dimension (and horizon) with statistics of the latent cache, saved in the checkpoint.
    standardise_targets: bool = False
    # Prophet input with standardise_targets: "latents" (the T latents) or "motion" (T-1 frame changes + z_t).
    prophet_input: str = "latents"
    # World loss: "cosine" (1 - cos, scale-free), "mse" or "smooth_l1" (see the size of the change).
    world_loss_type: str = "cosine"
    # Weight of the world loss (masked at episode ends) added to the action loss.
    lambda_world: float = 1.0
    # Memory read by the action path in training: pred, oracle, zero, random, shuffle, scheduled.
    memory_mode_train: str = "pred"
    # Memory read at rollout (select_action / predict_action_chunk): pred, zero, random, shuffle.
    memory_mode_rollout: str = "pred"
    # Stop action-loss gradients from flowing into the Prophet through the memory.
    detach_memory: bool = False
    # Cross-attention: attention heads.
    fusion_heads: int = 4
    # Cross-attention: channels queries, keys and values are projected to (narrow keeps the world path cheap).
    fusion_dim: int = 64
    # Cross-attention: initial gate value (tanh(0) = 0: the world path starts switched off).
    gate_init: float = 0.0
    # Cross-attention: one gate per channel instead of one scalar gate.
    gate_per_channel: bool = False
    # Cross-attention memory norm: "layer" (per row, drops each row's scale), "rms" (one scale per sample), "none".
    fusion_memory_norm: str = "layer"
    # Learning rate of the cross-attention gates = optimizer_lr x this (own parameter group, no weight decay).
    gate_lr_mult: float = 1.0

    # Scheduled sampling: oracle probability at the start.
    scheduled_prob_start: float = 1.0
    # Scheduled sampling: oracle probability at the end of the decay.
    scheduled_prob_end: float = 0.0
    # Scheduled sampling: training steps held at the start probability before decaying.
    scheduled_warmup_steps: int = 0
    # Scheduled sampling: training steps over which the probability decays.
    scheduled_decay_steps: int = 10_000
    # Scheduled sampling: shape of the decay ("linear", "cosine" or "exponential").
    scheduled_shape: str = "linear"

    def validate_world_memory(self, baseline_hint: str = "") -> None:
        """Raise ValueError, naming the flag to fix, for inconsistent world-path settings.

        Reads history_frames / future_frames of the `WorldLatentOptions` the concrete config also has.
        baseline_hint: how this policy type trains without a world path, quoted in the error.
        """
        self.resolve_world_target()
        self.validate_future_stride()
        if self.prophet_width % self.prophet_heads:
            raise ValueError(
                f"prophet_width ({self.prophet_width}) must be divisible by prophet_heads ({self.prophet_heads})."
            )
        if self.fusion_dim % self.fusion_heads:
            raise ValueError(
                f"fusion_dim ({self.fusion_dim}) must be divisible by fusion_heads ({self.fusion_heads})."
            )
        if self.inject_memory and not self.use_prophet:
            raise ValueError(
                "inject_memory=True needs use_prophet=True: the injected memory is the Prophet's prediction."
                + (f" {baseline_hint}" if baseline_hint else "")
            )
        if self.use_prophet and (self.history_frames < 1 or self.future_frames < 1):
            raise ValueError(
                f"The Prophet needs --policy.history_frames >= 1 and --policy.future_frames >= 1 (got "
                f"{self.history_frames}, {self.future_frames}); set them, or turn the Prophet off "
                "(--policy.use_prophet=false)."
                + (f" {baseline_hint}" if baseline_hint else "")
            )
        if self.memory_mode_train not in MEMORY_MODES:
            raise ValueError(f"memory_mode_train '{self.memory_mode_train}' is not one of {MEMORY_MODES}.")
        if self.memory_mode_rollout not in ROLLOUT_MEMORY_MODES:
            raise ValueError(
                f"memory_mode_rollout '{self.memory_mode_rollout}' is not one of {ROLLOUT_MEMORY_MODES}: the "
                "true future (oracle, scheduled) is unknown at rollout."
            )
        if self.scheduled_shape not in SCHEDULE_SHAPES:
            raise ValueError(f"scheduled_shape '{self.scheduled_shape}' is not one of {SCHEDULE_SHAPES}.")
        if (
            self.scheduled_shape == "exponential"
            and min(self.scheduled_prob_start, self.scheduled_prob_end) <= 0
        ):
            raise ValueError(
                "The exponential schedule needs scheduled_prob_start > 0 and scheduled_prob_end > 0: set "
                "--policy.scheduled_prob_end to a small positive value (e.g. 0.01) or use another scheduled_shape."
            )
        for name in ("scheduled_prob_start", "scheduled_prob_end"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"{name} must lie in [0, 1], got {getattr(self, name)}.")
        if self.scheduled_decay_steps < 0 or self.scheduled_warmup_steps < 0:
            raise ValueError("scheduled_decay_steps and scheduled_warmup_steps must be >= 0.")
        if self.prophet_input not in ("latents", "motion"):
            raise ValueError(f"prophet_input '{self.prophet_input}' is not one of ('latents', 'motion').")
        if self.prophet_input == "motion" and not self.standardise_targets:
            raise ValueError(
                "prophet_input='motion' reads frame changes standardised with the latent cache's statistics: "
                "set --policy.standardise_targets=true as well."
            )
        if self.prophet_input == "motion" and self.history_frames < 2:
            raise ValueError(
                f"prophet_input='motion' reads the changes between history frames: set --policy.history_frames "
                f">= 2 (got {self.history_frames})."
            )
        if self.world_loss_type not in WORLD_LOSS_TYPES:
            raise ValueError(f"world_loss_type '{self.world_loss_type}' is not one of {WORLD_LOSS_TYPES}.")
        if self.fusion_memory_norm not in MEMORY_NORMS:
            raise ValueError(f"fusion_memory_norm '{self.fusion_memory_norm}' is not one of {MEMORY_NORMS}.")
        if not self.gate_lr_mult > 0:
            raise ValueError(f"gate_lr_mult must be > 0, got {self.gate_lr_mult}.")

    def resolve_world_target(self) -> None:
        """Fold the old `delta_prediction` flag into `world_target` and keep the two in sync.

        `delta_prediction=True` (an older config or checkpoint) means world_target="delta"; a config
        that sets world_target="delta" saves delta_prediction=True too, so older readers agree.
        """
        if self.world_target not in WORLD_TARGETS:
            raise ValueError(f"world_target '{self.world_target}' is not one of {WORLD_TARGETS}.")
        if self.delta_prediction:
            self.world_target = "delta"
        self.delta_prediction = self.world_target == "delta"


@dataclass
class DynamicsOptions:
    """Action-conditioned world model, progress head and rollout planner (see `world/dynamics.py`,
    `world/planner.py`). A mixin like `WorldMemoryOptions`; the action path never reads these modules,
    so with `planner="none"` the actions are those of the same policy without them."""

    # World model: "none", or "action_conditioned" (f(z history, action chunk) -> K future frames, own loss).
    dynamics: str = "none"
    # Weight of the dynamics loss (same targets, mask and loss type as the world loss).
    lambda_dynamics: float = 1.0
    # Train a progress head (remaining fraction of the episode from a latent): the planner's score without a goal.
    progress_head: bool = False
    # Weight of the progress head's loss.
    lambda_progress: float = 0.1
    # Train an outcome critic (the dataset chunk's imagined outcome vs its perturbations'): the planner's score.
    plan_critic: bool = False
    # Weight of the critic's loss.
    lambda_critic: float = 0.1
    # Perturbations of the dataset's chunk per training frame, the critic's negatives (at planner_noise).
    critic_negatives: int = 7
    # What the critic reads besides the current latent: "imagined", "actions" (a control), "both"; "<x>_projected".
    critic_input: str = "imagined"
    # Train a reward head (the step's reward from a latent, from the dataset's next.reward): a planner score.
    reward_head: bool = False
    # Weight of the reward head's loss.
    lambda_reward: float = 0.1
    # Rewards are divided by this before the reward head's loss (MetaWorld's dense reward lies in [0, 10]).
    reward_scale: float = 10.0
    # Planner score: "auto" (goal image, else critic, else reward, else progress), or one of them by name.
    planner_score: str = "auto"
    # Action loss on failed episodes too; false = imitate successes only (failures still train the world model).
    imitate_failures: bool = True
    # Planner at rollout: "none", "rerank" (best of N perturbations of the policy's chunk) or "cem".
    planner: str = "none"
    # Planner: candidate chunks per round (the policy's own chunk is one of them).
    planner_samples: int = 16
    # Planner: CEM rounds.
    planner_iterations: int = 3
    # Planner: fraction of CEM candidates kept as elites.
    planner_elite_frac: float = 0.25
    # Planner: std of the perturbations, in normalised action units.
    planner_noise: float = 0.3
    # Planner: predicted frame (1..future_frames) whose imagined latent is scored; 0 = the last.
    planner_horizon: int = 0
    # Planner: seed of its noise, re-seeded at every reset() so a rollout is reproducible.
    planner_seed: int = 0

    def validate_dynamics(self) -> None:
        """Raise ValueError, naming the flag to fix, for dynamics / planner settings that cannot work."""
        if self.dynamics not in DYNAMICS:
            raise ValueError(f"dynamics '{self.dynamics}' is not one of {DYNAMICS}.")
        if self.planner not in PLANNERS:
            raise ValueError(f"planner '{self.planner}' is not one of {PLANNERS}.")
        on = self.dynamics != "none"
        if on and self.future_frames < 1:
            raise ValueError(
                f"dynamics='{self.dynamics}' predicts the future frames: set --policy.future_frames >= 1."
            )
        if on and self.future_frames * self.future_stride > self.chunk_size:
            raise ValueError(
                f"The dynamics read the actions up to the last predicted frame, future_frames x future_stride = "
                f"{self.future_frames * self.future_stride}, but a chunk holds {self.chunk_size}: lower "
                "--policy.future_frames / --policy.future_stride or raise --policy.chunk_size."
            )
        if self.progress_head and not on:
            raise ValueError(
                "progress_head=True scores the dynamics' imagined latents: set --policy.dynamics=action_conditioned."
            )
        if self.plan_critic and not on:
            raise ValueError(
                "plan_critic=True judges the dynamics' imagined outcomes: set --policy.dynamics=action_conditioned."
            )
        if self.reward_head and not on:
            raise ValueError(
                "reward_head=True scores the dynamics' imagined latents: set --policy.dynamics=action_conditioned."
            )
        if not self.reward_scale > 0.0:
            raise ValueError(f"reward_scale must be > 0, got {self.reward_scale}.")
        if self.planner_score not in PLANNER_SCORES:
            raise ValueError(f"planner_score '{self.planner_score}' is not one of {PLANNER_SCORES}.")
        head = {"critic": ("plan_critic", self.plan_critic), "reward": ("reward_head", self.reward_head),
                "progress": ("progress_head", self.progress_head)}.get(self.planner_score)  # fmt: skip
        if head is not None and not head[1]:
            raise ValueError(
                f"planner_score='{self.planner_score}' needs the head trained with --policy.{head[0]}=true."
            )
        if self.critic_input not in CRITIC_INPUTS:
            raise ValueError(f"critic_input '{self.critic_input}' is not one of {CRITIC_INPUTS}.")
        if self.critic_negatives < 1:
            raise ValueError(f"critic_negatives must be >= 1 (perturbed chunks per frame), got {self.critic_negatives}.")
        if self.plan_critic and not self.planner_noise > 0.0:
            raise ValueError(f"plan_critic=True perturbs chunks at planner_noise, which must be > 0, got {self.planner_noise}.")
        if self.planner != "none":
            if not on:
                raise ValueError(
                    f"planner='{self.planner}' rolls candidate chunks through the world model: set "
                    "--policy.dynamics=action_conditioned (and train with it)."
                )
            self.planner_settings().validate()
            if not 0 <= self.planner_horizon <= self.future_frames:
                raise ValueError(
                    f"planner_horizon must lie in [0, future_frames={self.future_frames}], got {self.planner_horizon}."
                )
        for name in ("lambda_dynamics", "lambda_progress", "lambda_critic", "lambda_reward"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}.")

    def planner_settings(self) -> PlannerSettings:
        """The planner's knobs as `world.planner.PlannerSettings`."""
        return PlannerSettings(
            self.planner, self.planner_samples, self.planner_iterations, self.planner_elite_frac, self.planner_noise
        )
