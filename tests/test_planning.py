"""Action-conditioned dynamics, the progress head and the rerank / CEM planners (pure torch and world_f)."""

import math

import pytest
import torch

from lerobot_policy_world_modality.constants import OBS_WORLD_GOAL, OBS_WORLD_LATENT, OBS_WORLD_REMAINING
from lerobot_policy_world_modality.latents.cache import EpisodeBounds
from lerobot_policy_world_modality.world.dynamics import ActionDynamics, progress_targets
from lerobot_policy_world_modality.world.planner import (
    PlannerSettings,
    mirrored_slope,
    plan_chunk,
    reference_rank,
    toward_reference,
)
from lerobot_policy_world_modality.world.prophet import Prophet
from lerobot_policy_world_modality.world_f.modeling_world_f import WorldFPolicy

from test_world_f_model import A, B, D, H, K, T, eval_batch, make_config, train_batch


# ------------------------------------------------------------------------------------ a known world
def point_world(goal: torch.Tensor):
    """x_end = x_0 + sum of the chunk's actions (x_0 = 0); score = -|x_end - goal|^2. Best chunk sum: goal."""

    def score(chunks):  # [B, N, H, A] -> [B, N]
        return -(chunks.sum(dim=2) - goal[:, None]).pow(2).sum(-1)

    return score


@pytest.mark.parametrize("kind", ["rerank", "cem"])
def test_planner_picks_the_best_scored_chunk_and_is_deterministic(kind):
    goal = torch.tensor([[1.5, -1.0], [0.0, 2.0]])
    proposal = torch.zeros(2, 4, 2)
    seen = []
    base = point_world(goal)

    def score(chunks):
        seen.append(chunks.clone())
        return base(chunks)

    settings = PlannerSettings(kind, samples=64, iterations=6, elite_frac=0.2, noise=0.6)
    chunk, info = plan_chunk(proposal, score, settings, torch.Generator().manual_seed(0))
    # It returns the best candidate it scored (no other chunk scored higher) ...
    every = torch.cat(seen, dim=1)
    best_seen = base(every).max(dim=1).values
    assert torch.allclose(info["score"], best_seen) and torch.allclose(base(chunk[:, None])[:, 0], best_seen)
    # ... which beats the policy's own proposal (a candidate too), and CEM gets close to the optimum.
    assert (info["score"] > info["proposal_score"]).all()
    error = (chunk.sum(1) - goal).norm(dim=-1)
    assert (error < (0.35 if kind == "cem" else 1.5)).all(), error
    # The same seed gives the same plan; another seed another.
    again, _ = plan_chunk(proposal, base, settings, torch.Generator().manual_seed(0))
    other, _ = plan_chunk(proposal, base, settings, torch.Generator().manual_seed(1))
    assert torch.equal(chunk, again) and not torch.equal(chunk, other)


def test_planner_keeps_the_proposal_when_it_is_the_best():
    goal = torch.zeros(1, 2)
    chunk, info = plan_chunk(torch.zeros(1, 4, 2), point_world(goal), PlannerSettings("rerank", samples=8))
    assert torch.equal(chunk, torch.zeros(1, 4, 2)) and info["score"].item() == 0.0


def test_reference_rank_tells_an_informative_score_from_a_blind_one():
    """A score that peaks at the reference always prefers it; a constant one cannot tell (0.5, never
    best); a score that ignores the reference ranks it about half way, at random."""
    reference = torch.randn(64, 4, 2, generator=torch.Generator().manual_seed(0))

    def near(chunks):  # higher the closer a candidate is to the reference
        return -(chunks - reference[:, None]).pow(2).sum(dim=(2, 3))

    beats, best = reference_rank(reference, near, 16, 0.3, torch.Generator().manual_seed(1))
    assert torch.equal(beats, torch.ones(64)) and best.all()
    beats, best = reference_rank(reference, lambda c: torch.zeros(c.shape[:2]), 16, 0.3)
    assert torch.equal(beats, torch.full((64,), 0.5)) and not best.any()
    beats, best = reference_rank(reference, lambda c: c[..., 0].sum(-1), 16, 0.3, torch.Generator().manual_seed(2))
    assert 0.35 < beats.mean() < 0.65 and best.float().mean() < 0.25


def test_mirrored_slope_tells_a_slope_from_a_peak():
    """A linear score puts the reference between every mirrored pair (1); a score peaking at the reference
    never does (0); a score drawn at random per candidate does in about half of them; ties are not between."""
    reference = torch.randn(32, 4, 2, generator=torch.Generator().manual_seed(0))
    slope = mirrored_slope(reference, lambda c: c[..., 0].sum(-1), 8, 0.3, torch.Generator().manual_seed(1))
    assert torch.equal(slope, torch.ones(32))
    peak = mirrored_slope(reference, lambda c: -(c - reference[:, None]).pow(2).sum(dim=(2, 3)), 8, 0.3,
                          torch.Generator().manual_seed(1))  # fmt: skip
    assert torch.equal(peak, torch.zeros(32))
    noise = torch.Generator().manual_seed(3)
    rand = mirrored_slope(reference, lambda c: torch.randn(c.shape[:2], generator=noise), 8, 0.3)
    assert 0.35 < rand.mean() < 0.65
    assert torch.equal(mirrored_slope(reference, lambda c: torch.zeros(c.shape[:2]), 8, 0.3), torch.zeros(32))


def test_planner_settings_are_validated_by_name():
    for bad, name in [(dict(samples=1), "planner_samples"), (dict(elite_frac=0.0), "planner_elite_frac"),
                      (dict(noise=0.0), "planner_noise"), (dict(iterations=0), "planner_iterations")]:  # fmt: skip
        with pytest.raises(ValueError, match=name):
            PlannerSettings("cem", **bad).validate()


# ------------------------------------------------------------ the dynamics use the actions they are given
def test_action_conditioned_dynamics_beat_the_history_only_prophet_when_actions_drive_the_future():
    """z_{t+1} = z_t + M a_t with actions independent of the past: only a model that reads them can predict."""
    torch.manual_seed(0)
    d, a_dim, t_hist, k = 8, 2, 2, 2
    mix = torch.randn(a_dim, d)

    def batch(n, g):
        z0 = torch.randn(n, d, generator=g)
        prev = torch.randn(n, a_dim, generator=g)
        actions = torch.randn(n, k, a_dim, generator=g)
        history = torch.stack([z0 - prev @ mix, z0], dim=1)
        future = z0[:, None] + torch.cumsum(actions @ mix, dim=1)
        return history, actions, future - z0[:, None]

    common = dict(width=32, depth=1, heads=2, delta=True, rescale_output=False)
    models = {"history": Prophet(d, t_hist, k, **common),
              "actions": ActionDynamics(d, t_hist, k, a_dim, k, **common)}  # fmt: skip
    g = torch.Generator().manual_seed(1)
    for name, model in models.items():
        opt = torch.optim.Adam(model.parameters(), lr=3e-3)
        for _ in range(300):
            history, actions, target = batch(64, g)
            pred = model(history).prediction() if name == "history" else model(history, actions)
            loss = (pred - target).pow(2).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
    history, actions, target = batch(512, torch.Generator().manual_seed(2))
    with torch.no_grad():
        err_hist = (models["history"](history).prediction() - target).pow(2).mean().item()
        err_act = (models["actions"](history, actions) - target).pow(2).mean().item()
        shuffled = (models["actions"](history, actions[torch.randperm(512)]) - target).pow(2).mean().item()
    assert err_act < 0.2 * err_hist, (err_act, err_hist)
    assert shuffled > 5 * err_act  # it reads the actions it is given, not the history


def test_remaining_fraction_and_progress_targets():
    bounds = EpisodeBounds([0, 5], [5, 8])
    remaining = bounds.remaining_fraction(torch.arange(8))
    assert remaining.tolist() == pytest.approx([1.0, 0.75, 0.5, 0.25, 0.0, 1.0, 0.5, 0.0])
    targets = progress_targets(remaining, torch.tensor([True] * 5 + [False] * 3))
    assert targets[:5].tolist() == pytest.approx(remaining[:5].tolist()) and targets[5:].tolist() == [1.0] * 3


# ----------------------------------------------------------------------------------- world_f with a planner
def planning_policy(seed=0, **overrides):
    torch.manual_seed(seed)
    kw = dict(variant="A", dynamics="action_conditioned", progress_head=True, planner="cem",
              planner_samples=8, planner_iterations=2)  # fmt: skip
    return WorldFPolicy(make_config(**(kw | overrides)))


def test_world_f_trains_its_dynamics_without_touching_the_actions():
    policy = planning_policy(planner="none")
    batch = train_batch() | {OBS_WORLD_REMAINING: torch.rand(B)}
    policy.train()
    loss, info = policy.forward(batch)
    assert {"dyn_loss", "dyn_cos_h1", "dyn_motion_cos_h1", "progress_loss", "action_loss"} <= set(info)
    loss.backward()
    assert policy.world.dynamics.net.context_type.grad is not None
    # The action path never reads the world model: A with the same trunk gives the same chunk.
    policy.eval()
    plain = WorldFPolicy(make_config(variant="A"))
    plain.load_state_dict({k: v for k, v in policy.state_dict().items() if k in plain.state_dict()})
    latent = batch[OBS_WORLD_LATENT]
    policy.reset()
    plain.reset()
    assert torch.equal(policy.predict_action_chunk(eval_batch(latent)), plain.predict_action_chunk(eval_batch(latent)))


def test_planned_actions_follow_the_goal_and_survive_save_and_load(tmp_path):
    policy = planning_policy()
    policy.eval()
    latent = train_batch()[OBS_WORLD_LATENT]
    obs = eval_batch(latent)
    policy.reset()
    planned = policy.predict_action_chunk(obs)
    policy.reset()
    assert torch.equal(policy.predict_action_chunk(obs), planned)  # reset re-seeds the planner
    with torch.no_grad():
        proposal = policy._run(obs, policy.world_history, "pred", None, 0.0, False)["actions"]
    assert planned.shape == (B, H, A) and not torch.equal(planned, proposal)

    # A goal latent changes what the planner prefers.
    policy.reset()
    goal_plan = policy.predict_action_chunk(obs | {OBS_WORLD_GOAL: torch.randn(B, latent.shape[1])})
    assert not torch.equal(goal_plan, planned)

    policy.save_pretrained(tmp_path / "ckpt")
    loaded = WorldFPolicy.from_pretrained(tmp_path / "ckpt")
    loaded.eval()
    loaded.reset()
    assert loaded.config.planner == "cem" and torch.equal(loaded.predict_action_chunk(obs), planned)


def test_imitating_successes_only_leaves_failed_episodes_out_of_the_action_loss(tmp_path):
    """imitate_failures=false: a batch's frames of failed episodes no longer move the action loss (their
    actions are replaced by garbage and the loss stays), while the world model still trains on them;
    the default imitates them; a dataset without success marks is refused by name."""
    from lerobot.datasets.lerobot_dataset import LeRobotDatasetMetadata
    from support.datasets import make_synthetic_dataset

    from test_world_targets import _precompute

    repo, root = "local/marked", tmp_path / "ds"
    make_synthetic_dataset(root, repo_id=repo, episode_lengths=(6, 6), image_hw=(16, 16), use_videos=False,
                           episode_success=(1.0, 0.0))  # fmt: skip
    _precompute(repo, root)
    meta = LeRobotDatasetMetadata(repo, root=root)
    kw = dict(world_latent_dim=None, encoder="pixels", world_cameras=["observation.image"], variant="A",
              dynamics="action_conditioned", future_frames=K)  # fmt: skip
    torch.manual_seed(0)
    policy = WorldFPolicy(make_config(**kw, imitate_failures=False), dataset_meta=meta)
    policy.eval()
    d = policy.config.world_latent_dim
    batch = train_batch()
    batch.update({OBS_WORLD_LATENT: torch.randn(B, d), "episode_index": torch.arange(B) % 2})
    batch["observation.world.history"] = torch.randn(B, batch["observation.world.history"].shape[1], d)
    batch["observation.world.future"] = torch.randn(B, K, d)
    spoiled = {**batch, "action": batch["action"].clone()}
    spoiled["action"][batch["episode_index"] == 1] = 100.0  # the failed episode's frames
    with torch.no_grad():
        _, clean_info = policy.forward(dict(batch))
        _, spoiled_info = policy.forward(dict(spoiled))
    assert spoiled_info["action_loss"] == pytest.approx(clean_info["action_loss"])
    assert spoiled_info["dyn_loss"] != pytest.approx(clean_info["dyn_loss"])  # the world model still reads them
    default = WorldFPolicy(make_config(**kw), dataset_meta=meta)
    default.eval()
    with torch.no_grad():
        assert default.forward(dict(spoiled))[1]["action_loss"] > 10 * default.forward(dict(batch))[1]["action_loss"]

    plain, plain_root = "local/unmarked", tmp_path / "plain"
    make_synthetic_dataset(plain_root, repo_id=plain, episode_lengths=(6, 6), image_hw=(16, 16), use_videos=False)
    _precompute(plain, plain_root)
    with pytest.raises(ValueError, match="imitate_failures"):
        WorldFPolicy(make_config(**kw, imitate_failures=False), dataset_meta=LeRobotDatasetMetadata(plain, root=plain_root))


def expert_world(seed, n):
    """A world whose demonstrations act as a known function of the state: the expert's chunk is
    tanh(z_t W) at every step, and the future is z_{t+k} = z_t + (sum of the first k actions) M."""
    g = torch.Generator().manual_seed(1000)
    w, mix = torch.randn(D, A, generator=g), torch.randn(A, D, generator=g)
    g = torch.Generator().manual_seed(seed)
    history = torch.randn(n, T, D, generator=g)
    z = history[:, -1]
    actions = torch.tanh(z @ w).unsqueeze(1).expand(n, H, A).contiguous()
    future = z[:, None] + torch.cumsum(actions[:, :K] @ mix, dim=1)
    return history, actions, future



def test_outcome_critic_peaks_at_the_demonstrated_chunk_on_unseen_states():
    """The outcome critic (plan_critic) judges a chunk by the world model's imagined outcome. Trained on
    demonstrations, its score peaks at the demonstrated chunk on states it never saw: the chunk beats most
    of its perturbations and seldom lies between mirrored ones (a slope would put it there in most pairs),
    and rerank from a knocked-off proposal strays less than a random pick does (it still strays: 15 of
    16 candidates lie farther than the proposal, see docs/planning.md). Fails if the critic does not
    read the imagined outcome or the world model ignores the actions."""
    torch.manual_seed(0)
    policy = WorldFPolicy(make_config(variant="A", dynamics="action_conditioned", plan_critic=True,
                                      lambda_critic=1.0, planner="rerank", planner_samples=16))  # fmt: skip
    opt = torch.optim.Adam(policy.parameters(), lr=3e-3)
    policy.train()
    for step in range(400):
        history, actions, future = expert_world(step, 64)
        batch = {OBS_WORLD_LATENT: history[:, -1], "observation.world.history": history,
                 "observation.world.future": future, "observation.world.future_valid": torch.ones(64, K, dtype=torch.bool),
                 "observation.state": torch.zeros(64, 4), "action": actions,
                 "action_is_pad": torch.zeros(64, H, dtype=torch.bool)}  # fmt: skip
        loss, info = policy.forward(batch)
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert {"critic_loss", "critic_top1"} <= set(info)
    assert policy.world.critic.net[0].weight.grad is not None
    assert policy.world.dynamics.net.context_type.grad is not None  # trained by its own loss, not the critic's
    policy.eval()
    history, actions, _ = expert_world(10_000, 256)  # states the critic never saw

    def score(chunks):
        return policy.world.score_chunks(history, chunks, None, K)

    g = torch.Generator().manual_seed(0)
    beats, _ = reference_rank(actions, score, 16, policy.config.planner_noise, g)
    between = mirrored_slope(actions, score, 8, policy.config.planner_noise, g)
    settings = policy.config.planner_settings()
    ratio = toward_reference(actions, score, settings, policy.config.planner_noise, K, g)
    random_pick = toward_reference(actions, lambda c: torch.rand(c.shape[:2], generator=g), settings, 0.3, K, g)
    assert beats.mean() > 0.7, beats.mean()
    assert between.mean() < 0.5, between.mean()
    assert ratio.median() < random_pick.median() - 0.1, (ratio.median(), random_pick.median())


@pytest.mark.parametrize("reads", ["actions", "both"])
def test_a_critic_that_reads_the_actions_scores_through_the_world_model_only_when_it_reads_both(reads):
    """critic_input="actions" (the control without the world model) scores chunks without imagining them:
    scrambling the dynamics leaves its scores unchanged; "both" reads the imagined frames too, so the same
    scramble changes them. Both train with the policy's critic loss."""
    torch.manual_seed(0)
    policy = WorldFPolicy(make_config(variant="A", dynamics="action_conditioned", plan_critic=True,
                                      critic_input=reads, planner="rerank", planner_samples=4))  # fmt: skip
    history, actions, future = expert_world(0, 8)
    batch = {OBS_WORLD_LATENT: history[:, -1], "observation.world.history": history,
             "observation.world.future": future, "observation.world.future_valid": torch.ones(8, K, dtype=torch.bool),
             "observation.state": torch.zeros(8, 4), "action": actions, "action_is_pad": torch.zeros(8, H, dtype=torch.bool)}  # fmt: skip
    loss, info = policy.forward(batch)
    loss.backward()
    assert "critic_loss" in info and policy.world.critic.actions.weight.grad is not None
    policy.eval()
    chunks = actions.unsqueeze(1) + 0.3 * torch.randn(8, 4, H, A)
    before = policy.world.score_chunks(history, chunks, None, K)
    with torch.no_grad():
        for param in policy.world.dynamics.parameters():
            param.add_(torch.randn_like(param))
    after = policy.world.score_chunks(history, chunks, None, K)
    assert torch.equal(before, after) == (reads == "actions")


def rewarded_world(seed, n):
    """Random actions (exploration data) in z_{t+k} = z_t + (sum of the first k actions) M, and a reward
    that depends on the scene only: R(z) = -|z P|^2 (P: a fixed projection to 2 dimensions)."""
    g = torch.Generator().manual_seed(2000)
    mix, proj = torch.randn(A, D, generator=g), torch.randn(D, 2, generator=g) / D**0.5
    g = torch.Generator().manual_seed(seed)
    history = torch.randn(n, T, D, generator=g)
    z = history[:, -1]
    actions = torch.randn(n, H, A, generator=g)
    future = z[:, None] + torch.cumsum(actions[:, :K] @ mix, dim=1)

    def reward(latent):
        return -(latent @ proj).pow(2).sum(-1)

    return history, actions, future, reward


def test_reward_head_lets_the_planner_pick_chunks_with_a_better_outcome():
    """reward_head learns the step's reward from a latent (next.reward); scoring imagined outcomes by it
    (planner_score=reward), rerank executes chunks whose true outcome earns more than the proposal's, on
    states never seen: information the demonstrations alone do not carry. Fails if the head ignores the
    latent or the world model the actions. With a critic trained too, "auto" scores by the critic and
    "reward" by the reward head."""
    from lerobot_policy_world_modality.constants import NEXT_REWARD

    torch.manual_seed(0)
    cfg = make_config(variant="A", dynamics="action_conditioned", reward_head=True, lambda_reward=1.0,
                      reward_scale=1.0, plan_critic=True, planner="rerank", planner_samples=16,
                      planner_score="reward")  # fmt: skip
    policy = WorldFPolicy(cfg)
    opt = torch.optim.Adam(policy.parameters(), lr=3e-3)
    policy.train()
    for step in range(400):
        history, actions, future, reward = rewarded_world(step, 64)
        batch = {OBS_WORLD_LATENT: history[:, -1], "observation.world.history": history,
                 "observation.world.future": future, "observation.world.future_valid": torch.ones(64, K, dtype=torch.bool),
                 "observation.state": torch.zeros(64, 4), "action": actions,
                 "action_is_pad": torch.zeros(64, H, dtype=torch.bool), NEXT_REWARD: reward(history[:, -1])[:, None]}  # fmt: skip
        loss, info = policy.forward(batch)
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert {"reward_loss", "critic_loss"} <= set(info)
    policy.eval()
    history, proposal, _, reward = rewarded_world(10_000, 256)  # unseen states; the proposal is arbitrary
    g = torch.Generator().manual_seed(0)
    mix = torch.randn(A, D, generator=torch.Generator().manual_seed(2000))

    def outcome(chunk):  # the true latent after the K actions the world model reads
        return history[:, -1] + chunk[:, :K].sum(dim=1) @ mix

    planned, _ = policy.plan(proposal, history)
    gain = reward(outcome(planned)) - reward(outcome(proposal))
    assert gain.mean() > 0.1 and (gain > 0).float().mean() > 0.6, (gain.mean(), (gain > 0).float().mean())
    assert policy.world.score_kind(None) == "reward"
    policy.config.planner_score = "auto"
    assert policy.world.score_kind(None) == "critic" and policy.world.score_kind(torch.zeros(1, D)) == "goal"
    # A dataset without rewards is refused by name.
    policy.train()
    batch.pop(NEXT_REWARD)
    with pytest.raises(KeyError, match="next.reward"):
        policy.forward(batch)


def test_toward_reference_tells_a_correcting_score_from_a_random_and_a_blind_one():
    """Rerank from a knocked-off proposal: an oracle that knows the reference corrects (< 1), a random
    score strays about twice as far (squared), and a constant one keeps the proposal (exactly 1)."""
    g = torch.Generator().manual_seed(0)
    reference = torch.randn(64, H, A, generator=g)
    settings = PlannerSettings(kind="rerank", samples=16, noise=0.3)

    def oracle(chunks):  # reads the first 2 actions, like a world model reaching 2 frames ahead
        return -(chunks[:, :, :2] - reference[:, None, :2]).pow(2).sum(dim=(2, 3))

    corrected = toward_reference(reference, oracle, settings, 0.3, 2, g)
    random_pick = toward_reference(reference, lambda c: torch.rand(c.shape[:2], generator=g), settings, 0.3, 2, g)
    kept = toward_reference(reference, lambda c: torch.zeros(c.shape[:2]), settings, 0.3, 2, g)
    assert corrected.median() < 0.95 and 1.6 < random_pick.median() < 2.4, (corrected.median(), random_pick.median())
    assert torch.allclose(kept, torch.ones(64))


def test_select_action_plans_once_per_chunk():
    policy = planning_policy(planner="rerank", planner_samples=4)
    policy.eval()
    calls = []
    score = policy.world.score_chunks
    policy.world.score_chunks = lambda *a, **k: calls.append(1) or score(*a, **k)
    policy.reset()
    latent = train_batch()[OBS_WORLD_LATENT]
    for _ in range(policy.config.n_action_steps + 1):
        policy.select_action(eval_batch(latent))
    assert len(calls) == 2


def test_planner_without_goal_or_progress_head_says_what_to_do():
    policy = planning_policy(progress_head=False)
    policy.eval()
    policy.reset()
    with pytest.raises(RuntimeError, match="reward_head=true or --policy.progress_head=true"):
        policy.predict_action_chunk(eval_batch(train_batch()[OBS_WORLD_LATENT]))


@pytest.mark.parametrize(
    "overrides, flag",
    [
        (dict(planner="cem", dynamics="none"), "dynamics=action_conditioned"),
        (dict(progress_head=True, dynamics="none", planner="none"), "dynamics=action_conditioned"),
        (dict(dynamics="action_conditioned", future_stride=3, planner="none", progress_head=False), "chunk_size"),
        (dict(planner="beam"), "planner 'beam'"),
        (dict(planner_horizon=K + 1), "planner_horizon"),
        (dict(plan_critic=True, dynamics="none", planner="none", progress_head=False), "plan_critic"),
        (dict(plan_critic=True, critic_negatives=0), "critic_negatives"),
        (dict(lambda_critic=-1.0), "lambda_critic"),
        (dict(plan_critic=True, critic_input="frames"), "critic_input 'frames'"),
        (dict(reward_head=True, dynamics="none", planner="none", progress_head=False), "reward_head"),
        (dict(planner_score="reward"), "reward_head=true"),
        (dict(planner_score="value"), "planner_score 'value'"),
        (dict(reward_head=True, reward_scale=0.0), "reward_scale"),
    ],
)
def test_bad_planning_settings_name_the_flag(overrides, flag):
    with pytest.raises(ValueError, match=flag):
        planning_policy(**overrides)


# ------------------------------------------------------------------------- through lerobot-train / -eval
@pytest.mark.slow
def test_failures_to_world_model_to_planned_rollouts_through_the_stock_clis(tmp_path):
    """The issue's loop through real entry points, one shared training to keep it short:
    record random-action failures (kept, episode_success 0) -> precompute -> lerobot-train with the world
    model and progress head (the policy reads the failures as failures) -> stock lerobot-eval plans with
    --policy.planner=cem (and the same episode goes otherwise without it) -> the checkpoint's own rollouts
    recorded as new data, its actions replayable through it."""
    import json
    import os
    import subprocess
    from pathlib import Path

    import numpy as np
    from lerobot.datasets.lerobot_dataset import LeRobotDataset, LeRobotDatasetMetadata
    from lerobot.policies.factory import make_policy, make_policy_config
    from safetensors import safe_open
    from support.cli import BIN, TINY_WORLD_F, capped_eval_cmd, replay_with_planner, short_train_flags

    from lerobot_policy_world_modality.tools.fit_plan_score import PAIRED
    from lerobot_policy_world_modality.tools.record_metaworld import CheckpointActor

    def run(cmd):
        env = {**os.environ, "MUJOCO_GL": "egl"}
        return subprocess.run([str(c) for c in cmd], capture_output=True, text=True, timeout=600, env=env)

    def record(repo, root, *flags):
        return run([BIN / "lerobot-wm-record-metaworld", f"--dataset.repo_id={repo}", f"--dataset.root={root}",
                    "--env.task=button-press-v3", "--success_only=false", "--dataset.use_videos=false", *flags])

    def avg_reward(eval_dir):
        info = json.loads((eval_dir / "eval_info.json").read_text())
        return float(info.get("overall", info.get("aggregated", {}))["avg_sum_reward"])

    # 1. Failures are kept and marked; random actions without --success_only false are refused up front.
    repo, root = "local/failures", tmp_path / "ds"
    res = record(repo, root, "--episodes_per_task=2", "--max_steps=8", "--actions=random")
    assert res.returncode == 0, res.stderr[-3000:]
    ds = LeRobotDataset(repo, root=root)
    assert ds.num_episodes == 2 and float(ds[0]["episode_success"]) == 0.0
    bad = run([BIN / "lerobot-wm-record-metaworld", "--dataset.repo_id=local/x", f"--dataset.root={tmp_path / 'x'}",
               "--env.task=button-press-v3", "--actions=random"])  # fmt: skip
    assert bad.returncode == 2 and "--success_only false" in bad.stderr

    # 2. Precompute and train the world model and progress head next to variant A.
    res = run([BIN / "lerobot-wm-precompute", f"--dataset.repo_id={repo}", f"--dataset.root={root}"])
    assert res.returncode == 0, res.stderr
    view = Path(next(ln for ln in res.stdout.splitlines() if "training view" in ln).split(": ", 1)[1].strip())
    flags = ["--policy.variant=A", "--policy.dynamics=action_conditioned", "--policy.progress_head=true",
             "--policy.plan_critic=true", "--policy.reward_head=true"]
    res = run([BIN / "lerobot-train", "--policy.type=world_f", "--policy.encoder=pixels", *TINY_WORLD_F, *flags,
               f"--dataset.repo_id={repo}", f"--dataset.root={view}", *short_train_flags(tmp_path / "out", 4)])  # fmt: skip
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-5000:]
    ckpt = (tmp_path / "out" / "checkpoints" / "last" / "pretrained_model").resolve()
    cfg = json.loads((ckpt / "config.json").read_text())
    assert cfg["dynamics"] == "action_conditioned" and cfg["planner"] == "none"
    with safe_open(str(ckpt / "model.safetensors"), "pt") as f:
        keys = list(f.keys())
    assert {"world.dynamics.net.context_type", "world.progress.net.1.weight", "world.critic.net.0.weight",
            "world.reward.net.1.weight"} <= set(keys)
    # The policy lerobot-train builds on this view reads both episodes as failures (progress target 1).
    cfg = make_policy_config("world_f", device="cpu", variant="A", dynamics="action_conditioned", progress_head=True,
                             width=32, depth=1, heads=2, history_frames=3, future_frames=2, chunk_size=4,
                             n_action_steps=2)  # fmt: skip
    policy = make_policy(cfg, ds_meta=LeRobotDatasetMetadata(repo, root=view))
    assert policy._success({"episode_index": torch.tensor([1, 0])}).tolist() == [False, False]

    # The probe reports the world model against the copy baseline, with no memory verdict (A reads no memory).
    res = run([BIN / "lerobot-wm-probe", f"--policy.path={ckpt}", f"--dataset.root={view}", f"--dataset.repo_id={repo}",
               "--batches=1", "--batch_size=4", f"--out={tmp_path / 'probe.json'}"])  # fmt: skip
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    probed = json.loads((tmp_path / "probe.json").read_text())
    assert probed["world_model_only"] and probed["reads_memory"] is None and list(probed["action_loss"]) == ["pred"]
    assert set(probed["dynamics_cosine"]) and {k.replace("dyn_", "world_copy_") for k in probed["dynamics_cosine"]} <= set(
        probed["world_copy_cosine"])
    assert "beats copying z_t at" in res.stdout and "--policy.planner=cem" in res.stdout
    # ... and whether the planner's score can tell the dataset's chunks from their perturbations.
    check = probed["planning"]
    assert 0.0 <= check["expert_beats_perturbations"] <= 1.0 and 0.0 <= check["expert_is_best"] <= 1.0
    assert check["expert_is_best_chance"] == 1 / check["planner_samples"]
    assert 0.0 <= check["expert_between_mirrored"] <= 1.0 and "mirrored perturbations" in res.stdout
    assert check["dynamics_loss"] > 0 and math.isfinite(check["dynamics_action_sensitivity"])
    assert check["score"] == "critic" and check["planner"] == "rerank" and math.isfinite(check["planned_distance_ratio"])
    assert -1.0 <= check["reward_spearman"] <= 1.0  # the reward head read the recorded next.reward
    # The same weights checked with another planner and score (rollout-time fields).
    cem = run([BIN / "lerobot-wm-probe", f"--policy.path={ckpt}", f"--dataset.root={view}", f"--dataset.repo_id={repo}",
               "--batches=1", "--batch_size=4", "--planner=cem", "--planner_score=reward", f"--out={tmp_path / 'cem.json'}"])  # fmt: skip
    assert cem.returncode == 0, cem.stdout[-3000:] + cem.stderr[-3000:]
    other = json.loads((tmp_path / "cem.json").read_text())["planning"]
    assert (other["planner"], other["score"]) == ("cem", "reward") and math.isfinite(other["planned_distance_ratio"])
    assert "The planner's score (critic) prefers the dataset's chunk" in res.stdout and "knocked-off proposal" in res.stdout
    # 3. Stock lerobot-eval plans with the override; without it the same episode (same env seed) goes otherwise.
    res = run([*capped_eval_cmd(ckpt, tmp_path / "eval_cem", episode_length=6), "--policy.planner=cem",
               "--policy.planner_samples=4", "--policy.planner_iterations=2"])  # fmt: skip
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-5000:]
    res = run(capped_eval_cmd(ckpt, tmp_path / "eval_plain", episode_length=6))
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-5000:]
    assert np.isfinite(avg_reward(tmp_path / "eval_cem"))
    assert avg_reward(tmp_path / "eval_plain") != avg_reward(tmp_path / "eval_cem")
    # An episode starts from its env seed alone (the launcher seeds MetaWorld's resets): the episode on seed
    # 1001 is the same whether it is the second of an evaluation from --seed=1000 or the first from 1001.
    for name, episodes, seed in (("eval_two", 2, 1000), ("eval_one", 1, 1001)):
        res = run([*capped_eval_cmd(ckpt, tmp_path / name, episode_length=6, episodes=episodes), f"--seed={seed}"])
        assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-5000:]

    def sum_rewards(name):
        return json.loads((tmp_path / name / "eval_info.json").read_text())["per_task"][0]["metrics"]["sum_rewards"]

    two, one = sum_rewards("eval_two"), sum_rewards("eval_one")
    assert two[1] == one[0] and two[0] != two[1]

    # 4. The checkpoint's own rollouts become data; the recorded actions are its actions.
    res = record("local/rollouts", tmp_path / "ro", "--episodes_per_task=1", "--max_steps=5", "--actions=policy",
                 f"--policy.path={ckpt}", "--action_noise=0")
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-3000:]
    rollout = LeRobotDataset("local/rollouts", root=tmp_path / "ro")
    assert rollout.num_episodes == 1 and len(rollout) == 5 and float(rollout[0]["episode_success"]) in (0.0, 1.0)
    assert json.loads((tmp_path / "ro" / "meta" / "wm_recording.json").read_text())["plan"]["policy_path"] == str(ckpt)
    actor, first = CheckpointActor(str(ckpt)), rollout[0]
    actor.reset()
    pixels = (first["observation.image"].permute(1, 2, 0) * 255).round().to(torch.uint8).numpy()
    action = actor.act({"pixels": pixels, "agent_pos": first["observation.state"].numpy()}, first["task"])
    np.testing.assert_allclose(np.clip(action, -1, 1), first["action"].numpy(), atol=1e-5)
    bad = record("local/x", tmp_path / "y", "--actions=policy")
    assert bad.returncode == 2 and "--policy.path" in bad.stderr

    # 5. The score's ranking against the simulator's counterfactual outcomes (lerobot-wm-plan-check).
    def plan_check(pick, out, *flags, path=ckpt, score="reward", episodes=1):
        return run([BIN / "lerobot-wm-plan-check", f"--policy.path={path}", "--tasks=button-press-v3",
                    f"--episodes={episodes}", "--episode_length=6", f"--pick={pick}", "--planner_samples=4",
                    f"--planner_score={score}", f"--out_dir={out}", *flags])  # fmt: skip

    res = plan_check("true", tmp_path / "pc" / "true")
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    episode_file = tmp_path / "pc" / "true" / "episodes" / "button-press-v3__1000.json"
    ep = json.loads(episode_file.read_text())
    # Replaying the picked chunk repeats its counterfactual rewards exactly: the saved state is the whole state.
    assert ep["replay_max_abs_diff"] == 0.0 and ep["steps"] == len(ep["actions"])
    assert len(ep["decisions"]) == math.ceil(ep["steps"] / 2)  # n_action_steps = 2
    for d in ep["decisions"]:  # the oracle executes the true best; the model's pick is never better
        assert d["true_picked"] == d["true_best"] >= d["true_model_pick"] and 0 <= d["model_pick_true_rank"] < 4
        assert math.isnan(d["spearman"]) or -1.0 <= d["spearman"] <= 1.0
    summary = json.loads((tmp_path / "pc" / "true" / "summary.json").read_text())
    assert summary["all"]["episodes"] == 1 and summary["planner_samples"] == 4 and "| button-press-v3 |" in res.stdout
    mtime = episode_file.stat().st_mtime_ns
    assert plan_check("true", tmp_path / "pc" / "true").returncode == 0 and episode_file.stat().st_mtime_ns == mtime  # resumed
    res = plan_check("model", tmp_path / "pc" / "true")
    assert res.returncode == 2 and "another --out_dir" in res.stderr
    # pick=model executes exactly what stock rollouts with --policy.planner=rerank execute (same env seed).
    res = plan_check("model", tmp_path / "pc" / "model")
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    executed = json.loads((tmp_path / "pc" / "model" / "episodes" / "button-press-v3__1000.json").read_text())["actions"]
    replay_with_planner(ckpt, "button-press-v3", 1000, executed, planner="rerank", planner_samples=4, planner_score="reward")
    # --truth=expert: the oracle by the scripted expert's steps to success, counted within the episode's
    # remaining steps (6 here: too few for the expert to press the button, so every candidate scores the
    # failure floor, one step below the slowest success the remaining steps allow).
    res = plan_check("true", tmp_path / "pc" / "true_expert", "--truth=expert")
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    ep = json.loads((tmp_path / "pc" / "true_expert" / "episodes" / "button-press-v3__1000.json").read_text())
    assert ep["truth"] == "expert" and ep["expert_horizon"] == 150 and ep["replay_max_abs_diff"] == 0.0
    assert [d["true_best"] for d in ep["decisions"]] == [-(2 + (6 - d["step"] - 2) + 1) for d in ep["decisions"]]
    assert all(d["true_picked"] == d["true_best"] and d["true_spread"] == 0 for d in ep["decisions"])
    # The report pairs the picks of the same checkpoint, task and env seed, each oracle by its own truth.
    assert plan_check("proposal", tmp_path / "pc" / "proposal").returncode == 0
    res = run([BIN / "lerobot-wm-plan-check", f"--report={tmp_path / 'pc'}"])
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    rep = json.loads((tmp_path / "pc" / "report.json").read_text())
    assert set(rep["summaries"]) == {"proposal", "model", "true", "true:expert"}
    assert (tmp_path / "pc" / "report_success.png").is_file() and "steps to success (oracle)" in res.stdout
    assert {(c["x"], c["task"], c["pairs"]) for c in rep["comparisons"]} >= {
        ("true", "all", 1), ("model", "all", 1), ("true:expert", "all", 1)}

    # 6. A score fitted to the counterfactual outcomes of saved candidates (lerobot-wm-fit-plan-score).
    res = plan_check("proposal", tmp_path / "collect", "--save_candidates", episodes=3)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    saved = np.load(tmp_path / "collect" / "candidates" / "button-press-v3__1001.npz")
    ep = json.loads((tmp_path / "collect" / "episodes" / "button-press-v3__1001.json").read_text())
    m = len(ep["decisions"])
    assert saved["history"].shape == (m, 3, 768) and saved["candidates"].shape == (m, 4, 4, 4)  # T=3, N=4, H=4, A=4
    np.testing.assert_allclose(saved["true"][:, 0], [d["true_proposal"] for d in ep["decisions"]], rtol=1e-6)
    np.testing.assert_allclose(saved["true"].max(axis=1), [d["true_best"] for d in ep["decisions"]], rtol=1e-6)
    # An episode whose candidates were lost is run again, not skipped.
    (tmp_path / "collect" / "candidates" / "button-press-v3__1001.npz").unlink()
    assert plan_check("proposal", tmp_path / "collect", "--save_candidates", episodes=3).returncode == 0
    assert (tmp_path / "collect" / "candidates" / "button-press-v3__1001.npz").is_file()
    # Two folders of candidates (as a planning-off collection and a second round would be): the fit reads
    # both and reports how each is ranked.
    (tmp_path / "round2" / "candidates").mkdir(parents=True)
    (tmp_path / "collect" / "candidates" / "button-press-v3__1002.npz").rename(tmp_path / "round2" / "candidates" / "button-press-v3__1002.npz")
    res = run([BIN / "lerobot-wm-fit-plan-score", f"--policy.path={ckpt}", "--candidates", tmp_path / "collect",
               tmp_path / "round2", "--output_dir", tmp_path / "fit", "--steps=30", "--holdout=0.4", "--label=r2"])  # fmt: skip
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    fitted = tmp_path / "fit" / "pretrained_model"
    fit = json.loads((tmp_path / "fit" / "fit.json").read_text())
    assert fit["source"] == str(ckpt) and (tmp_path / "fit" / "fit.png").is_file() and fit["label"] == "r2"
    assert set(fit["figures"]["held_out"]) == {"world model", "world model + actions", "control: actions",
                                               "world model + actions, projected", "checkpoint's score",
                                               "world model, projected", "control: actions, projected",
                                               "world model + actions, imagined shuffled",
                                               "world model + actions, projected, imagined shuffled"}  # fmt: skip
    assert fit["exported"] == "world model"
    # The critics paired on the same held-out decisions (each against its control and its shuffle).
    assert set(fit["paired"]) == {f"{x} vs {y}" for x, y in PAIRED} and "Paired on the held-out decisions" in res.stdout
    assert all(1 <= c["spearman"]["clusters"] <= len(fit["episodes"]["held_out"]) for c in fit["paired"].values())
    by_source = {src: b["decisions"] for split in ("train", "held_out")
                 for src, b in fit["figures"][split]["world model"]["sources"].items()}  # fmt: skip
    assert set(by_source) == {str(tmp_path / "collect"), str(tmp_path / "round2")} and all(by_source.values())
    assert sum(len(v) for v in fit["episodes"].values()) == 3 and fit["episodes"]["held_out"]
    assert json.loads((fitted / "config.json").read_text())["planner_score"] == "critic"
    # Only the critic changed: the policy and its world model are the source's.
    with safe_open(str(ckpt / "model.safetensors"), "pt") as a, safe_open(str(fitted / "model.safetensors"), "pt") as b:
        assert set(a.keys()) == set(b.keys())
        changed = {k for k in a.keys() if not torch.equal(a.get_tensor(k), b.get_tensor(k))}
    assert changed and all(k.startswith("world.critic.") for k in changed)
    # The fitted checkpoint plans with its critic under stock lerobot-eval, and the check pairs its episodes
    # with the source checkpoint's proposals.
    res = run([*capped_eval_cmd(fitted, tmp_path / "eval_fit", episode_length=4), "--policy.planner=rerank"])
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-5000:]
    res = plan_check("model", tmp_path / "pc" / "fitted", path=fitted, score="critic")
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    rec = json.loads((tmp_path / "pc" / "fitted" / "episodes" / "button-press-v3__1000.json").read_text())
    assert rec["planner_score"] == "critic" and rec["policy_key"] == str(ckpt)
    res = run([BIN / "lerobot-wm-plan-check", f"--report={tmp_path / 'pc'}"])
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    rep = json.loads((tmp_path / "pc" / "report.json").read_text())
    assert ("model_fit:r2", "all", 1) in {(c["x"], c["task"], c["pairs"]) for c in rep["comparisons"]}
    # The critic that reads the imagined frames and the actions, each projected on its own, exported
    # instead: its other layers are saved, and stock lerobot-eval rebuilds it from the config and plans with it.
    res = run([BIN / "lerobot-wm-fit-plan-score", f"--policy.path={ckpt}", "--candidates", tmp_path / "collect",
               "--output_dir", tmp_path / "fit_both", "--steps=30", "--holdout=0.4", "--critic_input=both_projected"])  # fmt: skip
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    both = tmp_path / "fit_both" / "pretrained_model"
    assert json.loads((both / "config.json").read_text())["critic_input"] == "both_projected"
    with safe_open(str(ckpt / "model.safetensors"), "pt") as a, safe_open(str(both / "model.safetensors"), "pt") as b:
        added, removed = set(b.keys()) - set(a.keys()), set(a.keys()) - set(b.keys())
    wb = ("weight", "bias")
    assert added == {f"world.critic.actions.{p}" for p in wb} | {
        f"world.critic.project.{i}.{j}.{p}" for i in ("current", "imagined", "actions") for j in (0, 1) for p in wb
    } | {f"world.critic.net.{j}.{p}" for j in (1, 3) for p in wb}, sorted(added)
    assert removed == {f"world.critic.net.{j}.{p}" for j in (0, 2) for p in wb}, sorted(removed)
    res = run([*capped_eval_cmd(both, tmp_path / "eval_both", episode_length=4), "--policy.planner=rerank"])
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-5000:]
    # The two fits' paired comparisons pooled over both fits' held-out episodes.
    res = run([BIN / "lerobot-wm-fit-plan-score", "--pool", tmp_path / "fit", tmp_path / "fit_both",
               "--output_dir", tmp_path / "pooled"])  # fmt: skip
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    pooled = json.loads((tmp_path / "pooled" / "pooled.json").read_text())["paired"]
    fits = [json.loads((tmp_path / d / "fit.json").read_text())["paired"] for d in ("fit", "fit_both")]
    assert set(pooled) == set(fit["paired"]) and all(
        c["spearman"]["items"] == sum(f[k]["spearman"]["items"] for f in fits) for k, c in pooled.items())
