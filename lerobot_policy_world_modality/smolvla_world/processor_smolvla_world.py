"""Pre- and post-processing pipelines of `smolvla_world`: SmolVLA's steps plus the world-latent step."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from lerobot.configs.types import PipelineFeatureType, PolicyFeature
from lerobot.processor import (
    ComplementaryDataProcessorStep,
    PolicyAction,
    PolicyProcessorPipeline,
    ProcessorStepRegistry,
    TokenizerProcessorStep,
)

from ..pipelines import make_world_policy_pipelines
from .configuration_smolvla_world import SmolVLAWorldConfig


@ProcessorStepRegistry.register(name="smolvla_world_instruction")
@dataclass
class InstructionStep(ComplementaryDataProcessorStep):
    """Checks the instruction (`task`) of every sample and ends it with a newline, as SmolVLA's prompt expects.

    A missing or blank instruction is an error: SmolVLA conditions on it, and a blank prompt trains
    (or runs) a VLA that ignores the task without any sign of it. The instruction is read from `task`
    because that is the only text key LeRobot 0.4.4 carries from a batch into a processor pipeline
    (datasets store it there and `lerobot-eval` environments fill it).
    """

    def complementary_data(self, complementary_data):
        """The complementary data with the instruction(s) under `task` checked and newline-terminated."""
        task = (complementary_data or {}).get("task")
        texts = [task] if isinstance(task, str) else task
        if not isinstance(texts, (list, tuple)) or not all(isinstance(t, str) for t in texts):
            raise ValueError(
                f"smolvla_world needs the instruction under 'task' (a string per sample), got "
                f"{type(task).__name__}. Use a dataset with a task description for every episode, or an "
                "environment that provides one (LIBERO and MetaWorld do)."
            )
        empty = [i for i, t in enumerate(texts) if not t.strip()]
        if empty:
            raise ValueError(
                f"Empty instruction under 'task' for batch sample(s) {empty[:8]}. SmolVLA would read a blank "
                "prompt. Fill the dataset's task for every episode (or evaluate on an env with task "
                "descriptions)."
            )
        texts = [t if t.endswith("\n") else f"{t}\n" for t in texts]
        return {**complementary_data, "task": texts[0] if isinstance(task, str) else texts}

    def transform_features(
        self, features: dict[PipelineFeatureType, dict[str, PolicyFeature]]
    ) -> dict[PipelineFeatureType, dict[str, PolicyFeature]]:
        """Features are unchanged (the instruction is complementary data)."""
        return features


def make_smolvla_world_pre_post_processors(
    config: SmolVLAWorldConfig,
    dataset_stats: dict[str, dict[str, torch.Tensor]] | None = None,
) -> tuple[
    PolicyProcessorPipeline[dict[str, Any], dict[str, Any]],
    PolicyProcessorPipeline[PolicyAction, PolicyAction],
]:
    """SmolVLA's pipelines (rename, batch, instruction + tokenizer, device, normalise / unnormalise, to CPU)
    with the instruction checked and the world-latent step after device placement.

    Images are resized with padding inside the model, exactly as in SmolVLA.
    """
    instruction = [
        InstructionStep(),
        TokenizerProcessorStep(
            tokenizer_name=config.vlm_model_name,
            padding=config.pad_language_to,
            padding_side="right",
            max_length=config.tokenizer_max_length,
            task_key="task",
        ),
    ]
    return make_world_policy_pipelines(config, dataset_stats, batch_steps=instruction)
