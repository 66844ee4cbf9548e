"""Pre- and post-processing pipelines of the `world_f` policy, found by LeRobot's naming convention."""

from __future__ import annotations

from ..pipelines import make_world_policy_pipelines
from .configuration_world_f import WorldFConfig


def make_world_f_pre_post_processors(config: WorldFConfig, dataset_stats=None):
    """Preprocessor: rename, batch, device, world latents, normalise; postprocessor: unnormalise, to CPU."""
    return make_world_policy_pipelines(config, dataset_stats)
