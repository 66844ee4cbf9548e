"""world_f's in-trunk foresight path and the A_hist control on tiny dims (in-process, seconds).

One-way mask, the probe's interventions (zero / shuffle / random leave the foresight itself alone),
do-no-harm (blocked foresight = A_hist with the same weights), save/load, A_hist reading history.
"""

import pytest
import torch
from test_world_f_model import B, D, H, K, T, assert_rollout_history_matches_window, eval_batch, make_policy, train_batch

from lerobot_policy_world_modality.constants import OBS_WORLD_HISTORY, OBS_WORLD_LATENT
from lerobot_policy_world_modality.world.foresight import StagedMask, run_staged
from lerobot_policy_world_modality.world_f.modeling_world_f import WorldFPolicy


def in_trunk(seed=0, **kw) -> WorldFPolicy:
    return make_policy(seed=seed, world_path="in_trunk", **kw)


def staged(policy, batch, mode="pred", queries=None):
    """(trunk states, obs count, foresight count) of one in-trunk pass, with optional replaced queries."""
    history = batch[OBS_WORLD_HISTORY]
    obs = policy.trunk.observation_tokens(batch[OBS_WORLD_LATENT], batch["observation.state"], None, history)
    fore = policy.foresight.queries(obs.shape[0])
    q = policy.trunk.queries(obs.shape[0]) if queries is None else queries
    return run_staged(policy.trunk, obs, fore, q, StagedMask(), mode), obs.shape[1], fore.shape[1]


def test_in_trunk_builds_foresight_tokens_instead_of_prophet_and_cross_attention():
    policy = in_trunk(foresight_tokens=2)
    assert policy.prophet is None and policy.fusion is None and policy.foresight is not None
    assert policy.foresight.tokens.shape == (2, 32) and policy.trunk.motion is not None
    keys = policy.state_dict().keys()
    assert "world.prophet.tokens" in keys and not any(k.startswith("world.fusion") for k in keys)
    policy.train()
    loss, info = policy.forward(train_batch())
    loss.backward()
    # The world loss reaches the foresight head and, through the trunk, the action queries do not feed it.
    assert policy.foresight.head.weight.grad.abs().sum() > 0 and policy.foresight.tokens.grad.abs().sum() > 0
    assert {"action_loss", "world_loss", "world_cos_h1", "world_cos_h2"} <= set(info) and "gate" not in info


@pytest.mark.parametrize("mode", ["pred", "shuffle", "random", "zero"])
def test_foresight_outputs_do_not_depend_on_the_action_queries(mode):
    """The one-way mask: other queries change the query states but not one bit of the foresight states."""
    policy = in_trunk().eval()
    batch = train_batch()
    torch.manual_seed(0)
    base, n_obs, n_fore = staged(policy, batch, mode)
    torch.manual_seed(0)
    other, _, _ = staged(policy, batch, mode, queries=torch.randn(B, H, 32))
    ctx = slice(0, n_obs + n_fore)
    assert torch.equal(base[:, ctx], other[:, ctx])
    assert not torch.allclose(base[:, n_obs + n_fore :], other[:, n_obs + n_fore :])


def test_interventions_change_what_the_queries_read_never_the_prediction():
    """zero / shuffle / random: the foresight states (and so the prediction) equal pred's; the actions differ."""
    policy = in_trunk().eval()
    batch = train_batch()
    pred, n_obs, n_fore = staged(policy, batch, "pred")
    ctx = slice(0, n_obs + n_fore)
    for mode in ("zero", "shuffle", "random"):
        torch.manual_seed(0)
        alt, _, _ = staged(policy, batch, mode)
        assert torch.allclose(alt[:, ctx], pred[:, ctx], atol=1e-6), mode
        assert not torch.allclose(alt[:, n_obs + n_fore :], pred[:, n_obs + n_fore :], atol=1e-4), mode


def test_rollout_memory_modes_map_onto_the_interventions():
    """memory_mode_rollout=zero gives exactly the blocked-foresight actions; shuffle at B=1 is the identity."""
    batch = train_batch()
    actions = {}
    for mode in ("pred", "zero", "random"):
        policy = in_trunk(memory_mode_rollout=mode).eval()
        torch.manual_seed(0)
        actions[mode] = policy.predict_action_chunk(dict(batch))
    assert not torch.allclose(actions["pred"], actions["zero"]) and not torch.allclose(actions["pred"], actions["random"])
    one = {k: v[:1] for k, v in batch.items()}
    shuffled = in_trunk(memory_mode_rollout="shuffle").eval().predict_action_chunk(dict(one))
    assert torch.allclose(shuffled, in_trunk().eval().predict_action_chunk(dict(one)), atol=1e-6)


def test_blocked_foresight_is_exactly_a_hist_with_the_same_weights():
    """Do no harm: with its attention to the foresight blocked, in_trunk F acts as A_hist with its weights.

    (A_hist is the in-trunk path's baseline: same trunk, same history input, no foresight tokens.)
    """
    policy = in_trunk(memory_mode_rollout="zero").eval()
    torch.manual_seed(7)
    a_hist = WorldFPolicy(policy.config.__class__(**{**_cfg_kwargs(policy.config), "variant": "A_hist"})).eval()
    missing = set(a_hist.state_dict()) - set(policy.state_dict())
    assert not missing
    a_hist.load_state_dict({k: v for k, v in policy.state_dict().items() if k in a_hist.state_dict()})
    batch = train_batch()
    assert torch.allclose(policy.predict_action_chunk(dict(batch)), a_hist.predict_action_chunk(dict(batch)), atol=1e-5)


def _cfg_kwargs(cfg):
    import dataclasses

    kw = {f.name: getattr(cfg, f.name) for f in dataclasses.fields(cfg) if f.init}
    kw.update(variant=None, world_path="cross_attn", trunk_reads_history=False)
    return kw


def test_b_cont_on_the_in_trunk_path_trains_foresight_and_never_reads_it():
    policy = in_trunk(variant="B_cont")
    loss, info = policy.forward(train_batch())
    assert "world_loss" in info
    policy.eval()
    batch = train_batch()
    chunk = policy.predict_action_chunk(dict(batch))  # rollout skips the foresight tokens altogether
    with torch.no_grad():
        policy.foresight.tokens.add_(3.0)
    assert torch.equal(chunk, policy.predict_action_chunk(dict(batch)))


def test_in_trunk_save_load_gives_identical_actions_and_eval_history(tmp_path):
    policy = in_trunk(delta_prediction=True, foresight_tokens=2)
    policy.train()
    policy.forward(train_batch())
    policy.save_pretrained(tmp_path)
    loaded = WorldFPolicy.from_pretrained(tmp_path)
    assert loaded.config.world_path == "in_trunk" and loaded.config.foresight_tokens == 2
    latent = torch.randn(B, D)
    policy.reset()
    loaded.reset()
    for _ in range(3):  # select_action keeps the history itself, as at rollout
        obs = eval_batch(latent)
        assert torch.equal(policy.select_action(dict(obs)), loaded.select_action(dict(obs)))
        latent = latent + 0.1
    assert loaded.world_history.shape == (B, T, D)


def test_a_hist_reads_the_history_and_a_does_not():
    batch = train_batch()
    moved = dict(batch)
    moved[OBS_WORLD_HISTORY] = batch[OBS_WORLD_HISTORY].clone()
    moved[OBS_WORLD_HISTORY][:, :-1] += 0.5  # the past changes, the current latent does not
    for variant, reads in (("A_hist", True), ("A", False)):
        policy = make_policy(variant=variant).eval()
        assert policy.config.trunk_reads_history is reads and policy.prophet is None
        same = torch.equal(policy.predict_action_chunk(dict(batch)), policy.predict_action_chunk(dict(moved)))
        assert same is not reads, variant
    policy = make_policy(variant="A_hist")
    loss, info = policy.forward(train_batch())
    assert "world_loss" not in info and policy.trunk.motion.lag_weight.shape == (T, 32)


def test_world_path_config_errors_name_the_fix():
    from lerobot_policy_world_modality.world_f.configuration_world_f import WorldFConfig

    with pytest.raises(ValueError, match="world_path 'sideways'"):
        WorldFConfig(world_path="sideways")
    with pytest.raises(ValueError, match=r"memory_mode_train='oracle' does not exist on world_path=in_trunk"):
        WorldFConfig(world_path="in_trunk", memory_mode_train="oracle")
    with pytest.raises(ValueError, match="must be a multiple of foresight_tokens"):
        WorldFConfig(world_path="in_trunk", future_frames=4, foresight_tokens=3)
    with pytest.raises(ValueError, match="needs depth >= 2"):
        WorldFConfig(world_path="in_trunk", depth=1)
    with pytest.raises(ValueError, match="needs history_frames >= 2"):
        WorldFConfig(variant="A_hist", history_frames=1)
    # The cross-attention path keeps its oracle mode; A ignores world_path.
    assert WorldFConfig(memory_mode_train="oracle").memory_mode_train == "oracle"
    assert not WorldFConfig(variant="A", world_path="in_trunk").in_trunk


@pytest.mark.parametrize("detach", [False, True])
def test_detach_memory_stops_the_action_loss_at_the_foresight_states(detach):
    """With detach_memory the action loss reaches the foresight tokens only through the world loss (off here)."""
    policy = in_trunk(detach_memory=detach, lambda_world=0.0)
    policy.train()
    loss, _ = policy.forward(train_batch())
    loss.backward()
    grad = policy.foresight.tokens.grad
    reached = grad is not None and bool(grad.abs().sum() > 0)
    assert reached is not detach
    assert policy.trunk.action_queries.grad.abs().sum() > 0  # the actions still train


@pytest.mark.parametrize("kw", [{"variant": "A_hist"}, {"world_path": "in_trunk"}])
def test_rollout_history_gives_the_training_window_actions(kw):
    """A_hist and in_trunk keep their own latent history at rollout: a rollout step and a training-style
    batch with the cache's episode-clamped window give the same chunk; A keeps none."""
    latents = torch.randn(4, 2, D)
    assert_rollout_history_matches_window(make_policy(**kw).eval(), latents)
    a = make_policy(variant="A").eval()
    a.select_action(eval_batch(latents[0]))
    assert a.world_history is None
