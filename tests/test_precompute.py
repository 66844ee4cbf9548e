"""lerobot-wm-precompute end to end: console script, online == cached, kill/resume, shard split, bad input."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from lerobot.datasets.lerobot_dataset import LeRobotDataset
from support.datasets import make_synthetic_dataset

from lerobot_policy_world_modality.latents import precompute as engine
from lerobot_policy_world_modality.latents.cache import (
    DatasetIdentity,
    EpisodeBounds,
    LatentCache,
    LatentCacheError,
    cache_dir_for,
)
from lerobot_policy_world_modality.latents.encoder_base import WorldEncoder
from lerobot_policy_world_modality.latents.encoders import load_encoder
from lerobot_policy_world_modality.tools import precompute

CAMERAS = ("observation.image", "observation.wrist")
SCRIPT = str(Path(sys.executable).parent / "lerobot-wm-precompute")


@pytest.fixture(scope="module")
def video_root(tmp_path_factory):
    """A real two-camera video dataset with episodes of lengths 5, 1, 8."""
    root = tmp_path_factory.mktemp("ds") / "video"
    make_synthetic_dataset(root, cameras=CAMERAS)
    return root


def _args(root, cache_root, *extra) -> list[str]:
    return ["--dataset.repo_id=local/synthetic", f"--dataset.root={root}", f"--cache_root={cache_root}", *extra]


def _run_script(args: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run([SCRIPT, *args], capture_output=True, text=True, timeout=300)


def _dir_bytes(directory: Path) -> dict[str, bytes]:
    """Every file of a cache directory (hidden temp files included) with its bytes."""
    return {p.name: p.read_bytes() for p in sorted(directory.iterdir())}


def _assert_cache_equals_online(root, cache_root, camera, encoder_name="pixels"):
    """Row i of the cache equals encoding LeRobotDataset[i][camera] online (max abs diff <= 1e-5)."""
    encoder = load_encoder(encoder_name)
    dataset = LeRobotDataset("local/synthetic", root=root, video_backend="pyav")
    cache = LatentCache.open(cache_root, DatasetIdentity.from_meta(dataset.meta), camera, encoder.identity)
    online = torch.cat([encoder.encode(dataset[i][camera][None]) for i in range(len(dataset))])
    assert cache.latents.shape == online.shape
    assert (cache.latents - online).abs().max().item() <= 1e-5
    assert torch.unique(cache.latents, dim=0).shape[0] == len(dataset)  # frames differ: the check has teeth


def test_console_script_two_cameras_equal_online_encoding(video_root, tmp_path):
    """The installed script builds one cache per camera, prints where, and rows equal online encodings."""
    cache_root = tmp_path / "cache"
    # Batches of 3 inside shards of 4: batches and shards both cross episode boundaries.
    proc = _run_script(_args(video_root, cache_root, f"--camera={','.join(CAMERAS)}", "--shard_frames=4", "--batch_size=3"))
    assert proc.returncode == 0, proc.stderr
    dataset = DatasetIdentity.from_dataset("local/synthetic", video_root)
    identity = load_encoder("pixels").identity
    for camera in CAMERAS:
        assert str(cache_dir_for(cache_root, dataset, camera, identity)) in proc.stdout
        _assert_cache_equals_online(video_root, cache_root, camera)
    assert "lerobot-train --policy.encoder=pixels --policy.world_cameras='[observation.image,observation.wrist]'" in proc.stdout
    # The two cameras' latents differ (different square colours).
    a = LatentCache.open(cache_root, dataset, CAMERAS[0], identity).latents
    b = LatentCache.open(cache_root, dataset, CAMERAS[1], identity).latents
    assert not torch.allclose(a, b)


def test_image_dataset_equals_online_encoding(tmp_path):
    """Datasets storing images (not videos) are read from their image column, equal to __getitem__."""
    root = tmp_path / "images"
    make_synthetic_dataset(root, episode_lengths=(3, 1, 2), use_videos=False)
    cache_root = tmp_path / "cache"
    assert precompute.main(_args(root, cache_root, "--no_progress", "--batch_size=4")) == 0
    _assert_cache_equals_online(root, cache_root, "observation.image")


def test_video_windows_repeat_padded_at_episode_start(video_root):
    """For window m > 1 the loader gives frames t-m+1..t clamped to the episode start, as decoded by LeRobot."""
    dataset = LeRobotDataset("local/synthetic", root=video_root, video_backend="pyav")
    bounds = EpisodeBounds.from_identity(DatasetIdentity.from_meta(dataset.meta))
    loader = engine.BatchLoader(engine.FrameSource(dataset, CAMERAS[0], "pyav"), bounds, window=3)
    windows = loader.load(3, 8)  # frames 3..7: crosses the length-1 episode [5, 6) and the start of [6, 14)
    assert windows.shape == (5, 3, 3, 48, 48)
    expected_indices = [[1, 2, 3], [2, 3, 4], [5, 5, 5], [6, 6, 6], [6, 6, 7]]
    for row, indices in zip(windows, expected_indices):
        expected = torch.stack([dataset[i][CAMERAS[0]] for i in indices])
        assert torch.equal(row, expected)


def test_sigkill_then_rerun_is_byte_identical(video_root, tmp_path):
    """SIGKILL after the first shard lands, rerun: the cache dir equals an uninterrupted run's, byte for byte."""
    ref_root, killed_root = tmp_path / "ref", tmp_path / "killed"
    common = ("--shard_frames=1", "--batch_size=1", "--num_workers=1", "--no_progress")
    assert precompute.main(_args(video_root, ref_root, *common)) == 0
    proc = subprocess.Popen([SCRIPT, *_args(video_root, killed_root, *common)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 240
    first_shard = None
    while time.time() < deadline and proc.poll() is None:
        first_shard = next(killed_root.glob("*/*/*/shard-*.npy"), None)
        if first_shard is not None:
            os.kill(proc.pid, signal.SIGKILL)
            break
        time.sleep(0.002)
    proc.wait()
    assert first_shard is not None and proc.returncode == -signal.SIGKILL, "precompute ended before it could be killed"
    cache_dir = first_shard.parent
    assert len(list(cache_dir.glob("shard-*.npy"))) < 14  # really interrupted
    with pytest.raises(LatentCacheError, match="Unfinished"):
        identity = load_encoder("pixels").identity
        LatentCache.open(killed_root, DatasetIdentity.from_dataset("local/synthetic", video_root), CAMERAS[0], identity)
    # Resume in-process (same code as the script; spares a second ~10 s interpreter start-up).
    assert precompute.main(_args(video_root, killed_root, *common)) == 0
    dataset = DatasetIdentity.from_dataset("local/synthetic", video_root)
    ref_dir = cache_dir_for(ref_root, dataset, CAMERAS[0], load_encoder("pixels").identity)
    assert cache_dir == cache_dir_for(killed_root, dataset, CAMERAS[0], load_encoder("pixels").identity)
    assert _dir_bytes(cache_dir) == _dir_bytes(ref_dir)


def test_num_shards_split_gives_same_bytes(video_root, tmp_path):
    """Two --shard_index processes fill one cache; the last marks it complete; bytes equal one process."""
    ref_root, split_root = tmp_path / "ref", tmp_path / "split"
    common = ("--shard_frames=3", "--no_progress")
    assert precompute.main(_args(video_root, ref_root, *common)) == 0
    dataset = DatasetIdentity.from_dataset("local/synthetic", video_root)
    identity = load_encoder("pixels").identity
    assert precompute.main(_args(video_root, split_root, *common, "--num_shards=2", "--shard_index=1")) == 0
    with pytest.raises(LatentCacheError, match="Unfinished"):
        LatentCache.open(split_root, dataset, CAMERAS[0], identity)
    assert precompute.main(_args(video_root, split_root, *common, "--num_shards=2", "--shard_index=0")) == 0
    LatentCache.open(split_root, dataset, CAMERAS[0], identity)
    ref_dir = cache_dir_for(ref_root, dataset, CAMERAS[0], identity)
    split_dir = cache_dir_for(split_root, dataset, CAMERAS[0], identity)
    assert _dir_bytes(split_dir) == _dir_bytes(ref_dir)


def test_unknown_camera_lists_available_keys(video_root, tmp_path):
    """An unknown --camera fails before any work and lists the dataset's camera keys."""
    with pytest.raises(SystemExit) as info:
        precompute.main(_args(video_root, tmp_path / "c", "--camera=observation.images.top"))
    msg = str(info.value)
    assert "observation.images.top" in msg and "observation.image" in msg and "observation.wrist" in msg
    assert not (tmp_path / "c").exists()


def test_dataset_without_camera_is_refused_with_the_reason(tmp_path):
    root = tmp_path / "no_camera"
    make_synthetic_dataset(root, episode_lengths=(3,), cameras=())
    with pytest.raises(SystemExit, match=r"has no camera .* computed from camera frames"):
        precompute.main(_args(root, tmp_path / "c"))
    assert not (tmp_path / "c").exists()


class _NaNOnSecondFrame(WorldEncoder):
    """Test encoder: the pixel thumbnail, but NaN for the second frame of every batch."""

    def __init__(self):
        base = load_encoder("pixels")
        super().__init__(base.identity)
        self.base = base

    def _forward(self, pixels):
        z = self.base._forward(pixels).clone()
        if z.shape[0] > 1:
            z[1] = float("nan")
        return z


def test_nan_latents_are_rejected_before_writing(video_root, tmp_path):
    """NaN encoder output names the frames and leaves no shard behind."""
    dataset = LeRobotDataset("local/synthetic", root=video_root, video_backend="pyav")
    with pytest.raises(LatentCacheError, match=r"NaN/Inf latents for frames \[1\]"):
        engine.precompute_camera(dataset, CAMERAS[0], _NaNOnSecondFrame(), tmp_path / "c", progress=False)
    assert not list((tmp_path / "c").glob("*/*/*/shard-*.npy"))
