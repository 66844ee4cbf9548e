"""Linear probes: how much of a known signal (gripper state, object position) a set of latents carries.

A ridge regression is fitted on the latents of some episodes and scored on held-out episodes, so a
probe cannot succeed by memorising frames of an episode it was trained on. The ridge strength is
picked by cross-validation over folds of the training episodes, never on the test episodes.
`motion_probe` asks the same of the latents' motion: how much of it the actions taken explain.
"""

from __future__ import annotations

import math

import numpy as np
import scipy.linalg

# Ridge strengths tried (on standardised latents); wide because latent scales differ per encoder.
DEFAULT_ALPHAS = (1e-2, 1e-1, 1.0, 10.0, 100.0, 1e3, 1e4, 1e5)
# Floor of a latent dimension's scale when standardising, relative to the median dimension's scale.
SD_FLOOR = 1.0
# Folds of the training episodes over which the ridge strength is cross-validated.
VALIDATION_FOLDS = 4


def split_by_episode(
    episode_ids: np.ndarray, test_fraction: float, groups: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Boolean (train, test) masks: the last `test_fraction` of the episodes (at least one) are held out.

    With `groups` (one label per frame, e.g. the task), the last fraction of each group's episodes is
    held out, so a multi-task dataset recorded task after task is tested on every task, not only the last.
    """
    if groups is None:
        groups = np.zeros(len(episode_ids), dtype=np.int64)
    groups = np.asarray(groups)
    if len(groups) != len(episode_ids):
        raise ValueError(f"groups ({len(groups)}) and episode_ids ({len(episode_ids)}) differ in length.")
    held_out = []
    for group in np.unique(groups):
        episodes = np.unique(episode_ids[groups == group])
        if len(episodes) < 2:
            raise ValueError(
                f"A probe needs at least 2 episodes per group: one to fit on and one held out (group {group} "
                f"has {len(episodes)})."
            )
        n_test = min(len(episodes) - 1, max(1, math.ceil(test_fraction * len(episodes))))
        held_out.extend(episodes[-n_test:].tolist())
    test = np.isin(episode_ids, held_out)
    return ~test, test


def episode_folds(episode_ids: np.ndarray, groups: np.ndarray | None, n_folds: int) -> np.ndarray | None:
    """Fold index per frame: each group's episodes dealt round-robin into up to `n_folds` folds.

    None when some group has fewer than 2 episodes (nothing to validate on).
    """
    if groups is None:
        groups = np.zeros(len(episode_ids), dtype=np.int64)
    per_group = [np.unique(episode_ids[groups == g]) for g in np.unique(groups)]
    k = min([n_folds] + [len(e) for e in per_group])
    if k < 2:
        return None
    fold_of = {int(e): i % k for episodes in per_group for i, e in enumerate(episodes)}
    return np.array([fold_of[int(e)] for e in episode_ids])


def _fit_ridge(x: np.ndarray, y: np.ndarray, alpha: float):
    """Ridge weights on standardised x; returns a predict function."""
    mu, sd = x.mean(0), x.std(0)
    # No dimension is scaled up beyond the median dimension: near-constant ones (a thumbnail's background
    # pixels) would otherwise be blown up by standardising and dominate on held-out frames where they vary
    # (on MetaWorld `pixels` latents a 1e-8 floor gave a held-out gripper R^2 of -13 at 98% accuracy).
    sd = np.maximum(sd, max(SD_FLOOR * float(np.median(sd)), 1e-8))
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
    groups: np.ndarray | None = None,
) -> dict:
    """Fit a ridge probe latents -> targets on some episodes, report held-out R^2 (and accuracy if `binary`).

    `latents` is [N, D], `targets` [N] or [N, K], `episode_ids` [N]. With `binary`, targets are
    thresholded halfway between their training minimum and maximum (e.g. gripper
    closed vs open) and the held-out accuracy of the
    thresholded prediction is reported next to the majority-class rate a constant guess would get.
    `groups` [N] (e.g. the task of each frame) holds out episodes of every group (`split_by_episode`).
    """
    x = np.asarray(latents, dtype=np.float64)
    y = np.asarray(targets, dtype=np.float64)
    y = y[:, None] if y.ndim == 1 else y
    episode_ids = np.asarray(episode_ids)
    if not (len(x) == len(y) == len(episode_ids)):
        raise ValueError(f"latents ({len(x)}), targets ({len(y)}) and episode_ids ({len(episode_ids)}) differ in length.")
    groups = None if groups is None else np.asarray(groups)
    train, test = split_by_episode(episode_ids, test_fraction, groups)
    # Alpha chosen by cross-validation over folds of the training episodes only (whole episodes per fold,
    # every group in every fold): one validation split let a single odd episode pick an alpha that failed.
    folds = episode_folds(episode_ids[train], None if groups is None else groups[train], VALIDATION_FOLDS)
    best_alpha, best = alphas[0], -np.inf
    if folds is not None:
        xt, yt = x[train], y[train]
        for alpha in alphas:
            score = np.mean([
                r2_scores(yt[folds == f], _fit_ridge(xt[folds != f], yt[folds != f], alpha)(xt[folds == f])).mean()
                for f in np.unique(folds)
            ])  # fmt: skip
            if score > best:
                best_alpha, best = alpha, score
    predict = _fit_ridge(x[train], y[train], best_alpha)
    pred = predict(x[test])
    r2 = r2_scores(y[test], pred)
    # r2_total weighs each column by its held-out variance (1 - total SSE / total SST): for many-column targets
    # such as latent motion, where r2_mean would count a near-still pixel as much as the moving arm.
    sst = ((y[test] - y[test].mean(0)) ** 2).sum()
    r2_total = 1.0 - float(((y[test] - pred) ** 2).sum()) / max(float(sst), 1e-12)
    out = {"r2": r2.tolist(), "r2_mean": float(r2.mean()), "r2_total": r2_total, "alpha": best_alpha,
           "n_train": int(train.sum()), "n_test": int(test.sum())}  # fmt: skip
    if binary:
        threshold = 0.5 * (y[train].min(0) + y[train].max(0))
        truth, guess = y[test] > threshold, pred > threshold
        majority = np.maximum(truth.mean(0), 1 - truth.mean(0))
        out.update(accuracy=float((truth == guess).mean()), majority_rate=float(majority.mean()))
    return out


def motion_probe(
    latents: np.ndarray,
    actions: np.ndarray,
    episode_ids: np.ndarray,
    horizon: int,
    groups: np.ndarray | None = None,
    test_fraction: float = 0.25,
) -> dict:
    """How much of the latent motion z_{t+h} - z_t the next h actions explain, linearly, on held-out episodes.

    Two ridge probes of the motion (`r2_total`, variance-weighted): from z_t alone and from z_t with the
    actions a_t..a_{t+h-1}. Their difference (`action_gain`) is a linear estimate of how much an
    action-conditioned world model can learn about "what happens if I execute this chunk" in this latent
    space (a nonlinear model may find more): near 0, the latents move about the same whatever the actions,
    and a planner has little to choose between. Rows are the
    frames t with t + h in the same episode; frames are the dataset's global order (episodes contiguous).
    """
    z = np.asarray(latents, dtype=np.float64)
    a = np.asarray(actions, dtype=np.float64)
    episode_ids = np.asarray(episode_ids)
    if horizon < 1 or not (len(z) == len(a) == len(episode_ids)):
        raise ValueError(f"horizon must be >= 1 (got {horizon}) and latents ({len(z)}), actions ({len(a)}) and "
                         f"episode_ids ({len(episode_ids)}) must have one row per frame.")  # fmt: skip
    t = np.flatnonzero(episode_ids[horizon:] == episode_ids[:-horizon])
    if len(t) == 0:
        raise ValueError(f"No episode is longer than horizon {horizon}.")
    motion = z[t + horizon] - z[t]
    chunk = np.concatenate([a[t + i] for i in range(horizon)], axis=1)
    sub_groups = None if groups is None else np.asarray(groups)[t]
    state = ridge_probe(z[t], motion, episode_ids[t], test_fraction, groups=sub_groups)
    both = ridge_probe(np.concatenate([z[t], chunk], axis=1), motion, episode_ids[t], test_fraction, groups=sub_groups)
    return {"horizon": horizon, "r2_state": state["r2_total"], "r2_state_actions": both["r2_total"],
            "action_gain": both["r2_total"] - state["r2_total"], "n_test": both["n_test"]}  # fmt: skip
