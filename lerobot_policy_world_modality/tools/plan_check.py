"""`lerobot-wm-plan-check`: does the planner's score rank candidate chunks as the simulator does?

    lerobot-wm-plan-check --policy.path=<checkpoint>/pretrained_model --tasks=pick-place-v3,assembly-v3 \
        --episodes=10 --seed=1000 --pick=model --out_dir=outputs/plan_check/seed0

Runs a world_f or smolvla_world checkpoint that has an action-conditioned world model in MetaWorld,
episode by episode on env seeds seed, seed + 1, ... (episode i starts from the state its seed gives, as
in evaluations through `lerobot-wm-compare`, see `tools.demo.seed_metaworld_resets`). At every
replanning step it draws the candidates the rerank planner draws, from the policy's own planner
generator (world_f: its proposal and N - 1 Gaussian perturbations; smolvla_world: N flow samples, the
first one its proposal), and gets two scores for each:
- the checkpoint's: the planner's score (`--planner_score`, default the checkpoint's), exactly what
  `--policy.planner=rerank` ranks by;
- the simulator's: the simulator state is saved, the candidate's actions are executed in it, their
  outcome measured, and the state restored (counterfactual outcomes, without rendering). `--truth`
  says which outcome is the true score:
  - `reward` (default): the mean reward at the steps whose rewards the reward head estimates for the
    imagined frames (step k * future_stride + 1 for k = 1..horizon: the head reads a frame's latent and
    predicts the reward of the step taken from it). A short-horizon score.
  - `expert`: minus the steps to success when the candidate's executed actions (`n_action_steps`) are
    followed by MetaWorld's scripted expert, within the episode's remaining steps and at most
    `--expert_horizon` expert steps (a failure scores one step below the longest). This is the scripted
    expert's value of the state a candidate leads to: a long-horizon score, aligned with success, that
    no rendering is needed for.

`--report DIR` compares the checks written under DIR instead (the picks of the same checkpoints,
paired by checkpoint, task and env seed, McNemar's exact test and a bootstrap interval, as
`lerobot-wm-compare` reports): `DIR/report.md`, `report.json`, `report_success.png`.

`--pick` chooses which candidate is executed: `proposal` (planning off), `model` (the checkpoint's
best: the same chunk `--policy.planner=rerank` would execute) or `true` (the simulator's best by
`--truth`: rerank with a perfect score of that kind, the most a rerank over these candidates can give
with it; the report keeps the oracles of the two truths apart). Whatever the
pick, every decision logs the Spearman correlation of the two scores, how the picked chunk's true score
compares with the proposal's, and whether replaying the picked chunk reproduced its counterfactual
rewards (`replay_max_abs_diff`, 0 when the saved state is the whole state).

Each episode is written atomically to `<out_dir>/episodes/<task>__<seed>.json` and skipped on rerun, so
a killed check resumes; `<out_dir>/summary.json` holds success counts with Wilson 95% intervals and the
ranking figures per task.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import sys
import time
from pathlib import Path

import numpy as np

from ..fileio import atomic_write_json

PICKS = ("proposal", "model", "true")
# What the true score of a candidate is (see the module docstring).
TRUTHS = ("reward", "expert")
# How reports name each pick.
PICK_LABELS = {"proposal": "planning off (the proposal)", "model": "rerank by the checkpoint's score",
               "true": "rerank by the true reward (oracle)",
               "true:expert": "rerank by the scripted expert's steps to success (oracle)",
               "model_fit": "rerank by a score fitted to counterfactual outcomes"}


# The file `lerobot-wm-fit-plan-score` writes into a checkpoint it fitted (source checkpoint, data, figures).
FIT_RECORD = "plan_score_fit.json"
# The label of a fit given no `--label`; its runs form the report group "model_fit".
DEFAULT_FIT_LABEL = "fit"


class PlanCheckError(ValueError):
    """A checkpoint or setting the check cannot work with; the message says what to do instead."""


class SimSnapshot:
    """The whole state of a MetaWorld env that a step reads or writes: MuJoCo's integration state
    (positions, velocities, actuator and mocap state, warm start, time) and the env's own plain
    attributes (step counter, previous observation, task flags some reward functions keep).
    Restoring it makes the next steps repeat exactly (checked by `replay_max_abs_diff`)."""

    def __init__(self, env):
        import mujoco

        self._spec = mujoco.mjtState.mjSTATE_INTEGRATION
        self.physics = np.empty(mujoco.mj_stateSize(env.model, self._spec))
        mujoco.mj_getState(env.model, env.data, self.physics, self._spec)
        # Arrays that are views stay out: some alias MuJoCo's data (MetaWorld's `init_left_pad` is a view
        # of the pads' current position, which its rewards read), so the physics restores them, and a
        # frozen copy would change the reward function.
        self.attrs = {k: copy.deepcopy(v) for k, v in vars(env).items()
                      if isinstance(v, (bool, int, float, np.generic)) or (isinstance(v, np.ndarray) and v.base is None)}  # fmt: skip

    def restore(self, env) -> None:
        """Put `env` back in the saved state."""
        import mujoco

        mujoco.mj_setState(env.model, env.data, self.physics, self._spec)
        mujoco.mj_forward(env.model, env.data)
        for k, v in self.attrs.items():
            setattr(env, k, copy.deepcopy(v))


def reward_steps(horizon: int, stride: int, length: int) -> list[int]:
    """0-based indices, into a chunk's executed steps, of the rewards the reward score estimates: the
    head reads imagined frame k (k * stride steps ahead) and predicts the reward of the step taken from
    it, the (k * stride + 1)-th. Capped at the `length` actions a chunk has."""
    return [min(k * stride, length - 1) for k in range(1, horizon + 1)]


def outcomes(sim, actions: np.ndarray, steps: int) -> tuple[np.ndarray, bool]:
    """Rewards [steps] of executing `actions` [>= steps, A] from the env's current state (then restored),
    and whether the task succeeded on the way. No frame is rendered."""
    snap = SimSnapshot(sim)
    rewards = np.zeros(steps)
    success = False
    for i in range(steps):
        _obs, reward, _term, truncated, info = sim.step(actions[i].astype(np.float32))
        rewards[i] = reward
        success = success or bool(info.get("success", 0))
        if truncated:
            rewards[i + 1 :] = reward
            break
    snap.restore(sim)
    return rewards, success


def expert_steps_to_success(sim, expert, actions: np.ndarray, horizon: int) -> int | None:
    """Steps until the task succeeds when `actions` [S, A] are executed from the env's current state and
    the scripted `expert` (MetaWorld's policy for the task, which reads the raw state) acts after them,
    for at most `horizon` steps; None if it does not succeed by then or the env truncates. The state is
    restored. No frame is rendered."""
    snap = SimSnapshot(sim)
    try:
        obs = None
        for step in range(len(actions) + horizon):
            action = actions[step] if step < len(actions) else np.clip(expert.get_action(obs), -1.0, 1.0)
            obs, _reward, _term, truncated, info = sim.step(np.asarray(action, dtype=np.float32))
            if bool(info.get("success", 0)):
                return step + 1
            if truncated:
                return None
        return None
    finally:
        snap.restore(sim)


def expert_truth(sim, expert, candidates: np.ndarray, executed: int, horizon: int) -> np.ndarray:
    """The `expert` true score of each candidate [N, >= executed, A]: minus its `expert_steps_to_success`
    after its first `executed` actions, and for a candidate that does not succeed, one step below the
    slowest possible success (so every failure ties, below every success)."""
    worst = executed + horizon + 1
    out = np.empty(len(candidates))
    for i, cand in enumerate(candidates):
        n = expert_steps_to_success(sim, expert, cand[:executed], horizon)
        out[i] = -(worst if n is None else n)
    return out


def save_candidates(path: Path, saved: dict[str, list], task: str, seed: int, idx: list[int],
                    truth: str = "reward") -> None:
    """Write one episode's decisions (atomically) as an .npz that `lerobot-wm-fit-plan-score` trains on:
    `history` [M, T, D] (the raw latent history the world model reads), `candidates` [M, N, H, A] (the
    rerank candidates in normalised action units, the proposal first), `true` [M, N] (their true
    scores), `rewards` [M, N, L] (the rewards of their first L steps), `model` [M, N] (the checkpoint's
    scores), `reward_steps` (which of the L rewards the `reward` truth averages), `truth` (what `true`
    is: `--truth`), `task`, `seed`."""
    import io

    from ..fileio import atomic_write_bytes

    arrays = {k: np.stack(v) for k, v in saved.items()}
    buf = io.BytesIO()
    np.savez_compressed(buf, **arrays, reward_steps=np.asarray(idx), truth=np.asarray(truth), task=np.asarray(task),
                        seed=np.asarray(seed))  # fmt: skip
    atomic_write_bytes(path, buf.getvalue())


def _spearman(a: np.ndarray, b: np.ndarray) -> float:
    from scipy.stats import spearmanr

    if np.ptp(a) == 0 or np.ptp(b) == 0:
        return math.nan
    return float(spearmanr(a, b).statistic)


def run_episode(actor, env, task: str, seed: int, args, settings, horizon: int, stride: int,
                saved_candidates: Path | None = None) -> dict:
    """One episode; returns its record (success, steps, one entry per replanning decision).

    saved_candidates: an .npz path to write every decision's inputs and outcomes to (`save_candidates`)."""
    import torch

    from ..world.planner import plan_chunk

    policy = actor.policy
    cfg = policy.config
    sim = env._env
    # MetaWorld ignores reset's seed and draws the initial positions from NumPy's global generator, so
    # seeding it here makes an episode's start a function of its seed alone: the same for every --pick,
    # and after a resume.
    np.random.seed(seed)
    raw_obs, _ = sim.reset()
    actor.reset()
    chunk_len = cfg.chunk_size
    look = min(chunk_len, max(cfg.n_action_steps, horizon * stride + 1))
    idx = reward_steps(horizon, stride, look)
    queue: list[np.ndarray] = []
    expected: list[float] = []  # the picked candidate's counterfactual rewards, to check the replay
    decisions, replay_diffs, executed = [], [], []
    saved: dict[str, list] = {"history": [], "candidates": [], "true": [], "rewards": [], "model": []}
    success, steps, total_reward = False, 0, 0.0
    while steps < args.episode_length:
        obs = env._format_raw_obs(raw_obs)
        batch = actor.batch(obs, env.task_description)
        with torch.inference_mode():
            history = policy.advance_history(batch)
            if not queue:
                # world_f: the proposal (the planner perturbs it); smolvla_world: N flow samples as well.
                proposal, first_round = policy.plan_candidates(batch, history)
                record = {}

                def score(cands, _history=history, _record=record):
                    model = policy.world.score_chunks(_history, cands, None, horizon)[0].numpy()
                    env_actions = actor.unnormalise(cands[0, :, :look])
                    res = [outcomes(sim, a, look) for a in env_actions]
                    true_rewards = np.stack([r for r, _ in res])
                    if args.truth == "expert":
                        remaining = args.episode_length - steps - cfg.n_action_steps
                        true = expert_truth(sim, env.expert_policy, env_actions, cfg.n_action_steps,
                                            max(0, min(args.expert_horizon, remaining)))  # fmt: skip
                    else:
                        true = true_rewards[:, idx].mean(axis=1)
                    # What each --pick executes: the planner's argmax (ties go to the lowest index, the
                    # proposal's). Kept as the very float32 tensor the planner ranks, so `picked` below is
                    # its choice even where float64 true scores differ by less than float32 resolves.
                    wanted = {"model": model, "true": true, "proposal": np.eye(len(model))[0]}[args.pick]
                    wanted = torch.as_tensor(wanted, dtype=torch.float32)[None]
                    _record.update(model=model, true=true, rewards=true_rewards, wanted=wanted,
                                   success=np.array([s for _, s in res]), history=_history[0], candidates=cands[0])  # fmt: skip
                    return wanted

                chunk, _ = plan_chunk(proposal, score, settings, policy.planner_rng, first_round=first_round)
                model, true = record["model"], record["true"]
                queue = list(actor.unnormalise(chunk[0, : cfg.n_action_steps]))
                picked = int(record["wanted"].argmax(dim=1))
                expected = list(record["rewards"][picked, : cfg.n_action_steps])
                model_pick = int(np.argmax(model))
                if saved_candidates is not None:
                    for key in ("history", "candidates"):
                        saved[key].append(record[key].float().numpy())
                    for key in ("true", "rewards", "model"):
                        saved[key].append(np.asarray(record[key], dtype=np.float32))
                decisions.append({
                    "step": steps,
                    "spearman": _spearman(model, true),
                    "picked": picked,
                    "model_pick": model_pick,
                    "model_pick_true_rank": int((true > true[model_pick]).sum()),  # 0: the true best
                    "true_picked": float(true[picked]),
                    "true_proposal": float(true[0]),
                    "true_model_pick": float(true[model_pick]),
                    "true_best": float(true.max()),
                    "true_mean": float(true.mean()),
                    "true_spread": float(true.max() - true.min()),
                    "candidate_successes": int(record["success"].sum()),
                })  # fmt: skip
        action = queue.pop(0)
        executed.append([round(float(a), 6) for a in action])
        raw_obs, reward, _term, truncated, info = sim.step(action.astype(np.float32))
        if expected:
            replay_diffs.append(abs(float(reward) - float(expected.pop(0))))
        total_reward += float(reward)
        steps += 1
        if bool(info.get("success", 0)):
            success = True
            break
        if truncated:
            break
    if saved_candidates is not None:
        save_candidates(saved_candidates, saved, task=task, seed=seed, idx=idx, truth=args.truth)
    return {"task": task, "seed": seed, "pick": args.pick, "truth": args.truth, "success": success, "steps": steps,
            "sum_reward": total_reward, "replay_max_abs_diff": max(replay_diffs, default=0.0),
            "decisions": decisions, "actions": executed}  # fmt: skip


def pairing_key(policy_path: str) -> str:
    """The checkpoint whose proposals an episode executes, which `--report` pairs episodes by: the
    checkpoint itself, or for one written by `lerobot-wm-fit-plan-score` (which changes only the
    planner's score) the checkpoint it was fitted from, followed back through refits, so a fitted score
    pairs with its source's runs."""
    path, seen = Path(policy_path).resolve(), set()
    while (path / FIT_RECORD).is_file() and path not in seen:
        seen.add(path)
        path = Path(json.loads((path / FIT_RECORD).read_text())["source"]).resolve()
    return str(path)


def fit_label(policy_path: str) -> str | None:
    """The `--label` of the fit that wrote a checkpoint (None for one no fit wrote)."""
    fit = Path(policy_path) / FIT_RECORD
    return json.loads(fit.read_text()).get("label", DEFAULT_FIT_LABEL) if fit.is_file() else None


def pick_group(rec: dict) -> str:
    """The report group of an episode record: its pick, or for pick=model runs of a fitted checkpoint
    "model_fit" (the default label) or "model_fit:<label>", so two fits of one source compare side by side."""
    fitted = rec["pick"] == "model" and rec.get("policy_key", rec["policy_path"]) != rec["policy_path"]
    if rec["pick"] == "true" and rec.get("truth", "reward") != "reward":
        return f"true:{rec['truth']}"  # oracles of different truths are different picks
    if not fitted:
        return rec["pick"]
    label = rec.get("fit_label") or DEFAULT_FIT_LABEL
    return "model_fit" if label == DEFAULT_FIT_LABEL else f"model_fit:{label}"


def pick_title(group: str) -> str:
    """How reports name a group of `pick_group`."""
    if group in PICK_LABELS:
        return PICK_LABELS[group]
    return f"{PICK_LABELS['model_fit']} ({group.split(':', 1)[1]})"


def group_order(groups) -> list[str]:
    """Report order: planning off, the checkpoint's score, the fitted scores (default label first, then
    by label), the oracle."""
    rank = {"proposal": 0, "model": 1, "model_fit": 2, "true": 4, "true:expert": 5}
    return sorted(groups, key=lambda g: (rank.get(g, 3), g))


def summarise(records: list[dict]) -> dict:
    """Per task and overall: successes with Wilson 95% intervals, and the ranking figures over all
    decisions (median Spearman of the two scores; how often the model's pick is the true best, chance
    1 / N; the true-score gain of the model's pick and of the true best over the proposal)."""
    from .stats import wilson_interval

    def block(recs: list[dict]) -> dict:
        dec = [d for r in recs for d in r["decisions"]]
        n, k = len(recs), sum(r["success"] for r in recs)
        lo, hi = wilson_interval(k, n)
        rho = np.array([d["spearman"] for d in dec], dtype=float)
        gain_model = np.array([d["true_model_pick"] - d["true_proposal"] for d in dec])
        gain_best = np.array([d["true_best"] - d["true_proposal"] for d in dec])
        return {
            "episodes": n, "successes": k, "rate": k / n if n else math.nan, "wilson95": [lo, hi],
            "decisions": len(dec),
            "spearman_median": float(np.nanmedian(rho)) if np.isfinite(rho).any() else math.nan,
            "spearman_mean": float(np.nanmean(rho)) if np.isfinite(rho).any() else math.nan,
            "decisions_with_flat_true_score": int(np.isnan(rho).sum()),
            "model_pick_is_true_best": float(np.mean([d["model_pick_true_rank"] == 0 for d in dec])) if dec else math.nan,
            "model_pick_beats_proposal": float(np.mean(gain_model > 0)) if dec else math.nan,
            "model_pick_worse_than_proposal": float(np.mean(gain_model < 0)) if dec else math.nan,
            "true_gain_model_pick_mean": float(gain_model.mean()) if dec else math.nan,
            "true_gain_best_mean": float(gain_best.mean()) if dec else math.nan,
            # The scale the gains are read against: the true score itself and its spread over the candidates.
            "true_level_median": float(np.median([d["true_mean"] for d in dec])) if dec else math.nan,
            "true_spread_median": float(np.median([d["true_spread"] for d in dec])) if dec else math.nan,
            "replay_max_abs_diff": max((r["replay_max_abs_diff"] for r in recs), default=0.0),
        }

    tasks = sorted({r["task"] for r in records})
    return {"all": block(records), "tasks": {t: block([r for r in records if r["task"] == t]) for t in tasks}}


def summary_table(summary: dict) -> str:
    """The summary as a markdown table."""
    rows = ["| task | success | Wilson 95% | decisions | Spearman (median) | model pick = true best | "
            "model pick better / worse than proposal | true gain: model pick, best | true score, spread (medians) |",
            "|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for name, b in [*summary["tasks"].items(), ("all", summary["all"])]:
        rows.append(
            f"| {name} | {b['successes']}/{b['episodes']} | {b['wilson95'][0]:.2f}-{b['wilson95'][1]:.2f} | "
            f"{b['decisions']} | {b['spearman_median']:.2f} | {b['model_pick_is_true_best']:.1%} | "
            f"{b['model_pick_beats_proposal']:.1%} / {b['model_pick_worse_than_proposal']:.1%} | "
            f"{b['true_gain_model_pick_mean']:+.3f}, {b['true_gain_best_mean']:+.3f} | "
            f"{b['true_level_median']:.3f}, {b['true_spread_median']:.3f} |"
        )
    return "\n".join(rows)


def load_runs(root: Path) -> dict[str, list[dict]]:
    """Every episode record under `root` (any depth: one folder per checkpoint and pick), grouped by
    `pick_group`: pick=model runs of a checkpoint written by `lerobot-wm-fit-plan-score` form their own
    group per fit label, paired with the proposals of the checkpoint it was fitted from."""
    runs: dict[str, list[dict]] = {}
    for path in sorted(root.rglob("episodes/*.json")):
        rec = json.loads(path.read_text())
        runs.setdefault(pick_group(rec), []).append(rec)
    return runs


def report(root: Path) -> dict:
    """Compare the picks found under `root`, paired: episodes of two picks pair when they share the
    checkpoint, task and env seed (the same start). Writes `report.json`, `report.md` and
    `report_success.png` (success per task and pick, Wilson 95%) into `root`; returns the report."""
    from .plots import grouped_bars_png
    from .stats import paired_comparison

    runs = load_runs(root)
    if not runs:
        raise PlanCheckError(f"No episode records under {root}: run the check with --out_dir inside it first.")
    picks = group_order(runs)
    summaries = {p: summarise(runs[p]) for p in picks}
    keyed = {p: {(r.get("policy_key", r["policy_path"]), r["task"], r["seed"]): r for r in runs[p]} for p in picks}
    comparisons = []
    for x in picks:
        if x == "proposal" or "proposal" not in picks:
            continue
        shared = sorted(set(keyed[x]) & set(keyed["proposal"]))
        for task in [None, *sorted({k[1] for k in shared})]:
            keys = [k for k in shared if task is None or k[1] == task]
            c = paired_comparison(x, "proposal", [keyed[x][k]["success"] for k in keys],
                                  [keyed["proposal"][k]["success"] for k in keys])  # fmt: skip
            comparisons.append({"task": task or "all", "checkpoints": len({k[0] for k in keys}), **c})
    tasks = sorted({r["task"] for p in picks for r in runs[p]})
    groups = {pick_title(p): [(100 * b["rate"], 100 * b["wilson95"][0], 100 * b["wilson95"][1])
                  for b in (summaries[p]["tasks"].get(t, {"rate": math.nan, "wilson95": [math.nan, math.nan]})
                            for t in tasks)]
              for p in picks}  # fmt: skip
    (root / "report_success.png").write_bytes(
        grouped_bars_png(tasks, groups, "Success per task (Wilson 95%)"))
    lines = [f"# lerobot-wm-plan-check report: {root}", ""]
    for p in picks:
        lines += [f"## pick = {p}: {pick_title(p)} ({len({r['policy_path'] for r in runs[p]})} checkpoints)", "", summary_table(summaries[p]), ""]
    if comparisons:
        lines += ["## Paired comparisons with the proposal (same checkpoint, task and env seed)", "",
                  "| pick vs proposal | task | pairs | rates | difference (bootstrap 95%) | only pick / only proposal | McNemar p |",
                  "|---|---|---|---|---|---|---|"]  # fmt: skip
        for c in comparisons:
            lines.append(f"| {c['x']} | {c['task']} | {c['pairs']} | {c['x_rate']:.1%} vs {c['y_rate']:.1%} | "
                         f"{100 * c['difference']:+.1f} ({100 * c['bootstrap_ci'][0]:+.1f}, {100 * c['bootstrap_ci'][1]:+.1f}) | "
                         f"{c['x_only']} / {c['y_only']} | {c['p_value']:.3g} |")  # fmt: skip
    lines += ["", "![Success per task](report_success.png)", ""]
    out = {"root": str(root), "summaries": summaries, "comparisons": comparisons}
    atomic_write_json(root / "report.json", out, indent=1)
    (root / "report.md").write_text("\n".join(lines))
    return out


def parse_args(argv=None) -> argparse.Namespace:
    """The command line (see the module docstring)."""
    p = argparse.ArgumentParser(prog="lerobot-wm-plan-check", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    p.add_argument("--report", default=None, metavar="DIR",
                   help="Instead of running: compare the checks written under DIR (paired by checkpoint, task and "
                        "env seed) into DIR/report.md, report.json and report_success.png")
    p.add_argument("--policy.path", dest="policy_path", default=None,
                   help="pretrained_model directory of a world_f or smolvla_world checkpoint trained with "
                        "--policy.dynamics=action_conditioned")
    p.add_argument("--tasks", default=None, help="Comma-separated MetaWorld tasks, e.g. pick-place-v3,assembly-v3")
    p.add_argument("--episodes", type=int, default=10, help="Episodes per task (default 10)")
    p.add_argument("--seed", type=int, default=1000, help="Env seed of the first episode, as lerobot-eval's --seed (default 1000)")
    p.add_argument("--episode_length", type=int, default=200, help="Steps per episode at most (default 200)")
    p.add_argument("--pick", choices=PICKS, default="model",
                   help="Which candidate is executed: proposal (planning off), model (the checkpoint's score, as "
                        "--policy.planner=rerank) or true (the best by --truth; default model)")
    p.add_argument("--truth", choices=TRUTHS, default="reward",
                   help="The true score of a candidate: reward (the mean reward at the steps the reward head "
                        "estimates; default) or expert (minus the steps to success when the scripted expert "
                        "takes over after the candidate's executed actions)")
    p.add_argument("--expert_horizon", type=int, default=150,
                   help="With --truth=expert: expert steps at most before a candidate counts as failing (default 150)")
    p.add_argument("--planner_samples", type=int, default=None, help="Candidates per decision (default: the checkpoint's)")
    p.add_argument("--planner_noise", type=float, default=None, help="Perturbation scale (default: the checkpoint's)")
    p.add_argument("--planner_score", choices=("critic", "reward", "progress"), default=None,
                   help="The checkpoint's score to rank by (default: the checkpoint's planner_score)")
    p.add_argument("--out_dir", default=None, help="Where episodes and summary.json go (a rerun resumes)")
    p.add_argument("--save_candidates", action="store_true",
                   help="Also write every decision's latent history, candidates and true outcomes to "
                        "<out_dir>/candidates/<task>__<seed>.npz, the training data of lerobot-wm-fit-plan-score")
    args = p.parse_args(argv)
    if args.report is None and None in (args.policy_path, args.tasks, args.out_dir):
        p.error("--policy.path, --tasks and --out_dir are required (or --report DIR to compare finished checks)")
    return args


def main(argv=None) -> int:
    """Console entry point of lerobot-wm-plan-check."""
    os.environ.setdefault("MUJOCO_GL", "egl")  # CPU rendering; must be set before mujoco is imported
    args = parse_args(argv)
    try:
        return _main(args)
    except PlanCheckError as err:
        print(f"lerobot-wm-plan-check: error: {err}", file=sys.stderr)
        return 2


def _main(args) -> int:
    if args.report is not None:
        root = Path(args.report)
        report(root)
        print((root / "report.md").read_text())
        return 0

    import torch
    from tqdm import tqdm

    from .probe import ProbeError, override_planner
    from .record_metaworld import CheckpointActor

    if not (Path(args.policy_path) / "config.json").is_file():
        raise PlanCheckError(f"--policy.path {args.policy_path} has no config.json: give a checkpoint's "
                             "pretrained_model directory.")  # fmt: skip
    if args.episodes < 1 or args.episode_length < 1:
        raise PlanCheckError("--episodes and --episode_length must be >= 1.")
    if args.expert_horizon < 1:
        raise PlanCheckError(f"--expert_horizon must be >= 1, got {args.expert_horizon}.")
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1") or 1))
    actor = CheckpointActor(args.policy_path)
    policy, cfg = actor.policy, actor.policy.config
    if getattr(policy, "world", None) is None or getattr(policy.world, "dynamics", None) is None:
        raise PlanCheckError(f"{args.policy_path} has no action-conditioned world model: the check needs a world_f "
                             "or smolvla_world checkpoint trained with --policy.dynamics=action_conditioned and a head to score with.")  # fmt: skip
    try:
        override_planner(cfg, None, args.planner_score)
        policy.world.score_kind(None)
    except (ProbeError, RuntimeError) as err:
        raise PlanCheckError(str(err)) from None
    # The check is the rerank planner's decision, whatever the checkpoint was saved with. The overrides go
    # into the config, which the planner's settings and smolvla_world's flow samples both read (and
    # smolvla_world keeps a latent history only when something reads it, as the planner does).
    cfg.planner = "rerank"
    if args.planner_samples is not None:
        cfg.planner_samples = args.planner_samples
    if args.planner_noise is not None:
        cfg.planner_noise = args.planner_noise
    settings = cfg.planner_settings()
    try:
        settings.validate()
    except ValueError as err:
        raise PlanCheckError(str(err)) from None
    horizon = getattr(cfg, "planner_horizon", 0) or cfg.future_frames
    stride = getattr(cfg, "future_stride", 1)

    from lerobot.envs.metaworld import MetaworldEnv

    out = Path(args.out_dir)
    (out / "episodes").mkdir(parents=True, exist_ok=True)
    if args.save_candidates:
        (out / "candidates").mkdir(exist_ok=True)
    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
    todo = [(t, args.seed + i) for t in tasks for i in range(args.episodes)]
    bar = tqdm(total=len(todo), desc="episodes", unit="ep", dynamic_ncols=True)
    records = []
    for task in tasks:
        env = None
        for i in range(args.episodes):
            seed = args.seed + i
            path = out / "episodes" / f"{task}__{seed}.json"
            cand_path = out / "candidates" / f"{task}__{seed}.npz" if args.save_candidates else None
            # With --save_candidates an episode is done only once its candidates are written too (they
            # are written first, so a kill between the two files reruns the episode).
            if path.is_file() and cand_path is not None and not cand_path.is_file():
                path.unlink()
            if path.is_file():
                rec = json.loads(path.read_text())
                if (rec.get("pick") != args.pick or rec.get("truth", "reward") != args.truth
                        or rec.get("policy_path") != str(Path(args.policy_path).resolve())):
                    raise PlanCheckError(f"{path} was written by another check (pick, truth or checkpoint differ): "
                                         "give another --out_dir.")  # fmt: skip
            else:
                if env is None:
                    env = MetaworldEnv(task=task, obs_type="pixels_agent_pos")
                t0 = time.time()
                rec = run_episode(actor, env, task, seed, args, settings, horizon, stride, cand_path)
                rec.update(policy_path=str(Path(args.policy_path).resolve()), policy_key=pairing_key(args.policy_path),
                           fit_label=fit_label(args.policy_path), seconds=round(time.time() - t0, 1),
                           planner_samples=settings.samples, planner_noise=settings.noise,
                           planner_score=policy.world.score_kind(None),
                           expert_horizon=args.expert_horizon if args.truth == "expert" else None)  # fmt: skip
                atomic_write_json(path, rec, indent=1)
            records.append(rec)
            bar.update(1)
            bar.set_postfix_str(f"{task} {sum(r['success'] for r in records)}/{len(records)} ok", refresh=False)
        if env is not None:
            env.close()
    bar.close()
    summary = summarise(records)
    summary.update(pick=args.pick, truth=args.truth, policy_path=str(Path(args.policy_path).resolve()), seed=args.seed,
                   planner_samples=settings.samples, planner_noise=settings.noise, horizon=horizon, stride=stride)  # fmt: skip
    atomic_write_json(out / "summary.json", summary, indent=1)
    print(summary_table(summary))
    print(f"Wrote {out / 'summary.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
