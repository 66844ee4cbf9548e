"""lerobot-wm-fit-encoder: fit, load by path everywhere, cache == online, seeds, resume, refit staleness, probe."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from lerobot.datasets.lerobot_dataset import LeRobotDataset
from support.cli import BIN, TINY_WORLD_F, capped_eval_cmd, short_train_flags
from support.datasets import make_synthetic_dataset

from lerobot_policy_world_modality.latents.cache import DatasetIdentity, LatentCache, LatentCacheError
from lerobot_policy_world_modality.latents.encoders import load_encoder, resolve_encoder_identity
from lerobot_policy_world_modality.latents.fitted import MARKER_FILE, STATE_DIR, WEIGHTS_FILE, FittedEncoderError
from lerobot_policy_world_modality.latents.linear_probe import (
    episode_folds,
    motion_probe,
    ridge_probe,
    split_by_episode,
)
from lerobot_policy_world_modality.tools import fit_encoder, precompute

REPO = "local/fit_encoder"
# A fit small enough for seconds on the CPU: what is tested is the machinery, not the quality.
TINY_FIT = ["--steps=8", "--batch_size=8", "--save_every=4", "--dim=32", "--channels=8,16", "--no_progress"]


def _run(cmd, timeout=600, **env_extra):
    env = {**os.environ, "MUJOCO_GL": "egl", **env_extra}
    return subprocess.run([str(c) for c in cmd], capture_output=True, text=True, timeout=timeout, env=env)


# CPU float sums depend on the thread count; the bit-identical resume check runs every fit on one thread.
ONE_THREAD = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


def _fit_args(root, out, *extra) -> list[str]:
    return [f"--dataset.repo_id={REPO}", f"--dataset.root={root}", f"--output_dir={out}", *TINY_FIT, *extra]


@pytest.fixture(scope="module")
def dataset_root(tmp_path_factory):
    """A real video dataset: 3 episodes (12, 9, 15 frames) of a moving square, 48x48."""
    root = tmp_path_factory.mktemp("fit_ds") / "ds"
    make_synthetic_dataset(root, repo_id=REPO, episode_lengths=(12, 9, 15), image_hw=(48, 48))
    return root


def _cache(root, cache_root, encoder: str) -> LatentCache:
    return LatentCache.open(cache_root, DatasetIdentity.from_dataset(REPO, root), "observation.image",
                            resolve_encoder_identity(encoder))


@pytest.mark.slow
def test_fitted_encoder_loads_by_path_in_precompute_train_and_eval(dataset_root, tmp_path):
    """Console-script fit -> precompute (cache == online encodings) -> lerobot-train -> capped lerobot-eval."""
    enc = tmp_path / "enc"
    res = _run([BIN / "lerobot-wm-fit-encoder", *_fit_args(dataset_root, enc)])
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-3000:]
    assert (enc / MARKER_FILE).is_file() and (enc / WEIGHTS_FILE).is_file()
    cache_root = Path(os.environ["LEROBOT_WM_CACHE"])
    res = _run([BIN / "lerobot-wm-precompute", f"--dataset.repo_id={REPO}", f"--dataset.root={dataset_root}",
                f"--encoder={enc}", "--no_progress"])  # fmt: skip
    assert res.returncode == 0, res.stderr[-3000:]

    # Cached latents equal the online encodings of the dataset's own frames.
    encoder = load_encoder(str(enc))
    assert encoder.identity.kind == "fitted" and encoder.identity.dim == 32
    dataset = LeRobotDataset(REPO, root=dataset_root, video_backend="pyav")
    online = torch.cat([encoder.encode(dataset[i]["observation.image"][None]) for i in range(len(dataset))])
    cached = _cache(dataset_root, cache_root, str(enc)).latents
    assert cached.shape == online.shape == (36, 32)
    assert (cached - online).abs().max().item() <= 1e-5
    assert torch.unique(cached, dim=0).shape[0] == len(dataset)  # the latents differ frame to frame

    view = Path(next(ln for ln in res.stdout.splitlines() if "training view" in ln).split(": ", 1)[1].strip())
    out = tmp_path / "train"
    res = _run([BIN / "lerobot-train", "--policy.type=world_f", f"--policy.encoder={enc}", *TINY_WORLD_F,
                f"--dataset.repo_id={REPO}", f"--dataset.root={view}", *short_train_flags(out, 2)])  # fmt: skip
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-5000:]
    ckpt = out / "checkpoints" / "last" / "pretrained_model"
    cfg = json.loads((ckpt / "config.json").read_text())
    assert cfg["encoder"] == str(enc) and cfg["world_latent_dim"] == 32
    step = next(s for s in json.loads((ckpt / "policy_preprocessor.json").read_text())["steps"]
                if s.get("registry_name") == "world_modality_latents")  # fmt: skip
    assert step["config"]["encoder_identity"]["revision"] == encoder.identity.revision

    res = _run(capped_eval_cmd(ckpt, tmp_path / "eval", episode_length=4))
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-5000:]
    assert "pc_success" in (tmp_path / "eval" / "eval_info.json").read_text()


def test_same_seed_same_weights_and_a_refit_makes_the_cache_stale(dataset_root, tmp_path, capsys):
    """Seed 0 twice gives the same bytes; a refit with seed 1 changes the identity; the old cache is refused."""
    a, b = tmp_path / "a", tmp_path / "b"
    assert fit_encoder.main(_fit_args(dataset_root, a)) == 0
    assert fit_encoder.main(_fit_args(dataset_root, b)) == 0
    assert (a / WEIGHTS_FILE).read_bytes() == (b / WEIGHTS_FILE).read_bytes()
    id_a = resolve_encoder_identity(str(a))
    assert id_a.revision == resolve_encoder_identity(str(b)).revision
    # A rerun with the same settings reuses the fit.
    assert fit_encoder.main(_fit_args(dataset_root, a)) == 0
    assert "already fitted" in capsys.readouterr().out

    cache_root = tmp_path / "cache"
    assert precompute.main([f"--dataset.repo_id={REPO}", f"--dataset.root={dataset_root}", f"--encoder={a}",
                            f"--cache_root={cache_root}", "--no_progress", "--no_training_view"]) == 0  # fmt: skip
    _cache(dataset_root, cache_root, str(a))  # valid now

    # Other settings into the same directory need --overwrite, and then change the identity.
    assert fit_encoder.main(_fit_args(dataset_root, a, "--seed=1")) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert fit_encoder.main(_fit_args(dataset_root, a, "--seed=1", "--overwrite")) == 0
    id_new = resolve_encoder_identity(str(a))
    assert id_new.revision != id_a.revision
    assert (a / WEIGHTS_FILE).read_bytes() != (b / WEIGHTS_FILE).read_bytes()
    with pytest.raises(LatentCacheError, match="(?i)stale"):
        _cache(dataset_root, cache_root, str(a))

    # A directory from another format version is refused with the fix, not misread.
    marker = json.loads((b / MARKER_FILE).read_text())
    (b / MARKER_FILE).write_text(json.dumps({**marker, "format_version": 99}))
    with pytest.raises(FittedEncoderError, match="refit"):
        load_encoder(str(b))


def test_jepa_objective_fits_deterministically_into_its_own_identity(dataset_root, tmp_path, capsys):
    """--objective=jepa: same seed, same bytes; another identity than the InfoNCE fit of the same seed; the
    marker names it; the loss falls while the latents keep a spread (not collapsed); the EMA target is
    checkpointed; a bad --ema is refused."""
    a, b, nce = tmp_path / "a", tmp_path / "b", tmp_path / "nce"
    assert fit_encoder.main(_fit_args(dataset_root, a, "--objective=jepa")) == 0
    assert "JEPA" in capsys.readouterr().out
    assert fit_encoder.main(_fit_args(dataset_root, b, "--objective=jepa")) == 0
    assert fit_encoder.main(_fit_args(dataset_root, nce)) == 0
    assert (a / WEIGHTS_FILE).read_bytes() == (b / WEIGHTS_FILE).read_bytes()
    assert (a / WEIGHTS_FILE).read_bytes() != (nce / WEIGHTS_FILE).read_bytes()
    assert resolve_encoder_identity(str(a)).revision != resolve_encoder_identity(str(nce)).revision
    marker = json.loads((a / MARKER_FILE).read_text())
    assert marker["objective"] == "temporal-jepa-v1" and marker["fit"]["objective"] == "jepa"
    assert "objective" not in json.loads((nce / MARKER_FILE).read_text())["fit"]  # InfoNCE settings as before
    log = json.loads((a / "fit_log.json").read_text())
    assert log["latent_spread"] > 0.01 and log["final_loss"] < log["first_loss"]
    state = torch.load(a / STATE_DIR / fit_encoder.CHECKPOINT_FILE, weights_only=True)
    assert set(state["target"]) == set(state["net"])  # the EMA target is saved, so a resumed fit continues it
    from lerobot_policy_world_modality.latents.fitted import build_net

    torch.manual_seed(0)  # the fit's initial weights, which the target starts from
    initial = build_net(marker["arch"]).state_dict()
    assert any(not torch.equal(state["target"][k], initial[k]) for k in initial), "the EMA target never moved"
    assert fit_encoder.main(_fit_args(dataset_root, tmp_path / "bad", "--objective=jepa", "--ema=1.0")) == 2
    assert "--ema" in capsys.readouterr().err


def test_thumbnail_option_appends_the_pixels_thumbnail_to_the_same_fit(dataset_root, tmp_path, capsys):
    """--thumbnail=n: the learnt part is the fit without it (the objective never sees the thumbnail), followed
    by the area-averaged n x n frame, which tracks the built-in `pixels-n` latent; the identity and width
    change with it; an impossible side is refused."""
    from lerobot_policy_world_modality.latents.encoder_base import preprocess_frames

    plain, thumb = tmp_path / "plain", tmp_path / "thumb"
    assert fit_encoder.main(_fit_args(dataset_root, plain)) == 0
    assert fit_encoder.main(_fit_args(dataset_root, thumb, "--thumbnail=4")) == 0
    assert "80-d" in capsys.readouterr().out
    assert (plain / WEIGHTS_FILE).read_bytes() == (thumb / WEIGHTS_FILE).read_bytes()
    id_plain, id_thumb = resolve_encoder_identity(str(plain)), resolve_encoder_identity(str(thumb))
    assert (id_plain.dim, id_thumb.dim) == (32, 32 + 3 * 4 * 4)
    assert id_thumb.revision != id_plain.revision  # caches of the two never mix
    assert "thumbnail" not in json.loads((plain / MARKER_FILE).read_text())["arch"]  # old fits keep their identity

    dataset = LeRobotDataset(REPO, root=dataset_root, video_backend="pyav")
    frames = torch.stack([dataset[i]["observation.image"] for i in range(0, len(dataset), 3)])
    z_plain, z_thumb = load_encoder(str(plain)).encode(frames), load_encoder(str(thumb)).encode(frames)
    assert z_thumb.shape == (len(frames), 80)
    assert torch.allclose(z_thumb[:, :32], z_plain, atol=1e-6)
    side = id_thumb.image_size
    pooled = torch.nn.functional.adaptive_avg_pool2d(preprocess_frames(frames, side, id_thumb.image_mean, id_thumb.image_std), 4)
    assert torch.allclose(z_thumb[:, 32:], pooled.flatten(1), atol=1e-6)
    builtin = load_encoder("pixels-4").encode(frames)
    tail = z_thumb[:, 32:] - z_thumb[:, 32:].mean(0)
    ref = builtin - builtin.mean(0)
    assert torch.nn.functional.cosine_similarity(tail.flatten(), ref.flatten(), dim=0) > 0.9

    assert fit_encoder.main(_fit_args(dataset_root, tmp_path / "bad", "--thumbnail=65")) == 2
    assert "--thumbnail" in capsys.readouterr().err


@pytest.mark.slow
@pytest.mark.parametrize("objective", ["infonce", "jepa"])
def test_killed_fit_resumes_to_the_weights_of_an_uninterrupted_fit(dataset_root, tmp_path, objective):
    """SIGKILL after the first checkpoint; the rerun resumes there and ends bit-identical to a straight run."""
    longer = ["--steps=300", "--save_every=4", f"--objective={objective}"]
    killed = tmp_path / "killed"
    proc = subprocess.Popen([str(BIN / "lerobot-wm-fit-encoder"), *_fit_args(dataset_root, killed, *longer)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            env={**os.environ, **ONE_THREAD})  # fmt: skip
    ckpt = killed / STATE_DIR / fit_encoder.CHECKPOINT_FILE
    deadline = time.time() + 240
    while not ckpt.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert ckpt.exists(), "the fit wrote no checkpoint before it was killed"
    assert not (killed / MARKER_FILE).exists(), "the fit finished before the kill; the test needs more --steps"
    done = torch.load(ckpt, weights_only=True)["step"]
    assert 0 < done < 300
    with pytest.raises(FittedEncoderError, match="has not finished"):
        resolve_encoder_identity(str(killed))

    res = _run([BIN / "lerobot-wm-fit-encoder", *_fit_args(dataset_root, killed, *longer)], **ONE_THREAD)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "Resuming the fit from step" in res.stdout
    straight = tmp_path / "straight"
    res = _run([BIN / "lerobot-wm-fit-encoder", *_fit_args(dataset_root, straight, *longer)], **ONE_THREAD)
    assert res.returncode == 0, res.stderr[-3000:]
    assert (killed / WEIGHTS_FILE).read_bytes() == (straight / WEIGHTS_FILE).read_bytes()


def test_dataset_without_cameras_is_a_clear_error(tmp_path, capsys):
    root = tmp_path / "nocam"
    make_synthetic_dataset(root, repo_id=REPO, cameras=())
    assert fit_encoder.main(_fit_args(root, tmp_path / "enc")) == 2
    err = capsys.readouterr().err
    assert "has no camera" in err and "--encoder=pixels" in err
    assert not (tmp_path / "enc" / MARKER_FILE).exists()


def _square_frames(n_episodes: int = 12, length: int = 10, side: int = 32, seed: int = 0):
    """Frames with a bright square at a random place; returns frames, (x, y) of the square, episode ids."""
    rng = np.random.default_rng(seed)
    frames = np.full((n_episodes * length, 3, side, side), 40, dtype=np.uint8)
    pos = rng.integers(0, side - 6, size=(len(frames), 2))
    for i, (x, y) in enumerate(pos):
        frames[i, :, y : y + 6, x : x + 6] = 230
    return torch.from_numpy(frames), pos.astype(np.float64), np.repeat(np.arange(n_episodes), length)


def test_linear_probe_recovers_a_known_signal_and_only_from_the_image():
    frames, pos, episodes = _square_frames()
    latents = load_encoder("pixels-16").encode(frames).numpy()
    real = ridge_probe(latents, pos, episodes)
    assert real["r2_mean"] > 0.8, real
    assert real["n_test"] == 30 and real["n_train"] == 90  # 3 of 12 episodes held out
    # Latents that ignore the image (the same latents, paired with other frames' targets) score nothing.
    shuffled = ridge_probe(latents[np.random.default_rng(1).permutation(len(latents))], pos, episodes)
    assert shuffled["r2_mean"] < 0.2, shuffled
    # Even a nearly unregularised probe, which fits its 90 training frames exactly (768-d latents), scores
    # nothing on the held-out episodes: the score is out of sample.
    loose = ridge_probe(latents[np.random.default_rng(1).permutation(len(latents))], pos, episodes, alphas=(1e-2,))
    assert loose["r2_mean"] < 0.2, loose
    side = pos[:, 0] > 13
    assert ridge_probe(latents, side, episodes, binary=True)["accuracy"] > 0.9
    blind = ridge_probe(np.zeros_like(latents), side, episodes, binary=True)
    assert blind["accuracy"] <= blind["majority_rate"] + 1e-9


def test_probe_split_holds_out_episodes_of_every_task_when_given_groups():
    # A multi-task recording is stored task after task: the plain split tests on the last task only.
    episodes = np.repeat(np.arange(12), 5)
    tasks = episodes // 4  # tasks 0, 1, 2 with 4 episodes each
    _, plain = split_by_episode(episodes, 0.25)
    assert set(tasks[plain]) == {2}
    train, test = split_by_episode(episodes, 0.25, groups=tasks)
    assert sorted(set(episodes[test])) == [3, 7, 11]  # the last episode of each task
    assert not (train & test).any() and (train | test).all()
    # The probe passes the groups through: its held-out frames cover every task.
    signal = np.random.default_rng(0).normal(size=(len(episodes), 4))
    grouped = ridge_probe(signal, signal[:, 0], episodes, groups=tasks)
    assert grouped["n_test"] == 15 and grouped["r2_mean"] > 0.99
    with pytest.raises(ValueError, match="at least 2 episodes per group"):
        split_by_episode(episodes, 0.25, groups=np.where(episodes == 0, 9, tasks))
    # The ridge strength is cross-validated on folds of whole episodes, each fold holding every task.
    folds = episode_folds(episodes, tasks, 4)
    for e in np.unique(episodes):
        assert len(set(folds[episodes == e])) == 1
    for f in range(4):
        assert set(tasks[folds == f]) == {0, 1, 2}
    assert episode_folds(episodes, np.where(episodes == 0, 9, tasks), 4) is None  # a group of one episode


def test_a_near_constant_latent_dimension_does_not_wreck_the_probe():
    # A background pixel is constant in the training episodes up to codec noise and changes in a held-out
    # one: standardising it by its tiny training scale would make it dominate the held-out predictions.
    rng = np.random.default_rng(0)
    episodes = np.repeat(np.arange(8), 20)
    signal = rng.normal(size=len(episodes))
    background = 1e-5 * rng.normal(size=len(episodes)) + np.where(episodes == 7, 0.5, 0.0)
    latents = np.stack([signal + 0.1 * rng.normal(size=len(episodes)), background], axis=1)
    assert ridge_probe(latents, signal, episodes, alphas=(1e-2,))["r2_mean"] > 0.9


def test_r2_total_weighs_columns_by_their_variance():
    # One large predictable column and one small unpredictable one: the mean R^2 halves, the total does not.
    rng = np.random.default_rng(0)
    episodes = np.repeat(np.arange(8), 25)
    x = rng.normal(size=(len(episodes), 2))
    y = np.stack([10 * x[:, 0], 0.01 * rng.normal(size=len(episodes))], axis=1)
    out = ridge_probe(x, y, episodes, alphas=(1e-2,))
    assert out["r2_mean"] < 0.6 and out["r2_total"] > 0.99


def test_motion_probe_credits_the_actions_only_when_they_move_the_latents():
    """Latents driven by the actions (z_{t+1} = z_t + B a_t) give a large action gain; latents that drift on
    their own, with the same actions recorded beside them, give none."""
    rng = np.random.default_rng(0)
    n_ep, length, horizon = 12, 30, 3
    b = rng.normal(size=(2, 6))
    actions = rng.normal(size=(n_ep * length, 2))
    episodes = np.repeat(np.arange(n_ep), length)
    driven, drifting = np.zeros((n_ep * length, 6)), np.zeros((n_ep * length, 6))
    for i in range(len(episodes)):
        if i % length:
            driven[i] = driven[i - 1] + actions[i - 1] @ b
            drifting[i] = drifting[i - 1] + rng.normal(size=6)
    by_actions = motion_probe(driven, actions, episodes, horizon)
    alone = motion_probe(drifting, actions, episodes, horizon)
    assert by_actions["r2_state_actions"] > 0.99 and by_actions["action_gain"] > 0.9
    assert abs(alone["action_gain"]) < 0.1
    # Rows never pair frames of two episodes: each episode loses its last `horizon` frames.
    assert by_actions["n_test"] == 3 * (length - horizon)
    with pytest.raises(ValueError, match="horizon"):
        motion_probe(driven, actions, episodes, 0)


@pytest.mark.slow
def test_demo_encoder_fit_fits_on_the_recorded_dataset_once(dataset_root, tmp_path):
    """`lerobot-wm-demo --encoder=fit`: the fit stage writes an encoder the later stages get, and a rerun reuses it."""
    from lerobot_policy_world_modality.tools import demo

    args = demo.build_parser().parse_args(["--encoder=fit", *[f"--fit_arg={a}" for a in TINY_FIT]])
    enc = demo.stage_encoder(args, tmp_path, REPO, dataset_root)
    assert Path(enc).parent == tmp_path / "encoder" and (Path(enc) / MARKER_FILE).is_file()
    assert resolve_encoder_identity(enc).kind == "fitted"
    assert demo.stage_encoder(args, tmp_path, REPO, dataset_root) == enc
    assert "already fitted" in (tmp_path / "logs" / "fit_encoder.log").read_text()
    # Any other encoder passes through untouched.
    assert demo.stage_encoder(demo.build_parser().parse_args([]), tmp_path, REPO, dataset_root) == "pixels"


@pytest.mark.slow
def test_recorder_sim_state_column_is_optional_and_aligned(tmp_path):
    """`--store_sim_state` adds MetaWorld's raw observation of the same step; without it, nothing changes and
    a recording made before the flag existed is still recognised as finished."""
    from lerobot_policy_world_modality.tools.record_metaworld import RECORDING_INFO, SIM_STATE_KEY

    cli = BIN / "lerobot-wm-record-metaworld"
    common = ["--env.task=drawer-close-v3", "--episodes_per_task=1", "--max_steps=6", "--success_only=false",
              "--use_videos=false"]  # fmt: skip
    plain = tmp_path / "plain"
    res = _run([cli, "--dataset.repo_id=local/plain", f"--dataset.root={plain}", *common])
    assert res.returncode == 0, res.stderr[-3000:]
    assert SIM_STATE_KEY not in json.loads((plain / "meta" / "info.json").read_text())["features"]
    info = json.loads((plain / RECORDING_INFO).read_text())
    info["plan"].pop("store_sim_state")  # as written before the flag existed
    (plain / RECORDING_INFO).write_text(json.dumps(info))
    res = _run([cli, "--dataset.repo_id=local/plain", f"--dataset.root={plain}", *common])
    assert res.returncode == 0 and "Dataset already recorded" in res.stdout, res.stdout + res.stderr[-2000:]

    sim = tmp_path / "sim"
    res = _run([cli, "--dataset.repo_id=local/sim", f"--dataset.root={sim}", *common, "--store_sim_state=true"])
    assert res.returncode == 0, res.stderr[-3000:]
    table = LeRobotDataset("local/sim", root=sim).hf_dataset.data
    raw = np.stack(table.column(SIM_STATE_KEY).to_numpy(zero_copy_only=False))
    state = np.stack(table.column("observation.state").to_numpy(zero_copy_only=False))
    assert raw.shape == (6, 39)
    np.testing.assert_array_equal(raw[:, :4], state)  # agent_pos is the raw observation's first 4 entries
    assert np.abs(raw[:, 4:7]).sum() > 0  # the object position is there
