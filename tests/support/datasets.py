"""Small, real LeRobotDatasets written to disk for tests and benchmarks.

`make_synthetic_dataset` records a dataset through LeRobot's own writer (`LeRobotDataset.create`,
`add_frame`, `save_episode`, `finalize`), so everything that reads it (the precompute command, the
processor step, `lerobot-train`) goes through the same code paths as with a recorded dataset.
Each frame shows a coloured square that moves with the frame index on a background whose tint
depends on the episode, so every frame (and so every world latent) differs from every other.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np


def synthetic_frame(episode: int, frame: int, camera: int, hw: tuple[int, int], seed: int = 0) -> np.ndarray:
    """The deterministic HxWx3 uint8 image of (`episode`, `frame`, `camera`).

    A 1/4-size square moves diagonally by a few pixels per frame; its colour depends on the camera
    and the background on the episode, so frames are distinct across time, episodes and cameras.
    Flat colour areas keep video compression artefacts small.
    """
    h, w = hw
    rng = np.random.default_rng(seed * 1000 + episode)
    background = rng.integers(20, 110, size=3, dtype=np.uint8)
    img = np.empty((h, w, 3), dtype=np.uint8)
    img[:] = background
    side = max(4, min(h, w) // 4)
    step = max(1, min(h, w) // 12)
    y = (frame * step) % max(1, h - side)
    x = (frame * step * 2 + episode * 3) % max(1, w - side)
    colours = ((230, 40, 40), (40, 230, 40), (40, 40, 230), (230, 230, 40))
    img[y : y + side, x : x + side] = colours[camera % len(colours)]
    return img


def make_synthetic_dataset(
    root: str | Path,
    repo_id: str = "local/synthetic",
    episode_lengths: tuple[int, ...] = (5, 1, 8),
    cameras: tuple[str, ...] = ("observation.image",),
    image_hw: tuple[int, int] = (48, 48),
    state_dim: int = 4,
    action_dim: int = 4,
    fps: int = 10,
    use_videos: bool = True,
    seed: int = 0,
    task: str = "move the square",
    episode_success: tuple[float, ...] | None = None,
):
    """Write a real LeRobotDataset at `root` (which must not exist yet) and return it, finalized.

    `episode_lengths` sets the number of episodes and their lengths (the default includes a length-1
    episode, a classic boundary case). Cameras are stored as AV1 video when `use_videos` is True,
    else as PNG images in the parquet files. `observation.state` / `action` are smooth
    deterministic ramps and every frame carries the `task` string. Reopen it for reading with
    `LeRobotDataset(repo_id, root=root, video_backend="pyav")`. `episode_success` (one mark per episode)
    adds the per-frame `episode_success` column that recordings keeping failures write.
    """
    from lerobot.datasets.lerobot_dataset import LeRobotDataset

    h, w = image_hw
    features: dict = {
        "observation.state": {"dtype": "float32", "shape": (state_dim,), "names": None},
        "action": {"dtype": "float32", "shape": (action_dim,), "names": None},
    }
    if episode_success is not None:
        features["episode_success"] = {"dtype": "float32", "shape": (1,), "names": None}
    for cam in cameras:
        features[cam] = {
            "dtype": "video" if use_videos else "image",
            "shape": (h, w, 3),
            "names": ["height", "width", "channels"],
        }
    dataset = LeRobotDataset.create(
        repo_id=repo_id,
        fps=fps,
        features=features,
        root=root,
        use_videos=use_videos,
        # pyav: torchcodec cannot load here (no FFmpeg shared libraries on the machine).
        video_backend="pyav",
    )
    global_index = 0
    for episode, length in enumerate(episode_lengths):
        for frame in range(length):
            item = {
                "observation.state": np.full(state_dim, 0.01 * global_index, dtype=np.float32)
                + np.arange(state_dim, dtype=np.float32),
                "action": np.full(action_dim, 0.1 * np.sin(global_index), dtype=np.float32),
                "task": task,
            }
            if episode_success is not None:
                item["episode_success"] = np.array([episode_success[episode]], dtype=np.float32)
            for c, cam in enumerate(cameras):
                item[cam] = synthetic_frame(episode, frame, c, image_hw, seed)
            dataset.add_frame(item)
            global_index += 1
        dataset.save_episode()
    dataset.finalize()
    return dataset
