"""`lerobot-wm-fit-plan-score`: fit the planner's score to counterfactual outcomes from the simulator.

    lerobot-wm-plan-check --policy.path=<ckpt> --tasks=pick-place-v3,assembly-v3 --seed=2000 \
        --pick=proposal --save_candidates --out_dir=outputs/plan_score/collect/seed0
    lerobot-wm-fit-plan-score --policy.path=<ckpt> --candidates=outputs/plan_score/collect/seed0 \
        --output_dir=outputs/plan_score/fit/seed0

A reward or progress head learns from the frames of recorded episodes, which differ from each other
far more than the candidates a rerank planner compares from one state do; such a head can order frames
well and candidates at chance. This tool trains the score on the comparison the planner makes: the
candidates `lerobot-wm-plan-check --save_candidates` drew at each decision, with the true outcome of
each, executed in the simulator from the same state: its mean reward at the steps the world model
imagines, or with `--truth=expert` minus the scripted expert's steps to success after it. The fit
learns whichever truth its candidates were collected with (`fit.json` `truth`) and refuses folders
collected with different ones.

The score is an outcome critic (`world.dynamics.OutcomeCritic`) on the checkpoint's own world model.
Up to six critics are fitted side by side (`--critics`; all by default), and `--critic_input` picks the
one exported:
- `imagined` (default): the current latent and the K frames the action-conditioned dynamics imagine for a
  candidate, never the actions themselves, so it ranks candidates only as well as the world model tells
  them apart;
- `actions`: the actions the dynamics read instead of their imagined outcome, a control without the
  world model. When it ranks better than the `imagined` critic, the world model loses what the ranking
  needs;
- `both`: the imagined frames and the actions. Whether it uses the world model is measured by an
  intervention: its held-out ranking with each decision's imagined frames shuffled among its candidates
  (the actions kept). If the ranking does not fall, the world model adds nothing the actions lack;
- `both_projected`: the same two inputs, each projected and normalised on its own before they are mixed,
  so the actions' few numbers weigh as much as the thousands of imagined ones. It gets the same shuffle.
  Its architecture differs from the plain critics', so its controls are `imagined_projected` and
  `actions_projected`: whether the world model adds to the actions is `both_projected` against
  `actions_projected`, the same critic without the imagined frames.

Each is trained with a pairwise ranking loss (`world.dynamics.ranking_loss`; `--loss listwise` for
`world.dynamics.listwise_loss`, weighted toward the best candidates) while the world model stays frozen.

Held-out episodes (`--holdout`, whole episodes, chosen by a hash of their name) measure both, next to
the checkpoint's own score, by:
- the median Spearman correlation with the true outcomes over decisions;
- how often the pick is the true best (chance 1 / N);
- the share of the oracle's gain the pick captures: mean(true[pick] - true[proposal]) over
  mean(true[best] - true[proposal]) (1 for an oracle, about 0 at chance, negative when worse than
  planning off).

Critics are also compared paired, on the same held-out decisions (`fit.json` `paired`): each critic against
its control of the same architecture, and each critic that reads both inputs against its shuffle. The
difference of their Spearman correlations and of their picks' true outcomes is tested over episodes
(Wilcoxon signed-rank on episode means, episode bootstrap interval), since the decisions of one episode
are not independent. `--pool FIT_DIR ...` pools these comparisons over several fits, e.g. one per
training seed, without fitting anything; fits whose settings differ (steps, batch, learning rate, loss,
hold-out fraction, candidates per decision, truth) are refused unless `--allow_mixed_settings` is given.

`<output_dir>/pretrained_model` is the checkpoint with the fitted critic and `planner_score="critic"`
(its policy is unchanged; `--policy.planner=rerank` uses the fitted score). `<output_dir>/fit.json`
(also `pretrained_model/plan_score_fit.json`, which makes `lerobot-wm-plan-check --report` pair its
episodes with the source checkpoint's) holds the figures; `fit.png` plots them.
"""

from __future__ import annotations

import argparse
import hashlib
import math
import shutil
import sys
from pathlib import Path

import numpy as np

from ..fileio import atomic_write_bytes, atomic_write_json
from .plan_check import DEFAULT_FIT_LABEL, FIT_RECORD

# Training losses: pairwise (RankNet, `world.dynamics.ranking_loss`) or listwise with a top-weighted
# target (`world.dynamics.listwise_loss`).
LOSSES = ("ranknet", "listwise")
# The critics fitted side by side, by `--critic_input` (`world.dynamics.CRITIC_INPUTS`), as the figures name them.
# New critics go last: each is built from the seeded generator in this order, so the earlier ones keep
# their initial weights (a refit reproduces an earlier fit's critic).
CRITIC_NAMES = {"imagined": "world model", "both": "world model + actions", "actions": "control: actions",
                "both_projected": "world model + actions, projected", "imagined_projected": "world model, projected",
                "actions_projected": "control: actions, projected"}  # fmt: skip
# The intervention on the critics that read both inputs: their imagined frames shuffled among each
# decision's candidates, the actions kept.
SHUFFLED = {"both": "world model + actions, imagined shuffled",
            "both_projected": "world model + actions, projected, imagined shuffled"}  # fmt: skip
# Paired comparisons on the same held-out decisions, x against y: each critic against its control of the
# same architecture (the world model's frames against the actions they were imagined from), and each critic
# that reads both inputs against itself with its imagined frames shuffled. A pair runs when both are fitted.
PAIRED = ((CRITIC_NAMES["imagined_projected"], CRITIC_NAMES["actions_projected"]),
          (CRITIC_NAMES["both_projected"], CRITIC_NAMES["actions_projected"]),
          (CRITIC_NAMES["imagined"], CRITIC_NAMES["actions"]), (CRITIC_NAMES["both"], CRITIC_NAMES["actions"]),
          *((CRITIC_NAMES[reads], shuffled) for reads, shuffled in SHUFFLED.items()))  # fmt: skip
# Files of a checkpoint the fit writes itself; every other file (processors, train_config) is copied.
WRITTEN = ("config.json", "model.safetensors", "README.md", FIT_RECORD)


class FitPlanScoreError(ValueError):
    """Candidate data or a checkpoint the fit cannot use; the message says what to do instead."""


def load_candidates(roots: list[Path]) -> list[dict]:
    """Every `candidates/*.npz` under `roots` (any depth), one dict of arrays per episode, with `name`
    (task and env seed, which decides the holdout split) and `source` (the root it came from)."""
    episodes = []
    for root in roots:
        paths = sorted(root.rglob("candidates/*.npz")) if root.is_dir() else []
        if not paths:
            raise FitPlanScoreError(f"No candidates/*.npz under {root}: run lerobot-wm-plan-check with "
                                    f"--save_candidates --out_dir inside it first.")  # fmt: skip
        for path in paths:
            with np.load(path) as data:
                ep = {k: data[k] for k in data.files}
            ep["name"] = f"{ep['task']}__{int(ep['seed'])}"
            ep["source"] = str(root)
            ep["truth"] = str(ep.get("truth", "reward"))  # collections from before --truth are rewards
            episodes.append(ep)
    return episodes


def is_holdout(name: str, fraction: float) -> bool:
    """Whether an episode is held out: a hash of its name, so the split never depends on file order."""
    h = int(hashlib.sha256(name.encode()).hexdigest()[:8], 16) / 0xFFFFFFFF
    return h < fraction


def stack(episodes: list[dict]) -> dict[str, np.ndarray]:
    """Decisions of several episodes in one array per field, with `task`, `source` and `episode` (the
    episode's name) per decision."""
    out = {k: np.concatenate([ep[k] for ep in episodes]) for k in ("history", "candidates", "true", "model")}
    for key in ("task", "source", "name"):
        out[key] = np.concatenate([[str(ep[key])] * len(ep["true"]) for ep in episodes])
    out["episode"] = out.pop("name")
    return out


def decision_spearman(scores: np.ndarray, true: np.ndarray) -> np.ndarray:
    """Spearman correlation of each decision's scores [M, N] with its true outcomes [M, N]; 0 where the
    scores are flat (a score that cannot tell the candidates apart ranks them at chance)."""
    from scipy.stats import spearmanr

    return np.array([spearmanr(s, t).statistic if np.ptp(s) > 0 else 0.0 for s, t in zip(scores, true)])


def ranking_figures(scores: np.ndarray, true: np.ndarray) -> dict:
    """How scores [M, N] rank the candidates whose true outcomes are true [M, N] (the proposal is
    column 0): median Spearman, pick = true best, the pick's true gain over the proposal and the share of
    the oracle's gain it captures, overall and in the tenth of decisions with the most to gain (with the
    fraction of the oracle's gain that tenth holds). Decisions with a flat truth are left out."""
    keep = np.ptp(true, axis=1) > 0
    scores, true = scores[keep], true[keep]
    if not len(true):
        return {"decisions": 0}
    rho = decision_spearman(scores, true)
    rows = np.arange(len(true))
    pick = scores.argmax(axis=1)
    gain = true[rows, pick] - true[:, 0]
    best = true.max(axis=1) - true[:, 0]
    # The decile of decisions with the most to gain: when it holds most of the oracle's gain, the share
    # below measures those decisions (and their tasks) and says little about the rest.
    top = np.argsort(-best, kind="stable")[: max(1, len(best) // 10)]
    return {
        "decisions": int(len(true)),
        "spearman_median": float(np.median(rho)),
        "spearman_mean": float(np.mean(rho)),
        "pick_is_true_best": float(np.mean(true[rows, pick] == true.max(axis=1))),
        "pick_beats_proposal": float(np.mean(gain > 0)),
        "pick_worse_than_proposal": float(np.mean(gain < 0)),
        "true_gain_mean": float(gain.mean()),
        "oracle_gain_mean": float(best.mean()),
        "share_of_oracle_gain": float(gain.mean() / best.mean()) if best.mean() > 0 else math.nan,
        "oracle_gain_in_top_decile": float(best[top].sum() / best.sum()) if best.sum() > 0 else math.nan,
        "share_of_oracle_gain_top_decile": float(gain[top].sum() / best[top].sum()) if best[top].sum() > 0 else math.nan,
    }


def paired_figures(x: np.ndarray, y: np.ndarray, true: np.ndarray, episode: np.ndarray) -> dict:
    """Score x's ranking against score y's on the same decisions (scores [M, N], true [M, N], episode [M]):
    per decision, the difference of their Spearman correlations with the truth and the true outcome of
    x's pick minus y's, each tested over episodes (`stats.clustered_paired_difference`), since the
    decisions of one episode are not independent. The per-decision differences are kept so that fits of
    several training seeds can be pooled (`--pool`). Decisions with a flat truth are left out."""
    from .stats import clustered_paired_difference

    keep = np.ptp(true, axis=1) > 0
    x, y, true, episode = x[keep], y[keep], true[keep], episode[keep]
    rows = np.arange(len(true))
    d_rho = decision_spearman(x, true) - decision_spearman(y, true)
    d_gain = true[rows, x.argmax(axis=1)] - true[rows, y.argmax(axis=1)]
    return {"spearman": clustered_paired_difference(d_rho, episode),
            "true_outcome": clustered_paired_difference(d_gain, episode),
            "per_decision": {"episode": [str(e) for e in episode], "spearman": d_rho.tolist(),
                             "true_outcome": d_gain.tolist()}}  # fmt: skip


def pool_paired(fits: dict[str, dict]) -> dict:
    """The paired comparisons of several fits (by name, e.g. one per training seed) pooled: every fit's
    held-out decisions together, each episode a cluster of its own fit."""
    from .stats import clustered_paired_difference

    pooled = {}
    for x, y in PAIRED:
        key = f"{x} vs {y}"
        parts = [(name, f["paired"][key]["per_decision"]) for name, f in fits.items() if key in f.get("paired", {})]
        if not parts:
            continue
        episode = [f"{name}/{e}" for name, d in parts for e in d["episode"]]
        pooled[key] = {"x": x, "y": y, "fits": [name for name, _ in parts]}
        for what in ("spearman", "true_outcome"):
            pooled[key][what] = clustered_paired_difference([v for _, d in parts for v in d[what]], episode)
    return pooled


# What must agree for the held-out episodes of several fits to be one sample; the seed, the label and which
# critic is exported may differ (one fit per training seed, or per exported critic).
POOL_SETTINGS = ("steps", "batch_size", "lr", "loss", "holdout")


def pooled_settings(fit: dict) -> dict:
    """The settings of one `fit.json` that `--pool` requires to agree across fits."""
    given = fit.get("settings", {})
    return {**{k: given.get(k) for k in POOL_SETTINGS}, "candidates_per_decision": fit.get("candidates_per_decision"),
            "truth": fit.get("truth", "reward")}


def pooled_figure(fits: dict[str, dict], pooled: dict) -> bytes:
    """`pooled_plot` as PNG bytes."""
    from .plots import figure_png

    return figure_png(pooled_plot(fits, pooled))


def pooled_plot(fits: dict[str, dict], pooled: dict):
    """One row per paired comparison: each held-out episode's mean difference (x - y) as a dot coloured by
    its fit, and the pooled mean with its episode-bootstrap interval; Spearman left, the picks' true
    outcome right (a matplotlib figure)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from .plots import PALETTE

    keys = list(pooled)
    # One colour per fit, whichever comparisons it holds, and one legend entry each.
    colour = {name: PALETTE[j % len(PALETTE)] for j, name in enumerate(fits)}
    fig, axes = plt.subplots(1, 2, figsize=(11, 0.6 * len(keys) + 1.6), sharey=True)
    for ax, what, title in ((axes[0], "spearman", "Spearman with the truth, x - y"),
                            (axes[1], "true_outcome", "true outcome of x's pick - y's")):  # fmt: skip
        labelled = set()
        for row, key in enumerate(keys):
            for name in pooled[key]["fits"]:
                d = fits[name]["paired"][key]["per_decision"]
                episode, diff = np.asarray(d["episode"]), np.asarray(d[what], dtype=float)
                means = [diff[episode == e].mean() for e in sorted(set(episode))]
                offsets = np.linspace(-0.25, 0.25, len(means)) if len(means) > 1 else [0.0]
                ax.scatter(means, row + np.asarray(offsets), s=12, color=colour[name], alpha=0.7,
                           label=None if name in labelled else Path(name).name)  # fmt: skip
                labelled.add(name)
            c = pooled[key][what]
            ax.errorbar([c["mean"]], [row], xerr=[[c["mean"] - c["bootstrap_ci"][0]], [c["bootstrap_ci"][1] - c["mean"]]],
                        fmt="D", color="black", capsize=4, markersize=5)  # fmt: skip
        ax.axvline(0.0, color="grey", linewidth=0.8)
        ax.set_title(f"held-out episodes: {title}", fontsize=9)
    axes[0].set_yticks(range(len(keys)), [k.replace(" vs ", "\nvs ") for k in keys], fontsize=7)
    axes[0].invert_yaxis()
    axes[1].legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.0, 1.0), title="fit (dots: episodes)", title_fontsize=7)
    return fig


def paired_table(paired: dict) -> str:
    """Paired comparisons as a markdown table: mean difference, its episode-bootstrap interval, the
    Wilcoxon p over episodes and the episodes where x / y ranked better."""
    rows = ["| x vs y | decisions (episodes) | Spearman x - y (95%) | p | episodes x / y better | true outcome of x's pick - y's (95%) | p |",
            "|---|---|---|---|---|---|---|"]  # fmt: skip
    for key, c in paired.items():
        r, g = c["spearman"], c["true_outcome"]
        rows.append(f"| {key} | {r['items']} ({r['clusters']}) | {r['mean']:+.3f} ({r['bootstrap_ci'][0]:+.3f}, "
                    f"{r['bootstrap_ci'][1]:+.3f}) | {r['wilcoxon_p']:.2g} | {r['clusters_positive']} / {r['clusters_negative']} | "
                    f"{g['mean']:+.4f} ({g['bootstrap_ci'][0]:+.4f}, {g['bootstrap_ci'][1]:+.4f}) | {g['wilcoxon_p']:.2g} |")  # fmt: skip
    return "\n".join(rows)


def imagine_all(world, history: np.ndarray, candidates: np.ndarray, batch: int = 512):
    """The world model's imagined frames [M, N, K, D] (target space) and current latents [M, D]."""
    import torch

    m, n = candidates.shape[:2]
    hist = torch.as_tensor(history).float()
    cands = torch.as_tensor(candidates).float()
    out = []
    step = max(1, batch // n)  # decisions per call (at least one, however many candidates it has)
    with torch.no_grad():
        for i in range(0, m, step):
            h = hist[i : i + step]
            c = cands[i : i + step]
            imagined = world.imagine(h.repeat_interleave(n, dim=0), c.flatten(0, 1))
            out.append(imagined.view(len(h), n, *imagined.shape[1:]))
    return torch.cat(out), hist[:, -1]


def train_critic(critic, current, imagined, true, steps: int, lr: float, batch: int, seed: int,
                 loss: str = "ranknet", chunks=None) -> list[float]:  # fmt: skip
    """Train `critic` (current [M, D], imagined [M, N, K, D], chunks [M, N, H, A]; either may be None
    when the critic does not read it) -> [M, N] scores against true [M, N] with `loss` (one of
    `LOSSES`); returns the loss every 50 steps. Decisions are drawn by a generator seeded with `seed`,
    so a fit repeats exactly."""
    import torch

    from ..world.dynamics import listwise_loss, ranking_loss

    if loss not in LOSSES:
        raise FitPlanScoreError(f"--loss {loss!r} is not one of {', '.join(LOSSES)}.")
    loss_fn = ranking_loss if loss == "ranknet" else listwise_loss

    g = torch.Generator().manual_seed(seed)
    true = torch.as_tensor(true).float()
    keep = torch.nonzero(true.amax(dim=1) > true.amin(dim=1)).squeeze(1)
    if len(keep) == 0:
        raise FitPlanScoreError("Every decision's candidates have the same true outcome: nothing to rank.")
    opt = torch.optim.AdamW(critic.parameters(), lr=lr, weight_decay=1e-4)
    n = true.shape[1]
    losses = []
    critic.train()
    for step in range(steps):
        idx = keep[torch.randint(len(keep), (batch,), generator=g)]
        cur = current[idx].repeat_interleave(n, dim=0)
        logits = critic(cur, *_flat(idx, imagined, chunks)).view(len(idx), n)
        value = loss_fn(logits, true[idx])
        opt.zero_grad()
        value.backward()
        opt.step()
        if step % 50 == 0 or step == steps - 1:
            losses.append(value.item())
    critic.eval()
    return losses


def _flat(idx, *per_candidate):
    """Rows `idx` of each [M, N, ...] tensor (None passes through), candidates flattened into the batch."""
    return [None if x is None else x[idx].flatten(0, 1) for x in per_candidate]


def critic_scores(critic, current, imagined, chunks=None) -> np.ndarray:
    """Scores [M, N] of a trained critic (inputs as `train_critic`'s)."""
    import torch

    n = (imagined if imagined is not None else chunks).shape[1]
    with torch.no_grad():
        return critic(current.repeat_interleave(n, dim=0), *_flat(slice(None), imagined, chunks)).view(-1, n).numpy()


def shuffle_candidates(x, seed: int):
    """x [M, N, ...] with each decision's N entries permuted at random (seeded): the intervention that
    detaches each candidate from its own imagined outcome while keeping the outcomes' distribution."""
    import torch

    g = torch.Generator().manual_seed(seed)
    perm = torch.argsort(torch.rand(x.shape[:2], generator=g), dim=1)
    return x.gather(1, perm.view(*perm.shape, *[1] * (x.ndim - 2)).expand_as(x))


def export(actor, source: Path, critic, out: Path, record: dict) -> Path:
    """Write `<out>/pretrained_model`: the source checkpoint with `critic` as its outcome critic,
    `critic_input` set to what it reads and `planner_score="critic"`; the processors and train config are
    copied unchanged."""
    model_dir = out / "pretrained_model"
    tmp = out / "pretrained_model.partial"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    policy = actor.policy
    policy.config.plan_critic = True
    policy.config.planner_score = "critic"
    policy.config.critic_input = critic.reads
    policy.world.critic = critic
    policy.save_pretrained(tmp)
    for f in source.iterdir():
        if f.is_file() and f.name not in WRITTEN:
            shutil.copy2(f, tmp / f.name)
    atomic_write_json(tmp / FIT_RECORD, record, indent=1)
    if model_dir.exists():
        shutil.rmtree(model_dir)
    tmp.rename(model_dir)
    return model_dir


def fit_figure(figures: dict) -> bytes:
    """Held-out median Spearman with the true outcome and share of the oracle's gain, per score and task
    (two panels, PNG bytes)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from .plots import PALETTE, figure_png

    tasks = sorted({t for f in figures.values() for t in f["tasks"]}) + ["all"]
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.4))
    width = 0.8 / max(1, len(figures))
    # More series than colours: a shuffle row is drawn hatched in the colour of the critic it shuffles.
    colours: dict[str, str] = {}
    for name in figures:
        if name not in SHUFFLED.values():
            colours[name] = PALETTE[len(colours) % len(PALETTE)]
    for reads, name in SHUFFLED.items():
        colours[name] = colours.get(CRITIC_NAMES[reads], PALETTE[-1])
    for ax, key, title in ((axes[0], "spearman_median", "median Spearman with the true outcome"),
                           (axes[1], "share_of_oracle_gain", "share of the oracle's gain")):  # fmt: skip
        for j, (name, f) in enumerate(figures.items()):
            vals = [(f["all"] if t == "all" else f["tasks"].get(t, {})).get(key, math.nan) for t in tasks]
            xs = [i - 0.4 + width * (j + 0.5) for i in range(len(tasks))]
            shuffled = name in SHUFFLED.values()
            ax.bar(xs, [v if math.isfinite(v) else 0.0 for v in vals], width=width * 0.9, label=name,
                   color="white" if shuffled else colours[name], hatch="///" if shuffled else None,
                   edgecolor=colours[name])  # fmt: skip
        ax.axhline(0.0, color="black", linewidth=0.8)
        ax.set_xticks(range(len(tasks)), tasks, fontsize=7)
        ax.set_title(f"held out: {title}", fontsize=9)
    axes[1].axhline(1.0, color="grey", linewidth=0.8, linestyle="--")
    axes[1].legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    return figure_png(fig)  # lays the figure out tight


def parse_args(argv=None) -> argparse.Namespace:
    """The command line (see the module docstring)."""
    p = argparse.ArgumentParser(prog="lerobot-wm-fit-plan-score", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    p.add_argument("--policy.path", dest="policy_path",
                   help="pretrained_model directory of a world_f or smolvla_world checkpoint trained with "
                        "--policy.dynamics=action_conditioned")
    p.add_argument("--candidates", nargs="+",
                   help="Folders written by lerobot-wm-plan-check --save_candidates (searched for candidates/*.npz)")
    p.add_argument("--output_dir", required=True, help="Where pretrained_model/, fit.json and fit.png go "
                   "(with --pool: where pooled.json goes)")
    p.add_argument("--pool", nargs="+", metavar="FIT_DIR",
                   help="Fit nothing: pool the paired comparisons of earlier fits (their --output_dir, e.g. one per "
                        "training seed) over all their held-out episodes, into <output_dir>/pooled.json and pooled.png")
    p.add_argument("--allow_mixed_settings", action="store_true",
                   help="With --pool: pool fits whose settings differ (steps, batch size, learning rate, loss, "
                        "hold-out fraction, candidates per decision); by default they are refused")
    p.add_argument("--holdout", type=float, default=0.25, help="Fraction of episodes held out to measure the fit (default 0.25)")
    p.add_argument("--steps", type=int, default=1500, help="Training steps (default 1500)")
    p.add_argument("--batch_size", type=int, default=32, help="Decisions per step (default 32)")
    p.add_argument("--lr", type=float, default=1e-3, help="AdamW learning rate (default 1e-3)")
    p.add_argument("--seed", type=int, default=0, help="Seed of the critic's initialisation and batches (default 0)")
    p.add_argument("--loss", choices=LOSSES, default="ranknet",
                   help="ranknet: every pair the truth orders counts alike (default); listwise: softmax cross-entropy "
                        "against the candidates' true ranks, weighted toward the best")
    p.add_argument("--critic_input", choices=tuple(CRITIC_NAMES), default="imagined",
                   help="Which fitted critic the exported checkpoint plans with: imagined (the world model's imagined "
                        "frames; default), both (imagined frames and actions), actions (the control without the world "
                        "model), or one of them with _projected (each input projected on its own before they are mixed)")
    p.add_argument("--critics", nargs="+", choices=tuple(CRITIC_NAMES), default=list(CRITIC_NAMES),
                   help="Which critics to fit side by side (default: all six; each costs about as much as the others). "
                        "Must include --critic_input")
    p.add_argument("--label", default=DEFAULT_FIT_LABEL,
                   help="Name of this fit in lerobot-wm-plan-check --report: its --pick=model runs form the group "
                        f"model_fit:<label> (default {DEFAULT_FIT_LABEL!r}: the group model_fit), so several fits of one "
                        "checkpoint (e.g. successive collection rounds) compare side by side")
    args = p.parse_args(argv)
    if not args.pool and (args.policy_path is None or args.candidates is None):
        p.error("--policy.path and --candidates are required to fit (or --pool FIT_DIR ... to pool earlier fits)")
    return args


def main(argv=None) -> int:
    """Console entry point of lerobot-wm-fit-plan-score."""
    args = parse_args(argv)
    try:
        return _pool(args) if args.pool else _main(args)
    except FitPlanScoreError as err:
        print(f"lerobot-wm-fit-plan-score: error: {err}", file=sys.stderr)
        return 2


def _pool(args) -> int:
    """`--pool`: the paired comparisons of earlier fits pooled over all their held-out episodes."""
    import json

    fits = {}
    for d in args.pool:
        path = Path(d) / "fit.json"
        if not path.is_file():
            raise FitPlanScoreError(f"--pool {d} has no fit.json: give the --output_dir of a lerobot-wm-fit-plan-score run.")
        fit = json.loads(path.read_text())
        if not fit.get("paired"):
            raise FitPlanScoreError(f"{path} holds no paired comparison: it was fitted before they existed or without "
                                    "a critic and its control; fit it again with the critics to compare (--critics).")  # fmt: skip
        fits[str(d)] = fit
    settings = {d: pooled_settings(f) for d, f in fits.items()}
    differ = {k for s in settings.values() for k in s if len({json.dumps(v.get(k)) for v in settings.values()}) > 1}
    if differ and not args.allow_mixed_settings:
        detail = "; ".join(f"{k}: " + ", ".join(f"{d}={settings[d].get(k)}" for d in settings) for k in sorted(differ))
        raise FitPlanScoreError(f"The fits were not fitted alike ({detail}), so their episodes are not one sample: "
                                "fit them again with the same settings, or pass --allow_mixed_settings to pool them "
                                "anyway (pooled.json then lists each fit's settings).")  # fmt: skip
    pooled = pool_paired(fits)
    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    record = {"fits": {d: f["source"] for d, f in fits.items()}, "settings": settings,
              "mixed_settings": sorted(differ), "paired": pooled}  # fmt: skip
    atomic_write_json(out / "pooled.json", record, indent=1)
    atomic_write_bytes(out / "pooled.png", pooled_figure(fits, pooled))
    print(f"Paired on the held-out decisions of {len(fits)} fits, tested over episodes:\n" + paired_table(pooled))
    print(f"Wrote {out / 'pooled.json'} and {out / 'pooled.png'}")
    return 0


def _main(args) -> int:
    import os

    import torch

    from ..world.dynamics import OutcomeCritic
    from .record_metaworld import CheckpointActor

    source = Path(args.policy_path)
    if not (source / "config.json").is_file():
        raise FitPlanScoreError(f"--policy.path {source} has no config.json: give a checkpoint's pretrained_model directory.")
    if not args.label or not all(ch.isalnum() or ch in "-_." for ch in args.label):
        raise FitPlanScoreError(f"--label {args.label!r} must be a non-empty name of letters, digits, '-', '_' or '.'.")
    if args.critic_input not in args.critics:
        raise FitPlanScoreError(f"--critic_input {args.critic_input} is exported, so --critics must include it "
                                f"(got {' '.join(args.critics)}).")  # fmt: skip
    if not 0.0 < args.holdout < 1.0:
        raise FitPlanScoreError(f"--holdout must lie in (0, 1), got {args.holdout}.")
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1") or 1))
    episodes = load_candidates([Path(c) for c in args.candidates])
    truths = {}
    for ep in episodes:
        truths.setdefault(ep["truth"], set()).add(ep["source"])
    if len(truths) > 1:
        detail = "; ".join(f"{t}: {', '.join(sorted(srcs))}" for t, srcs in sorted(truths.items()))
        raise FitPlanScoreError(f"The candidates were collected with different --truth ({detail}), so their true "
                                "scores measure different things: fit each truth's folders on their own.")  # fmt: skip
    held = [ep for ep in episodes if is_holdout(ep["name"], args.holdout)]
    train = [ep for ep in episodes if not is_holdout(ep["name"], args.holdout)]
    if not held or not train:
        raise FitPlanScoreError(f"{len(episodes)} episodes cannot be split into training and held-out ones at "
                                f"--holdout {args.holdout}: record more episodes or change --holdout.")  # fmt: skip
    actor = CheckpointActor(str(source))
    policy, cfg = actor.policy, actor.policy.config
    world = getattr(policy, "world", None)
    if world is None or getattr(world, "dynamics", None) is None:
        raise FitPlanScoreError(f"{source} has no action-conditioned world model: the fitted score reads its "
                                "imagined outcomes (train with --policy.dynamics=action_conditioned).")  # fmt: skip
    d, t_len, a_len = int(cfg.world_latent_dim), cfg.history_frames, world.dynamics.action_len
    action_dim = cfg.action_feature.shape[0]  # world_f and smolvla_world alike (SmolVLA pads its own)
    hist_shape, cand_shape = episodes[0]["history"].shape[1:], episodes[0]["candidates"].shape[1:]
    if hist_shape != (t_len, d) or cand_shape[1] < a_len or cand_shape[2] != action_dim:
        raise FitPlanScoreError(
            f"The candidates hold latent histories {hist_shape} and chunks {cand_shape}, but {source} reads histories "
            f"({t_len}, {d}) and chunks of >= {a_len} actions of dimension {action_dim}: record them with "
            "a checkpoint of the same encoder, history and action space."
        )
    data = {"train": stack(train), "held_out": stack(held)}
    torch.manual_seed(args.seed)
    k = cfg.future_frames
    # Every critic is built, in a fixed order, so each starts from the same weights whichever are fitted.
    built = {reads: OutcomeCritic(d, k, cfg.prophet_width, reads, action_dim, a_len) for reads in CRITIC_NAMES}
    critics = {reads: critic for reads, critic in built.items() if reads in args.critics}
    inputs = {}
    for split, arr in data.items():
        imagined, current = imagine_all(world, arr["history"], arr["candidates"])
        chunks = torch.as_tensor(arr["candidates"]).float()
        inputs[split] = {"current": current, "imagined": imagined, "chunks": chunks}

    losses, scores = {}, {}
    for reads, critic in critics.items():
        name = CRITIC_NAMES[reads]
        # Every critic gets both inputs and reads only its own (`OutcomeCritic.reads`).
        x = inputs["train"]
        losses[name] = train_critic(critic, x["current"], x["imagined"], data["train"]["true"], args.steps, args.lr,
                                    args.batch_size, args.seed, args.loss, chunks=x["chunks"])  # fmt: skip
        scores[name] = {s: critic_scores(critic, inputs[s]["current"], inputs[s]["imagined"], inputs[s]["chunks"])
                        for s in data}  # fmt: skip
    # One shuffle per split, shared by every critic that reads both inputs.
    shuffled = {split: shuffle_candidates(inputs[split]["imagined"], args.seed) for split in data}
    for reads, name in SHUFFLED.items():
        if reads in critics:
            scores[name] = {split: critic_scores(critics[reads], inputs[split]["current"], shuffled[split],
                                                 inputs[split]["chunks"]) for split in data}  # fmt: skip
    scores["checkpoint's score"] = {s: data[s]["model"] for s in data}

    def per_task(s: np.ndarray, split: str) -> dict:
        arr = data[split]
        out = {"all": ranking_figures(s, arr["true"]),
               "tasks": {t: ranking_figures(s[arr["task"] == t], arr["true"][arr["task"] == t])
                         for t in sorted(set(arr["task"]))}}  # fmt: skip
        # With several --candidates folders (e.g. planning-off states and a fitted planner's own states),
        # how the score ranks each: a score can rank one distribution of states and not the other.
        if len(args.candidates) > 1:
            out["sources"] = {src: ranking_figures(s[arr["source"] == src], arr["true"][arr["source"] == src])
                              for src in sorted(set(arr["source"]))}  # fmt: skip
        return out

    figures = {split: {name: per_task(sc[split], split) for name, sc in scores.items()} for split in data}
    held_out = data["held_out"]
    paired = {f"{x} vs {y}": {"x": x, "y": y, **paired_figures(scores[x]["held_out"], scores[y]["held_out"],
                                                                held_out["true"], held_out["episode"])}
              for x, y in PAIRED if x in scores and y in scores}  # fmt: skip
    record = {
        "source": str(source.resolve()),
        "label": args.label,
        "candidates": [str(Path(c).resolve()) for c in args.candidates],
        "episodes": {"train": [ep["name"] for ep in train], "held_out": [ep["name"] for ep in held]},
        "decisions": {s: int(len(data[s]["true"])) for s in data},
        "candidates_per_decision": int(cand_shape[0]),
        "truth": next(iter(truths)),
        "settings": {"steps": args.steps, "batch_size": args.batch_size, "lr": args.lr, "seed": args.seed,
                     "holdout": args.holdout, "loss": args.loss, "critic_input": args.critic_input,
                     "critics": list(critics)},  # fmt: skip
        "exported": CRITIC_NAMES[args.critic_input],
        "losses": losses,
        "figures": figures,
        "paired": paired,
    }
    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    model_dir = export(actor, source, critics[args.critic_input], out, record)
    atomic_write_json(out / "fit.json", record, indent=1)
    atomic_write_bytes(out / "fit.png", fit_figure(figures["held_out"]))
    print(figures_table(figures))
    if paired:
        print("\nPaired on the held-out decisions, tested over episodes:\n" + paired_table(paired))
    print(f"Wrote {model_dir} (planner_score='critic', critic_input={args.critic_input!r}) and {out / 'fit.json'}")
    return 0


def figures_table(figures: dict) -> str:
    """The fit's figures as a markdown table (per split, score and task)."""
    rows = ["| split | score | task | decisions | Spearman (median) | pick = true best | pick better / worse than proposal | share of oracle gain | top decile: oracle gain held, share |",
            "|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for split, per_score in figures.items():
        for name, f in per_score.items():
            sources = [(f"source {src}", b) for src, b in f.get("sources", {}).items()]
            for task, b in [*f["tasks"].items(), *sources, ("all", f["all"])]:
                if not b.get("decisions"):
                    continue
                rows.append(f"| {split} | {name} | {task} | {b['decisions']} | {b['spearman_median']:.2f} | "
                            f"{b['pick_is_true_best']:.1%} | {b['pick_beats_proposal']:.1%} / {b['pick_worse_than_proposal']:.1%} | "
                            f"{b['share_of_oracle_gain']:+.2f} | {b['oracle_gain_in_top_decile']:.0%}, "
                            f"{b['share_of_oracle_gain_top_decile']:+.2f} |")  # fmt: skip
    return "\n".join(rows)


if __name__ == "__main__":
    sys.exit(main())
