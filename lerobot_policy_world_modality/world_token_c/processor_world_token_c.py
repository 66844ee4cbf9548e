"""Pre- and post-processing pipelines of the `world_token_c` policy, found by LeRobot's naming convention.

The same pipelines as `world_f` (rename, batch, device, world-latent step, normalise; then unnormalise,
to CPU): tokenisation happens inside the policy, so one world-latent step feeds the cached latents in
training and the online latents at evaluation.
"""

from __future__ import annotations

from ..pipelines import make_world_policy_pipelines
from .configuration_world_token_c import WorldTokenCConfig


def make_world_token_c_pre_post_processors(config: WorldTokenCConfig, dataset_stats=None):
    """The world-policy pipelines for a `world_token_c` config (see the module docstring)."""
    return make_world_policy_pipelines(config, dataset_stats)
