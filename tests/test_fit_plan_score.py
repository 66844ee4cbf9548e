"""`lerobot-wm-fit-plan-score`: a planner score fitted to counterfactual candidate outcomes (issue 16).

The run on a trained checkpoint and real simulator candidates is in tests/test_planning.py's stock-CLI
test (step 6); here the pieces it rests on."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch

from lerobot_policy_world_modality.tools.fit_plan_score import (
    CRITIC_NAMES,
    PAIRED,
    SHUFFLED,
    critic_scores,
    fit_figure,
    is_holdout,
    main,
    paired_figures,
    pool_paired,
    pooled_plot,
    ranking_figures,
    shuffle_candidates,
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


def _two_inputs(m: int, driver: str, seed: int):
    """Candidates whose imagined frames and actions are independent, and a truth (differences of 1e-3)
    driven by one of them."""
    g = torch.Generator().manual_seed(seed)
    current = torch.randn(m, 8, generator=g)
    imagined = torch.randn(m, 6, 2, 8, generator=g)
    chunks = torch.randn(m, 6, 5, 3, generator=g)
    by_world = imagined[:, :, 1, :3].sum(-1) - imagined[:, :, 0, 5]
    by_actions = chunks[:, :, 0, 0] - chunks[:, :, 3, :2].sum(-1)  # the critic reads the first 4 actions
    return current, imagined, chunks, (1e-3 * (by_world if driver == "imagined" else by_actions)).numpy()


@pytest.mark.parametrize("both", ["both", "both_projected"])
@pytest.mark.parametrize("driver", ["imagined", "actions"])
def test_shuffling_the_imagined_frames_shows_whether_a_critic_that_reads_both_uses_them(driver, both):
    """The intervention fit-plan-score reports for the critics that read both inputs: each decision's
    imagined frames permuted among its candidates, the actions kept. Its ranking must fall when the truth
    lies in the imagined frames and hold when it lies in the actions; each single-input critic of the same
    architecture (plain or projected) ranks only its own."""
    cur, img, chunks, true = _two_inputs(400, driver, seed=1)
    hcur, himg, hchunks, htrue = _two_inputs(200, driver, seed=2)
    held = {}
    suffix = both.removeprefix("both")  # the single-input critics of the same architecture
    for reads in ("imagined" + suffix, "actions" + suffix, both):
        torch.manual_seed(0)
        critic = OutcomeCritic(8, 2, 32, reads, action_dim=3, action_len=4)
        train_critic(critic, cur, img if critic.reads_imagined else None, true, steps=300, lr=3e-3, batch=32, seed=0,
                     chunks=chunks if critic.reads_actions else None)  # fmt: skip
        held[reads.removesuffix(suffix)] = ranking_figures(critic_scores(
            critic, hcur, himg if critic.reads_imagined else None, hchunks if critic.reads_actions else None), htrue)["spearman_median"]  # fmt: skip
        if reads == both:
            shuffled = critic_scores(critic, hcur, shuffle_candidates(himg, seed=0), hchunks)
            held["shuffled"] = ranking_figures(shuffled, htrue)["spearman_median"]
    other = "actions" if driver == "imagined" else "imagined"
    assert held[driver] > 0.6 and held["both"] > 0.6 and abs(held[other]) < 0.25, held
    if driver == "imagined":
        assert abs(held["shuffled"]) < 0.25, held
    else:
        assert held["shuffled"] > 0.6, held


def test_shuffle_candidates_permutes_within_each_decision_only():
    x = torch.arange(3 * 5 * 2, dtype=torch.float32).view(3, 5, 2)
    y = shuffle_candidates(x, seed=0)
    assert not torch.equal(x, y) and torch.equal(shuffle_candidates(x, seed=0), y)
    for row in range(3):  # the same candidates (as whole [2] entries), in another order
        assert sorted(map(tuple, x[row].tolist())) == sorted(map(tuple, y[row].tolist()))


def test_an_outcome_critic_names_the_input_it_lacks():
    with pytest.raises(ValueError, match="critic_input 'frames'"):
        OutcomeCritic(8, 2, reads="frames")
    with pytest.raises(ValueError, match="action_dim and action_len"):
        OutcomeCritic(8, 2, reads="both")
    critic = OutcomeCritic(8, 2, 16, "both", action_dim=3, action_len=4)
    with pytest.raises(ValueError, match="first 4 actions"):
        critic(torch.zeros(5, 8), torch.zeros(5, 2, 8), torch.zeros(5, 3, 3))
    with pytest.raises(ValueError, match="reads the imagined frames"):
        critic(torch.zeros(5, 8), None, torch.zeros(5, 4, 3))
    assert critic(torch.zeros(5, 8), torch.zeros(5, 2, 8), torch.zeros(5, 6, 3)).shape == (5,)


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
    rc = main(["--policy.path", str(tmp_path / "ckpt"), "--candidates", str(tmp_path), "--output_dir", str(tmp_path / "o"),
               "--critic_input", "both_projected", "--critics", "imagined", "actions"])  # fmt: skip
    assert rc == 2 and "--critics must include it" in capsys.readouterr().err
    # Candidates collected with different --truth measure different outcomes: refused, naming each folder's.
    from lerobot_policy_world_modality.tools.plan_check import save_candidates

    saved = {"history": [np.zeros((3, 8))], "candidates": [np.zeros((4, 4, 4))], "true": [np.arange(4.0)],
             "rewards": [np.zeros((4, 5))], "model": [np.zeros(4)]}  # fmt: skip
    for truth in ("reward", "expert"):
        (tmp_path / truth / "candidates").mkdir(parents=True)
        save_candidates(tmp_path / truth / "candidates" / "pick-place-v3__1.npz", saved, "pick-place-v3", 1, [1], truth)
    rc = main(["--policy.path", str(tmp_path / "ckpt"), "--candidates", str(tmp_path / "reward"), str(tmp_path / "expert"),
               "--output_dir", str(tmp_path / "o")])  # fmt: skip
    err = capsys.readouterr().err
    assert rc == 2 and "different --truth" in err and f"expert: {tmp_path / 'expert'}" in err and "reward: " in err
    assert not (tmp_path / "o").exists()


def test_the_fit_figure_draws_every_critic_and_shuffle_the_fit_reports():
    """Six critics, two shuffle rows and the checkpoint's score are more series than the palette has
    colours; the figure must still draw them all (a shuffle row in its critic's colour, hatched)."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.image import imread

    g = np.random.default_rng(0)
    true = g.normal(size=(40, 8))
    fig = {"all": ranking_figures(true + g.normal(size=true.shape), true), "tasks": {}}
    names = [*CRITIC_NAMES.values(), *SHUFFLED.values(), "checkpoint's score"]
    png = fit_figure({name: {**fig, "tasks": {"t": fig["all"]}} for name in names})
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and imread(io.BytesIO(png)).shape[0] > 100


def _episodes_of(m: int, per_episode: int) -> np.ndarray:
    return np.array([f"t__{1000 + i // per_episode}" for i in range(m)])


def test_paired_figures_credit_the_score_that_ranks_and_test_it_over_episodes():
    """x ranks the truth (with noise), y does not: x wins on Spearman and on its picks' true outcome,
    over the 12 episodes; x against itself differs by nothing."""
    g = np.random.default_rng(0)
    true = g.normal(size=(240, 16))
    x, y = true + g.normal(size=true.shape), g.normal(size=true.shape)
    episode = _episodes_of(240, 20)
    res = paired_figures(x, y, true, episode)
    r, o = res["spearman"], res["true_outcome"]
    assert r["clusters"] == 12 and r["items"] == 240 and r["clusters_positive"] == 12
    assert r["mean"] > 0.5 and r["bootstrap_ci"][0] > 0.4 and r["wilcoxon_p"] < 0.001
    assert o["mean"] > 0.5 and o["wilcoxon_p"] < 0.001
    assert len(res["per_decision"]["spearman"]) == 240 and res["per_decision"]["episode"][-1] == "t__1011"
    same = paired_figures(x, x, true, episode)
    assert same["spearman"]["mean"] == 0.0 and same["spearman"]["wilcoxon_p"] == 1.0
    flat = true.copy()
    flat[:20] = 1.0  # decisions whose candidates have one outcome tell nothing and are left out
    assert paired_figures(x, y, flat, episode)["spearman"]["clusters"] == 11


def test_pool_joins_the_fits_held_out_episodes_and_refuses_what_it_cannot_pool(tmp_path, capsys):
    """--pool over two fits: every fit's decisions, each episode a cluster of its own fit (the same env
    seed in two fits is two episodes), and the same test as one fit over those clusters."""
    import json

    from lerobot_policy_world_modality.tools.stats import clustered_paired_difference

    g = np.random.default_rng(1)
    key = f"{PAIRED[0][0]} vs {PAIRED[0][1]}"
    per_fit = {}
    for seed in (0, 1):
        true = g.normal(size=(60, 8))
        paired = paired_figures(true + g.normal(size=true.shape), g.normal(size=true.shape), true, _episodes_of(60, 10))
        per_fit[seed] = paired["per_decision"]
        (tmp_path / f"fit{seed}").mkdir()
        settings = {"steps": 100, "batch_size": 8, "lr": 1e-3, "loss": "ranknet", "holdout": 0.25, "seed": seed}
        fit = {"source": f"ckpt{seed}", "settings": settings, "candidates_per_decision": 8, "paired": {key: paired}}
        (tmp_path / f"fit{seed}" / "fit.json").write_text(json.dumps(fit))
    out = tmp_path / "pooled"
    assert main(["--pool", str(tmp_path / "fit0"), str(tmp_path / "fit1"), "--output_dir", str(out)]) == 0
    assert key in capsys.readouterr().out
    pooled = json.loads((out / "pooled.json").read_text())["paired"][key]
    want = clustered_paired_difference(per_fit[0]["spearman"] + per_fit[1]["spearman"],
                                       [f"{tmp_path / f'fit{s}'}/{e}" for s in (0, 1) for e in per_fit[s]["episode"]])  # fmt: skip
    assert pooled["spearman"] == want and pooled["spearman"]["clusters"] == 12 and len(pooled["fits"]) == 2
    assert (out / "pooled.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert json.loads((out / "pooled.json").read_text())["mixed_settings"] == []  # the seeds differ, as they may
    # Fits trained differently are not one sample: refused by name unless asked for.
    fit = json.loads((tmp_path / "fit1" / "fit.json").read_text())
    fit["settings"]["steps"] = 300
    (tmp_path / "fit1" / "fit.json").write_text(json.dumps(fit))
    assert main(["--pool", str(tmp_path / "fit0"), str(tmp_path / "fit1"), "--output_dir", str(tmp_path / "mixed")]) == 2
    err = capsys.readouterr().err
    assert "steps" in err and "=300" in err and "--allow_mixed_settings" in err and not (tmp_path / "mixed").exists()
    assert main(["--pool", str(tmp_path / "fit0"), str(tmp_path / "fit1"), "--output_dir", str(tmp_path / "mixed"),
                 "--allow_mixed_settings"]) == 0  # fmt: skip
    assert json.loads((tmp_path / "mixed" / "pooled.json").read_text())["mixed_settings"] == ["steps"]
    # Fits of different truths (--truth of their collections) are refused too; a fit.json without one is `reward`.
    fit["settings"]["steps"], fit["truth"] = 100, "expert"
    (tmp_path / "fit1" / "fit.json").write_text(json.dumps(fit))
    assert main(["--pool", str(tmp_path / "fit0"), str(tmp_path / "fit1"), "--output_dir", str(tmp_path / "mixed2")]) == 2
    err = capsys.readouterr().err
    assert "truth" in err and "=expert" in err and "=reward" in err and not (tmp_path / "mixed2").exists()
    # What cannot be pooled is refused by name, and nothing is written.
    assert main(["--pool", str(tmp_path / "none"), "--output_dir", str(tmp_path / "o")]) == 2
    assert "has no fit.json" in capsys.readouterr().err
    (tmp_path / "old").mkdir()
    (tmp_path / "old" / "fit.json").write_text(json.dumps({"source": "c", "figures": {}}))
    assert main(["--pool", str(tmp_path / "old"), "--output_dir", str(tmp_path / "o")]) == 2
    assert "holds no paired comparison" in capsys.readouterr().err and not (tmp_path / "o").exists()
    with pytest.raises(SystemExit):  # without --pool a fit needs its checkpoint and candidates
        main(["--output_dir", str(tmp_path / "o")])
    assert "--policy.path and --candidates are required" in capsys.readouterr().err


def test_pooled_plot_gives_every_fit_one_colour_and_one_legend_entry():
    """A fit that lacks the first comparison still appears in the legend, in the same colour in every row."""
    import matplotlib.colors as mcolors
    import matplotlib.pyplot as plt
    from matplotlib.collections import PathCollection

    g = np.random.default_rng(2)
    keys = [f"{x} vs {y}" for x, y in PAIRED[:2]]

    def paired():
        true = g.normal(size=(20, 8))
        return paired_figures(true + g.normal(size=true.shape), g.normal(size=true.shape), true, _episodes_of(20, 5))

    fits = {"fitA": {"paired": {keys[1]: paired()}}, "fitB": {"paired": {keys[0]: paired(), keys[1]: paired()}}}
    fig = pooled_plot(fits, pool_paired(fits))
    assert sorted(fig.axes[1].get_legend_handles_labels()[1]) == ["fitA", "fitB"]
    # The dots in drawing order: row 0 holds fitB alone, row 1 fitA then fitB.
    dots = [c for c in fig.axes[0].collections if isinstance(c, PathCollection)]
    b_row0, a_row1, b_row1 = (mcolors.to_hex(c.get_facecolor()[0]) for c in dots)
    assert b_row0 == b_row1 != a_row1
    plt.close(fig)
