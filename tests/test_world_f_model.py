"""The `world_f` policy on tiny dims: do-no-harm, non-finite memory, eval history, save/load, losses."""

import pytest
import torch
from lerobot.configs.types import FeatureType, PolicyFeature

from lerobot_policy_world_modality.constants import (
    OBS_WORLD_FUTURE,
    OBS_WORLD_FUTURE_VALID,
    OBS_WORLD_HISTORY,
    OBS_WORLD_LATENT,
)
from lerobot_policy_world_modality.latents.cache import EpisodeBounds
from lerobot_policy_world_modality.world_f.configuration_world_f import WorldFConfig
from lerobot_policy_world_modality.world_f.modeling_world_f import WorldFPolicy

B, D, S, A, T, K, H = 3, 12, 4, 4, 3, 2, 5



def make_config(**overrides) -> WorldFConfig:
    kw = dict(
        device="cpu",
        world_latent_dim=D,
        width=32,
        depth=2,
        heads=4,
        fusion_heads=4,
        prophet_width=16,
        prophet_depth=1,
        prophet_heads=2,
        chunk_size=H,
        n_action_steps=3,
        history_frames=T,
        future_frames=K,
        dropout=0.0,
        input_features={
            "observation.state": PolicyFeature(FeatureType.STATE, (S,)),
            "observation.image": PolicyFeature(FeatureType.VISUAL, (3, 8, 8)),
        },
        output_features={"action": PolicyFeature(FeatureType.ACTION, (A,))},
    )
    kw.update(overrides)
    return WorldFConfig(**kw)


def make_policy(seed=0, **overrides) -> WorldFPolicy:
    torch.manual_seed(seed)
    return WorldFPolicy(make_config(**overrides))


def train_batch(seed=1, b=B):
    g = torch.Generator().manual_seed(seed)
    history = torch.randn(b, T, D, generator=g)
    valid = torch.ones(b, K, dtype=torch.bool)
    valid[0, 1:] = False
    return {
        OBS_WORLD_LATENT: history[:, -1].clone(),
        OBS_WORLD_HISTORY: history,
        OBS_WORLD_FUTURE: torch.randn(b, K, D, generator=g),
        OBS_WORLD_FUTURE_VALID: valid,
        "observation.state": torch.randn(b, S, generator=g),
        "action": torch.randn(b, H, A, generator=g),
        "action_is_pad": torch.zeros(b, H, dtype=torch.bool),
    }


def eval_batch(latent, seed=2):
    g = torch.Generator().manual_seed(seed)
    return {OBS_WORLD_LATENT: latent, "observation.state": torch.randn(latent.shape[0], S, generator=g)}


def as_variant_a(policy_f: WorldFPolicy) -> WorldFPolicy:
    """Variant A with exactly F's trunk and head weights."""
    policy_a = make_policy(seed=123, variant="A")
    shared = {k: v for k, v in policy_f.state_dict().items() if k in policy_a.state_dict()}
    policy_a.load_state_dict(shared, strict=True)
    return policy_a


# ---------------------------------------------------------------------------------------------- do no harm
def test_closed_gate_gives_a_actions_exactly_and_gate_gets_gradient():
    policy_f = make_policy()
    assert policy_f.fusion is not None and policy_f.fusion.gate.item() == 0.0
    policy_a = as_variant_a(policy_f)
    assert policy_a.prophet is None and policy_a.fusion is None
    policy_b = make_policy(seed=7, variant="B_cont")
    policy_b.load_state_dict(policy_f.state_dict(), strict=False)

    batch = train_batch()
    for policy in (policy_f, policy_a, policy_b):
        policy.reset()
    actions_f = policy_f.predict_action_chunk(eval_batch(batch[OBS_WORLD_LATENT]))
    actions_a = policy_a.predict_action_chunk(eval_batch(batch[OBS_WORLD_LATENT]))
    actions_b = policy_b.predict_action_chunk(eval_batch(batch[OBS_WORLD_LATENT]))
    assert torch.equal(actions_f, actions_a) and torch.equal(actions_b, actions_a)

    # One training step: F's loss equals A's action loss plus the world loss; the gate gets a gradient.
    policy_f.train()
    policy_a.train()
    loss_f, info_f = policy_f.forward(batch)
    _, info_a = policy_a.forward(batch)
    assert info_f["action_loss"] == info_a["action_loss"]
    loss_f.backward()
    assert policy_f.fusion.gate.grad is not None and policy_f.fusion.gate.grad.abs().item() > 0

    # The test can fail: with the gate open, F's actions differ from A's.
    with torch.no_grad():
        policy_f.fusion.gate.fill_(1.0)
    policy_f.reset()
    assert not torch.allclose(policy_f.predict_action_chunk(eval_batch(batch[OBS_WORLD_LATENT])), actions_a)


def test_gate_opens_under_training():
    policy = make_policy(dropout=0.0)
    opt = torch.optim.AdamW(policy.get_optim_params(), lr=1e-2)
    policy.train()
    for step in range(3):
        loss, _ = policy.forward(train_batch(seed=step))
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert policy.fusion.gate.item() != 0.0


def test_optim_groups_cover_every_parameter_once():
    policy = make_policy()
    groups = policy.get_optim_params()
    ids = [id(p) for g in groups for p in g["params"]]
    assert sorted(ids) == sorted(id(p) for p in policy.parameters()) and len(ids) == len(set(ids))
    assert any(p is policy.fusion.gate for p in groups[1]["params"])  # no weight decay on the gate


def test_fused_adamw_groups_train_like_the_per_tensor_optimizer():
    """The groups ask for the fused kernel (CPU, torch >= 2.4) and LeRobot's preset then takes the same steps."""
    fused_policy, plain_policy = make_policy(), make_policy()
    fused_groups = fused_policy.get_optim_params()
    assert all(g.get("fused") for g in fused_groups)
    plain_groups = [{k: v for k, v in g.items() if k != "fused"} for g in plain_policy.get_optim_params()]
    opts = [fused_policy.config.get_optimizer_preset().build(g) for g in (fused_groups, plain_groups)]
    assert opts[0].param_groups[0]["fused"] and not opts[1].param_groups[0]["fused"]
    before = [p.detach().clone() for p in plain_policy.parameters()]
    # One step from identical weights and gradients (later steps amplify rounding: Adam normalises tiny gradients).
    for policy, opt in zip((fused_policy, plain_policy), opts):
        loss, _ = policy.forward(train_batch())
        loss.backward()
        opt.step()
    moved = 0
    for a, b, b0 in zip(fused_policy.parameters(), plain_policy.parameters(), before):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-8)
        moved += int(not torch.equal(b, b0))
    assert moved > 0


# ---------------------------------------------------------------------------------------------- non-finite memory
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_memory_leaves_actions_finite_and_equal_to_closed_gate(bad):
    policy = make_policy()
    latent = train_batch()[OBS_WORLD_LATENT]
    policy.reset()
    closed = policy.predict_action_chunk(eval_batch(latent))
    with torch.no_grad():
        policy.fusion.gate.fill_(2.0)  # gate wide open
        policy.prophet.out_proj.bias.fill_(bad)  # every predicted latent is non-finite
    policy.reset()
    actions = policy.predict_action_chunk(eval_batch(latent))
    assert torch.isfinite(actions).all()
    assert torch.equal(actions, closed)
    # Training with non-finite memory: the action loss and its gradients stay finite.
    policy.train()
    batch = train_batch()
    _, info = policy.forward(batch)
    assert torch.isfinite(torch.tensor(info["action_loss"]))


# ---------------------------------------------------------------------------------------------- eval history
def test_eval_history_matches_training_windows_across_episodes():
    """select_action builds exactly the cache's episode-clamped windows (repeat-padded at episode start)."""
    episodes = [(0, 5), (5, 12)]  # global [from, to) ranges, as in LeRobot's meta.episodes
    bounds = EpisodeBounds([a for a, _ in episodes], [b for _, b in episodes])
    latents = torch.randn(12, 1, D)  # global frame i -> latent (batch of one env)
    policy = make_policy(n_action_steps=3)
    for start, end in episodes:
        policy.reset()
        assert policy.world_history is None
        for t in range(start, end):
            policy.select_action(eval_batch(latents[t]))
            window = bounds.history_indices(torch.tensor([t]), T)[0]
            by_hand = [max(i, start) for i in range(t - T + 1, t + 1)]
            assert window.tolist() == by_hand
            assert torch.equal(policy.world_history[0], latents[window, 0])


def assert_rollout_history_matches_window(policy, latents):
    """Rollout steps over `latents` [t, B, D] give the chunks of batches carrying the cache's clamped window."""
    policy.reset()
    for t in range(3):
        obs = eval_batch(latents[t])
        chunk = policy.predict_action_chunk(obs)
        window = torch.stack([latents[max(i, 0)] for i in range(t - T + 1, t + 1)], dim=1)
        assert torch.equal(chunk, policy.predict_action_chunk({**obs, OBS_WORLD_HISTORY: window}))


def test_eval_actions_equal_actions_from_training_window():
    """A rollout step and a training-style batch with the cache's window give the same chunk."""
    assert_rollout_history_matches_window(make_policy(), torch.randn(4, 2, D))


def test_reset_clears_action_queue_and_history():
    policy = make_policy(n_action_steps=3)
    policy.reset()
    first = policy.select_action(eval_batch(torch.randn(B, D)))
    assert first.shape == (B, A) and len(policy._action_queue) == 2
    policy.reset()
    assert len(policy._action_queue) == 0 and policy.world_history is None


def test_select_action_switches_a_training_policy_to_eval():
    """select_action after a training step runs every module in eval mode (dropout off)."""
    policy = make_policy(dropout=0.5)
    policy.train()
    policy.reset()
    latent = torch.randn(B, D)
    first = policy.select_action(eval_batch(latent))
    assert not any(m.training for m in policy.modules())
    policy.reset()
    torch.testing.assert_close(policy.select_action(eval_batch(latent)), first, rtol=0, atol=0)


# ---------------------------------------------------------------------------------------------- save / load
def test_checkpoint_whose_weights_do_not_fit_is_refused_not_loaded_half_random(tmp_path):
    """Renamed modules (a checkpoint of an older layout) or missing world weights: a clear error, never a
    policy whose Prophet and cross-attention are silently left at their random initialisation."""
    from safetensors.torch import load_file, save_file

    from lerobot_policy_world_modality.checkpoints import CheckpointMismatchError

    make_policy().save_pretrained(tmp_path)
    weights = load_file(tmp_path / "model.safetensors")
    old_layout = {k.removeprefix("world."): v for k, v in weights.items()}  # before the shared WorldPath
    save_file(old_layout, tmp_path / "model.safetensors")
    with pytest.raises(CheckpointMismatchError, match=r"do not fit this world_f policy: \d+ missing .*'world\.fusion"):
        WorldFPolicy.from_pretrained(tmp_path)
    save_file({k: v for k, v in weights.items() if not k.startswith("world.prophet.")}, tmp_path / "model.safetensors")
    with pytest.raises(CheckpointMismatchError, match="0 unexpected"):
        WorldFPolicy.from_pretrained(tmp_path)
    save_file(weights, tmp_path / "model.safetensors")
    WorldFPolicy.from_pretrained(tmp_path)  # the untouched weights load


def test_save_load_round_trip_gives_identical_actions(tmp_path):
    policy = make_policy(delta_prediction=True, gate_per_channel=True, memory_mode_train="scheduled")
    with torch.no_grad():
        policy.fusion.gate.fill_(0.7)  # make the world path matter for the comparison
    policy.train()
    policy.forward(train_batch())
    policy.save_pretrained(tmp_path)
    loaded = WorldFPolicy.from_pretrained(tmp_path)
    assert loaded.config.delta_prediction and loaded.config.memory_mode_train == "scheduled"
    assert loaded.config.world_latent_dim == D and int(loaded.world_train_step) == 1
    latent = torch.randn(B, D)
    policy.reset()
    loaded.reset()
    for _ in range(2):
        obs = eval_batch(latent)
        assert torch.equal(policy.predict_action_chunk(obs), loaded.predict_action_chunk(obs))
        latent = latent + 0.1


# ---------------------------------------------------------------------------------------------- losses and logs
def test_forward_logs_python_floats_and_masks_padding():
    policy = make_policy()
    policy.train()
    batch = train_batch()
    loss, info = policy.forward(batch)
    expected = {"action_loss", "world_loss", "world_cos_h1", "world_cos_h2", "gate", "memory_norm", "attn_entropy"}
    assert expected <= set(info) and all(isinstance(v, float) for v in info.values())
    assert info["gate"] == 0.0 and info["memory_norm"] > 0
    # Padded action steps and invalid future horizons contribute nothing.
    batch["action_is_pad"][:, -2:] = True
    _, base = policy.forward(batch)
    changed = {k: v.clone() for k, v in batch.items()}
    changed["action"][:, -2:] += 100.0
    changed[OBS_WORLD_FUTURE][0, 1:] = float("nan")  # horizon 2 of sample 0 is past the episode end
    _, info2 = policy.forward(changed)
    assert info2["action_loss"] == pytest.approx(base["action_loss"])
    assert info2["world_loss"] == pytest.approx(base["world_loss"])


def test_mse_loss_and_variant_a_logs():
    policy = make_policy(variant="A", action_loss="mse")
    policy.train()
    batch = {k: v for k, v in train_batch().items() if "world" not in k or k == OBS_WORLD_LATENT}
    loss, info = policy.forward(batch)
    manual = (policy.predict_action_chunk(batch) - batch["action"]).pow(2).mean()
    assert loss.item() == pytest.approx(manual.item(), rel=1e-5)
    assert set(info) == {"action_loss", "loss"}


def test_scheduled_sampling_probability_decays_over_training_steps():
    policy = make_policy(memory_mode_train="scheduled", scheduled_decay_steps=4)
    policy.train()
    probs = [policy.forward(train_batch())[1]["oracle_prob"] for _ in range(6)]
    assert probs == pytest.approx([1.0, 0.75, 0.5, 0.25, 0.0, 0.0])


def test_oracle_memory_in_training_reads_the_targets():
    """With oracle memory, the actions depend on the true future and not on the Prophet's prediction."""
    policy = make_policy(memory_mode_train="oracle", gate_init=1.0)
    policy.train()
    batch = train_batch()
    _, base = policy.forward(batch)
    with torch.no_grad():
        policy.prophet.out_proj.bias.add_(5.0)
    _, info = policy.forward(batch)
    assert info["action_loss"] == pytest.approx(base["action_loss"])
    changed = dict(batch, **{OBS_WORLD_FUTURE: torch.randn(B, K, D)})
    assert policy.forward(changed)[1]["action_loss"] != pytest.approx(base["action_loss"])


# ---------------------------------------------------------------------------------------------- config
def test_config_variants_and_errors():
    assert (make_config(variant="B_cont").use_prophet, make_config(variant="B_cont").inject_memory) == (True, False)
    with pytest.raises(ValueError, match="variant=A"):
        make_config(use_prophet=False, inject_memory=True)
    with pytest.raises(ValueError, match="rollout"):
        make_config(memory_mode_rollout="oracle")
    with pytest.raises(ValueError, match="n_action_steps"):
        make_config(n_action_steps=H + 1)
    cfg = make_config()
    assert cfg.observation_delta_indices is None and cfg.reward_delta_indices is None
    assert cfg.action_delta_indices == list(range(H))
    assert cfg.get_optimizer_preset().lr == cfg.optimizer_lr and cfg.type == "world_f"
    with pytest.raises(ValueError, match="fusion_dim"):
        make_config(fusion_dim=10, fusion_heads=4)
    with pytest.raises(ValueError, match="scheduled_prob_end"):  # exponential decay towards 0 is undefined
        make_config(memory_mode_train="scheduled", scheduled_shape="exponential")


def test_cross_attention_runs_at_fusion_dim():
    fusion = make_policy(fusion_dim=8, fusion_heads=2).fusion
    assert (fusion.attn_dim, fusion.q.out_features, fusion.kv.out_features) == (8, 8, 16)
    assert fusion.out.in_features == 8 and fusion.out.out_features == 32  # back to the trunk width


# ---------------------------------------------------------------------------------------------- language input
@pytest.fixture(scope="module")
def text_dir(tmp_path_factory):
    from support.text import make_tiny_text_encoder

    return make_tiny_text_encoder(tmp_path_factory.mktemp("text") / "tiny_bert")


def with_tasks(batch: dict, tasks) -> dict:
    return {**batch, "task": list(tasks)}


def test_language_is_off_by_default_and_loads_nothing():
    cfg = make_config()
    assert cfg.language_encoder is None and cfg.language_encoder_revision is None
    policy = make_policy()
    assert policy.text_encoder is None and policy._text_encoder == []
    assert policy.trunk.num_obs_tokens == 2 and policy.trunk.obs_embed.shape == (2, 32)
    assert not any("language" in k for k in policy.state_dict())
    policy.train()
    policy.forward(train_batch())  # no 'task' needed
    assert policy._text_encoder == []


def test_language_token_depends_on_the_instruction_and_each_is_encoded_once(text_dir):
    policy = make_policy(language_encoder=str(text_dir))
    assert policy.trunk.num_obs_tokens == 3 and policy._text_encoder == []  # loaded lazily
    latent = train_batch()[OBS_WORLD_LATENT]
    obs = eval_batch(latent)
    tasks_a = ["open the drawer", "open the drawer", "press the button"]
    tasks_b = ["close the drawer", "open the drawer", "press the button"]
    chunk_a = policy.predict_action_chunk({**obs, OBS_WORLD_HISTORY: latent.unsqueeze(1).repeat(1, T, 1), "task": tasks_a})
    enc = policy.text_encoder
    assert enc.num_encoded == 2  # distinct strings only
    chunk_b = policy.predict_action_chunk({**obs, OBS_WORLD_HISTORY: latent.unsqueeze(1).repeat(1, T, 1), "task": tasks_b})
    assert enc.num_encoded == 3
    assert not torch.allclose(chunk_a[0], chunk_b[0])  # row 0's instruction changed
    assert torch.equal(chunk_a[1:], chunk_b[1:])  # the others did not
    tok_a = policy.trunk.observation_tokens(latent, obs["observation.state"], enc.encode(tasks_a))
    tok_b = policy.trunk.observation_tokens(latent, obs["observation.state"], enc.encode(tasks_b))
    assert not torch.equal(tok_a[0, 2], tok_b[0, 2]) and torch.equal(tok_a[:, :2], tok_b[:, :2])
    # A rollout re-uses the cached embedding at every inference.
    policy.reset()
    for _ in range(7):
        policy.select_action(with_tasks(eval_batch(torch.randn(B, D)), tasks_a))
    assert enc.num_encoded == 3


def test_language_trains_the_projection_not_the_text_model(text_dir):
    policy = make_policy(language_encoder=str(text_dir))
    policy.train()
    loss, _ = policy.forward(with_tasks(train_batch(), ["pick the cube"] * B))
    loss.backward()
    assert policy.trunk.language_proj.weight.grad.abs().sum() > 0
    text_params = {id(p) for p in policy.text_encoder.model.parameters()}
    assert not text_params & {id(p) for p in policy.parameters()}
    assert all(p.grad is None for p in policy.text_encoder.model.parameters())


def test_text_encoder_is_not_saved_and_round_trip_gives_identical_actions(text_dir, tmp_path):
    policy = make_policy(language_encoder=str(text_dir))
    keys = set(policy.state_dict())
    assert {"trunk.language_proj.weight", "trunk.language_norm.weight"} <= keys
    _ = policy.text_encoder  # loaded now: must still stay out of the state dict
    assert set(policy.state_dict()) == keys and not any("embeddings" in k or "encoder.layer" in k for k in keys)
    policy.save_pretrained(tmp_path)
    loaded = WorldFPolicy.from_pretrained(tmp_path)
    assert loaded.config.language_encoder == str(text_dir)
    assert loaded.config.language_encoder_revision == policy.config.language_encoder_revision is not None
    latent = torch.randn(B, D)
    tasks = ["open the drawer", "press the button", "pick the cube"]
    policy.reset()
    loaded.reset()
    for _ in range(2):
        obs = with_tasks(eval_batch(latent), tasks)
        assert torch.equal(policy.predict_action_chunk(obs), loaded.predict_action_chunk(obs))
        latent = latent + 0.1


def test_missing_or_empty_instruction_is_a_clear_error(text_dir):
    policy = make_policy(language_encoder=str(text_dir))
    policy.train()
    with pytest.raises(KeyError, match="no 'task'"):
        policy.forward(train_batch())
    with pytest.raises(ValueError, match="Empty language instruction"):
        policy.forward(with_tasks(train_batch(), ["pick the cube", "", "pick the cube"]))
    with pytest.raises(ValueError, match="Empty language instruction"):
        policy.select_action(with_tasks(eval_batch(torch.randn(B, D)), [""] * B))  # an env without instructions


def test_checkpoint_with_another_text_encoder_fails_clearly(text_dir, tmp_path):
    from support.text import make_tiny_text_encoder

    from lerobot_policy_world_modality.language import TextEncoderLoadError

    own = make_tiny_text_encoder(tmp_path / "own", seed=0)
    make_policy(language_encoder=str(own)).save_pretrained(tmp_path / "ckpt")
    # Same name, other weights (the directory was overwritten after training).
    make_tiny_text_encoder(own, seed=5)
    with pytest.raises(TextEncoderLoadError, match="mismatch.*--policy.language_encoder"):
        WorldFPolicy.from_pretrained(tmp_path / "ckpt")
    # Evaluating with a different encoder than the one recorded, as `--policy.language_encoder=...` would.
    from lerobot.configs.policies import PreTrainedConfig

    cfg = PreTrainedConfig.from_pretrained(tmp_path / "ckpt")
    cfg.language_encoder = str(make_tiny_text_encoder(tmp_path / "other", seed=7))
    with pytest.raises(TextEncoderLoadError, match="mismatch"):
        WorldFPolicy.from_pretrained(tmp_path / "ckpt", config=cfg)
    # Turning the language input off for a checkpoint trained with it.
    cfg.language_encoder = None
    with pytest.raises(TextEncoderLoadError, match="trained with a language input"):
        WorldFPolicy.from_pretrained(tmp_path / "ckpt", config=cfg)


def test_task_reaches_the_policy_through_its_preprocessor(text_dir):
    """lerobot-eval's observation (after `add_envs_task`) keeps `task` through world_f's preprocessor."""
    from lerobot_policy_world_modality.world_f.processor_world_f import make_world_f_pre_post_processors

    cfg = make_config(language_encoder=str(text_dir), world_latent_dim=None, encoder="pixels-2")
    policy = WorldFPolicy(cfg)
    pre, post = make_world_f_pre_post_processors(cfg)
    obs = {
        "observation.image": torch.rand(2, 3, 8, 8),
        "observation.state": torch.randn(2, S),
        "task": ["press the button", "open the drawer"],
    }
    batch = pre(obs)
    assert batch["task"] == ["press the button", "open the drawer"]
    policy.reset()
    action = post(policy.select_action(batch))
    assert action.shape == (2, A) and policy.text_encoder.num_encoded == 2


@pytest.mark.parametrize("path", ["cross_attn", "in_trunk"])
def test_world_f_aligns_its_action_query_states_with_the_future(path):
    plain = make_policy(world_path=path)
    aligned = make_policy(world_path=path, lambda_align=0.5)
    missing, unexpected = aligned.load_state_dict(plain.state_dict(), strict=False)
    assert not unexpected and sorted(missing) == ["align.proj.bias", "align.proj.weight"]
    b = train_batch()
    torch.manual_seed(0)
    plain_loss, plain_info = plain.forward(dict(b))
    torch.manual_seed(0)
    loss, info = aligned.forward(dict(b))
    assert info["action_loss"] == plain_info["action_loss"]
    assert loss.item() == pytest.approx(plain_loss.item() + 0.5 * info["align_loss"], rel=1e-5)
    # The loss reaches the trunk through the action-query states.
    loss.backward()
    plain_loss.backward()
    theirs = dict(plain.named_parameters())
    trunk = [(p.grad, theirs[n].grad) for n, p in aligned.named_parameters()
             if n.startswith("trunk.") and p.grad is not None]  # fmt: skip
    assert trunk and any(not torch.allclose(mine, other) for mine, other in trunk)
    # Invalid future steps (sample 0, horizon 2 of train_batch) do not count.
    changed = dict(b)
    changed[OBS_WORLD_FUTURE] = b[OBS_WORLD_FUTURE].clone()
    changed[OBS_WORLD_FUTURE][0, 1] += 5.0
    torch.manual_seed(0)
    assert aligned.forward(changed)[1]["align_loss"] == info["align_loss"]
