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
