"""The shared world core (Prophet, gated cross-attention, memory modes, world loss) on tiny tensors."""

import math

import pytest
import torch

from lerobot_policy_world_modality.world.fusion import GatedCrossAttention
from lerobot_policy_world_modality.world.memory import (
    MEMORY_MODES,
    derangement,
    per_horizon_cosine,
    scheduled_oracle_prob,
    select_memory,
    world_loss,
    world_targets,
)
from lerobot_policy_world_modality.world.prophet import Prophet

B, T, K, D, W = 5, 3, 4, 6, 16



# ---------------------------------------------------------------------------------------------- Prophet
@pytest.mark.parametrize("delta", [False, True])
def test_prophet_shapes_and_parameterisation(delta):
    torch.manual_seed(0)
    prophet = Prophet(D, T, K, width=W, depth=1, heads=2, delta=delta)
    history = torch.randn(B, T, D)
    out = prophet(history)
    assert out.absolute.shape == out.delta.shape == (B, K, D)
    assert out.supervised == ("delta" if delta else "absolute")
    torch.testing.assert_close(out.absolute, history[:, -1:] + out.delta)
    assert out.prediction() is (out.delta if delta else out.absolute)


@pytest.mark.parametrize("delta", [False, True])
def test_prophet_zero_output_means_no_change_under_delta(delta):
    """With the output layer zeroed, delta mode predicts "the world stays as it is", absolute mode zeros."""
    prophet = Prophet(D, T, K, width=W, depth=1, heads=2, delta=delta)
    torch.nn.init.zeros_(prophet.out_proj.weight)
    torch.nn.init.zeros_(prophet.out_proj.bias)
    history = torch.randn(B, T, D)
    out = prophet(history)
    if delta:
        assert torch.equal(out.absolute, history[:, -1:].expand(B, K, D))
    else:
        assert torch.equal(out.absolute, torch.zeros(B, K, D))


def test_prophet_learns_constant_velocity_in_delta_space():
    """A small delta Prophet learns z_{t+k} = z_t + k * v from a history that shows v."""
    torch.manual_seed(0)
    prophet = Prophet(D, T, K, width=64, depth=2, heads=4, delta=True)
    opt = torch.optim.Adam(prophet.parameters(), lr=3e-3)

    def sample(n):
        z0, v = torch.randn(n, 1, D), torch.randn(n, 1, D)
        hist = z0 + torch.arange(-T + 1, 1).view(1, T, 1) * v
        fut = z0 + torch.arange(1, K + 1).view(1, K, 1) * v
        return hist, world_targets(fut, hist[:, -1], delta=True)

    hist, tgt = sample(256)
    before = world_loss(prophet(hist).delta, tgt).item()
    for _ in range(100):
        h, t = sample(64)
        loss = world_loss(prophet(h).delta, t)
        opt.zero_grad()
        loss.backward()
        opt.step()
    after = world_loss(prophet(hist).delta, tgt).item()
    assert after < 0.05 and before > 0.5


def test_prophet_reads_context_and_passes_gradient_to_it():
    torch.manual_seed(0)
    prophet = Prophet(D, T, K, width=W, depth=1, heads=2, context_dim=8)
    history = torch.randn(B, T, D)
    context = torch.randn(B, 2, 8, requires_grad=True)
    a = prophet(history, context).absolute
    b = prophet(history, context + 1.0).absolute
    assert not torch.allclose(a, b)
    a.sum().backward()
    assert context.grad is not None and context.grad.abs().sum() > 0


def _full_block(block, x, attn_mask=None):
    """Reference pre-norm block written out from its weights: every token updated (no `last`)."""
    b, n, w = x.shape
    hd = w // block.heads
    q, k, v = block.qkv(block.norm1(x)).view(b, n, 3, block.heads, hd).permute(2, 0, 3, 1, 4)
    scores = q @ k.transpose(-1, -2) / math.sqrt(hd)
    if attn_mask is not None:
        scores = scores.masked_fill(~attn_mask, float("-inf"))
    x = x + block.out((scores.softmax(-1) @ v).transpose(1, 2).reshape(b, n, w))
    return x + block.mlp(block.norm2(x))


def test_prophet_last_block_computes_only_the_slots_and_matches_the_full_stack():
    torch.manual_seed(0)
    prophet = Prophet(D, T, K, width=W, depth=3, heads=2, context_dim=8, delta=True)
    history, context = torch.randn(B, T, D), torch.randn(B, 2, 8)
    scale = history.pow(2).mean(dim=(1, 2), keepdim=True).sqrt()
    x = torch.cat([prophet.in_proj(history / scale) + prophet.history_pos,
                   prophet.context_proj(context) + prophet.context_type,
                   prophet.queries.expand(B, -1, -1)], dim=1)  # fmt: skip
    for block in prophet.blocks:
        x = _full_block(block, x)
    expected = prophet.out_proj(prophet.out_norm(x[:, -K:])) * scale
    torch.testing.assert_close(prophet(history, context).delta, expected, rtol=1e-5, atol=1e-6)
    # A masked block keeps the mask rows of the tokens it updates.
    block = prophet.blocks[0]
    x = torch.randn(B, 7, W)
    mask = torch.rand(7, 7) > 0.3
    mask |= torch.eye(7, dtype=torch.bool)
    torch.testing.assert_close(block(x, mask, last=3), _full_block(block, x, mask)[:, -3:], rtol=1e-5, atol=1e-6)


def test_prophet_rejects_wrong_history_shape():
    prophet = Prophet(D, T, K, width=W, depth=1, heads=2)
    with pytest.raises(ValueError, match="history_frames"):
        prophet(torch.randn(B, T + 1, D))


# ---------------------------------------------------------------------------------------------- fusion
def _fusion(gate_init=0.0, **kw):
    torch.manual_seed(0)
    return GatedCrossAttention(W, D, heads=4, gate_init=gate_init, **kw)


def test_closed_gate_is_identity_but_gate_still_gets_gradient():
    """Regression: the residual is computed at g == 0, so the gate receives a gradient and can open."""
    fusion = _fusion()
    hidden = torch.randn(B, 3, W)
    memory = torch.randn(B, K, D)
    out = fusion(hidden, memory).hidden
    assert torch.equal(out, hidden)
    out.pow(2).sum().backward()
    assert fusion.gate.grad is not None and fusion.gate.grad.abs().item() > 0


def test_open_gate_changes_output():
    fusion = _fusion(gate_init=1.0)
    hidden = torch.randn(B, 3, W)
    assert not torch.allclose(fusion(hidden, torch.randn(B, K, D)).hidden, hidden)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_memory_never_reaches_output(bad):
    fusion = _fusion(gate_init=1.5, per_channel=True)
    hidden = torch.randn(B, 3, W, requires_grad=True)
    memory = torch.randn(B, K, D)
    memory[0] = bad  # every row of sample 0 is unusable
    memory[1, 2, 3] = bad  # one element of one row of sample 1
    res = fusion(hidden, memory)
    assert torch.isfinite(res.hidden).all()
    # Sample 0 has no finite memory: output equals the closed-gate output (the input) exactly.
    assert torch.equal(res.hidden[0], hidden[0])
    assert res.valid_slots[0].sum() == 0 and res.valid_slots[1].tolist() == [True, True, False, True]
    # Sample 1 reads its finite rows only: same as giving it just those rows.
    keep = [0, 1, 3]
    only_finite = fusion(hidden[1:2], memory[1:2, keep]).hidden
    torch.testing.assert_close(res.hidden[1:2], only_finite)
    res.hidden.sum().backward()
    assert all(torch.isfinite(p.grad).all() for p in fusion.parameters() if p.grad is not None)
    assert torch.isfinite(hidden.grad).all()


def test_attention_entropy_is_log_m_for_identical_slots():
    fusion = _fusion(gate_init=1.0)
    memory = torch.randn(B, 1, D).expand(B, K, D)
    res = fusion(torch.randn(B, 3, W), memory)
    assert res.attn_entropy.item() == pytest.approx(math.log(K), rel=1e-5)


def test_fusion_matches_written_out_attention_and_entropy_is_read_from_it():
    """Output = hidden + tanh(gate) * out(softmax(q k^T / sqrt(d)) v) over the finite rows, with or without
    the entropy statistic; the entropy is that attention's, averaged over samples with a finite row."""
    fusion = _fusion(gate_init=0.8, attn_dim=8, num_slots=K)
    hidden, memory = torch.randn(B, 3, W), torch.randn(B, K, D) * 3
    memory[0] = float("nan")
    memory[1, 1] = float("inf")
    valid = torch.isfinite(memory).all(-1)
    mem = fusion.memory_norm(torch.where(valid[..., None], memory, 0.0)) + fusion.slot_embed
    hd = 8 // fusion.heads
    q = fusion.q(fusion.query_norm(hidden)).view(B, 3, fusion.heads, hd).transpose(1, 2)
    k, v = fusion.kv(mem).view(B, K, 2, fusion.heads, hd).permute(2, 0, 3, 1, 4)
    probs = (q @ k.transpose(-1, -2) / math.sqrt(hd)).masked_fill(~valid[:, None, None], float("-inf")).softmax(-1)
    ctx = fusion.out((probs[1:] @ v[1:]).transpose(1, 2).reshape(B - 1, 3, 8))
    expected = torch.cat([hidden[:1], hidden[1:] + math.tanh(0.8) * ctx])
    entropy = -(probs[1:] * probs[1:].log()).nan_to_num().sum(-1).mean()
    for with_entropy in (True, False):
        res = fusion(hidden, memory, with_entropy=with_entropy)
        torch.testing.assert_close(res.hidden, expected, rtol=1e-5, atol=1e-6)
        assert torch.equal(res.hidden[0], hidden[0])
    assert fusion(hidden, memory).attn_entropy.item() == pytest.approx(entropy.item(), rel=1e-5)
    assert fusion(hidden, memory, with_entropy=False).attn_entropy.item() == 0.0
    assert 0.1 < entropy.item() < math.log(K) - 0.1  # not a uniform attention: the check has teeth


def test_per_channel_gate_shape_and_value():
    fusion = _fusion(gate_init=0.5, per_channel=True)
    assert fusion.gate.shape == (W,)
    torch.testing.assert_close(fusion.gate_value(), torch.full((W,), math.tanh(0.5)))


# ---------------------------------------------------------------------------------------------- memory
def test_memory_modes_pred_zero_oracle():
    pred, oracle = torch.randn(B, K, D), torch.randn(B, K, D)
    assert select_memory("pred", pred, oracle) is pred
    assert torch.equal(select_memory("oracle", pred, oracle), oracle)
    zero = select_memory("zero", pred, oracle)
    assert zero.shape == pred.shape and not zero.any()


def test_shuffle_is_a_derangement_across_the_batch():
    pred = torch.randn(B, K, D)
    g = torch.Generator().manual_seed(0)
    for _ in range(20):
        shuffled = select_memory("shuffle", pred, generator=g)
        # Each output row is the memory of a different sample, and all samples are used once.
        src = [next(j for j in range(B) if torch.equal(shuffled[i], pred[j])) for i in range(B)]
        assert sorted(src) == list(range(B))
        assert all(s != i for i, s in enumerate(src))
    assert torch.equal(derangement(1), torch.tensor([0]))


def test_random_memory_has_prediction_scale_and_no_information():
    g = torch.Generator().manual_seed(0)
    pred = torch.randn(B, K, 2048) * torch.linspace(0.5, 5.0, B).view(B, 1, 1)
    noise = select_memory("random", pred, generator=g)
    rms_pred = pred.pow(2).mean(-1).sqrt()
    rms_noise = noise.pow(2).mean(-1).sqrt()
    torch.testing.assert_close(rms_noise, rms_pred, rtol=0.06, atol=0.0)
    assert torch.nn.functional.cosine_similarity(noise, pred, dim=-1).abs().max() < 0.15


def test_scheduled_memory_mixes_per_sample():
    pred, oracle = torch.randn(64, K, D), torch.randn(64, K, D)
    assert torch.equal(select_memory("scheduled", pred, oracle, oracle_prob=1.0), oracle)
    assert torch.equal(select_memory("scheduled", pred, oracle, oracle_prob=0.0), pred)
    mixed = select_memory("scheduled", pred, oracle, oracle_prob=0.5, generator=torch.Generator().manual_seed(1))
    is_oracle = torch.tensor([torch.equal(mixed[i], oracle[i]) for i in range(64)])
    is_pred = torch.tensor([torch.equal(mixed[i], pred[i]) for i in range(64)])
    assert bool((is_oracle ^ is_pred).all()) and 10 < int(is_oracle.sum()) < 54


def test_oracle_modes_need_targets_and_unknown_mode_fails():
    pred = torch.randn(B, K, D)
    for mode in ("oracle", "scheduled"):
        with pytest.raises(ValueError, match="rollout"):
            select_memory(mode, pred, None)
    with pytest.raises(ValueError, match="Unknown memory mode"):
        select_memory("future", pred)
    assert set(MEMORY_MODES) == {"pred", "oracle", "zero", "random", "shuffle", "scheduled"}


@pytest.mark.parametrize("shape", ["linear", "cosine", "exponential"])
def test_scheduled_probability_decays(shape):
    kw = dict(prob_start=0.9, prob_end=0.1, decay_steps=100, warmup_steps=10, shape=shape)
    probs = [scheduled_oracle_prob(s, **kw) for s in range(0, 131)]
    assert probs[0] == probs[10] == pytest.approx(0.9)  # held during warm-up
    assert probs[110] == probs[130] == pytest.approx(0.1)  # stays at the end value
    assert all(a >= b for a, b in zip(probs, probs[1:]))
    assert probs[10] > probs[60] > probs[110]
    if shape == "linear":
        assert probs[60] == pytest.approx(0.5)


def test_schedule_rejects_bad_arguments():
    with pytest.raises(ValueError, match="shape"):
        scheduled_oracle_prob(0, shape="step")
    with pytest.raises(ValueError, match="exponential"):
        scheduled_oracle_prob(0, prob_end=0.0, shape="exponential")


# ---------------------------------------------------------------------------------------------- world loss
def test_world_loss_values_and_masking():
    target = torch.randn(B, K, D)
    assert world_loss(target.clone(), target).item() == pytest.approx(0.0, abs=1e-6)
    assert world_loss(-target, target).item() == pytest.approx(2.0, abs=1e-6)

    pred = torch.randn(B, K, D, requires_grad=True)
    valid = torch.ones(B, K, dtype=torch.bool)
    valid[:, 2:] = False
    valid[0] = False
    loss = world_loss(pred, target, valid)
    # Invalid horizons contribute nothing, whatever their targets (NaN included), gradient included.
    garbage = target.clone()
    garbage[~valid] = float("nan")
    assert world_loss(pred, garbage, valid).item() == pytest.approx(loss.item())
    expected = (1 - torch.nn.functional.cosine_similarity(pred, target, dim=-1))[valid].mean()
    assert loss.item() == pytest.approx(expected.item(), rel=1e-6)
    world_loss(pred, garbage, valid).backward()
    assert torch.isfinite(pred.grad).all()
    assert not pred.grad[~valid].any() and pred.grad[valid].abs().sum() > 0
    none_valid = torch.zeros(B, K, dtype=torch.bool)
    assert world_loss(pred, garbage, none_valid).item() == 0.0


def test_per_horizon_cosine_masks_and_reports_nan_for_empty_horizons():
    target = torch.randn(B, K, D)
    pred = target.clone()
    pred[:, 1] = -target[:, 1]
    valid = torch.ones(B, K, dtype=torch.bool)
    valid[:, 3] = False
    pred[0, 2] = -target[0, 2]
    valid[0, 2] = False  # the one wrong entry at horizon 2 is masked
    cos = per_horizon_cosine(pred, target, valid)
    assert cos[0].item() == pytest.approx(1.0, abs=1e-5)
    assert cos[1].item() == pytest.approx(-1.0, abs=1e-5)
    assert cos[2].item() == pytest.approx(1.0, abs=1e-5)
    assert math.isnan(cos[3].item())


def test_world_targets_delta():
    future, current = torch.randn(B, K, D), torch.randn(B, D)
    assert world_targets(future, current, delta=False) is future
    torch.testing.assert_close(world_targets(future, current, delta=True), future - current[:, None])
