"""Batch keys and registry names shared by the world-latent step and every policy type."""

# Keys the world-latent processor step adds to the observation part of a batch.
OBS_WORLD_LATENT = "observation.world.latent"  # [B, D] latent of the current frame z_t
OBS_WORLD_HISTORY = "observation.world.history"  # [B, T, D] z_{t-T+1..t}, repeat-padded at episode start
OBS_WORLD_FUTURE = "observation.world.future"  # [B, K, D] z_{t+1..t+K}, clamped to the episode's last frame
OBS_WORLD_FUTURE_VALID = "observation.world.future_valid"  # [B, K] bool, False where t+k is past the episode end

# Name under which the world-latent step is registered in LeRobot's ProcessorStepRegistry.
WORLD_LATENT_STEP_NAME = "world_modality_latents"

# Environment variable that overrides the default latent cache root.
CACHE_ENV_VAR = "LEROBOT_WM_CACHE"
