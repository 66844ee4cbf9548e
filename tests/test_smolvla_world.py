"""`smolvla_world` on a tiny offline SmolVLM: options, do-no-harm vs SmolVLA, init_from, save/load, processors."""

import dataclasses
import json
import re
import shutil

import draccus
import pytest
import torch
from lerobot.configs.policies import PreTrainedConfig
from lerobot.configs.types import FeatureType, PolicyFeature
from lerobot.policies.smolvla.configuration_smolvla import SmolVLAConfig
from lerobot.policies.smolvla.modeling_smolvla import SmolVLAPolicy
from support import vlm
from support.vlm import TINY_SMOLVLA

from lerobot_policy_world_modality.constants import (
    OBS_WORLD_FUTURE,
    OBS_WORLD_FUTURE_VALID,
    OBS_WORLD_HISTORY,
    OBS_WORLD_LATENT,
)
from lerobot_policy_world_modality.smolvla_world.configuration_smolvla_world import (
    SMOLVLA_FIELDS,
    SmolVLAOptions,
    SmolVLAWorldConfig,
)
from lerobot_policy_world_modality.smolvla_world.modeling_smolvla_world import SmolVLAWorldPolicy

tiny_vlm = vlm.tiny_vlm  # the session fixture: one tiny SmolVLM for every test

B, S, A, T, K = 2, 4, 4, 3, 2
H = TINY_SMOLVLA["chunk_size"]
FEATURES = {
    "input_features": {
        "observation.image": PolicyFeature(FeatureType.VISUAL, (3, 48, 48)),
        "observation.state": PolicyFeature(FeatureType.STATE, (S,)),
    },
    "output_features": {"action": PolicyFeature(FeatureType.ACTION, (A,))},
}
TINY_WORLD = dict(
    prophet_width=32, prophet_depth=1, prophet_heads=2, fusion_heads=2, history_frames=T, future_frames=K
)


def make_config(vlm_dir, **overrides) -> SmolVLAWorldConfig:
    kw = dict(vlm_model_name=str(vlm_dir), device="cpu", **TINY_SMOLVLA, **TINY_WORLD)
    kw.update({k: dict(v) for k, v in FEATURES.items()})
    kw.update(overrides)
    return SmolVLAWorldConfig(**kw)


def make_smolvla(vlm_dir, **overrides) -> SmolVLAPolicy:
    cfg = SmolVLAConfig(vlm_model_name=str(vlm_dir), device="cpu", **{**TINY_SMOLVLA, **overrides})
    cfg.input_features, cfg.output_features = (dict(v) for v in FEATURES.values())
    return SmolVLAPolicy(cfg)


def batch(vlm_dir, dim, seed=0, tasks=("move the square\n", "press the red button\n")):
    """A preprocessed batch (tokenised instructions, world latents) as the pipeline would give it."""
    from transformers import AutoTokenizer

    g = torch.Generator().manual_seed(seed)
    tok = AutoTokenizer.from_pretrained(str(vlm_dir))(list(tasks), padding="longest", return_tensors="pt")
    history = torch.randn(B, T, dim, generator=g)
    return {
        "observation.image": torch.rand(B, 3, 48, 48, generator=g),
        "observation.state": torch.randn(B, S, generator=g),
        "observation.language.tokens": tok["input_ids"],
        "observation.language.attention_mask": tok["attention_mask"].bool(),
        "action": torch.randn(B, H, A, generator=g),
        OBS_WORLD_LATENT: history[:, -1].clone(),
        OBS_WORLD_HISTORY: history,
        OBS_WORLD_FUTURE: torch.randn(B, K, dim, generator=g),
        OBS_WORLD_FUTURE_VALID: torch.tensor([[True, False], [True, True]]),
    }


def gates(policy):
    return {n: p for n, p in policy.named_parameters() if n.endswith("gate")}


def test_config_carries_every_smolvla_option_with_its_default_and_parses_from_the_cli():
    base = {f.name for f in dataclasses.fields(PreTrainedConfig)}
    theirs = {f.name: f for f in dataclasses.fields(SmolVLAConfig) if f.name not in base}
    ours = {f.name: f for f in dataclasses.fields(SmolVLAOptions)}
    assert list(ours) == list(theirs) and SMOLVLA_FIELDS == tuple(theirs)
    for name, f in theirs.items():
        default = f.default_factory() if f.default is dataclasses.MISSING else f.default
        mine = (
            ours[name].default_factory() if ours[name].default is dataclasses.MISSING else ours[name].default
        )
        assert mine == default, name
    assert not issubclass(SmolVLAWorldConfig, SmolVLAConfig)

    # As `--policy.type=smolvla_world --policy.chunk_size=8 ...` (or a --config_path file) is decoded.
    cfg = draccus.decode(
        PreTrainedConfig,
        {"type": "smolvla_world", "chunk_size": 8, "n_action_steps": 3, "resize_imgs_with_padding": [64, 64],
         "train_expert_only": False, "inject_prefix": True, "device": "cpu"},
    )  # fmt: skip
    assert isinstance(cfg, SmolVLAWorldConfig) and cfg.type == "smolvla_world"
    inner = cfg.smolvla_config()
    assert (inner.chunk_size, inner.n_action_steps, inner.resize_imgs_with_padding) == (8, 3, (64, 64))
    assert inner.train_expert_only is False and cfg.inject_prefix
    with pytest.raises(ValueError, match="chunk size"):
        SmolVLAWorldConfig(device="cpu", chunk_size=4, n_action_steps=5)
    with pytest.raises(ValueError, match="use_prophet"):
        SmolVLAWorldConfig(device="cpu", use_prophet=False, inject_memory=False, inject_prefix=True)


def test_every_field_smolvla_world_declares_itself_is_in_its_docs_reference():
    """docs/smolvla_world.md's hand-written table must list the fields that only smolvla_world has."""
    from pathlib import Path

    text = (Path(__file__).resolve().parents[1] / "docs" / "smolvla_world.md").read_text()
    own = vars(SmolVLAWorldConfig)["__annotations__"]
    assert {"init_from", "coc_path", "lambda_text", "lambda_align", "explain"} <= set(own)
    assert [n for n in own if f"| `{n}` |" not in text] == []


@pytest.mark.parametrize("points", [{}, {"inject_expert_input": True, "inject_prefix": True}])
def test_closed_gates_give_smolvla_actions_exactly_and_every_gate_gets_a_gradient(tiny_vlm, points):
    torch.manual_seed(0)
    world = SmolVLAWorldPolicy(make_config(tiny_vlm, **points))
    smolvla = make_smolvla(tiny_vlm)
    smolvla.load_state_dict(world.smolvla.state_dict())
    dim = world.config.world_latent_dim
    noise = torch.randn(B, H, TINY_SMOLVLA["max_action_dim"])
    for step in range(3):  # the second call is served from the queue, the third predicts a new chunk
        b = batch(tiny_vlm, dim, seed=step)
        assert torch.equal(
            world.select_action(dict(b), noise=noise), smolvla.select_action(dict(b), noise=noise)
        )
    assert not any(m.training for m in world.modules())  # select_action put the whole policy in eval mode

    # The policy's own history advanced at every step (queue-served ones too), oldest first.
    assert torch.equal(world.history.value[:, -1], batch(tiny_vlm, dim, seed=2)[OBS_WORLD_LATENT])
    assert torch.equal(world.history.value[:, -3], batch(tiny_vlm, dim, seed=0)[OBS_WORLD_LATENT])
    # The history advances on calls served from the action queue too.
    assert torch.equal(world.history.value[:, -2], batch(tiny_vlm, dim, seed=1)[OBS_WORLD_LATENT])
    world.reset()
    assert world.history.value is None and len(world._action_queue) == 0

    # Opening a gate changes the actions: the memory really reaches the action expert.
    with torch.no_grad():
        for g in gates(world).values():
            g.fill_(0.5)
    b = batch(tiny_vlm, dim)
    assert not torch.allclose(
        world.predict_action_chunk(dict(b), noise=noise), smolvla.predict_action_chunk(b, noise)
    )

    with torch.no_grad():
        for g in gates(world).values():
            g.zero_()
    world.train()
    loss, info = world.forward(batch(tiny_vlm, dim))
    loss.backward()
    expected = 1 + len(points)
    assert len(gates(world)) == expected
    for name, g in gates(world).items():
        assert g.grad is not None and g.grad.abs().sum() > 0, name
    assert info["gate"] == 0.0 and "world_loss" in info and "world_cos_h2" in info
    assert all(isinstance(v, float) for v in info.values())
    assert int(world.world.train_step) == 1


def test_memory_modes_and_world_loss_only_configuration(tiny_vlm):
    torch.manual_seed(0)
    world = SmolVLAWorldPolicy(make_config(tiny_vlm, memory_mode_rollout="zero", gate_init=0.5))
    b = batch(tiny_vlm, world.config.world_latent_dim)
    noise = torch.randn(B, H, TINY_SMOLVLA["max_action_dim"])
    zero = world.predict_action_chunk(dict(b), noise=noise)
    world.config.memory_mode_rollout = "pred"
    assert not torch.allclose(zero, world.predict_action_chunk(dict(b), noise=noise))

    # World loss without injection (B_cont-like): no gate, no world module at rollout.
    torch.manual_seed(0)
    cont = SmolVLAWorldPolicy(make_config(tiny_vlm, inject_memory=False))
    assert not gates(cont) and not cont.injects
    cont.train()
    loss, info = cont.forward(batch(tiny_vlm, cont.config.world_latent_dim))
    assert loss.item() == pytest.approx(info["action_loss"] + info["world_loss"], rel=1e-5)
    assert "gate" not in info


def test_init_from_loads_smolvla_weights_keeps_user_fields_and_reloads_without_it(
    tiny_vlm, tmp_path, monkeypatch
):
    torch.manual_seed(1)
    init = make_smolvla(tiny_vlm, num_steps=2, n_action_steps=3, optimizer_lr=3e-4)
    init_dir = tmp_path / "smolvla_init"
    init.save_pretrained(init_dir)

    # As on the command line: num_steps given explicitly at its default value still counts as set by the user.
    monkeypatch.setattr(
        "sys.argv", ["lerobot-train", "--policy.num_steps=10", f"--policy.init_from={init_dir}"]
    )
    cfg = make_config(tiny_vlm, init_from=str(init_dir), n_action_steps=1, num_steps=10)
    assert cfg.num_steps == 10 and cfg.n_action_steps == 1  # user-set: kept
    assert cfg.optimizer_lr == 3e-4  # not set by the user: read from the checkpoint
    # Fields of a --config_path file count as set too (here: the default 48 against the checkpoint's 16).
    config_file = tmp_path / "train.json"
    config_file.write_text(json.dumps({"policy": {"type": "smolvla_world", "tokenizer_max_length": 48}}))
    monkeypatch.setattr("sys.argv", ["lerobot-train", f"--config_path={config_file}"])
    from_file = make_config(tiny_vlm, init_from=str(init_dir), tokenizer_max_length=48)
    assert from_file.tokenizer_max_length == 48 and from_file.optimizer_lr == 3e-4
    torch.manual_seed(2)
    policy = SmolVLAWorldPolicy(cfg)
    assert cfg.init_from_loaded
    for k, v in init.state_dict().items():
        assert torch.equal(policy.smolvla.state_dict()[k], v), k
    assert all(float(g.detach()) == 0.0 for g in gates(policy).values())

    ckpt = tmp_path / "ckpt"
    policy.save_pretrained(ckpt)
    from huggingface_hub import ModelCard

    card = ModelCard.load(ckpt / "README.md")
    data = card.data.to_dict()
    assert {"world-modality", "smolvla_world", "encoder-pixels"} <= set(data["tags"])
    # A local init checkpoint is named in the text; only a Hub id can be the card's base_model.
    assert data.get("base_model") is None and f"| initialised from | `{init_dir}` |" in card.text
    assert data["world_modality"]["gate_opening"]["abs_max"] == 0.0
    shutil.rmtree(init_dir)  # the trained checkpoint must not need the init checkpoint any more
    reloaded = SmolVLAWorldPolicy.from_pretrained(ckpt)
    assert reloaded.config.init_from == str(init_dir) and reloaded.config.num_steps == 10
    b = batch(tiny_vlm, cfg.world_latent_dim)
    noise = torch.randn(B, H, TINY_SMOLVLA["max_action_dim"])
    assert torch.equal(
        reloaded.predict_action_chunk(dict(b), noise=noise), policy.predict_action_chunk(b, noise)
    )


def test_init_from_refuses_incompatible_checkpoints_clearly(tiny_vlm, tmp_path):
    init_dir = tmp_path / "smolvla_init"
    make_smolvla(tiny_vlm).save_pretrained(init_dir)
    with pytest.raises(ValueError, match=r"num_vlm_layers=1 \(checkpoint: 2\)"):
        make_config(tiny_vlm, init_from=str(init_dir), num_vlm_layers=1)

    # Weights that do not fit (here: a file missing a tensor) are refused with the options to check.
    from safetensors.torch import load_file, save_file

    state = load_file(init_dir / "model.safetensors")
    dropped = next(k for k in state if "action_out_proj" in k)
    del state[dropped]
    save_file(state, init_dir / "model.safetensors")
    with pytest.raises(ValueError, match=f"missing: .*{dropped}"):
        SmolVLAWorldPolicy(make_config(tiny_vlm, init_from=str(init_dir)))

    other = tmp_path / "world_ckpt"
    make_config(tiny_vlm).save_pretrained(other)
    with pytest.raises(ValueError, match="must be a 'smolvla' one"):
        make_config(tiny_vlm, init_from=str(other))
    # A mistyped local path is named as such (not sent to the Hub as a repo id).
    with pytest.raises(FileNotFoundError, match="--policy.init_from .*is not a directory"):
        make_config(tiny_vlm, init_from=str(tmp_path / "no_such" / "pretrained_model"))


def test_stock_factory_resolves_smolvla_world_and_its_pipeline_checks_instructions(tiny_vlm, tmp_path):
    from lerobot.policies.factory import get_policy_class, make_pre_post_processors
    from lerobot.processor import PolicyProcessorPipeline, TokenizerProcessorStep

    from lerobot_policy_world_modality.latents.processor import WorldLatentStep

    assert get_policy_class("smolvla_world") is SmolVLAWorldPolicy
    cfg = make_config(tiny_vlm)
    pre, _ = make_pre_post_processors(cfg, dataset_stats=None)
    kinds = [type(s) for s in pre.steps]
    assert WorldLatentStep in kinds and TokenizerProcessorStep in kinds
    assert kinds.index(TokenizerProcessorStep) < kinds.index(WorldLatentStep)
    pre.save_pretrained(tmp_path / "pre")
    pre = PolicyProcessorPipeline.from_pretrained(
        tmp_path / "pre", config_filename="policy_preprocessor.json"
    )
    assert [type(s) for s in pre.steps] == kinds

    obs = {"observation.image": torch.rand(B, 3, 48, 48), "observation.state": torch.randn(B, S)}
    out = pre({**obs, "task": ["press the button", "open the drawer"]})
    assert out[OBS_WORLD_LATENT].shape[0] == B and torch.isfinite(out[OBS_WORLD_LATENT]).all()
    assert out["observation.language.tokens"].shape[0] == B
    with pytest.raises(ValueError, match=r"Empty instruction under 'task' for batch sample\(s\) \[1\]"):
        pre({**obs, "task": ["press the button", "  "]})


def test_instruction_step_ends_prompts_with_a_newline_and_refuses_a_missing_task(tiny_vlm):
    from lerobot.policies.factory import make_pre_post_processors

    from lerobot_policy_world_modality.smolvla_world.processor_smolvla_world import InstructionStep

    step = InstructionStep()
    assert step.complementary_data({"task": ["press", "open\n"]})["task"] == ["press\n", "open\n"]
    assert step.complementary_data({"task": "press"})["task"] == "press\n"

    pre, _ = make_pre_post_processors(make_config(tiny_vlm), dataset_stats=None)
    obs = {"observation.image": torch.rand(B, 3, 48, 48), "observation.state": torch.randn(B, S)}
    with pytest.raises(ValueError, match="needs the instruction under 'task'"):
        pre(obs)


def test_training_memory_mode_decides_what_the_action_loss_reads(tiny_vlm):
    """memory_mode_train is what training injects: oracle reads the batch's true future, zero reads zeros."""
    torch.manual_seed(0)
    # lambda_world=0: the per-sample loss is the action loss alone (the world loss reads the future in
    # every mode); gate_init=0.5 opens the gate, so the memory reaches the actions.
    cfg = make_config(tiny_vlm, memory_mode_train="oracle", gate_init=0.5, lambda_world=0.0)
    world = SmolVLAWorldPolicy(cfg)
    world.train()
    b = batch(tiny_vlm, world.config.world_latent_dim)
    noise = torch.randn(B, H, TINY_SMOLVLA["max_action_dim"])
    time = torch.tensor([0.3, 0.7])
    # Another true future for sample 1 only (fresh values: a constant shift would vanish in the LayerNorm).
    other_future = dict(b)
    other_future[OBS_WORLD_FUTURE] = b[OBS_WORLD_FUTURE].clone()
    other_future[OBS_WORLD_FUTURE][1] = torch.randn(K, world.config.world_latent_dim)
    other_history = dict(b)
    other_history[OBS_WORLD_HISTORY] = torch.randn_like(b[OBS_WORLD_HISTORY])

    def losses(mode, b):
        world.config.memory_mode_train = mode
        torch.manual_seed(0)  # the same draws before every compared forward (noise and time are given too)
        out, _ = world.forward(dict(b), noise=noise.clone(), time=time.clone(), reduction="none")
        return out.detach()

    def reading(memory, b):
        """SmolVLA's per-sample loss with `memory` injected directly (as the training forward injects it)."""
        torch.manual_seed(0)
        with torch.no_grad(), world._reading(memory, {}):
            return world.smolvla.forward(dict(b), noise.clone(), time.clone(), "none")[0]

    assert world.world.options is world.config  # the mode set on the config is the one the path reads
    oracle = losses("oracle", b)
    with torch.no_grad():
        predicted = world.world.predict(b[OBS_WORLD_HISTORY])
    # Oracle rows past the episode end (sample 0, horizon 2) are the prediction: no episode-end leak.
    valid = b[OBS_WORLD_FUTURE_VALID].unsqueeze(-1)
    expected = torch.where(valid, b[OBS_WORLD_FUTURE].float(), predicted)
    torch.testing.assert_close(oracle, reading(expected, b), rtol=1e-6, atol=0)
    changed = losses("oracle", other_future)
    assert changed[0] == pytest.approx(oracle[0].item(), rel=1e-6) and changed[1] != oracle[1]

    pred = losses("pred", b)
    assert torch.equal(losses("pred", other_future), pred)  # the true future does not reach the actions
    assert not torch.allclose(pred, oracle)
    torch.testing.assert_close(pred, reading(predicted, b), rtol=1e-6, atol=0)

    zero = losses("zero", b)
    zeros = torch.zeros(B, K, world.config.world_latent_dim)
    torch.testing.assert_close(zero, reading(zeros, b), rtol=1e-6, atol=0)
    assert torch.equal(losses("zero", other_history), zero)  # neither the prediction ...
    assert torch.equal(losses("zero", other_future), zero)  # ... nor the true future reaches the actions
    assert not torch.allclose(zero, pred) and not torch.allclose(zero, oracle)


def test_init_from_names_the_weights_whose_shapes_do_not_fit(tiny_vlm, tmp_path):
    """A smolvla checkpoint of another VLM width (same architecture options) is refused naming the misfits."""
    wider_vlm = vlm.make_tiny_smolvlm(tmp_path / "wider_vlm", text_width=96)
    init_dir = tmp_path / "smolvla_wider"
    make_smolvla(wider_vlm).save_pretrained(init_dir)
    # vlm_model_name=tiny_vlm is user-set (kept); the architecture options equal the checkpoint's, so the
    # config is accepted and only the weight shapes can tell.
    cfg = make_config(tiny_vlm, init_from=str(init_dir))
    assert cfg.vlm_model_name == str(tiny_vlm)
    from safetensors.torch import load_file

    theirs = load_file(init_dir / "model.safetensors")
    with pytest.raises(ValueError, match=r"shape mismatches: \['") as err:
        SmolVLAWorldPolicy(cfg)
    message = str(err.value)
    assert "vlm_model_name" in message and "expert_width_multiplier" in message
    named = re.findall(r"'([\w.]+): checkpoint (\([\d, ]+\)) vs model (\([\d, ]+\))'", message)
    assert len(named) == 3, message
    own = make_smolvla(tiny_vlm).state_dict()  # the SmolVLA this config builds
    for name, ckpt_shape, model_shape in named:
        assert (ckpt_shape, model_shape) == (str(tuple(theirs[name].shape)), str(tuple(own[name].shape)))
        assert theirs[name].shape != own[name].shape, name


def test_world_model_trains_and_the_planner_picks_among_flow_samples(tiny_vlm, tmp_path):
    """dynamics, progress head and outcome critic (reading the imagined frames and the chunk) train next to SmolVLA's loss; planner=rerank executes one of N flow samples,
    the same one after reset (seeded) and after save/load; planner=none is SmolVLA's own chunk."""
    from lerobot_policy_world_modality.constants import NEXT_REWARD, OBS_WORLD_REMAINING

    torch.manual_seed(0)
    policy = SmolVLAWorldPolicy(make_config(tiny_vlm, use_prophet=False, inject_memory=False,
                                            dynamics="action_conditioned", progress_head=True,
                                            plan_critic=True, critic_input="both", reward_head=True))  # fmt: skip
    dim = policy.config.world_latent_dim
    train = batch(tiny_vlm, dim) | {OBS_WORLD_REMAINING: torch.tensor([0.5, 0.0]), NEXT_REWARD: torch.tensor([[1.0], [4.0]])}
    policy.train()
    loss, info = policy.forward(train)
    assert {"dyn_loss", "dyn_cos_h1", "progress_loss", "critic_loss", "critic_top1", "reward_loss"} <= set(info)
    loss.backward()
    assert policy.world.dynamics.net.context_type.grad is not None and policy.world.critic.net[0].weight.grad is not None
    assert policy.world.critic.actions.weight.grad is not None  # critic_input="both": it reads the chunk too

    obs = {k: v for k, v in train.items() if k not in ("action", OBS_WORLD_HISTORY, OBS_WORLD_REMAINING, NEXT_REWARD)}
    policy.eval()
    policy.reset()
    plain = policy.predict_action_chunk(obs, noise=torch.zeros(B, H, policy.config.max_action_dim))
    policy.config.planner, policy.config.planner_samples = "rerank", 3
    policy.reset()
    planned = policy.select_action(obs)
    policy.reset()
    assert torch.equal(policy.select_action(obs), planned)
    assert planned.shape == (B, A) and not torch.equal(planned, plain[:, 0])
    # The executed chunk is the one the world model scores best: force each sample's score in turn.
    score = policy.world.score_chunks
    picks = []
    for best in range(3):
        policy.world.score_chunks = lambda h, c, g, hz, best=best: torch.nn.functional.one_hot(
            torch.full((c.shape[0],), best), 3).float()
        policy.reset()
        picks.append(policy.select_action(obs))
    policy.world.score_chunks = score
    assert not torch.equal(picks[0], picks[1]) and not torch.equal(picks[1], picks[2])
    # plan_candidates (what lerobot-wm-plan-check ranks) draws exactly the planner's flow samples.
    policy.reset()
    proposal, samples = policy.plan_candidates(obs, policy.advance_history(obs))
    assert samples.shape == (B, 3, H, A) and torch.equal(proposal, samples[:, 0])
    for best in range(3):
        assert torch.equal(samples[:, best, 0], picks[best])
    # Encoding each observation's prefix once (the default) gives the samples of the whole call on the
    # repeated batch, and leaves SmolVLA's methods as they were.
    policy.reset()
    _, unshared = policy.plan_candidates(obs, policy.advance_history(obs), share_prefix=False)
    torch.testing.assert_close(samples, unshared, rtol=1e-4, atol=1e-5)
    assert not torch.equal(samples[:, 0], samples[:, 1])  # distinct noise per sample, not one sample repeated
    assert "forward" not in policy.smolvla.model.vlm_with_expert.__dict__
    policy.save_pretrained(tmp_path / "ckpt")
    loaded = SmolVLAWorldPolicy.from_pretrained(tmp_path / "ckpt")
    loaded.eval()
    loaded.reset()
    assert loaded.config.planner == "rerank" and torch.equal(loaded.select_action(obs), planned)


def test_flow_samples_share_the_prefix_with_memory_read_at_every_fusion_point(tiny_vlm):
    """With the memory read by the prefix, the expert input and the expert output (open gates), encoding
    each observation's prefix once gives the samples of the whole call on the repeated batch."""
    from lerobot_policy_world_modality.world.fusion import fusion_gates

    torch.manual_seed(0)
    policy = SmolVLAWorldPolicy(make_config(tiny_vlm, dynamics="action_conditioned", progress_head=True,
                                            inject_expert_input=True, inject_prefix=True, planner="rerank",
                                            planner_samples=3))  # fmt: skip
    gates = fusion_gates(policy)
    assert len(gates) == 3
    with torch.no_grad():
        for g in gates:
            g.fill_(0.5)
    policy.eval()
    obs = {k: v for k, v in batch(tiny_vlm, policy.config.world_latent_dim).items() if k not in ("action", OBS_WORLD_HISTORY)}
    history = torch.randn(B, T, policy.config.world_latent_dim)
    out = {}
    for share in (True, False):
        policy.reset()
        out[share] = policy.plan_candidates(obs, history, share_prefix=share)[1]
    torch.testing.assert_close(out[True], out[False], rtol=1e-4, atol=1e-5)
    # The memory is read: another history gives other samples from the same noise.
    policy.reset()
    other = policy.plan_candidates(obs, torch.randn(B, T, policy.config.world_latent_dim))[1]
    assert not torch.allclose(other, out[True], atol=1e-4)


def test_perturbed_candidates_plan_around_one_flow_sample(tiny_vlm):
    """planner_candidates="perturbed": one flow sample is the proposal and the planner perturbs it (as
    world_f's): a score that prefers the proposal executes it, one that prefers another candidate executes
    a chunk within a few planner_noise of it; unknown values are refused by name."""
    torch.manual_seed(0)
    policy = SmolVLAWorldPolicy(make_config(tiny_vlm, use_prophet=False, inject_memory=False,
                                            dynamics="action_conditioned", progress_head=True, planner="rerank",
                                            planner_samples=4, planner_candidates="perturbed"))  # fmt: skip
    policy.eval()
    obs = {k: v for k, v in batch(tiny_vlm, policy.config.world_latent_dim).items() if k not in ("action", OBS_WORLD_HISTORY)}
    policy.reset()
    proposal, first_round = policy.plan_candidates(obs, policy.advance_history(obs))
    assert first_round is None and proposal.shape == (B, H, A)
    score = policy.world.score_chunks
    picks = []
    for best in (0, 2):
        policy.world.score_chunks = lambda h, c, g, hz, best=best: torch.nn.functional.one_hot(
            torch.full((c.shape[0],), best), c.shape[1]).float()
        policy.reset()
        picks.append(policy.select_action(obs))
    policy.world.score_chunks = score
    torch.testing.assert_close(picks[0], proposal[:, 0])
    gap = (picks[1] - proposal[:, 0]).abs()
    assert gap.max() > 0 and gap.max() < 6 * policy.config.planner_noise
    with pytest.raises(ValueError, match="planner_candidates 'flows' is not one of"):
        make_config(tiny_vlm, planner_candidates="flows")


def test_imitating_successes_only_weights_failed_frames_zero_in_the_flow_loss(tiny_vlm):
    """imitate_failures=false: with the same noise and time, garbage actions on a failed episode's frame
    leave the action loss unchanged (it is the successful frame's alone); the default reads them."""
    from lerobot_policy_world_modality.latents.train_view import EpisodeSuccess

    torch.manual_seed(0)
    policy = SmolVLAWorldPolicy(make_config(tiny_vlm, use_prophet=False, inject_memory=False, imitate_failures=False))
    policy._success = EpisodeSuccess(torch.tensor([1.0, 0.0]))  # episode 0 succeeded, episode 1 failed
    policy.eval()
    clean = batch(tiny_vlm, policy.config.world_latent_dim) | {"episode_index": torch.tensor([0, 1])}
    spoiled = clean | {"action": clean["action"].clone()}
    spoiled["action"][1] = 100.0
    noise = torch.randn(B, H, policy.config.max_action_dim, generator=torch.Generator().manual_seed(1))
    time = torch.full((B,), 0.5)

    def loss_of(p, b):
        with torch.no_grad():
            return float(p.forward(dict(b), noise=noise.clone(), time=time.clone())[0])

    assert loss_of(policy, spoiled) == pytest.approx(loss_of(policy, clean))
    policy.config.imitate_failures = True
    assert loss_of(policy, spoiled) > 10 * loss_of(policy, clean)
