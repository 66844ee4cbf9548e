"""Shared command-line pieces for tests that run the stock LeRobot entry points in subprocesses."""

import sys
from pathlib import Path

# Directory of the installed console scripts (lerobot-train, lerobot-eval, lerobot-wm-*).
BIN = Path(sys.executable).parent

# lerobot-train flags that shrink world_f so a few CPU training steps take seconds.
TINY_WORLD_F = [
    "--policy.width=32",
    "--policy.depth=1",
    "--policy.heads=2",
    "--policy.fusion_heads=2",
    "--policy.prophet_width=32",
    "--policy.prophet_depth=1",
    "--policy.prophet_heads=2",
    "--policy.chunk_size=4",
    "--policy.n_action_steps=2",
    "--policy.history_frames=3",
    "--policy.future_frames=2",
]

# lerobot-train flags that shrink world_token_c so a few CPU training steps take seconds.
TINY_WORLD_TOKEN_C = [
    "--policy.width=32",
    "--policy.depth=1",
    "--policy.heads=2",
    "--policy.chunk_size=4",
    "--policy.n_action_steps=2",
    "--policy.future_frames=2",
]


def short_train_flags(out, steps: int, batch_size: int = 4, log_freq: int = 2) -> list[str]:
    """lerobot-train flags of a short CPU run that saves its last step (policy and dataset flags apart)."""
    return [
        "--policy.device=cpu",
        "--policy.push_to_hub=false",
        "--dataset.video_backend=pyav",
        f"--batch_size={batch_size}",
        f"--steps={steps}",
        f"--save_freq={steps}",
        f"--log_freq={log_freq}",
        "--num_workers=0",
        "--eval_freq=0",
        "--wandb.enable=false",
        f"--output_dir={out}",
    ]


def capped_eval_cmd(ckpt, out, task: str = "button-press-v3", episode_length: int = 20, episodes: int = 1) -> list[str]:
    """Stock lerobot-eval of `episodes` MetaWorld episodes of `episode_length` steps (see `lerobot_eval_capped`)."""
    launcher = "from lerobot_policy_world_modality.tools.demo import lerobot_eval_capped as m; m()"
    return [
        sys.executable, "-c", launcher, f"--policy.path={ckpt}", "--policy.device=cpu", "--env.type=metaworld",
        f"--env.task={task}", f"--env.episode_length={episode_length}", f"--eval.n_episodes={episodes}",
        "--eval.batch_size=1", f"--output_dir={out}",
    ]  # fmt: skip


def replay_with_planner(ckpt, task: str, seed: int, executed, **planner) -> None:
    """Assert that a checkpoint planning under `planner` config overrides (e.g. planner="rerank") acts as
    `executed` (the env actions a lerobot-wm-plan-check episode on `task` and env `seed` recorded), step
    by step from the same start in the real MetaWorld env."""
    import numpy as np
    from lerobot.envs.metaworld import MetaworldEnv

    from lerobot_policy_world_modality.tools.record_metaworld import CheckpointActor

    actor = CheckpointActor(str(ckpt))
    for key, value in planner.items():
        setattr(actor.policy.config, key, value)
    env = MetaworldEnv(task=task, obs_type="pixels_agent_pos")
    np.random.seed(seed)  # the check's episode start (MetaWorld draws it from NumPy's global generator)
    raw, _ = env._env.reset()
    actor.reset()
    try:
        for want in executed:
            action = actor.act(env._format_raw_obs(raw), env.task_description)
            np.testing.assert_allclose(action, want, atol=1e-5)
            raw, *_ = env._env.step(action.astype(np.float32))
    finally:
        env.close()
