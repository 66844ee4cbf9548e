"""Latent cache: episode-window lookups and every validation error, each fixed by the command it names."""

from __future__ import annotations

import json
import shlex

import numpy as np
import pytest
import torch
from support.datasets import make_synthetic_dataset

from lerobot_policy_world_modality.latents.cache import (
    DatasetIdentity,
    EpisodeBounds,
    LatentCache,
    LatentCacheError,
    cache_dir_for,
    default_cache_root,
    write_shard,
)
from lerobot_policy_world_modality.latents.encoders import load_encoder
from lerobot_policy_world_modality.tools import precompute

CAMERA = "observation.image"
# Episodes of lengths 5, 1, 8 -> global ranges [0, 5), [5, 6), [6, 14).
BOUNDS = EpisodeBounds([0, 5, 6], [5, 6, 14])


def test_history_windows_hand_computed():
    """History t-T+1..t is repeat-padded at each episode's first frame, never crossing into the previous one."""
    index = torch.tensor([0, 2, 4, 5, 6, 7, 13])
    got = BOUNDS.history_indices(index, 3)
    expected = [[0, 0, 0], [0, 1, 2], [2, 3, 4], [5, 5, 5], [6, 6, 6], [6, 6, 7], [11, 12, 13]]
    assert got.tolist() == expected


def test_future_windows_hand_computed():
    """Future t+1..t+K is clamped to the episode's last frame, with valid False where clamped."""
    index = torch.tensor([0, 3, 4, 5, 6, 12, 13])
    fut, valid = BOUNDS.future_indices(index, 2)
    assert fut.tolist() == [[1, 2], [4, 4], [4, 4], [5, 5], [7, 8], [13, 13], [13, 13]]
    assert valid.tolist() == [
        [True, True],
        [True, False],
        [False, False],
        [False, False],
        [True, True],
        [True, False],
        [False, False],
    ]


def test_windows_longer_than_the_episode():
    """T and K larger than the episode (including the length-1 episode) stay inside it."""
    hist = BOUNDS.history_indices(torch.tensor([5, 7]), 10)
    assert hist.tolist() == [[5] * 10, [6] * 9 + [7]]
    fut, valid = BOUNDS.future_indices(torch.tensor([5, 7]), 10)
    assert fut.tolist() == [[5] * 10, [8, 9, 10, 11, 12, 13, 13, 13, 13, 13]]
    assert valid.tolist() == [[False] * 10, [True] * 6 + [False] * 4]


def test_out_of_range_index_is_rejected():
    """An index past the dataset is an error, not a silent clamp."""
    with pytest.raises(IndexError, match="out of range"):
        BOUNDS.history_indices(torch.tensor([14]), 2)


def test_default_cache_root_follows_env(monkeypatch, tmp_path):
    """$LEROBOT_WM_CACHE overrides the default root."""
    monkeypatch.setenv("LEROBOT_WM_CACHE", str(tmp_path / "x"))
    assert default_cache_root() == tmp_path / "x"


@pytest.fixture(scope="module")
def dataset_root(tmp_path_factory):
    """One small real video dataset shared by this module's tests (writing it is the slow part)."""
    root = tmp_path_factory.mktemp("ds") / "synthetic"
    make_synthetic_dataset(root)
    return root


@pytest.fixture
def built(dataset_root, tmp_path):
    """A freshly precomputed, complete cache: (cache_root, dataset identity, encoder identity, cache dir)."""
    cache_root = tmp_path / "cache"
    args = ["--dataset.repo_id=local/synthetic", f"--dataset.root={dataset_root}", "--shard_frames=4"]
    assert precompute.main(args + [f"--cache_root={cache_root}", "--no_progress"]) == 0
    dataset = DatasetIdentity.from_dataset("local/synthetic", dataset_root)
    encoder = load_encoder("pixels").identity
    return cache_root, dataset, encoder, cache_dir_for(cache_root, dataset, CAMERA, encoder)


def _error(cache_root, dataset, encoder) -> str:
    with pytest.raises(LatentCacheError) as info:
        LatentCache.open(cache_root, dataset, CAMERA, encoder)
    return str(info.value)


def _run_named_command(message: str) -> None:
    """Run, in-process, the lerobot-wm-precompute command an error message names."""
    line = next(ln.strip() for ln in message.splitlines() if ln.strip().startswith("lerobot-wm-precompute"))
    argv = shlex.split(line)
    assert argv[0] == "lerobot-wm-precompute"
    assert precompute.main(argv[1:] + ["--no_progress"]) == 0


def _assert_names_command(message: str, dataset, cache_root) -> None:
    assert (
        f"lerobot-wm-precompute --dataset.repo_id=local/synthetic --dataset.root={dataset.root} "
        f"--encoder=pixels-16 --camera={CAMERA}"
    ) in message
    assert f"--cache_root={cache_root}" in message


def test_open_and_lookup(built):
    """A complete cache opens; lookup gathers latent/history/future rows inside each episode."""
    cache_root, dataset, encoder, _ = built
    cache = LatentCache.open(cache_root, dataset, CAMERA, encoder)
    assert cache.latents.shape == (14, encoder.dim) and cache.latents.dtype == torch.float32
    # Every frame's latent differs (the synthetic square moves), so row equality identifies frames.
    assert torch.unique(cache.latents, dim=0).shape[0] == 14
    out = cache.lookup(torch.tensor([5, 6, 13]), T=3, K=2)
    lat = cache.latents
    assert torch.equal(out["latent"], lat[[5, 6, 13]])
    assert torch.equal(out["history"][0], lat[[5, 5, 5]])
    assert torch.equal(out["history"][1], lat[[6, 6, 6]])
    assert torch.equal(out["history"][2], lat[[11, 12, 13]])
    assert torch.equal(out["future"][1], lat[[7, 8]])
    assert out["future_valid"].tolist() == [[False, False], [True, True], [False, False]]


def test_missing_cache(dataset_root, tmp_path):
    """No cache at all -> 'Missing' plus the command; running it makes the cache open."""
    cache_root = tmp_path / "empty"
    dataset = DatasetIdentity.from_dataset("local/synthetic", dataset_root)
    encoder = load_encoder("pixels").identity
    msg = _error(cache_root, dataset, encoder)
    assert "Missing latent cache" in msg
    _assert_names_command(msg, dataset, cache_root)
    _run_named_command(msg)
    LatentCache.open(cache_root, dataset, CAMERA, encoder)


def test_stale_encoder_revision(built):
    """A cache built by another encoder revision is stale, says so, and the command rebuilds it."""
    cache_root, dataset, encoder, cache_dir = built
    meta = json.loads((cache_dir / "meta.json").read_text())
    meta["encoder"]["revision"] = "pixels-v0"
    meta["fingerprint"] = "0" * 64
    (cache_dir / "meta.json").write_text(json.dumps(meta))
    msg = _error(cache_root, dataset, encoder)
    assert "Stale latent cache" in msg and "encoder revision 'pixels-v0' -> 'pixels-v1'" in msg
    _assert_names_command(msg, dataset, cache_root)
    _run_named_command(msg)
    LatentCache.open(cache_root, dataset, CAMERA, encoder)


def test_stale_dataset_frames(built):
    """The dataset gained frames/episodes since the cache was built -> stale, naming what changed."""
    cache_root, dataset, encoder, _ = built
    grown = DatasetIdentity(
        dataset.repo_id, dataset.root, 16, dataset.fps, dataset.episode_from + [14], dataset.episode_to + [16]
    )
    msg = _error(cache_root, grown, encoder)
    assert "Stale latent cache" in msg
    assert "dataset num_frames 14 -> 16" in msg and "3 -> 4 episodes" in msg


@pytest.mark.parametrize(
    "damage, expected",
    [
        ("short", "Frame count mismatch"),
        ("wide", "Latent dim mismatch"),
        ("nan", "NaN/Inf latents in cache"),
        ("missing", "Unfinished latent cache"),
    ],
)
def test_damaged_cache_errors_and_fix(built, damage, expected):
    """Each kind of damage gets its own clear error, and the command it names repairs the cache."""
    cache_root, dataset, encoder, cache_dir = built
    shard = cache_dir / "shard-00001.npy"  # frames [4, 8)
    rows = np.load(shard)
    if damage == "short":
        write_shard(cache_dir, shard.name, rows[:3])
    elif damage == "wide":
        write_shard(cache_dir, shard.name, np.concatenate([rows, rows[:, :1]], axis=1))
    elif damage == "nan":
        rows[2, 7] = np.nan
        write_shard(cache_dir, shard.name, rows)
    else:
        shard.unlink()
    msg = _error(cache_root, dataset, encoder)
    assert expected in msg
    if damage == "nan":
        assert "first bad frame indices [6]" in msg
    if damage == "missing":
        assert "shard-00001.npy [4, 8)" in msg
    _assert_names_command(msg, dataset, cache_root)
    _run_named_command(msg)
    LatentCache.open(cache_root, dataset, CAMERA, encoder)


def test_unfinished_flag(built):
    """A cache whose meta was never marked complete is unfinished even if its files look whole."""
    cache_root, dataset, encoder, cache_dir = built
    meta = json.loads((cache_dir / "meta.json").read_text())
    meta["complete"] = False
    (cache_dir / "meta.json").write_text(json.dumps(meta))
    msg = _error(cache_root, dataset, encoder)
    assert "Unfinished latent cache" in msg and "never marked complete" in msg
    _run_named_command(msg)
    LatentCache.open(cache_root, dataset, CAMERA, encoder)
