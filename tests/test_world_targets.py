"""World targets with dynamics: target space, stride windows, statistics, losses, diagnostics, leak, gates.

The behaviours of issue 13 (items 1 and 3) on the world core and on real `world_f` / `smolvla_world`
policies: delta and standardised targets (statistics from a real latent cache, carried by a saved
checkpoint), the future stride and its validity mask at episode ends, the scale-aware world losses,
the copy baseline and motion cosine against hand-computed numbers, oracle rows past the episode end
never reaching the actions, the gates' optimiser group in the optimiser LeRobot builds, and a memory
normalisation that keeps magnitude.
"""

import json
import math
import sys

import pytest
import torch
from lerobot.configs.policies import PreTrainedConfig
from lerobot.configs.types import FeatureType, PolicyFeature
from support.datasets import make_synthetic_dataset
from support.vlm import tiny_vlm  # noqa: F401  (session fixture)
from test_world_f_model import A, B, D, H, K, S, T, make_config, make_policy

from lerobot_policy_world_modality.constants import (
    OBS_WORLD_FUTURE,
    OBS_WORLD_FUTURE_VALID,
    OBS_WORLD_HISTORY,
    OBS_WORLD_LATENT,
)
from lerobot_policy_world_modality.latents.cache import EpisodeBounds, latent_input_statistics, target_statistics
from lerobot_policy_world_modality.world.fusion import GatedCrossAttention
from lerobot_policy_world_modality.world.memory import horizon_diagnostics, select_memory, world_loss
from lerobot_policy_world_modality.world_f.modeling_world_f import WorldFPolicy


def train_batch(seed=1, b=B):
    """Sample 0 is one frame before its episode's end: its horizon 2 is a clamped copy (invalid)."""
    g = torch.Generator().manual_seed(seed)
    history = torch.randn(b, T, D, generator=g)
    valid = torch.ones(b, K, dtype=torch.bool)
    valid[0, 1:] = False
    future = torch.randn(b, K, D, generator=g)
    future[0, 1] = future[0, 0]  # the clamp: the last frame repeated
    return {
        OBS_WORLD_LATENT: history[:, -1].clone(),
        OBS_WORLD_HISTORY: history,
        OBS_WORLD_FUTURE: future,
        OBS_WORLD_FUTURE_VALID: valid,
        "observation.state": torch.randn(b, S, generator=g),
        "action": torch.randn(b, H, A, generator=g),
        "action_is_pad": torch.zeros(b, H, dtype=torch.bool),
    }


def forward_with_prediction(policy, batch) -> tuple[dict, torch.Tensor]:
    """(logged scalars, the Prophet's target-space prediction) of one training forward."""
    seen = []
    hook = policy.world.prophet.register_forward_hook(lambda m, args, out: seen.append(out.prediction().detach()))
    try:
        _, info = policy.forward(batch)
    finally:
        hook.remove()
    return info, seen[0]


def random_stats(seed=3) -> dict:
    g = torch.Generator().manual_seed(seed)
    return {
        "latent_mean": torch.randn(D, generator=g),
        "latent_std": torch.rand(D, generator=g) + 0.5,
        "target_mean": torch.randn(K, D, generator=g) * 0.1,
        "target_std": torch.rand(K, D, generator=g) * 0.2 + 0.05,
        "step_mean": torch.randn(D, generator=g) * 0.01,
        "step_std": torch.rand(D, generator=g) * 0.1 + 0.02,
    }


# ------------------------------------------------------------------------------ stride windows, validity
def test_future_stride_windows_are_clamped_to_each_episode_and_masked_past_its_end():
    bounds = EpisodeBounds([0, 5, 6], [5, 6, 14])  # lengths 5, 1, 8
    index = torch.tensor([0, 3, 5, 6, 9])
    fut, valid = bounds.future_indices(index, 3, stride=2)
    # t + 2, t + 4, t + 6, clamped to the episode's last frame (4, 5, 13), valid where not clamped.
    assert fut.tolist() == [[2, 4, 4], [4, 4, 4], [5, 5, 5], [8, 10, 12], [11, 13, 13]]
    assert valid.tolist() == [[True, True, False], [False, False, False], [False, False, False],
                              [True, True, True], [True, True, False]]  # fmt: skip
    # Stride 1 is the original window.
    assert bounds.future_indices(index, 3)[0].tolist() == bounds.future_indices(index, 3, stride=1)[0].tolist()
    with pytest.raises(ValueError, match="stride must be >= 1"):
        bounds.future_indices(index, 3, stride=0)
    with pytest.raises(ValueError, match="future_stride must be >= 1"):
        make_config(future_stride=0)
    # The policy's preprocessor step asks the cache for the config's stride.
    from lerobot_policy_world_modality.latents.processor import make_world_latent_step

    assert make_world_latent_step(make_config(future_stride=3, world_latent_dim=None)).future_stride == 3


# ------------------------------------------------------------------------------ statistics
def test_target_statistics_match_a_hand_computation_over_valid_pairs(monkeypatch):
    torch.manual_seed(0)
    latents = torch.randn(14, 3) * torch.tensor([1.0, 5.0, 0.0]) + torch.tensor([0.0, 2.0, 7.0])
    bounds = EpisodeBounds([0, 5, 6], [5, 6, 14])
    episodes = [(0, 5), (5, 6), (6, 14)]
    stats = target_statistics(latents, bounds, K=2, stride=3, delta=True)
    for k in (1, 2):
        pairs = [(t, t + 3 * k) for a, b in episodes for t in range(a, b) if t + 3 * k < b]
        deltas = torch.stack([latents[u] - latents[t] for t, u in pairs]).double()
        torch.testing.assert_close(stats["target_mean"][k - 1], deltas.mean(0).float())
        std = deltas.std(0, unbiased=False).float()
        torch.testing.assert_close(stats["target_std"][k - 1, :2], std[:2])
        assert stats["target_std"][k - 1, 2] > 0  # a constant dimension gets a floor, never 0
    torch.testing.assert_close(stats["latent_mean"], latents.mean(0))
    steps = torch.stack([latents[t] - latents[t - 1] for a, b in episodes for t in range(a + 1, b)]).double()
    torch.testing.assert_close(stats["step_mean"], steps.mean(0).float())
    torch.testing.assert_close(stats["step_std"][:2], steps.std(0, unbiased=False).float()[:2])
    # Summed in chunks (here of 3 rows) to the same numbers.
    from lerobot_policy_world_modality.latents import cache as cache_module

    monkeypatch.setattr(cache_module, "STATS_CHUNK_ROWS", 3)
    chunked = target_statistics(latents, bounds, K=2, stride=3, delta=True)
    for name, value in stats.items():
        torch.testing.assert_close(chunked[name], value, rtol=1e-6, atol=1e-7)
    absolute = target_statistics(latents, bounds, K=2, stride=3, delta=False)
    pairs = [(t, t + 3) for a, b in episodes for t in range(a, b) if t + 3 < b]
    torch.testing.assert_close(absolute["target_mean"][0], latents[[u for _, u in pairs]].mean(0))


def test_standardised_delta_targets_and_their_inverse():
    policy = make_policy(world_target="delta", standardise_targets=True)
    stats = random_stats()
    policy.world.set_target_stats(stats)
    batch = train_batch()
    _, targets, _ = policy.world.training_inputs(batch)
    z_t = batch[OBS_WORLD_HISTORY][:, -1:]
    by_hand = (batch[OBS_WORLD_FUTURE] - z_t - stats["target_mean"]) / stats["target_std"]
    torch.testing.assert_close(targets, by_hand)
    torch.testing.assert_close(policy.world.to_absolute(targets, z_t[:, 0]), batch[OBS_WORLD_FUTURE])
    # The Prophet reads its history standardised with the latent statistics.
    seen = {}
    policy.world.prophet.register_forward_pre_hook(lambda m, args: seen.setdefault("history", args[0]))
    policy.world.predict(batch[OBS_WORLD_HISTORY])
    expected = (batch[OBS_WORLD_HISTORY] - stats["latent_mean"]) / stats["latent_std"]
    torch.testing.assert_close(seen["history"], expected)


def test_motion_input_reads_standardised_frame_changes_then_the_current_latent():
    policy = make_policy(world_target="delta", standardise_targets=True, prophet_input="motion")
    stats = random_stats()
    policy.world.set_target_stats(stats)
    history = train_batch()[OBS_WORLD_HISTORY]
    tokens = policy.world.prophet_tokens(history)
    assert tokens.shape == history.shape
    for i in range(T - 1):
        change = (history[:, i + 1] - history[:, i] - stats["step_mean"]) / stats["step_std"]
        torch.testing.assert_close(tokens[:, i], change)
    torch.testing.assert_close(tokens[:, -1], (history[:, -1] - stats["latent_mean"]) / stats["latent_std"])
    # A repeat-padded window (episode start) reads "no change so far".
    padded = history[:, -1:].expand(B, T, D)
    torch.testing.assert_close(policy.world.prophet_tokens(padded)[:, :-1], ((0 - stats["step_mean"]) / stats["step_std"]).expand(B, T - 1, D))
    with pytest.raises(ValueError, match="standardise_targets=true"):
        make_config(prophet_input="motion")
    with pytest.raises(ValueError, match="history_frames"):
        make_config(prophet_input="motion", standardise_targets=True, history_frames=1)
    with pytest.raises(ValueError, match="prophet_input"):
        make_config(prophet_input="flow", standardise_targets=True)


def test_standardising_without_statistics_fails_with_the_fix():
    policy = make_policy(standardise_targets=True)
    policy.train()
    with pytest.raises(RuntimeError, match="set_target_stats"):
        policy.forward(train_batch())
    with pytest.raises(ValueError, match="shape"):
        policy.world.set_target_stats({**random_stats(), "target_std": torch.ones(K + 1, D)})


def test_delta_prediction_is_an_alias_of_world_target_delta_and_old_configs_load(tmp_path):
    assert make_config(delta_prediction=True).world_target == "delta"
    assert make_config(world_target="delta").delta_prediction is True
    assert make_config().world_target == "absolute" and not make_config().delta_prediction
    with pytest.raises(ValueError, match="world_target"):
        make_config(world_target="velocity")
    # A checkpoint config written before the new fields existed.
    make_config(delta_prediction=True).save_pretrained(tmp_path)
    raw = json.loads((tmp_path / "config.json").read_text())
    for new in ("world_target", "standardise_targets", "world_loss_type", "fusion_memory_norm",
                "gate_lr_mult", "future_stride", "prophet_input"):  # fmt: skip
        raw.pop(new)
    (tmp_path / "config.json").write_text(json.dumps(raw))
    old = PreTrainedConfig.from_pretrained(tmp_path)
    assert old.world_target == "delta" and old.future_stride == 1 and old.fusion_memory_norm == "layer"
    assert old.world_loss_type == "cosine" and old.gate_lr_mult == 1.0 and not old.standardise_targets
    assert old.prophet_input == "latents"


# ------------------------------------------------------------------------------ statistics through a real cache
def _precompute(repo, root):
    """lerobot-wm-precompute's entry point, in-process (the console script runs the same `main`)."""
    from lerobot_policy_world_modality.tools.precompute import main

    args = [f"--dataset.repo_id={repo}", f"--dataset.root={root}", "--encoder=pixels",
            "--camera=observation.image", "--no_progress"]  # fmt: skip
    assert main(args) in (0, None)


def test_statistics_come_from_the_cache_and_travel_in_the_checkpoint(tmp_path, monkeypatch):
    """Bound at construction from the training dataset's cache; a saved checkpoint reloads and acts
    identically with no cache at all."""
    from lerobot.datasets.lerobot_dataset import LeRobotDatasetMetadata

    from lerobot_policy_world_modality.latents.binding import open_world_caches

    repo, root = "local/targets", tmp_path / "ds"
    make_synthetic_dataset(root, repo_id=repo, episode_lengths=(6, 2, 9), image_hw=(16, 16), use_videos=False)
    _precompute(repo, root)
    kw = dict(world_latent_dim=None, encoder="pixels", world_cameras=["observation.image"], future_stride=2,
              world_target="delta", standardise_targets=True, world_loss_type="smooth_l1",
              prophet_input="motion")  # fmt: skip
    torch.manual_seed(0)
    policy = WorldFPolicy(make_config(**kw), dataset_meta=LeRobotDatasetMetadata(repo, root=root))
    cache = open_world_caches(policy.config)[0]
    expected = target_statistics(cache.latents, cache.bounds, K=K, stride=2, delta=True)
    for name, value in expected.items():
        torch.testing.assert_close(getattr(policy.world, name), value, rtol=0, atol=0)
    assert torch.isfinite(policy.world.target_std).all()

    policy.save_pretrained(tmp_path / "ckpt")
    monkeypatch.setenv("LEROBOT_WM_CACHE", str(tmp_path / "nowhere"))  # no cache from here on
    loaded = WorldFPolicy.from_pretrained(tmp_path / "ckpt")
    assert loaded.config.future_stride == 2 and loaded.config.world_target == "delta"
    for name in expected:
        assert torch.equal(getattr(loaded.world, name), getattr(policy.world, name))
    with torch.no_grad():
        policy.fusion.gate.fill_(0.8)
        loaded.fusion.gate.fill_(0.8)
    latent = torch.randn(2, policy.config.world_latent_dim)
    policy.reset()
    loaded.reset()
    for _ in range(2):
        obs = {OBS_WORLD_LATENT: latent, "observation.state": torch.randn(2, S)}
        assert torch.equal(policy.predict_action_chunk(obs), loaded.predict_action_chunk(obs))
        latent = latent + 0.1


def test_latent_input_statistics_floor_quiet_dimensions_at_the_median_std():
    """Dimension 0 never varies, 1 barely, 2-4 vary: the quiet ones get the median std, not their own."""
    g = torch.Generator().manual_seed(0)
    latents = torch.randn(200, 5, generator=g) * torch.tensor([0.0, 1e-4, 1.0, 2.0, 3.0]) + 7.0
    stats = latent_input_statistics(latents)
    std = latents.double().std(0, unbiased=False).float()
    median = float(std.median())
    torch.testing.assert_close(stats["input_mean"], latents.double().mean(0).float())
    torch.testing.assert_close(stats["input_std"], std.clamp(min=median))
    assert stats["input_std"][0] == stats["input_std"][1] == pytest.approx(median)


def test_dataset_input_norm_standardises_with_the_cache_and_travels_in_the_checkpoint(tmp_path, monkeypatch):
    """latent_input_norm="dataset": the trunk's statistics are the training cache's, its latent token is
    latent_proj((z - mean) / std); unbound it refuses to act; a checkpoint reloads and acts identically
    without the cache; the default keeps the LayerNorm (and old checkpoints their keys)."""
    from lerobot.datasets.lerobot_dataset import LeRobotDatasetMetadata

    from lerobot_policy_world_modality.latents.binding import open_world_caches

    repo, root = "local/input_norm", tmp_path / "ds"
    make_synthetic_dataset(root, repo_id=repo, episode_lengths=(6, 2, 9), image_hw=(16, 16), use_videos=False)
    _precompute(repo, root)
    kw = dict(world_latent_dim=None, encoder="pixels", world_cameras=["observation.image"], latent_input_norm="dataset")
    meta = LeRobotDatasetMetadata(repo, root=root)
    policy = WorldFPolicy(make_config(**kw), dataset_meta=meta)
    expected = latent_input_statistics(open_world_caches(policy.config)[0].latents)
    for name, value in expected.items():
        torch.testing.assert_close(getattr(policy.trunk, name), value, rtol=0, atol=0)
    z = torch.rand(3, policy.config.world_latent_dim)
    scaled = (z - expected["input_mean"]) / expected["input_std"]
    torch.testing.assert_close(policy.trunk.scaled_latent(z), scaled)
    assert policy.trunk.latent_norm is None and "trunk.latent_norm.weight" not in policy.state_dict()
    with pytest.raises(ValueError, match="shape"):
        policy.trunk.set_input_stats({"input_mean": torch.zeros(3), "input_std": torch.ones(3)})

    unbound = WorldFPolicy(make_config(**{**kw, "world_latent_dim": policy.config.world_latent_dim}))
    with pytest.raises(RuntimeError, match="input statistics"):
        unbound.predict_action_chunk({OBS_WORLD_LATENT: z, "observation.state": torch.randn(3, S)})

    policy.save_pretrained(tmp_path / "ckpt")
    monkeypatch.setenv("LEROBOT_WM_CACHE", str(tmp_path / "nowhere"))  # no cache from here on
    loaded = WorldFPolicy.from_pretrained(tmp_path / "ckpt")
    assert loaded.config.latent_input_norm == "dataset"
    obs = {OBS_WORLD_LATENT: z, "observation.state": torch.randn(3, S)}
    assert torch.equal(policy.predict_action_chunk(obs), loaded.predict_action_chunk(obs))
    assert "trunk.latent_norm.weight" in make_policy().state_dict()
    with pytest.raises(ValueError, match="latent_input_norm"):
        make_config(latent_input_norm="batch")


# ------------------------------------------------------------------------------ losses
def test_scale_aware_world_losses_by_hand_and_masked():
    pred = torch.tensor([[[1.0, 2.0], [0.0, 0.0]], [[0.5, 0.5], [3.0, -1.0]]])
    target = torch.tensor([[[1.0, 0.0], [float("nan"), 1.0]], [[0.0, 0.5], [1.0, -1.0]]])
    valid = torch.tensor([[True, False], [True, True]])
    # Per valid slot, the mean over D: mse (0 + 4)/2 = 2, (0.25 + 0)/2 = 0.125, (4 + 0)/2 = 2.
    assert world_loss(pred, target, valid, "mse").item() == pytest.approx((2 + 0.125 + 2) / 3)
    # smooth L1 (beta 1): |e| < 1 -> e^2 / 2, else |e| - 1/2: (0 + 1.5)/2, (0.125 + 0)/2, (1.5 + 0)/2.
    assert world_loss(pred, target, valid, "smooth_l1").item() == pytest.approx((0.75 + 0.0625 + 0.75) / 3)
    p = pred.clone().requires_grad_(True)
    world_loss(p, target, valid, "mse").backward()
    assert torch.isfinite(p.grad).all() and p.grad[0, 1].abs().sum() == 0
    # A policy trains with the loss it was configured with.
    policy = make_policy(world_loss_type="mse")
    policy.train()
    batch = train_batch()
    info, prediction = forward_with_prediction(policy, batch)
    targets = batch[OBS_WORLD_FUTURE]
    by_hand = world_loss(prediction, targets, batch[OBS_WORLD_FUTURE_VALID], "mse").item()
    assert info["world_loss"] == pytest.approx(by_hand, rel=1e-6)
    assert by_hand != pytest.approx(world_loss(prediction, targets, batch[OBS_WORLD_FUTURE_VALID]).item())
    with pytest.raises(ValueError, match="world_loss_type"):
        make_config(world_loss_type="l2")


# ------------------------------------------------------------------------------ copy baseline and motion
def test_copy_baseline_and_motion_cosine_against_hand_computed_numbers():
    current = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    target = torch.tensor([[[1.0, 1.0], [2.0, 0.0]], [[1.0, 1.0], [0.0, 2.0]]])
    pred = torch.tensor([[[1.0, 2.0], [0.0, 1.0]], [[1.0, 0.0], [5.0, 5.0]]])
    valid = torch.tensor([[True, True], [True, False]])
    info = horizon_diagnostics(pred, target, current, valid)
    s2 = math.sqrt(2.0)
    # h1, sample 0: cos([1,2],[1,1]) = 3/sqrt(10); copy cos([1,0],[1,1]) = 1/sqrt2; motion cos([0,2],[0,1]) = 1.
    #     sample 1: cos([1,0],[1,1]) = 1/sqrt2; copy cos([0,1],[1,1]) = 1/sqrt2; motion cos([1,-1],[1,0]) = 1/sqrt2.
    assert info["world_cos_h1"] == pytest.approx((3 / math.sqrt(10) + 1 / s2) / 2)
    assert info["world_copy_cos_h1"] == pytest.approx(1 / s2)
    assert info["world_motion_cos_h1"] == pytest.approx((1 + 1 / s2) / 2)
    # h2, sample 0 only: cos([0,1],[2,0]) = 0; copy 1; motion cos([-1,1],[1,0]) = -1/sqrt2.
    assert info["world_cos_h2"] == pytest.approx(0.0, abs=1e-7)
    assert info["world_copy_cos_h2"] == pytest.approx(1.0)
    assert info["world_motion_cos_h2"] == pytest.approx(-1 / s2)
    # A model that copies z_t scores the copy baseline and motion cosine 0.
    copy = horizon_diagnostics(current.unsqueeze(1).expand(2, 2, 2), target, current, valid)
    assert copy["world_cos_h1"] == pytest.approx(copy["world_copy_cos_h1"])
    assert copy["world_motion_cos_h1"] == 0.0


@pytest.mark.parametrize("target", ["absolute", "delta"])
def test_policy_logs_absolute_space_cosines_next_to_the_copy_baseline(target):
    policy = make_policy(world_target=target, standardise_targets=target == "delta")
    if target == "delta":
        policy.world.set_target_stats(random_stats())
    policy.train()
    batch = train_batch()
    info, prediction = forward_with_prediction(policy, batch)
    z_t = batch[OBS_WORLD_HISTORY][:, -1]
    pred = policy.world.to_absolute(prediction, z_t)
    if target == "absolute":
        assert torch.equal(pred, prediction)
    expected = horizon_diagnostics(pred, batch[OBS_WORLD_FUTURE], z_t, batch[OBS_WORLD_FUTURE_VALID])
    for k in range(1, K + 1):
        for name in ("world_cos", "world_copy_cos", "world_motion_cos"):
            assert info[f"{name}_h{k}"] == pytest.approx(expected[f"{name}_h{k}"], rel=1e-5), (name, k)
    # The copy baseline is the data's, not the model's.
    assert info["world_copy_cos_h1"] == pytest.approx(
        torch.nn.functional.cosine_similarity(z_t, batch[OBS_WORLD_FUTURE][:, 0], dim=-1).mean().item(), rel=1e-5
    )
    # loss_terms keeps its (prediction, targets, valid) call; z_t can also be passed explicitly.
    _, targets, valid = policy.world.training_inputs(batch)
    a = policy.world.loss_terms(prediction, targets, valid)[1]
    b = policy.world.loss_terms(prediction, targets.clone(), valid, current=z_t)[1]
    assert a["world_copy_cos_h1"] == pytest.approx(b["world_copy_cos_h1"])
    c = policy.world.loss_terms(prediction, targets.clone(), valid)[1]  # unknown targets, no z_t
    assert "world_copy_cos_h1" not in c and "world_cos_h1" in c


# ------------------------------------------------------------------------------ the oracle leak
@pytest.mark.parametrize("mode", ["oracle", "scheduled"])
def test_clamped_oracle_rows_never_reach_the_actions(mode):
    """Rows past the episode end are replaced by the prediction: changing them changes nothing."""
    policy = make_policy(memory_mode_train=mode, scheduled_prob_start=1.0, gate_init=1.0)
    policy.train()
    batch = train_batch()
    _, base = policy.forward(batch)
    leaked = {k: v.clone() for k, v in batch.items()}
    leaked[OBS_WORLD_FUTURE][0, 1] = torch.randn(D) * 3  # the invalid row only
    assert policy.forward(leaked)[1]["action_loss"] == base["action_loss"]
    # The test can fail: a valid row does reach the actions.
    seen = {k: v.clone() for k, v in batch.items()}
    seen[OBS_WORLD_FUTURE][0, 0] = torch.randn(D) * 3
    assert policy.forward(seen)[1]["action_loss"] != base["action_loss"]


def test_at_an_episode_end_oracle_memory_is_the_prediction():
    pred, oracle = torch.randn(2, K, D), torch.randn(2, K, D)
    valid = torch.tensor([[False, False], [True, False]])
    memory = select_memory("oracle", pred, oracle, valid=valid)
    assert torch.equal(memory[0], pred[0]) and torch.equal(memory[1, 0], oracle[1, 0])
    assert torch.equal(memory[1, 1], pred[1, 1])
    scheduled = select_memory("scheduled", pred, oracle, oracle_prob=1.0, valid=valid)
    assert torch.equal(scheduled, memory)


# ------------------------------------------------------------------------------ memory normalisation
@pytest.mark.parametrize("norm", ["layer", "rms", "none"])
def test_memory_norm_keeps_the_scale_of_a_row_unless_it_is_layer(norm):
    torch.manual_seed(0)
    fusion = GatedCrossAttention(16, D, heads=2, gate_init=1.0, num_slots=K, memory_norm=norm)
    hidden, memory = torch.randn(B, 4, 16), torch.randn(B, K, D)
    bigger = memory.clone()
    bigger[:, 1] *= 4.0  # one slot changes more, same direction
    a, b = fusion(hidden, memory).hidden, fusion(hidden, bigger).hidden
    if norm == "layer":
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)  # the per-row LayerNorm erases it
    else:
        assert (a - b).abs().max() > 1e-2
    if norm == "none":  # scaling the whole memory matters too
        assert (fusion(hidden, 3 * memory).hidden - a).abs().max() > 1e-2
    keys = set(fusion.state_dict())
    assert ({"memory_norm.weight", "memory_norm.bias"} <= keys) == (norm == "layer")  # old checkpoints load


def test_rms_memory_norm_ignores_non_finite_rows():
    torch.manual_seed(0)
    fusion = GatedCrossAttention(16, D, heads=2, gate_init=1.0, num_slots=K, memory_norm="rms")
    hidden, memory = torch.randn(1, 4, 16), torch.randn(1, K, D)
    with_nan = memory.clone()
    with_nan[0, 1] = float("nan")
    out = fusion(hidden, with_nan).hidden
    assert torch.isfinite(out).all()
    # Same as a memory with only the finite row (its RMS is taken over finite rows only).
    alone = GatedCrossAttention(16, D, heads=2, gate_init=1.0, num_slots=1, memory_norm="rms")
    alone.load_state_dict({k: (v[:1] if k == "slot_embed" else v) for k, v in fusion.state_dict().items()})
    torch.testing.assert_close(out, alone(hidden, memory[:, :1]).hidden)


# ------------------------------------------------------------------------------ gate learning rate
def _lerobot_optimizer(policy, tmp_path, monkeypatch):
    """The optimiser and scheduler lerobot-train builds: TrainPipelineConfig.validate() takes the policy's
    preset, then make_optimizer_and_scheduler calls get_optim_params()."""
    from lerobot.configs.default import DatasetConfig
    from lerobot.configs.train import TrainPipelineConfig
    from lerobot.optim.factory import make_optimizer_and_scheduler

    monkeypatch.setattr(sys, "argv", ["lerobot-train"])
    policy.config.push_to_hub = False  # validate() would ask for a repo_id
    cfg = TrainPipelineConfig(dataset=DatasetConfig(repo_id="local/x"), policy=policy.config,
                              output_dir=tmp_path / "out", steps=100)  # fmt: skip
    cfg.validate()
    return make_optimizer_and_scheduler(cfg, policy)


def test_gate_group_gets_lr_times_mult_and_no_weight_decay(tmp_path, monkeypatch):
    policy = make_policy(gate_lr_mult=50.0, optimizer_lr=2e-4, optimizer_weight_decay=0.1)
    optimizer, _ = _lerobot_optimizer(policy, tmp_path, monkeypatch)
    gate_groups = [g for g in optimizer.param_groups if any(p is policy.fusion.gate for p in g["params"])]
    assert len(gate_groups) == 1
    group = gate_groups[0]
    assert group["lr"] == pytest.approx(2e-4 * 50) and group["weight_decay"] == 0.0
    assert [p is policy.fusion.gate for p in group["params"]] == [True]
    others = [g for g in optimizer.param_groups if g is not group]
    assert all(g["lr"] == pytest.approx(2e-4) for g in others)
    ids = [id(p) for g in optimizer.param_groups for p in g["params"]]
    assert sorted(ids) == sorted(id(p) for p in policy.parameters()) and len(ids) == len(set(ids))
    # One step moves the gate by about lr x mult (Adam's first step is lr-sized).
    policy.train()
    loss, _ = policy.forward(train_batch())
    loss.backward()
    before = policy.fusion.gate.detach().clone()
    optimizer.step()
    assert (policy.fusion.gate.detach() - before).abs().item() == pytest.approx(2e-4 * 50, rel=1e-2)
    # Multiplier 1 keeps the original two groups.
    assert len(make_policy().get_optim_params()) == 2


def test_smolvla_world_gate_group_survives_its_schedule(tiny_vlm, tmp_path, monkeypatch):  # noqa: F811
    from support.vlm import TINY_SMOLVLA

    from lerobot_policy_world_modality.smolvla_world.configuration_smolvla_world import SmolVLAWorldConfig
    from lerobot_policy_world_modality.smolvla_world.modeling_smolvla_world import SmolVLAWorldPolicy

    cfg = SmolVLAWorldConfig(
        vlm_model_name=str(tiny_vlm), device="cpu", **TINY_SMOLVLA, prophet_width=32, prophet_depth=1,
        prophet_heads=2, fusion_heads=2, history_frames=T, future_frames=K, inject_prefix=True,
        gate_lr_mult=10.0, push_to_hub=False, scheduler_warmup_steps=2, scheduler_decay_steps=10,
        input_features={"observation.image": PolicyFeature(FeatureType.VISUAL, (3, 48, 48)),
                        "observation.state": PolicyFeature(FeatureType.STATE, (S,))},
        output_features={"action": PolicyFeature(FeatureType.ACTION, (A,))},
    )  # fmt: skip
    policy = SmolVLAWorldPolicy(cfg)
    optimizer, scheduler = _lerobot_optimizer(policy, tmp_path, monkeypatch)
    gates = {id(policy.world.fusion.gate), id(policy.prefix_fusion.gate)}
    (group,) = [g for g in optimizer.param_groups if {id(p) for p in g["params"]} == gates]
    (rest,) = [g for g in optimizer.param_groups if g is not group]
    assert group["weight_decay"] == 0.0
    for _ in range(4):  # through warm-up into the cosine decay: the ratio holds
        assert group["lr"] == pytest.approx(10.0 * rest["lr"])
        optimizer.step()
        scheduler.step()


# ------------------------------------------------------------------------------ world_token_c
def test_world_token_c_logs_the_token_copy_baseline(tmp_path):
    from lerobot_policy_world_modality.world.codebook import FitOptions, fit_codebook, save_codebook
    from lerobot_policy_world_modality.world_token_c.configuration_world_token_c import WorldTokenCConfig
    from lerobot_policy_world_modality.world_token_c.modeling_world_token_c import WorldTokenCPolicy

    torch.manual_seed(0)
    codes = torch.randn(4, D) * 10  # four well-separated codes
    book, stats = fit_codebook(codes.repeat(50, 1) + 0.01 * torch.randn(200, D), FitOptions(codes=4, iters=10))
    path = save_codebook(tmp_path / "book.safetensors", book, stats)
    cfg = WorldTokenCConfig(
        device="cpu", world_latent_dim=D, width=32, depth=1, heads=4, chunk_size=H, n_action_steps=3,
        future_frames=3, future_stride=2, codebook_path=str(path), push_to_hub=False,
        input_features={"observation.state": PolicyFeature(FeatureType.STATE, (S,)),
                        "observation.image": PolicyFeature(FeatureType.VISUAL, (3, 8, 8))},
        output_features={"action": PolicyFeature(FeatureType.ACTION, (A,))},
    )  # fmt: skip
    policy = WorldTokenCPolicy(cfg)
    # Horizon 1: same code as z_t for sample 0, not 1; sample 2 is a clamped copy past its end (masked);
    # horizon 2: another code for everyone; horizon 3: the same code for sample 0 only (of 3).
    current = codes[[0, 1, 2]]
    future = torch.stack([codes[[0, 3, 2]], codes[[1, 2, 3]], codes[[0, 3, 3]]], dim=1)
    valid = torch.tensor([[True, True, True], [True, True, True], [False, True, True]])
    batch = {OBS_WORLD_LATENT: current, OBS_WORLD_FUTURE: future, OBS_WORLD_FUTURE_VALID: valid,
             "observation.state": torch.randn(3, S), "action": torch.randn(3, H, A),
             "action_is_pad": torch.zeros(3, H, dtype=torch.bool)}  # fmt: skip
    policy.train()
    _, info = policy.forward(batch)
    assert info["world_copy_acc_h1"] == pytest.approx(0.5)  # 1 of the 2 valid samples
    assert info["world_copy_acc_h2"] == pytest.approx(0.0)
    assert info["world_copy_acc_h3"] == pytest.approx(1 / 3)


# ------------------------------------------------------------------------------ end to end
@pytest.mark.slow
def test_lerobot_train_with_dynamics_targets_saves_a_checkpoint_that_needs_no_cache(tmp_path, monkeypatch):
    """lerobot-train with every new option: the checkpoint carries the cache's statistics, its
    preprocessor the stride, its optimiser state the gate group; it reloads and acts without the cache."""
    import os
    import subprocess

    from support.cli import BIN, TINY_WORLD_F, short_train_flags

    from lerobot_policy_world_modality.latents.binding import bind_latent_input_stats, world_target_stats

    repo, root = "local/targets_e2e", tmp_path / "ds"
    make_synthetic_dataset(root, repo_id=repo, episode_lengths=(10, 3, 9), image_hw=(16, 16), use_videos=False)
    _precompute(repo, root)
    out = tmp_path / "train"
    new_options = ["--policy.world_target=delta", "--policy.standardise_targets=true",
                   "--policy.world_loss_type=smooth_l1", "--policy.future_stride=2",
                   "--policy.fusion_memory_norm=rms", "--policy.gate_lr_mult=10",
                   "--policy.memory_mode_train=scheduled", "--policy.prophet_input=motion",
                   "--policy.latent_input_norm=dataset"]  # fmt: skip
    cmd = [BIN / "lerobot-train", "--policy.type=world_f", "--policy.encoder=pixels", *TINY_WORLD_F,
           *new_options, f"--dataset.repo_id={repo}", f"--dataset.root={root}", *short_train_flags(out, 3)]  # fmt: skip
    res = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, timeout=600, env=dict(os.environ))
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-5000:]
    ckpt = out / "checkpoints" / "last" / "pretrained_model"
    pre = json.loads((ckpt / "policy_preprocessor.json").read_text())
    (step,) = [s for s in pre["steps"] if s.get("registry_name") == "world_modality_latents"]
    assert step["config"]["future_stride"] == 2
    groups = json.loads((out / "checkpoints" / "last" / "training_state" / "optimizer_param_groups.json").read_text())
    assert sorted(g["lr"] for g in groups) == pytest.approx([1e-4, 1e-4, 1e-3])  # optimizer_lr; x10 for the gate
    assert [g["weight_decay"] for g in groups if g["lr"] > 2e-4] == [0.0]

    # The statistics the run standardised with are those of the cache.
    cfg = PreTrainedConfig.from_pretrained(ckpt)
    expected = world_target_stats(cfg)
    input_stats = bind_latent_input_stats(cfg, dataset_meta=True)
    monkeypatch.setenv("LEROBOT_WM_CACHE", str(tmp_path / "nowhere"))  # no cache from here on
    policy = WorldFPolicy.from_pretrained(ckpt)
    assert policy.config.world_target == "delta" and policy.config.fusion_memory_norm == "rms"
    assert policy.config.prophet_input == "motion" and torch.isfinite(policy.world.step_std).all()
    for name, value in expected.items():
        torch.testing.assert_close(getattr(policy.world, name), value, rtol=0, atol=0)
    for name, value in input_stats.items():
        torch.testing.assert_close(getattr(policy.trunk, name), value, rtol=0, atol=0)
    policy.reset()
    action = policy.select_action({OBS_WORLD_LATENT: torch.randn(1, policy.config.world_latent_dim),
                                   "observation.state": torch.randn(1, S)})  # fmt: skip
    assert action.shape == (1, A) and torch.isfinite(action).all()


def test_smolvla_world_binds_the_statistics_of_its_training_dataset(tiny_vlm, tmp_path):  # noqa: F811
    from lerobot.datasets.lerobot_dataset import LeRobotDatasetMetadata
    from support.vlm import TINY_SMOLVLA

    from lerobot_policy_world_modality.latents.binding import world_target_stats
    from lerobot_policy_world_modality.smolvla_world.configuration_smolvla_world import SmolVLAWorldConfig
    from lerobot_policy_world_modality.smolvla_world.modeling_smolvla_world import SmolVLAWorldPolicy

    repo, root = "local/targets_vla", tmp_path / "ds"
    make_synthetic_dataset(root, repo_id=repo, episode_lengths=(6, 5), image_hw=(16, 16), use_videos=False)
    _precompute(repo, root)
    cfg = SmolVLAWorldConfig(
        vlm_model_name=str(tiny_vlm), device="cpu", **TINY_SMOLVLA, prophet_width=32, prophet_depth=1,
        prophet_heads=2, fusion_heads=2, history_frames=T, future_frames=K, push_to_hub=False,
        world_target="delta", standardise_targets=True, prophet_input="motion", future_stride=2,
        input_features={"observation.image": PolicyFeature(FeatureType.VISUAL, (3, 16, 16)),
                        "observation.state": PolicyFeature(FeatureType.STATE, (S,))},
        output_features={"action": PolicyFeature(FeatureType.ACTION, (A,))},
    )  # fmt: skip
    policy = SmolVLAWorldPolicy(cfg, dataset_meta=LeRobotDatasetMetadata(repo, root=root))
    expected = world_target_stats(cfg)
    for name in ("latent_mean", "latent_std", "target_mean", "target_std", "step_mean", "step_std"):
        torch.testing.assert_close(getattr(policy.world, name), expected[name], rtol=0, atol=0)
