"""The success-rate statistics of `lerobot-wm-compare` against values worked out by hand."""

import math

import numpy as np
import pytest
from scipy.stats import wilcoxon

from lerobot_policy_world_modality.tools import stats

Z = 1.959963984540054  # two-sided 95% normal quantile


def _wilson_by_hand(k, n, z=Z):
    p = k / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return centre - half, centre + half


@pytest.mark.parametrize("k,n", [(0, 10), (10, 10), (5, 10), (1, 2), (81, 263)])
def test_wilson_interval_matches_the_formula(k, n):
    lo, hi = stats.wilson_interval(k, n)
    assert (lo, hi) == pytest.approx(_wilson_by_hand(k, n), abs=1e-9)


def test_wilson_edge_cases_and_published_value():
    # 0/n: the interval starts at 0 and ends at z^2 / (n + z^2); n/n mirrors it.
    assert stats.wilson_interval(0, 10) == pytest.approx((0.0, Z * Z / (10 + Z * Z)), abs=1e-9)
    assert stats.wilson_interval(10, 10) == pytest.approx((10 / (10 + Z * Z), 1.0), abs=1e-9)
    assert stats.wilson_interval(0, 10)[1] == pytest.approx(0.2775, abs=1e-4)
    # Newcombe (1998), Stat. Med. 17:857, example 81/263: Wilson 0.2553 to 0.3662.
    assert stats.wilson_interval(81, 263) == pytest.approx((0.2553, 0.3662), abs=1e-4)
    assert all(math.isnan(v) for v in stats.wilson_interval(0, 0))


def test_mcnemar_exact_p_values_by_hand():
    # 1 pair for X, 9 for Y: p = 2 * (C(10,0) + C(10,1)) / 2^10 = 22 / 1024.
    x = [True] * 1 + [False] * 9 + [True] * 5
    y = [False] * 1 + [True] * 9 + [True] * 5
    r = stats.mcnemar_exact(x, y)
    assert (r["x_only"], r["y_only"]) == (1, 9)
    assert r["p_value"] == pytest.approx(22 / 1024)
    # All 5 discordant pairs one way: p = 2 / 2^5.
    assert stats.mcnemar_exact([False] * 5, [True] * 5)["p_value"] == pytest.approx(2 / 32)
    # No discordant pair (all succeed, or all fail): nothing to tell them apart.
    assert stats.mcnemar_exact([True] * 8, [True] * 8)["p_value"] == 1.0
    assert stats.mcnemar_exact([False] * 8, [False] * 8)["p_value"] == 1.0
    with pytest.raises(ValueError, match="equal lengths"):
        stats.mcnemar_exact([True], [True, False])


def test_verdicts_and_bootstrap():
    x, y = [True] * 12 + [False] * 8, [False] * 12 + [False] * 8  # X wins 12 discordant pairs
    c = stats.paired_comparison("F@pred", "A@pred", x, y)
    assert c["verdict"] == "F@pred better" and c["p_value"] == pytest.approx(2 / 2**12)
    lo, hi = c["bootstrap_ci"]
    assert c["difference"] == pytest.approx(0.6) and 0 < lo <= 0.6 <= hi <= 1
    assert stats.paired_comparison("F", "A", y, x)["verdict"] == "A better"
    same = stats.paired_comparison("F", "A", [True, False] * 5, [False, True] * 5)
    assert same["verdict"] == stats.NO_DIFFERENCE and same["p_value"] == 1.0
    # 3 vs 1 discordant pairs: X looks better but p = 0.625; that is no evidence at this sample size.
    weak = stats.paired_comparison("F", "A", [True, True, True, False], [False, False, False, True])
    assert weak["p_value"] == pytest.approx(0.625) and weak["verdict"] == stats.NO_DIFFERENCE
    assert stats.bootstrap_difference([True] * 4, [True] * 4) == (0.0, 0.0)


def test_episodes_to_detect_ten_points():
    # 50% vs 60%, alpha 0.05 two-sided, power 0.8 (Fleiss, no continuity correction): 387.3 -> 388.
    assert stats.episodes_to_detect(0.5) == 388
    # Near the edges fewer episodes suffice; 0% is shifted to 0% vs 10%.
    assert stats.episodes_to_detect(0.0) < stats.episodes_to_detect(0.5)
    assert stats.episodes_to_detect(1.0) == stats.episodes_to_detect(0.9)


def test_seed_spread():
    assert stats.seed_spread([0.2, 0.4, 0.6]) == pytest.approx((0.4, 0.2))
    assert stats.seed_spread([0.3]) == (0.3, 0.0)


def test_a_clustered_difference_is_tested_over_clusters_not_items():
    """Items of one cluster share an offset: 7 of 10 clusters of 40 items lean one way, 3 the other. As
    400 independent items that looks like a clear effect; over the 10 cluster means it is not one."""
    g = np.random.default_rng(0)
    offsets = np.repeat([0.3] * 7 + [-0.3] * 3, 40)
    clusters = np.repeat([f"ep{i}" for i in range(10)], 40)
    d = offsets + g.normal(scale=0.1, size=400)
    res = stats.clustered_paired_difference(d, clusters)
    assert res["items"] == 400 and res["clusters"] == 10 and (res["clusters_positive"], res["clusters_negative"]) == (7, 3)
    assert wilcoxon(d).pvalue < 1e-6  # the item-level test is fooled
    assert res["wilcoxon_p"] > 0.2 and res["bootstrap_ci"][0] < 0 < res["bootstrap_ci"][1]
    # A shift every cluster shares is found.
    shifted = stats.clustered_paired_difference(g.normal(scale=0.1, size=400) + 0.2, clusters)
    assert shifted["wilcoxon_p"] < 0.01 and shifted["clusters_positive"] == 10 and shifted["bootstrap_ci"][0] > 0.15
    # The mean is over items (a big cluster weighs more), not over cluster means (-0.82 here).
    uneven = stats.clustered_paired_difference([1.0] * 90 + [-1.0] * 10, ["a"] * 90 + [f"b{i}" for i in range(10)])
    assert uneven["mean"] == pytest.approx(0.8) and uneven["bootstrap_ci"][0] <= 0.8 <= uneven["bootstrap_ci"][1]
    none = stats.clustered_paired_difference([0.0, 0.0], ["a", "b"])
    assert none["wilcoxon_p"] == 1.0 and none["mean"] == 0.0
    with pytest.raises(ValueError, match="equal lengths"):
        stats.clustered_paired_difference([1.0, 2.0], ["a"])
