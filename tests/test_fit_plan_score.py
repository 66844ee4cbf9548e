"""`lerobot-wm-fit-plan-score`: a planner score fitted to counterfactual candidate outcomes (issue 16).

The run on a trained checkpoint and real simulator candidates is in tests/test_planning.py's stock-CLI
test (step 6); here the pieces it rests on."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from lerobot_policy_world_modality.tools.fit_plan_score import (
    critic_scores,
    is_holdout,
    main,
    ranking_figures,
    train_critic,
)
from lerobot_policy_world_modality.world.dynamics import OutcomeCritic, listwise_loss, ranking_loss


def test_ranking_loss_rewards_the_true_order_and_ignores_flat_rows():
    truth = torch.tensor([[3.0, 2.0, 1.0], [1e-4, 2e-4, 3e-4]])
    good = torch.tensor([[1.0, 0.0, -1.0], [-1.0, 0.0, 1.0]])
    assert ranking_loss(good, truth) < ranking_loss(-good, truth)
    # Only the order counts: a truth 1e4 times smaller (second row) teaches the same as a large one.
    assert ranking_loss(good[1:], truth[1:]) == pytest.approx(float(ranking_loss(good[:1], truth[:1])))
    flat = torch.tensor([[5.0, 5.0, 5.0]])
    both = ranking_loss(torch.cat([good[:1], torch.randn(1, 3)]), torch.cat([truth[:1], flat]))
    assert both == pytest.approx(float(ranking_loss(good[:1], truth[:1])))  # the flat row adds no pair


def test_listwise_loss_follows_the_true_order_weights_the_top_and_ignores_flat_rows():
    truth = torch.tensor([[3.0, 2.0, 1.0, 0.0], [4e-4, 3e-4, 2e-4, 1e-4]])
    good = torch.tensor([[1.0, 0.0, -1.0, -2.0]] * 2)
    assert listwise_loss(good, truth) < listwise_loss(-good, truth)
    # Only the order counts, as in the pairwise loss.
    assert listwise_loss(good[1:], truth[1:]) == pytest.approx(float(listwise_loss(good[:1], truth[:1])))
    # Top-weighted: swapping the two best candidates costs more than swapping the two worst.
    top_swapped = torch.tensor([[0.0, 1.0, -1.0, -2.0]])
    bottom_swapped = torch.tensor([[1.0, 0.0, -2.0, -1.0]])
    assert listwise_loss(top_swapped, truth[:1]) > listwise_loss(bottom_swapped, truth[:1])
    # Tied candidates weigh alike: with the two best tied, their scores' order costs nothing.
    tied = torch.tensor([[3.0, 3.0, 1.0, 0.0]])
    assert listwise_loss(good[:1], tied) == pytest.approx(float(listwise_loss(top_swapped, tied)))
    flat = torch.tensor([[5.0, 5.0, 5.0, 5.0]])
    both = listwise_loss(torch.cat([good[:1], torch.randn(1, 4)]), torch.cat([truth[:1], flat]))
    assert both == pytest.approx(float(listwise_loss(good[:1], truth[:1])))


def test_ranking_figures_tell_how_much_of_the_gain_few_decisions_hold():
    # 20 decisions: two with a large gain to be had (the top decile), 18 with a small one.
    true = np.zeros((20, 3))
    true[:2, 2] = 1.0
    true[2:, 1] = 0.01
    picks_small = np.zeros((20, 3))
    picks_small[2:, 1] = 1.0  # gets every small gain, misses both large ones
    f = ranking_figures(picks_small, true)
    assert f["oracle_gain_in_top_decile"] == pytest.approx(2.0 / 2.18)
    assert f["share_of_oracle_gain_top_decile"] == 0.0 and f["share_of_oracle_gain"] == pytest.approx(0.18 / 2.18)
    picks_large = np.zeros((20, 3))
    picks_large[:2, 2] = 1.0
    assert ranking_figures(picks_large, true)["share_of_oracle_gain_top_decile"] == pytest.approx(1.0)


def test_ranking_figures_place_a_score_between_chance_and_the_oracle():
    true = np.array([[0.0, 1.0, 2.0, 3.0], [1.0, 0.0, 0.5, 2.0], [1.0, 1.0, 1.0, 1.0]])
    oracle = ranking_figures(true, true)
    assert oracle["decisions"] == 2  # the flat decision is left out
    assert oracle["spearman_median"] == pytest.approx(1.0) and oracle["pick_is_true_best"] == 1.0
    assert oracle["share_of_oracle_gain"] == pytest.approx(1.0) and oracle["pick_beats_proposal"] == 1.0
    worst = ranking_figures(-true, true)
    assert worst["spearman_median"] == pytest.approx(-1.0) and worst["share_of_oracle_gain"] < 0
    keep = ranking_figures(np.eye(4)[[0, 0, 0]], true)  # always the proposal: planning off
    assert keep["share_of_oracle_gain"] == 0.0 and keep["pick_worse_than_proposal"] == 0.0


def _synthetic(m: int, informative: bool, seed: int):
    g = torch.Generator().manual_seed(seed)
    current = torch.randn(m, 8, generator=g)
    outcome = torch.randn(m, 6, 2, 8, generator=g)
    # The true outcome is a small function of the imagined frames (differences of 1e-3, as between
    # candidates from one state), or unrelated to them.
    true = 1e-3 * (outcome[:, :, 1, :3].sum(-1) - outcome[:, :, 0, 5]) if informative else torch.randn(m, 6, generator=g)
    return current, outcome, true.numpy()


@pytest.mark.parametrize("informative", [True, False])
def test_the_critic_learns_a_ranking_the_outcomes_carry_and_none_they_do_not(informative):
    torch.manual_seed(0)
    critic = OutcomeCritic(8, 2, width=32)
    cur, out, true = _synthetic(400, informative, seed=1)
    losses = train_critic(critic, cur, out, true, steps=300, lr=3e-3, batch=32, seed=0)
    hcur, hout, htrue = _synthetic(200, informative, seed=2)
    held = ranking_figures(critic_scores(critic, hcur, hout), htrue)
    if informative:
        assert held["spearman_median"] > 0.7 and held["share_of_oracle_gain"] > 0.5 and losses[-1] < losses[0]
    else:
        assert abs(held["spearman_median"]) < 0.25 and held["pick_is_true_best"] < 0.35


@pytest.mark.parametrize("loss", ["ranknet", "listwise"])
def test_a_fit_repeats_with_its_seed(loss):
    cur, out, true = _synthetic(50, True, seed=3)
    runs = []
    for _ in range(2):
        torch.manual_seed(0)
        critic = OutcomeCritic(8, 2, width=16)
        runs.append(train_critic(critic, cur, out, true, steps=20, lr=1e-3, batch=8, seed=5, loss=loss))
    assert runs[0] == runs[1]


def test_the_listwise_critic_learns_a_ranking_the_outcomes_carry():
    torch.manual_seed(0)
    critic = OutcomeCritic(8, 2, width=32)
    cur, out, true = _synthetic(400, True, seed=1)
    train_critic(critic, cur, out, true, steps=300, lr=3e-3, batch=32, seed=0, loss="listwise")
    hcur, hout, htrue = _synthetic(200, True, seed=2)
    assert ranking_figures(critic_scores(critic, hcur, hout), htrue)["spearman_median"] > 0.6


def test_the_holdout_split_depends_on_the_episode_alone():
    names = [f"pick-place-v3__{2000 + i}" for i in range(200)]
    held = [n for n in names if is_holdout(n, 0.25)]
    assert 30 < len(held) < 70 and held == [n for n in reversed(names) if is_holdout(n, 0.25)][::-1]


def test_missing_candidates_and_checkpoints_are_refused_by_name(tmp_path, capsys):
    (tmp_path / "ckpt").mkdir()
    (tmp_path / "ckpt" / "config.json").write_text("{}")
    rc = main(["--policy.path", str(tmp_path / "ckpt"), "--candidates", str(tmp_path / "none"), "--output_dir", str(tmp_path / "o")])
    assert rc == 2 and "--save_candidates" in capsys.readouterr().err
    rc = main(["--policy.path", str(tmp_path), "--candidates", str(tmp_path), "--output_dir", str(tmp_path / "o")])
    assert rc == 2 and "has no config.json" in capsys.readouterr().err
    rc = main(["--policy.path", str(tmp_path / "ckpt"), "--candidates", str(tmp_path), "--output_dir", str(tmp_path / "o"),
               "--label", "round 2"])  # fmt: skip
    assert rc == 2 and "--label 'round 2'" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()
