"""Linear probes: how much of a known signal (gripper state, object position) a set of latents carries.

A ridge regression is fitted on the latents of some episodes and scored on held-out episodes, so a
probe cannot succeed by memorising frames of an episode it was trained on. The ridge strength is
picked on a validation split of the training episodes, never on the test episodes.
"""

from __future__ import annotations

import math

import numpy as np
import scipy.linalg

# Ridge strengths tried (on standardised latents); wide because latent scales differ per encoder.
DEFAULT_ALPHAS = (1e-2, 1e-1, 1.0, 10.0, 100.0, 1e3, 1e4)


def split_by_episode(episode_ids: np.ndarray, test_fraction: float) -> tuple[np.ndarray, np.ndarray]:
    """Boolean (train, test) masks: the last `test_fraction` of the episodes (at least one) are held out."""
    episodes = np.unique(episode_ids)
    if len(episodes) < 2:
        raise ValueError("A probe needs at least 2 episodes: one to fit on and one held out.")
    n_test = min(len(episodes) - 1, max(1, math.ceil(test_fraction * len(episodes))))
    test = np.isin(episode_ids, episodes[-n_test:])
    return ~test, test


def _fit_ridge(x: np.ndarray, y: np.ndarray, alpha: float):
    """Ridge weights on standardised x; returns a predict function."""
    mu, sd = x.mean(0), x.std(0)
    sd = np.where(sd > 1e-8, sd, 1.0)
    xs = (x - mu) / sd
    y_mu = y.mean(0)
    n, d = xs.shape
    if d <= n:
        w = scipy.linalg.solve(xs.T @ xs + alpha * np.eye(d), xs.T @ (y - y_mu), assume_a="pos")
    else:  # dual form: the same solution through an n x n system when latents are wider than the data
        w = xs.T @ scipy.linalg.solve(xs @ xs.T + alpha * np.eye(n), y - y_mu, assume_a="pos")
    return lambda q: ((q - mu) / sd) @ w + y_mu


def r2_scores(y: np.ndarray, pred: np.ndarray) -> np.ndarray:
    """Coefficient of determination per target column (1 = perfect, 0 = predicting the mean, < 0 worse)."""
    sse = ((y - pred) ** 2).sum(0)
    sst = ((y - y.mean(0)) ** 2).sum(0)
    return 1.0 - sse / np.maximum(sst, 1e-12)


def ridge_probe(
    latents: np.ndarray,
    targets: np.ndarray,
    episode_ids: np.ndarray,
    test_fraction: float = 0.25,
    alphas: tuple[float, ...] = DEFAULT_ALPHAS,
    binary: bool = False,
) -> dict:
    """Fit a ridge probe latents -> targets on some episodes, report held-out R^2 (and accuracy if `binary`).

    `latents` is [N, D], `targets` [N] or [N, K], `episode_ids` [N]. With `binary`, targets are
    thresholded halfway between their training minimum and maximum (e.g. gripper
    closed vs open) and the held-out accuracy of the
    thresholded prediction is reported next to the majority-class rate a constant guess would get.
    """
    x = np.asarray(latents, dtype=np.float64)
    y = np.asarray(targets, dtype=np.float64)
    y = y[:, None] if y.ndim == 1 else y
    episode_ids = np.asarray(episode_ids)
    if not (len(x) == len(y) == len(episode_ids)):
        raise ValueError(f"latents ({len(x)}), targets ({len(y)}) and episode_ids ({len(episode_ids)}) differ in length.")
    train, test = split_by_episode(episode_ids, test_fraction)
    # Alpha chosen on a validation split of the training episodes only.
    fit_part, val_part = split_by_episode(episode_ids[train], 0.25) if len(np.unique(episode_ids[train])) > 1 else (None, None)
    best_alpha, best = alphas[0], -np.inf
    if fit_part is not None:
        xt, yt = x[train], y[train]
        for alpha in alphas:
            score = r2_scores(yt[val_part], _fit_ridge(xt[fit_part], yt[fit_part], alpha)(xt[val_part])).mean()
            if score > best:
                best_alpha, best = alpha, score
    predict = _fit_ridge(x[train], y[train], best_alpha)
    pred = predict(x[test])
    r2 = r2_scores(y[test], pred)
    out = {"r2": r2.tolist(), "r2_mean": float(r2.mean()), "alpha": best_alpha,
           "n_train": int(train.sum()), "n_test": int(test.sum())}  # fmt: skip
    if binary:
        threshold = 0.5 * (y[train].min(0) + y[train].max(0))
        truth, guess = y[test] > threshold, pred > threshold
        majority = np.maximum(truth.mean(0), 1 - truth.mean(0))
        out.update(accuracy=float((truth == guess).mean()), majority_rate=float(majority.mean()))
    return out
