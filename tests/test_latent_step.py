"""The world-latent processor step on a real dataset and cache: training lookups, online encoding, reload."""

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from lerobot.datasets.lerobot_dataset import LeRobotDataset, LeRobotDatasetMetadata
from lerobot.processor import PolicyProcessorPipeline, ProcessorStepRegistry
from lerobot.processor.converters import batch_to_transition, transition_to_batch
from support.datasets import make_synthetic_dataset

import lerobot_policy_world_modality  # noqa: F401  (registers the step)
from lerobot_policy_world_modality.constants import (
    OBS_WORLD_FUTURE,
    OBS_WORLD_FUTURE_VALID,
    OBS_WORLD_GOAL,
    OBS_WORLD_HISTORY,
    OBS_WORLD_LATENT,
    OBS_WORLD_REMAINING,
    WORLD_LATENT_STEP_NAME,
)
from lerobot_policy_world_modality.latents.cache import LatentCacheError
from lerobot_policy_world_modality.latents.encoders import load_encoder
from lerobot_policy_world_modality.latents.processor import WorldLatentStep

BIN = Path(sys.executable).parent
REPO = "local/step_test"
EPISODES = (5, 1, 8)  # includes a length-1 episode


def _precompute(root, cameras="observation.image", encoder="pixels"):
    cmd = [
        str(BIN / "lerobot-wm-precompute"),
        f"--dataset.repo_id={REPO}",
        f"--dataset.root={root}",
        f"--encoder={encoder}",
        f"--camera={cameras}",
        "--batch_size=4",
    ]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stdout + res.stderr


@pytest.fixture
def dataset_root(tmp_path):
    root = tmp_path / "ds"
    make_synthetic_dataset(root, repo_id=REPO, episode_lengths=EPISODES, cameras=("observation.image",))
    return root


def _step(root, T=3, K=4, **kw):
    return WorldLatentStep(
        encoder="pixels",
        cameras=["observation.image"],
        history_frames=T,
        future_frames=K,
        dataset_repo_id=REPO,
        dataset_root=str(root),
        **kw,
    )


def _batch(ds, indices):
    items = [ds[i] for i in indices]
    batch = torch.utils.data.default_collate(items)
    return batch


def test_training_batch_gets_episode_clamped_windows(dataset_root):
    _precompute(dataset_root)
    ds = LeRobotDataset(REPO, root=dataset_root, video_backend="pyav")
    encoder = load_encoder("pixels")
    # Latent of every frame, computed independently of the cache from LeRobotDataset's own decoding.
    z = torch.cat([encoder.encode(ds[i]["observation.image"][None]) for i in range(len(ds))])

    step = _step(dataset_root, T=3, K=4)
    # Frame 5 is the only frame of episode 1; frame 6 starts episode 2; frame 13 ends it.
    indices = [0, 4, 5, 6, 13]
    out = transition_to_batch(step(batch_to_transition(_batch(ds, indices))))

    ep_start = {0: 0, 4: 0, 5: 5, 6: 6, 13: 6}
    ep_last = {0: 4, 4: 4, 5: 5, 6: 13, 13: 13}
    for row, t in enumerate(indices):
        hist = [max(t - 2 + j, ep_start[t]) for j in range(3)]
        fut = [min(t + k, ep_last[t]) for k in range(1, 5)]
        valid = [t + k <= ep_last[t] for k in range(1, 5)]
        torch.testing.assert_close(out[OBS_WORLD_LATENT][row], z[t], atol=1e-5, rtol=0)
        torch.testing.assert_close(out[OBS_WORLD_HISTORY][row], z[hist], atol=1e-5, rtol=0)
        torch.testing.assert_close(out[OBS_WORLD_FUTURE][row], z[fut], atol=1e-5, rtol=0)
        assert out[OBS_WORLD_FUTURE_VALID][row].tolist() == valid
        remaining = (ep_last[t] - t) / max(ep_last[t] - ep_start[t], 1)
        assert out[OBS_WORLD_REMAINING][row].item() == pytest.approx(remaining)


def test_eval_batch_is_encoded_online_like_the_cache(dataset_root):
    _precompute(dataset_root)
    ds = LeRobotDataset(REPO, root=dataset_root, video_backend="pyav")
    step = _step(dataset_root)
    train = transition_to_batch(step(batch_to_transition(_batch(ds, [3, 9]))))
    # An eval batch carries no `index`: the step must encode the frames online.
    frames = torch.stack([ds[3]["observation.image"], ds[9]["observation.image"]])
    online = transition_to_batch(step(batch_to_transition({"observation.image": frames})))
    assert set(online) >= {OBS_WORLD_LATENT}
    assert OBS_WORLD_HISTORY not in online
    assert (online[OBS_WORLD_LATENT] - train[OBS_WORLD_LATENT]).abs().max() <= 1e-5


def test_goal_images_are_encoded_into_the_goal_latent(dataset_root):
    """An eval observation with a goal image per world camera gets OBS_WORLD_GOAL, the goal's own latent."""
    ds = LeRobotDataset(REPO, root=dataset_root, video_backend="pyav")
    frame, goal = ds[0]["observation.image"][None], ds[13]["observation.image"][None]
    out = transition_to_batch(_step(dataset_root)(batch_to_transition({"observation.image": frame,
                                                                       "observation.goal.image": goal})))  # fmt: skip
    encoder = load_encoder("pixels")
    torch.testing.assert_close(out[OBS_WORLD_GOAL], encoder.encode(goal), atol=1e-5, rtol=0)
    torch.testing.assert_close(out[OBS_WORLD_LATENT], encoder.encode(frame), atol=1e-5, rtol=0)
    plain = transition_to_batch(_step(dataset_root)(batch_to_transition({"observation.image": frame})))
    assert OBS_WORLD_GOAL not in plain


def test_a_constant_goal_is_encoded_once_and_a_new_goal_again(dataset_root):
    """The goal stays the same through an episode: the step encodes it at the first step only (its real
    encoder's passes counted), and a different goal image gets its own latent."""
    ds = LeRobotDataset(REPO, root=dataset_root, video_backend="pyav")
    frame, goal, other = (ds[i]["observation.image"][None] for i in (0, 13, 7))
    step = _step(dataset_root)
    calls, encoder = [], step.encoder_module()
    real = encoder._forward

    def counted(pixels):
        calls.append(pixels.shape[0])
        return real(pixels)

    encoder._forward = counted

    def run(g):
        return transition_to_batch(step(batch_to_transition({"observation.image": frame, "observation.goal.image": g})))

    first, again = run(goal), run(goal.clone())
    assert len(calls) == 3  # two camera frames, one goal
    torch.testing.assert_close(again[OBS_WORLD_GOAL], first[OBS_WORLD_GOAL], atol=0, rtol=0)
    changed = run(other)
    assert len(calls) == 5
    torch.testing.assert_close(changed[OBS_WORLD_GOAL], load_encoder("pixels").encode(other), atol=1e-5, rtol=0)


def test_missing_cache_fails_with_the_fixing_command(dataset_root):
    ds = LeRobotDataset(REPO, root=dataset_root, video_backend="pyav")
    step = _step(dataset_root)
    with pytest.raises(LatentCacheError, match="lerobot-wm-precompute"):
        step(batch_to_transition(_batch(ds, [0])))


def test_missing_camera_at_eval_names_the_camera(dataset_root):
    step = _step(dataset_root)
    with pytest.raises(KeyError, match="observation.images.wrist"):
        WorldLatentStep(encoder="pixels", cameras=["observation.images.wrist"])(
            batch_to_transition({"observation.image": torch.rand(1, 3, 32, 32)})
        )
    del step


def test_pipeline_round_trip_through_stock_from_pretrained(dataset_root, tmp_path):
    _precompute(dataset_root)
    assert ProcessorStepRegistry.get(WORLD_LATENT_STEP_NAME) is WorldLatentStep
    ds = LeRobotDataset(REPO, root=dataset_root, video_backend="pyav")
    step = _step(dataset_root, T=2, K=3, encoder_identity=load_encoder("pixels").identity.to_dict())
    pipe = PolicyProcessorPipeline(steps=[step], name="policy_preprocessor")
    pipe.save_pretrained(tmp_path / "saved")
    loaded = PolicyProcessorPipeline.from_pretrained(
        tmp_path / "saved", config_filename="policy_preprocessor.json"
    )
    assert isinstance(loaded.steps[0], WorldLatentStep)
    assert loaded.steps[0].get_config() == step.get_config()
    batch = _batch(ds, [1, 6, 12])
    a, b = pipe(dict(batch)), loaded(dict(batch))
    for key in (OBS_WORLD_LATENT, OBS_WORLD_HISTORY, OBS_WORLD_FUTURE, OBS_WORLD_FUTURE_VALID):
        assert torch.equal(a[key], b[key])
    frames = {"observation.image": ds[4]["observation.image"][None]}
    assert torch.equal(pipe(dict(frames))[OBS_WORLD_LATENT], loaded(dict(frames))[OBS_WORLD_LATENT])


def test_online_encoder_must_match_the_training_identity(dataset_root):
    trained = load_encoder("pixels").identity.to_dict()
    trained["revision"] = "something-else"
    step = WorldLatentStep(encoder="pixels", cameras=["observation.image"], encoder_identity=trained)
    with pytest.raises(ValueError, match="differs from the one the policy was trained with"):
        step(batch_to_transition({"observation.image": torch.rand(1, 3, 32, 32)}))


def test_training_view_keeps_indices_and_drops_cameras(dataset_root, tmp_path):
    from lerobot_policy_world_modality.latents.train_view import source_of_view, write_training_view

    view = write_training_view(REPO, dataset_root, tmp_path / "view")
    src = LeRobotDataset(REPO, root=dataset_root, video_backend="pyav")
    dst = LeRobotDataset(REPO, root=view, video_backend="pyav")
    assert dst.meta.video_keys == [] and dst.meta.camera_keys == []
    assert len(dst) == len(src) == sum(EPISODES)
    for i in (0, 5, 13):
        a, b = src[i], dst[i]
        assert int(a["index"]) == int(b["index"])
        assert torch.equal(a["observation.state"], b["observation.state"])
        assert "observation.image" not in b
    info = source_of_view(LeRobotDatasetMetadata(REPO, root=view).info)
    assert info["repo_id"] == REPO and Path(info["root"]) == dataset_root.resolve()
    assert info["cameras"] == ["observation.image"]
    # A second call with the source unchanged reuses the view.
    mtime = (view / "meta" / "info.json").stat().st_mtime_ns
    write_training_view(REPO, dataset_root, tmp_path / "view")
    assert (view / "meta" / "info.json").stat().st_mtime_ns == mtime


def test_future_stride_windows_through_the_step_and_its_saved_config(dataset_root, tmp_path):
    """With future_stride=s the step adds z_{t+s}, ..., z_{t+Ks}, clamped and masked at the episode's end,
    and a pipeline saved with it rebuilds the same step."""
    from lerobot_policy_world_modality.tools.precompute import main as precompute

    precompute([f"--dataset.repo_id={REPO}", f"--dataset.root={dataset_root}", "--encoder=pixels",
                "--camera=observation.image", "--no_progress"])  # fmt: skip
    ds = LeRobotDataset(REPO, root=dataset_root, video_backend="pyav")
    encoder = load_encoder("pixels")
    z = torch.cat([encoder.encode(ds[i]["observation.image"][None]) for i in range(len(ds))])
    step = _step(dataset_root, T=2, K=3, future_stride=2)
    indices = [0, 2, 5, 6, 9]
    out = transition_to_batch(step(batch_to_transition(_batch(ds, indices))))
    ep_last = {0: 4, 2: 4, 5: 5, 6: 13, 9: 13}
    for row, t in enumerate(indices):
        fut = [min(t + 2 * k, ep_last[t]) for k in range(1, 4)]
        torch.testing.assert_close(out[OBS_WORLD_FUTURE][row], z[fut], atol=1e-5, rtol=0)
        assert out[OBS_WORLD_FUTURE_VALID][row].tolist() == [t + 2 * k <= ep_last[t] for k in range(1, 4)]
    pipe = PolicyProcessorPipeline(steps=[step], name="policy_preprocessor")
    pipe.save_pretrained(tmp_path / "saved")
    loaded = PolicyProcessorPipeline.from_pretrained(tmp_path / "saved", config_filename="policy_preprocessor.json")
    assert loaded.steps[0].future_stride == 2
