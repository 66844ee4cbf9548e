"""The pre- and post-processing pipelines every world policy type builds, in one place.

Preprocessor: rename, add batch dimension, any policy-specific steps (e.g. SmolVLA's instruction
tokenizer), device placement, the world-latent step, normalisation. The world-latent step runs after
device placement so online encoding happens on the policy's device, and before normalisation, which
leaves latents untouched (they are not dataset features). Postprocessor: unnormalise actions, to CPU.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from lerobot.processor import (
    AddBatchDimensionProcessorStep,
    DeviceProcessorStep,
    NormalizerProcessorStep,
    PolicyAction,
    PolicyProcessorPipeline,
    ProcessorStep,
    RenameObservationsProcessorStep,
    UnnormalizerProcessorStep,
)
from lerobot.processor.converters import policy_action_to_transition, transition_to_policy_action
from lerobot.utils.constants import POLICY_POSTPROCESSOR_DEFAULT_NAME, POLICY_PREPROCESSOR_DEFAULT_NAME

from .latents.processor import make_world_latent_step


def make_world_policy_pipelines(
    config,
    dataset_stats: dict[str, dict[str, torch.Tensor]] | None = None,
    batch_steps: Sequence[ProcessorStep] = (),
) -> tuple[
    PolicyProcessorPipeline[dict[str, Any], dict[str, Any]],
    PolicyProcessorPipeline[PolicyAction, PolicyAction],
]:
    """(preprocessor, postprocessor) of a world policy; `batch_steps` run right after batching."""
    input_steps = [
        RenameObservationsProcessorStep(rename_map={}),
        AddBatchDimensionProcessorStep(),
        *batch_steps,
        DeviceProcessorStep(device=config.device),
        make_world_latent_step(config),
        NormalizerProcessorStep(
            features={**config.input_features, **config.output_features},
            norm_map=config.normalization_mapping,
            stats=dataset_stats,
            device=config.device,
        ),
    ]
    output_steps = [
        UnnormalizerProcessorStep(
            features=config.output_features, norm_map=config.normalization_mapping, stats=dataset_stats
        ),
        DeviceProcessorStep(device="cpu"),
    ]
    return (
        PolicyProcessorPipeline[dict[str, Any], dict[str, Any]](
            steps=input_steps, name=POLICY_PREPROCESSOR_DEFAULT_NAME
        ),
        PolicyProcessorPipeline[PolicyAction, PolicyAction](
            steps=output_steps,
            name=POLICY_POSTPROCESSOR_DEFAULT_NAME,
            to_transition=policy_action_to_transition,
            to_output=transition_to_policy_action,
        ),
    )
