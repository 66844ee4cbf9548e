"""Statistics of success rates for `lerobot-wm-compare` (and anything else that reports them).

All tests come from scipy.stats: the Wilson score interval of a binomial proportion, the exact McNemar
test (an exact binomial test on the discordant pairs of two paired samples), a bootstrap interval of a
paired difference, the normal-approximation sample size of a two-proportion test, and a paired
difference tested over clusters (Wilcoxon signed-rank on cluster means, cluster bootstrap).
Episodes are paired when two policies were evaluated with the same env seeds: episode i of X and
episode i of Y then start from the same reset, so only the pairs where they disagree carry evidence.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
from scipy import stats

# Verdict strings (report readers grep for them).
NO_DIFFERENCE = "no detectable difference at this sample size"


def wilson_interval(successes: int, n: int, confidence: float = 0.95) -> tuple[float, float]:
    """Wilson score interval of the success rate `successes / n`; (nan, nan) when n == 0."""
    if n == 0:
        return math.nan, math.nan
    ci = stats.binomtest(int(successes), int(n)).proportion_ci(confidence_level=confidence, method="wilson")
    return float(ci.low), float(ci.high)


def mcnemar_exact(x: Sequence[bool], y: Sequence[bool]) -> dict:
    """Exact McNemar test of paired outcomes: {"x_only", "y_only", "p_value"}.

    `x_only` counts pairs where only X succeeded, `y_only` where only Y did. Under "no difference"
    each discordant pair is a fair coin, so the p-value is the two-sided exact binomial test of
    x_only out of x_only + y_only at 1/2 (1.0 when there is no discordant pair).
    """
    if len(x) != len(y):
        raise ValueError(f"Paired outcomes need equal lengths, got {len(x)} and {len(y)}.")
    x_only = sum(bool(a) and not bool(b) for a, b in zip(x, y, strict=True))
    y_only = sum(bool(b) and not bool(a) for a, b in zip(x, y, strict=True))
    n = x_only + y_only
    p = 1.0 if n == 0 else float(stats.binomtest(x_only, n, 0.5).pvalue)
    return {"x_only": x_only, "y_only": y_only, "p_value": p}


def bootstrap_difference(
    x: Sequence[bool], y: Sequence[bool], confidence: float = 0.95, n_resamples: int = 2000, seed: int = 0
) -> tuple[float, float]:
    """Percentile bootstrap interval of mean(x) - mean(y) over paired episodes (pairs are resampled)."""
    d = np.asarray(x, dtype=float) - np.asarray(y, dtype=float)
    if d.size == 0:
        return math.nan, math.nan
    if np.all(d == d[0]):  # every resample gives the same mean; scipy would warn about a degenerate sample
        return float(d[0]), float(d[0])
    res = stats.bootstrap((d,), np.mean, confidence_level=confidence, n_resamples=n_resamples,
                          method="percentile", random_state=np.random.default_rng(seed))  # fmt: skip
    return float(res.confidence_interval.low), float(res.confidence_interval.high)


def verdict(x_name: str, y_name: str, p_value: float, x_only: int, y_only: int, alpha: float = 0.05) -> str:
    """"X better", "Y better" or NO_DIFFERENCE from the McNemar p-value at level `alpha`."""
    if p_value < alpha and x_only != y_only:
        return f"{x_name if x_only > y_only else y_name} better"
    return NO_DIFFERENCE


def episodes_to_detect(
    base_rate: float, difference: float = 0.10, alpha: float = 0.05, power: float = 0.8
) -> int:
    """Episodes per arm for a two-sided two-proportion z-test to detect `difference` at `base_rate`.

    Normal approximation, rates base_rate and base_rate + difference, shifted to stay in [0, 1]
    (Fleiss' formula without continuity correction). It treats the arms as independent: pairing by
    env seed can only lower the number when the arms' outcomes are positively correlated, so this is
    the conservative figure.
    """
    p1 = min(max(base_rate, 0.0), 1.0 - difference)
    p2 = p1 + difference
    pbar = (p1 + p2) / 2
    za, zb = stats.norm.ppf(1 - alpha / 2), stats.norm.ppf(power)
    n = (za * math.sqrt(2 * pbar * (1 - pbar)) + zb * math.sqrt(p1 * (1 - p1) + p2 * (1 - p2))) ** 2 / difference**2
    return int(math.ceil(n))


def rate_summary(successes: int, n: int, confidence: float = 0.95) -> dict:
    """{"successes", "episodes", "rate", "ci_low", "ci_high"} with the Wilson interval."""
    lo, hi = wilson_interval(successes, n, confidence)
    return {"successes": int(successes), "episodes": int(n), "rate": successes / n if n else math.nan,
            "ci_low": lo, "ci_high": hi}  # fmt: skip


def seed_spread(rates: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (ddof 1; 0 for a single seed) of per-seed success rates."""
    arr = np.asarray(rates, dtype=float)
    if arr.size == 0:
        return math.nan, math.nan
    return float(arr.mean()), float(arr.std(ddof=1)) if arr.size > 1 else 0.0


def paired_comparison(
    x_name: str, y_name: str, x: Sequence[bool], y: Sequence[bool], alpha: float = 0.05, difference: float = 0.10
) -> dict:
    """Everything the report says about one paired comparison of X and Y."""
    test = mcnemar_exact(x, y)
    lo, hi = bootstrap_difference(x, y, confidence=1 - alpha)
    rx, ry = float(np.mean(x)) if len(x) else math.nan, float(np.mean(y)) if len(y) else math.nan
    base = (rx + ry) / 2 if len(x) else 0.5
    return {
        "x": x_name, "y": y_name, "pairs": len(x), "x_rate": rx, "y_rate": ry, "difference": rx - ry,
        "bootstrap_ci": [lo, hi], **test, "alpha": alpha,
        "verdict": verdict(x_name, y_name, test["p_value"], test["x_only"], test["y_only"], alpha),
        "episodes_for_10pt": episodes_to_detect(base, difference, alpha),
        "power_assumption": (
            f"two-sided alpha {alpha}, power 0.8, independent two-proportion z-test at base rate "
            f"{min(max(base, 0.0), 1 - difference):.2f} vs +{difference:.2f} (pairing can only lower it)"
        ),
    }  # fmt: skip


def clustered_paired_difference(
    d: Sequence[float], clusters: Sequence, confidence: float = 0.95, n_resamples: int = 2000, seed: int = 0
) -> dict:
    """A paired difference `d` measured on items that come in clusters (e.g. the decisions of one episode),
    tested at the level of the clusters, since items of one cluster are not independent.

    Returns the mean over items, a percentile bootstrap interval of it that resamples whole clusters,
    and the two-sided Wilcoxon signed-rank test of the cluster means (p = 1.0 when every cluster mean is
    0; `clusters_positive` / `clusters_negative` count the signs).
    """
    d = np.asarray(d, dtype=float)
    labels = np.asarray([str(c) for c in clusters])
    if d.shape != labels.shape:
        raise ValueError(f"Differences and clusters need equal lengths, got {d.shape} and {labels.shape}.")
    if d.size == 0:
        return {"items": 0, "clusters": 0, "mean": math.nan, "bootstrap_ci": [math.nan, math.nan],
                "wilcoxon_p": math.nan, "clusters_positive": 0, "clusters_negative": 0}  # fmt: skip
    names, idx = np.unique(labels, return_inverse=True)
    sums, counts = np.bincount(idx, weights=d), np.bincount(idx).astype(float)
    means = sums / counts
    # The bootstrap draws clusters with replacement and weighs each by its size, as the item mean does.
    rng = np.random.default_rng(seed)
    draws = rng.integers(0, len(names), size=(n_resamples, len(names)))
    boot = sums[draws].sum(axis=1) / counts[draws].sum(axis=1)
    alpha = (1 - confidence) / 2
    nonzero = means[means != 0]
    p = float(stats.wilcoxon(nonzero).pvalue) if nonzero.size else 1.0
    return {
        "items": int(d.size), "clusters": int(len(names)), "mean": float(d.mean()),
        "bootstrap_ci": [float(np.quantile(boot, alpha)), float(np.quantile(boot, 1 - alpha))],
        "wilcoxon_p": p, "clusters_positive": int((means > 0).sum()), "clusters_negative": int((means < 0).sum()),
    }  # fmt: skip
