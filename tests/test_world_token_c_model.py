"""The `world_token_c` policy on tiny dims: loss and logs, attention mask, variants, save/load, codebook errors."""

import json

import pytest
import torch
from lerobot.configs.types import FeatureType, PolicyFeature

from lerobot_policy_world_modality.constants import OBS_WORLD_FUTURE, OBS_WORLD_FUTURE_VALID, OBS_WORLD_LATENT
from lerobot_policy_world_modality.world.codebook import (
    CodebookError,
    FitOptions,
    fit_codebook,
    save_codebook,
)
from lerobot_policy_world_modality.world_token_c.configuration_world_token_c import WorldTokenCConfig
from lerobot_policy_world_modality.world_token_c.modeling_world_token_c import WorldTokenCPolicy

B, D, S, A, K, H, V = 4, 12, 4, 4, 3, 5, 8


@pytest.fixture
def codebook(tmp_path):
    """Path of a plain 8-code codebook fitted on random latents of dim D."""
    book, stats = fit_codebook(torch.randn(600, D), FitOptions(codes=V, iters=10, batch_size=128))
    return str(save_codebook(tmp_path / "book.safetensors", book, stats))


def make_policy(codebook_path, seed=0, **overrides) -> WorldTokenCPolicy:
    kw = dict(
        device="cpu",
        world_latent_dim=D,
        width=32,
        depth=2,
        heads=4,
        chunk_size=H,
        n_action_steps=3,
        future_frames=K,
        dropout=0.0,
        codebook_path=codebook_path,
        input_features={
            "observation.state": PolicyFeature(FeatureType.STATE, (S,)),
            "observation.image": PolicyFeature(FeatureType.VISUAL, (3, 8, 8)),
        },
        output_features={"action": PolicyFeature(FeatureType.ACTION, (A,))},
    )
    kw.update(overrides)
    torch.manual_seed(seed)
    return WorldTokenCPolicy(WorldTokenCConfig(**kw))


def train_batch(seed=1):
    g = torch.Generator().manual_seed(seed)
    valid = torch.ones(B, K, dtype=torch.bool)
    valid[0, 1:] = False  # sample 0 is one frame before its episode's end
    return {
        OBS_WORLD_LATENT: torch.randn(B, D, generator=g),
        OBS_WORLD_FUTURE: torch.randn(B, K, D, generator=g),
        OBS_WORLD_FUTURE_VALID: valid,
        "observation.state": torch.randn(B, S, generator=g),
        "action": torch.randn(B, H, A, generator=g),
        "action_is_pad": torch.zeros(B, H, dtype=torch.bool),
    }


def test_loss_logs_and_episode_end_masking(codebook):
    policy = make_policy(codebook)
    policy.train()
    batch = train_batch()
    loss, info = policy.forward(batch)
    assert torch.isfinite(loss)
    assert {"action_loss", "world_ce", "world_acc", "codebook_usage", "codebook_perplexity", "loss"} <= set(
        info
    )
    assert [f"world_acc_h{k}" for k in range(1, K + 1)] == [k for k in info if k.startswith("world_acc_h")]
    assert info["loss"] == pytest.approx(info["action_loss"] + info["world_ce"], rel=1e-5)
    assert 0 < info["codebook_usage"] <= B / V
    # Futures past the episode end do not enter the loss; valid ones do.
    changed = {**batch, OBS_WORLD_FUTURE: batch[OBS_WORLD_FUTURE].clone()}
    changed[OBS_WORLD_FUTURE][0, 1:] = torch.randn(K - 1, D) * 10
    assert policy.forward(changed)[1]["world_ce"] == info["world_ce"]
    changed[OBS_WORLD_FUTURE][1, 0] = -batch[OBS_WORLD_FUTURE][1, 0] * 10
    assert policy.forward(changed)[1]["world_ce"] != info["world_ce"]


def test_training_learns_the_future_tokens(codebook):
    policy = make_policy(codebook)
    opt = torch.optim.AdamW(policy.get_optim_params(), lr=3e-3)
    policy.train()
    batch = train_batch()
    first = policy.forward(batch)[1]
    for _ in range(60):
        loss, info = policy.forward(batch)
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert info["world_ce"] < 0.2 * first["world_ce"]
    assert info["world_acc"] == 1.0


def _actions_and_logits(policy, batch, token):
    """Actions and future logits with the current world token forced to `token`."""
    policy.eval()
    with torch.no_grad():
        out = policy._run(batch, torch.full((B, 1), token, dtype=torch.long))
    return out["actions"], out["logits"]


@pytest.mark.parametrize(
    "depth, mask, actions_see_token", [(1, False, True), (1, True, False), (2, True, True)]
)
def test_attention_mask_routes_world_token_through_future_queries(codebook, depth, mask, actions_see_token):
    # One block with the mask: action queries cannot read WORLD_CUR. Two blocks: they can, but only
    # through the future queries (which read it in the first block).
    policy = make_policy(codebook, depth=depth, mask_world_from_actions=mask)
    batch = train_batch()
    actions_a, logits_a = _actions_and_logits(policy, batch, 1)
    actions_b, logits_b = _actions_and_logits(policy, batch, 6)
    assert not torch.allclose(logits_a, logits_b)  # future queries always read the token
    assert torch.equal(actions_a, actions_b) != actions_see_token
    attn = policy.attention_mask(policy.trunk.num_obs_tokens, torch.device("cpu"))
    if mask:  # WORLD_CUR is read by itself and the future queries only, not by observations or actions
        n_obs, k = policy.trunk.num_obs_tokens, policy.config.future_frames
        assert not attn[:n_obs, n_obs].any() and not attn[n_obs + 1 + k :, n_obs].any()
        assert attn[n_obs : n_obs + 1 + k, n_obs].all()
    else:
        assert attn is None


def test_variant_b_has_no_token_input(codebook):
    policy = make_policy(codebook, variant="B")
    assert not policy.config.world_token_input
    assert not any(k.startswith("token_") for k in policy.state_dict())
    batch = train_batch()
    actions_a, logits_a = _actions_and_logits(policy, batch, 1)
    actions_b, logits_b = _actions_and_logits(policy, batch, 6)
    assert torch.equal(actions_a, actions_b) and torch.equal(logits_a, logits_b)
    policy.train()
    assert torch.isfinite(policy.forward(batch)[0])


def test_world_token_options(codebook):
    policy = make_policy(codebook, world_token_dropout=0.5, world_token_layernorm=True, world_token_scale=3.0)
    tokens = torch.arange(B).unsqueeze(1)
    policy.eval()
    kept = policy._world_cur(tokens)[:, 0]
    expected = 3.0 * policy.token_norm(policy.token_embed(tokens[:, 0])) + policy.token_type
    assert torch.allclose(kept, expected)  # no dropout outside training
    policy.train()
    torch.manual_seed(0)
    cur = policy._world_cur(tokens.repeat(50, 1))[:, 0]
    dropped = torch.isclose(cur, (policy.token_null + policy.token_type).expand_as(cur)).all(-1)
    assert 0.3 < dropped.float().mean() < 0.7


def test_factorised_codebook_gives_factorised_heads(tmp_path):
    book, _ = fit_codebook(
        torch.randn(600, D), FitOptions(codes=4, factorisation="residual", factors=2, iters=10)
    )
    path = str(save_codebook(tmp_path / "rq.safetensors", book, {}))
    policy = make_policy(path)
    assert (policy.config.codebook_size, policy.config.codebook_factors) == (4, 2)
    assert policy.config.codebook_factorisation == "residual"
    assert policy.future_head.out_features == 8 and policy.token_embed.num_embeddings == 8
    batch = train_batch()
    _, logits = _actions_and_logits(policy, batch, 1)
    assert logits.shape == (B, K, 2, 4)
    policy.train()
    loss, info = policy.forward(batch)
    # The token NLL is the sum of the factors' cross-entropies (not their mean).
    with torch.no_grad():
        logits = policy._run(batch, policy.tokens(batch[OBS_WORLD_LATENT]))["logits"]
        future = policy.tokens(batch[OBS_WORLD_FUTURE])
        valid = batch[OBS_WORLD_FUTURE_VALID]
        ce = torch.nn.functional.cross_entropy(logits.flatten(0, 2), future.flatten(), reduction="none")
        expected = (ce.view(future.shape).sum(-1) * valid).sum() / valid.sum()
    assert info["world_ce"] == pytest.approx(expected.item(), rel=1e-5)
    # WORLD_CUR sums one embedding row per factor, factor g reading rows g * v ...: (0, 1) != (1, 0).
    tokens = torch.tensor([[0, 1], [1, 0]])
    policy.eval()
    cur = policy._world_cur(tokens)[:, 0]
    rows = policy.token_embed.weight
    torch.testing.assert_close(cur[0], rows[0] + rows[4 + 1] + policy.token_type)
    assert not torch.allclose(cur[0], cur[1])


def test_save_load_round_trip_without_the_codebook_file(codebook, tmp_path):
    policy = make_policy(codebook, mask_world_from_actions=True)
    policy.save_pretrained(tmp_path / "ckpt")
    (tmp_path / "book.safetensors").unlink()  # evaluation must not need the file
    loaded = WorldTokenCPolicy.from_pretrained(tmp_path / "ckpt")
    assert torch.equal(loaded.codebook.centroids, policy.codebook.centroids)
    assert loaded.codebook.centroids.abs().sum() > 0
    batch = {k: v for k, v in train_batch(seed=3).items() if k in (OBS_WORLD_LATENT, "observation.state")}
    policy.reset()
    loaded.reset()
    assert torch.equal(policy.predict_action_chunk(batch), loaded.predict_action_chunk(batch))
    assert torch.equal(policy.select_action(batch), loaded.select_action(batch))

    # A config whose codebook shape differs from the weights: a clear error, not a silent mismatch.
    cfg = json.loads((tmp_path / "ckpt" / "config.json").read_text())
    (tmp_path / "ckpt" / "config.json").write_text(json.dumps({**cfg, "codebook_size": 16}))
    with pytest.raises(CodebookError, match="same checkpoint"):
        WorldTokenCPolicy.from_pretrained(tmp_path / "ckpt")


def test_save_writes_the_model_card_with_the_codebook_and_training_figures(codebook, tmp_path):
    from huggingface_hub import ModelCard

    policy = make_policy(codebook)
    _, info = policy.forward(train_batch())
    policy.save_pretrained(tmp_path / "ckpt")
    card = ModelCard.load(tmp_path / "ckpt" / "README.md")
    data = card.data.to_dict()
    assert data["library_name"] == "lerobot" and {"world-modality", "world_token_c", "encoder-pixels"} <= set(
        data["tags"]
    )
    assert data["world_modality"]["training"]["world_ce"] == pytest.approx(info["world_ce"])
    assert "no gated cross-attention" in card.text and policy.config.codebook_digest in card.text
    # Saved again from a reloaded policy (which saw no training batch), the figures of training stay.
    WorldTokenCPolicy.from_pretrained(tmp_path / "ckpt").save_pretrained(tmp_path / "ckpt")
    again = ModelCard.load(tmp_path / "ckpt" / "README.md").data.to_dict()["world_modality"]
    assert again["training"] == data["world_modality"]["training"]


def test_mismatched_or_missing_codebook_fails_clearly(codebook, tmp_path):
    with pytest.raises(CodebookError, match=r"codebook_size.*\(16, 8\)"):
        make_policy(codebook, codebook_size=16)
    with pytest.raises(CodebookError, match="product"):
        make_policy(codebook, codebook_factorisation="product")
    with pytest.raises(CodebookError, match="dim 12.*has dim 20"):
        make_policy(codebook, world_latent_dim=20)
    with pytest.raises(CodebookError, match="lerobot-wm-fit-codebook"):
        make_policy(None)
    with pytest.raises(CodebookError, match="No codebook at"):
        make_policy(str(tmp_path / "nowhere.safetensors"))
