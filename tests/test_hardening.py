"""Bad input and faults a user hits (issue 15): each is refused by name or survived, and nothing is lost."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest
import torch
from lerobot.configs.types import FeatureType, PolicyFeature
from support.cli import BIN
from support.datasets import make_synthetic_dataset

from lerobot_policy_world_modality.checkpoints import CheckpointMismatchError
from lerobot_policy_world_modality.tools import fit_codebook, precompute
from lerobot_policy_world_modality.world_f.configuration_world_f import WorldFConfig
from lerobot_policy_world_modality.world_f.modeling_world_f import WorldFPolicy


@pytest.fixture(scope="module")
def image_root(tmp_path_factory):
    """A real one-camera image dataset (episodes of 5, 1 and 8 frames)."""
    root = tmp_path_factory.mktemp("ds") / "images"
    make_synthetic_dataset(root, cameras=("observation.image",), use_videos=False)
    return root


def _args(root, cache_root, *extra) -> list[str]:
    return ["--dataset.repo_id=local/synthetic", f"--dataset.root={root}", f"--cache_root={cache_root}", *extra]


@pytest.mark.parametrize(
    ("flag", "message"),
    [
        ("--batch_size=-1", r"--batch_size must be >= 1"),
        ("--batch_size=0", r"--batch_size must be >= 1"),
        ("--num_workers=-2", r"--num_workers must be >= 0"),
        ("--dtype=banana", r"--dtype=banana is not one of float32, float16, bfloat16"),
        ("--camera=observation.image,observation.image", r"names \['observation.image'\] more than once"),
        ("--device=tpu9", r"--device=tpu9 is not a torch device"),
    ],
)
def test_precompute_refuses_bad_flags_before_any_work(image_root, tmp_path, flag, message):
    with pytest.raises(SystemExit, match=message):
        precompute.main(_args(image_root, tmp_path / "c", flag))
    assert not (tmp_path / "c").exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_precompute_refuses_a_device_this_machine_lacks(image_root, tmp_path):
    with pytest.raises(SystemExit, match=r"--device=cuda was asked for but this machine has no cuda device"):
        precompute.main(_args(image_root, tmp_path / "c", "--device=cuda"))
    assert not (tmp_path / "c").exists()


@pytest.mark.parametrize("tool", [precompute.main, fit_codebook.main])
def test_missing_dataset_root_is_named(tmp_path, tool):
    """A mistyped --dataset.root names the path instead of a Hub-offline traceback."""
    missing = tmp_path / "no_such_dataset"
    with pytest.raises(SystemExit, match=rf"--dataset.root={missing} does not exist"):
        tool(_args(missing, tmp_path / "c"))


def test_fit_codebook_checks_the_same_cache_flags(image_root, tmp_path):
    with pytest.raises(SystemExit, match=r"lerobot-wm-fit-codebook: --dtype=fp8 is not one of"):
        fit_codebook.main(_args(image_root, tmp_path / "c", "--dtype=fp8"))


def test_overwrite_keeps_fitted_codebooks(image_root, tmp_path):
    """`--overwrite` rebuilds the latents but keeps the codebooks a world_token_c run still needs."""
    cache_root = tmp_path / "c"
    assert precompute.main(_args(image_root, cache_root, "--no_progress", "--no_training_view")) == 0
    assert fit_codebook.main(_args(image_root, cache_root, "--codes=3", "--iters=2")) == 0
    books = sorted(cache_root.rglob("codebooks/*.safetensors"))
    assert len(books) == 1
    before = books[0].read_bytes()
    shards = sorted(cache_root.rglob("shard-*.npy"))
    assert shards
    for shard in shards:  # mark the old latents, so the rebuild is seen to replace them
        shard.write_bytes(b"old")
    assert precompute.main(_args(image_root, cache_root, "--overwrite", "--no_progress", "--no_training_view")) == 0
    assert books[0].read_bytes() == before
    assert all(s.read_bytes() != b"old" for s in shards)


def test_failed_atomic_write_leaves_no_temp_file(tmp_path):
    """A write that fails half-way (here: the file-size limit, as on a full disk) leaves nothing behind."""
    script = textwrap.dedent(
        f"""
        import resource, signal
        from pathlib import Path
        from lerobot_policy_world_modality.fileio import atomic_write_bytes
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (4096, 4096))
        target = Path({str(tmp_path)!r}) / "shard-00000.npy"
        try:
            atomic_write_bytes(target, b"x" * 100_000)
        except OSError as err:
            print("failed:", err.errno)
        """
    )
    res = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert "failed:" in res.stdout, res.stderr
    assert list(tmp_path.iterdir()) == []


def _tiny_world_f() -> WorldFPolicy:
    torch.manual_seed(0)
    return WorldFPolicy(
        WorldFConfig(
            device="cpu", world_latent_dim=6, width=16, depth=1, heads=2, fusion_heads=2, fusion_dim=8,
            prophet_width=8, prophet_depth=1, prophet_heads=2, chunk_size=3, n_action_steps=2,
            history_frames=2, future_frames=2,
            input_features={"observation.state": PolicyFeature(FeatureType.STATE, (4,))},
            output_features={"action": PolicyFeature(FeatureType.ACTION, (4,))},
        )
    )  # fmt: skip


def test_truncated_weights_file_is_named(tmp_path):
    """A checkpoint whose model.safetensors was cut short names the file and the fix."""
    _tiny_world_f().save_pretrained(tmp_path)
    weights = tmp_path / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointMismatchError, match=rf"Cannot read the weights file {weights}.*damaged or incomplete"):
        WorldFPolicy.from_pretrained(tmp_path)
    weights.write_bytes(data)
    WorldFPolicy.from_pretrained(tmp_path)


def _open_cache(root, cache_root):
    from lerobot_policy_world_modality.latents.cache import DatasetIdentity, LatentCache
    from lerobot_policy_world_modality.latents.encoders import load_encoder

    identity = DatasetIdentity.from_dataset("local/synthetic", root)
    return LatentCache.open(cache_root, identity, "observation.image", load_encoder("pixels").identity)


def test_rerecorded_dataset_makes_the_cache_stale(tmp_path):
    """Same root, same episode lengths, other frames: the old latents are refused, and precompute rebuilds."""
    import shutil

    from lerobot_policy_world_modality.latents.cache import LatentCacheError

    root, cache_root = tmp_path / "ds", tmp_path / "c"
    make_synthetic_dataset(root, use_videos=False, seed=0)
    precompute.main(_args(root, cache_root, "--no_progress", "--no_training_view"))
    old = _open_cache(root, cache_root).latents.clone()
    shutil.rmtree(root)
    make_synthetic_dataset(root, use_videos=False, seed=1)  # the re-recording
    with pytest.raises(LatentCacheError, match=r"Stale latent cache .*dataset content changed"):
        _open_cache(root, cache_root)
    precompute.main(_args(root, cache_root, "--no_progress", "--no_training_view"))
    new = _open_cache(root, cache_root).latents
    assert new.shape == old.shape and not torch.allclose(new, old)


@pytest.mark.parametrize("damage", ["bytes", "swap"])
def test_edited_shards_are_refused(image_root, tmp_path, damage):
    """Finite bytes written over a shard, or two shard entries swapped in meta.json, are caught on open."""
    import json

    import numpy as np

    from lerobot_policy_world_modality.latents.cache import LatentCacheError, write_shard

    cache_root = tmp_path / "c"
    precompute.main(_args(image_root, cache_root, "--no_progress", "--no_training_view", "--shard_frames=4"))
    cache_dir = _open_cache(image_root, cache_root).cache_dir
    if damage == "bytes":
        shard = cache_dir / "shard-00001.npy"
        write_shard(cache_dir, shard.name, np.load(shard) + 0.5)  # same shape, finite: only the checksum tells
        expected = r"Corrupt shard .*shard-00001.npy: its checksum differs"
    else:
        meta = json.loads((cache_dir / "meta.json").read_text())
        meta["shards"][0], meta["shards"][1] = meta["shards"][1], meta["shards"][0]
        (cache_dir / "meta.json").write_text(json.dumps(meta))
        expected = r"the shard table in meta.json does not match"
    with pytest.raises(LatentCacheError, match=expected):
        _open_cache(image_root, cache_root)
    precompute.main(_args(image_root, cache_root, "--no_progress", "--no_training_view", "--overwrite"))
    _open_cache(image_root, cache_root)


def test_a_horizon_longer_than_every_episode_is_warned_about(tmp_path, caplog):
    """Future windows past an episode's end are masked: a horizon no episode reaches trains silently without it."""
    from lerobot.datasets.lerobot_dataset import LeRobotDatasetMetadata

    from lerobot_policy_world_modality.latents.binding import warn_if_no_future_fits

    root = tmp_path / "ds"
    make_synthetic_dataset(root, repo_id="local/short", episode_lengths=(5, 6))
    meta = LeRobotDatasetMetadata("local/short", root=root)
    with caplog.at_level("WARNING"):
        assert warn_if_no_future_fits(WorldFConfig(variant="F", future_frames=3, future_stride=2), meta)
    assert "3 x 2 = 6 frames, but the longest episode of local/short has 6" in caplog.text
    assert "--policy.future_frames" in caplog.text
    assert not warn_if_no_future_fits(WorldFConfig(variant="F", future_frames=5, future_stride=1), meta)
    assert not warn_if_no_future_fits(WorldFConfig(variant="A", future_frames=3, future_stride=2), meta)


# ------------------------------------------------------------------ errors a failed command ends with


def test_a_bad_policy_option_is_the_last_line_after_draccus(tmp_path):
    """draccus wraps a config's ValueError in its own errors; the line after the traceback is ours."""
    import draccus
    from lerobot.configs.train import TrainPipelineConfig

    from lerobot_policy_world_modality.cli_errors import final_line

    raw = {"dataset": {"repo_id": "local/x"}, "policy": {"type": "world_token_c", "world_token_dropout": 1.5}}
    with pytest.raises(Exception) as caught:
        draccus.decode(TrainPipelineConfig, raw)
    assert "world_token_dropout" not in str(caught.value).splitlines()[-1]  # draccus's own last line hides it
    assert final_line(caught.value) == (
        "Invalid world_token_c policy configuration: world_token_dropout must lie in [0, 1), got 1.5."
    )


def test_config_validation_errors_are_still_value_errors():
    """Python callers that catch ValueError from a config keep working."""
    from lerobot_policy_world_modality.cli_errors import PolicyConfigError

    with pytest.raises(PolicyConfigError, match=r"--policy\.history_frames >= 1") as caught:
        WorldFConfig(history_frames=-1)
    assert isinstance(caught.value, ValueError) and caught.value.policy_type == "world_f"


def test_a_truncated_config_json_is_named(tmp_path):
    """LeRobot parses config.json before any policy code runs; the final line names the file and the fix."""
    from lerobot.configs.policies import PreTrainedConfig

    from lerobot_policy_world_modality.cli_errors import final_line

    _tiny_world_f().save_pretrained(tmp_path)
    config = tmp_path / "config.json"
    config.write_bytes(config.read_bytes()[:200])
    with pytest.raises(ValueError) as caught:  # json.JSONDecodeError, without the path
        PreTrainedConfig.from_pretrained(tmp_path)
    assert str(config) not in str(caught.value)
    line = final_line(caught.value)
    assert line.startswith(f"Cannot read {config}:") and "download the checkpoint again" in line


def _last_lines(res: subprocess.CompletedProcess, n: int = 3) -> str:
    return "\n".join(res.stderr.strip().splitlines()[-n:])


@pytest.mark.slow
def test_lerobot_train_ends_with_the_bad_flag(tmp_path):
    """A negative --policy.history_frames: the last lines lerobot-train prints name the flag and the fix."""
    res = subprocess.run(
        [BIN / "lerobot-train", "--policy.type=world_f", "--policy.history_frames=-1", "--dataset.repo_id=local/x",
         "--policy.push_to_hub=false", f"--output_dir={tmp_path / 'out'}"],
        capture_output=True, text=True, timeout=600, cwd=tmp_path,
    )  # fmt: skip
    assert res.returncode != 0
    last = _last_lines(res)
    assert "--policy.history_frames >= 1" in last and "(got -1, 4)" in last and "--policy.use_prophet=false" in last, last


@pytest.mark.slow
@pytest.mark.parametrize("damaged", ["config.json", "model.safetensors"])
def test_lerobot_eval_names_a_truncated_checkpoint_file(tmp_path, damaged):
    """lerobot-eval on a checkpoint with a file cut short: the last lines name that file and the fix."""
    ckpt = tmp_path / "pretrained_model"
    _tiny_world_f().save_pretrained(ckpt)
    target = ckpt / damaged
    target.write_bytes(target.read_bytes()[: target.stat().st_size // 2])
    res = subprocess.run(
        [BIN / "lerobot-eval", f"--policy.path={ckpt}", "--env.type=metaworld", "--env.task=button-press-v3",
         "--eval.n_episodes=1", "--eval.batch_size=1", f"--output_dir={tmp_path / 'eval'}"],
        capture_output=True, text=True, timeout=600, cwd=tmp_path,
    )  # fmt: skip
    assert res.returncode != 0
    last = _last_lines(res)
    assert last.count(str(target)) == 1 and "download the checkpoint again" in last, last
