"""What the compact trunk policies (`world_f`, `world_token_c`) share: config fields and policy plumbing.

Both run `world/trunk.py`'s `ActionTrunk` over world-latent, state and (optional) instruction tokens
and predict an action chunk like ACT. `TrunkPolicyOptions` holds their common config fields and the
LeRobot config methods; `TrunkWorldPolicy` binds the training dataset's world latents, the optional
frozen text encoder and the optimiser groups, once for both.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

import torch
from lerobot.configs.policies import PreTrainedConfig
from lerobot.configs.types import NormalizationMode
from lerobot.optim.optimizers import AdamWConfig
from lerobot.policies.pretrained import PreTrainedPolicy
from torch import Tensor

from .checkpoints import StrictCheckpointLoading
from .language import FrozenTextEncoder, bind_language_encoder, instructions_from_batch
from .latents.binding import bind_latent_input_stats, bind_policy_world_latents, bind_world_target_stats
from .latents.processor import reset_online_state
from .model_card import ModelCardMixin, record_training_provenance
from .world.fusion import fusion_gates
from .world.trunk import LATENT_INPUT_NORMS


@dataclass
class TrunkPolicyOptions:
    """Mixin dataclass: action chunking, trunk size, action loss and optimiser of a trunk policy."""

    # Action chunk length H predicted per inference (one action-query token per step).
    chunk_size: int = 20
    # Actions of each chunk executed before the next inference (<= chunk_size).
    n_action_steps: int = 10

    normalization_mapping: dict[str, NormalizationMode] = field(
        default_factory=lambda: {
            "VISUAL": NormalizationMode.IDENTITY,  # images only feed the frozen world encoder
            "STATE": NormalizationMode.MEAN_STD,
            "ACTION": NormalizationMode.MEAN_STD,
        }
    )

    # Trunk: model width.
    width: int = 256
    # Trunk: number of transformer blocks.
    depth: int = 4
    # Trunk: attention heads (width must be divisible by it).
    heads: int = 8
    # Trunk: hidden size of the MLPs; None = 4 x width.
    ffn_dim: int | None = None
    # Dropout in the trunk and the world modules.
    dropout: float = 0.1
    # Action loss: "l1" or "mse", averaged over non-padded steps.
    action_loss: str = "l1"
    # Trunk's world-latent input: "layer" (LayerNorm each latent) or "dataset" (standardise each dim, cache stats).
    latent_input_norm: str = "layer"

    # AdamW learning rate (constant: no schedule).
    optimizer_lr: float = 1e-4
    # AdamW weight decay (not applied to biases, norms, gates).
    optimizer_weight_decay: float = 1e-4
    # Gradient-norm clipping.
    optimizer_grad_clip_norm: float = 10.0

    def variant_preset(self, variants: dict):
        """The preset that `self.variant` names in `variants`, or None when no variant is set."""
        if self.variant is None:
            return None
        if self.variant not in variants:
            raise ValueError(
                f"Unknown variant '{self.variant}'; use one of {sorted(variants)} or leave it unset."
            )
        return variants[self.variant]

    def validate_trunk(self) -> None:
        """Raise ValueError, naming the flag to fix, for inconsistent chunking / trunk settings."""
        if self.n_action_steps > self.chunk_size:
            raise ValueError(
                f"n_action_steps ({self.n_action_steps}) cannot exceed chunk_size ({self.chunk_size}): "
                "set --policy.n_action_steps <= --policy.chunk_size."
            )
        if self.n_obs_steps != 1:
            raise ValueError(
                f"{self.type} reads one observation step (its history comes from the world latents): "
                "set n_obs_steps=1."
            )
        if self.action_loss not in ("l1", "mse"):
            raise ValueError(f"action_loss must be 'l1' or 'mse', got '{self.action_loss}'.")
        if self.latent_input_norm not in LATENT_INPUT_NORMS:
            raise ValueError(
                f"latent_input_norm must be one of {LATENT_INPUT_NORMS}, got '{self.latent_input_norm}': set "
                "--policy.latent_input_norm=layer (the default) or =dataset."
            )
        if self.width % self.heads:
            raise ValueError(f"width ({self.width}) must be divisible by heads ({self.heads}).")
        if self.language_max_length < 1:
            raise ValueError(f"language_max_length must be >= 1, got {self.language_max_length}.")

    def get_optimizer_preset(self) -> AdamWConfig:
        """AdamW with this config's learning rate, weight decay and clipping."""
        return AdamWConfig(
            lr=self.optimizer_lr,
            weight_decay=self.optimizer_weight_decay,
            grad_clip_norm=self.optimizer_grad_clip_norm,
        )

    def get_scheduler_preset(self) -> None:
        """No learning-rate schedule (constant), as in LeRobot's ACT."""
        return None

    def validate_features(self) -> None:
        """An action output is needed; the world latent comes from the processor step, not a feature."""
        if self.action_feature is None:
            raise ValueError(
                f"{self.type} needs an 'action' output feature: train on a dataset with an 'action' column."
            )

    @property
    def observation_delta_indices(self) -> None:
        """One observation frame: world histories and futures come from the latent cache, not decoded frames."""
        return None

    @property
    def action_delta_indices(self) -> list[int]:
        """The action chunk a_t .. a_{t+H-1}."""
        return list(range(self.chunk_size))

    @property
    def reward_delta_indices(self) -> None:
        """Rewards are not used."""
        return None


def fused_adamw_supported(params: list[Tensor]) -> bool:
    """Whether torch's fused AdamW kernel can update these parameters (CUDA; CPU from torch 2.4 on)."""
    devices = {"cuda"} | (
        {"cpu"} if tuple(int(x) for x in torch.__version__.split(".")[:2]) >= (2, 4) else set()
    )
    return bool(params) and all(p.device.type in devices and p.is_floating_point() for p in params)


def gate_param_group(gates: list[Tensor], lr: float, mult: float) -> dict:
    """The optimiser group of the cross-attention gates: learning rate lr x mult, no weight decay.

    An explicit `lr` in a group wins over the optimiser's default in torch, and LeRobot's schedulers
    scale each group's own initial lr, so the ratio holds through warm-up and decay.
    """
    return {"params": gates, "lr": lr * mult, "weight_decay": 0.0}


def ensure_eval(policy: torch.nn.Module) -> None:
    """Put a policy in eval mode for inference; free when it already is.

    `nn.Module.eval()` walks every submodule (more of them for a VLM), and select_action runs at every
    environment step (its cost: docs/benchmarks.md).
    """
    if policy.training:
        policy.eval()


class TrunkWorldPolicy(ModelCardMixin, StrictCheckpointLoading, PreTrainedPolicy):
    """Base of the trunk policies: world-latent binding, optional instruction input, optimiser groups.

    Subclasses call `super().__init__(config, dataset_meta)` and then build their modules with
    `config.world_latent_dim`, `self.state_dim`, `self.action_dim` and `self.language_dim`.
    """

    # Placeholders that LeRobot requires of every policy class; each subclass sets its own.
    config_class = PreTrainedConfig
    name = "trunk_world_base"

    def __init__(self, config, dataset_meta=None):
        """Bind the training dataset (when `lerobot-train` gives `dataset_meta`) and the language input.

        Binding records the dataset in the config and fails fast when its latent cache is missing or
        stale; a policy rebuilt from a checkpoint needs neither the dataset nor the encoder.
        """
        super().__init__(config)
        config.validate_features()
        self.config = config
        bind_policy_world_latents(config, dataset_meta)
        if dataset_meta is not None:
            record_training_provenance(config)
        # Standardisation statistics of the world targets for the subclass's WorldPath (None when not
        # standardised or when rebuilt from a checkpoint, whose buffers carry them).
        self.world_target_stats = bind_world_target_stats(config, dataset_meta)
        # With latent_input_norm="dataset", the trunk's input statistics (None otherwise or when rebuilt).
        self.latent_input_stats = bind_latent_input_stats(config, dataset_meta)
        # Only the text encoder's identity is resolved here (cheap; it fills or checks the recorded
        # revision); the text model itself loads on first use and never enters the state dict.
        self.language_identity = bind_language_encoder(config)
        self._text_encoder: list[FrozenTextEncoder] = []  # a plain list: never a registered submodule
        state = config.robot_state_feature
        self.state_dim = state.shape[0] if state is not None else None
        self.action_dim = config.action_feature.shape[0]
        self.language_dim = self.language_identity.dim if self.language_identity else None
        self._action_queue: deque = deque([], maxlen=config.n_action_steps)

    def get_optim_params(self) -> list[dict]:
        """AdamW groups: matrices with weight decay; biases, norm scales and gates without it; and with
        `gate_lr_mult` != 1 the cross-attention gates in a third group of their own (learning rate
        optimizer_lr x gate_lr_mult, no weight decay).

        The groups ask for PyTorch's fused AdamW kernel where it exists for the parameters' device:
        LeRobot's AdamW preset otherwise updates one tensor at a time, which on a CPU made the
        optimiser step more than twice as slow (figures in docs/benchmarks.md).
        """
        decay, no_decay = [], []
        mult = getattr(self.config, "gate_lr_mult", 1.0)
        gates = [p for p in fusion_gates(self) if p.requires_grad] if mult != 1.0 else []
        gate_ids = {id(p) for p in gates}
        for name, p in self.named_parameters():
            if not p.requires_grad or id(p) in gate_ids:
                continue
            (no_decay if p.ndim < 2 or "gate" in name else decay).append(p)
        fused = {"fused": True} if fused_adamw_supported([*decay, *no_decay, *gates]) else {}
        groups = [{"params": decay, **fused}, {"params": no_decay, "weight_decay": 0.0, **fused}]
        if gates:
            groups.append(gate_param_group(gates, self.config.optimizer_lr, mult) | fused)
        return groups

    def reset(self):
        """Start a new episode: clear the action queue and the world step's online frame buffers."""
        self._action_queue = deque([], maxlen=self.config.n_action_steps)
        reset_online_state()

    @property
    def text_encoder(self) -> FrozenTextEncoder | None:
        """The frozen text encoder (loaded on first access), or None when the language input is off."""
        if self.language_identity is None:
            return None
        if not self._text_encoder:
            cfg = self.config
            self._text_encoder.append(
                FrozenTextEncoder(
                    cfg.language_encoder, cfg.language_encoder_revision, cfg.language_max_length
                )
            )
        return self._text_encoder[0]

    def _language(self, batch: dict, batch_size: int, device: torch.device) -> Tensor | None:
        """Instruction embeddings [B, L] on `device`, or None when the language input is off."""
        if self.language_identity is None:
            return None
        return self.text_encoder.encode(instructions_from_batch(batch, batch_size), device=device)
