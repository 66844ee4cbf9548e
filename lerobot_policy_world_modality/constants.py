"""Batch keys and registry names shared by the world-latent step and every policy type."""

# Keys the world-latent processor step adds to the observation part of a batch.
OBS_WORLD_LATENT = "observation.world.latent"  # [B, D] latent of the current frame z_t
OBS_WORLD_HISTORY = "observation.world.history"  # [B, T, D] z_{t-T+1..t}, repeat-padded at episode start
OBS_WORLD_FUTURE = "observation.world.future"  # [B, K, D] z_{t+1..t+K}, clamped to the episode's last frame
OBS_WORLD_FUTURE_VALID = "observation.world.future_valid"  # [B, K] bool, False where t+k is past the episode end
OBS_WORLD_REMAINING = "observation.world.remaining"  # [B] fraction of the episode still to go (1 first, 0 last frame)
OBS_WORLD_GOAL = "observation.world.goal"  # [B, D] latent of the goal images, when the observation carries them

# Per-frame dataset column saying whether the frame's episode succeeded (recordings that keep failures).
EPISODE_SUCCESS = "episode_success"
# Per-frame dataset column with the reward of the step the frame's action starts (LeRobot's reward key).
NEXT_REWARD = "next.reward"


def goal_image_key(camera: str) -> str:
    """Observation key of the goal image for world camera `camera`: "observation.image" ->
    "observation.goal.image", "observation.images.top" -> "observation.goal.images.top"."""
    return "observation.goal." + camera.removeprefix("observation.")

# Name under which the world-latent step is registered in LeRobot's ProcessorStepRegistry.
WORLD_LATENT_STEP_NAME = "world_modality_latents"

# Environment variable that overrides the default latent cache root.
CACHE_ENV_VAR = "LEROBOT_WM_CACHE"
