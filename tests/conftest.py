"""Shared test set-up: every test runs offline with its caches and datasets under a temp dir."""

import os

import pytest

os.environ.setdefault("MUJOCO_GL", "egl")
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# The entry points run as subprocesses, often two at once (compare --jobs 2, an eval next to a training):
# with torch's default one-thread-per-core they oversubscribe this 2-core machine and crawl (docs/benchmarks.md).
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("MKL_NUM_THREADS", "1")


@pytest.fixture(autouse=True)
def isolated_caches(tmp_path, monkeypatch):
    """Point the latent cache and LeRobot's dataset home at this test's temp dir."""
    monkeypatch.setenv("LEROBOT_WM_CACHE", str(tmp_path / "wm_cache"))
    monkeypatch.setenv("HF_LEROBOT_HOME", str(tmp_path / "lerobot_home"))
    yield


@pytest.fixture(autouse=True)
def single_torch_thread():
    """Tiny models run fastest on one thread; two threads on two shared cores mostly contend."""
    import torch

    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)
