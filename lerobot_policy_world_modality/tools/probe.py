"""`lerobot-wm-probe`: does a trained policy read its world memory, and would a better Prophet help?

    lerobot-wm-probe --policy.path=outputs/world_f/checkpoints/last/pretrained_model \
        --dataset.root=<training view or dataset> [--episodes=40:50] [--batches=8 --batch_size=32 --out=probe.json]

Reloads the checkpoint exactly as lerobot-eval does and computes its action loss on the same fixed
frames of held-out episodes (eval mode, same random draws) once per memory the action path can be given:
`pred` (what it reads at rollout), `zero`, `shuffle` (another sample's memory), `random` (noise at the
prediction's scale) and `oracle` (the true future latents). If replacing the prediction by zeros or by
another sample's memory leaves the action loss where it was, the action path ignores the world memory,
whatever the world loss says; if the true future lowers it, a better Prophet would help. The report
also gives the gate opening tanh(gate), the attention entropy over the K memory slots and the world
cosine per horizon, and prints the `lerobot-eval` commands that measure the same question in the
simulator (success with `--policy.memory_mode_rollout=pred` vs `zero`).

Episodes: by default the probe reads the episodes the checkpoint was NOT trained on (those missing
from its `train_config.json`'s `dataset.episodes`); a checkpoint trained on every episode is probed on
training frames, and the report says so (`held_out: false`). `--episodes` picks them explicitly.

The oracle row is off-distribution for a model trained on its own predictions (memory_mode_train
pred): its action path never saw the true future, so the oracle row bounds what a better Prophet could
give only loosely. On world_f's in-trunk path (`world_path=in_trunk`) `zero` blocks the action
queries' attention to the foresight tokens and `shuffle` / `random` replace the foresight states they
read (see `world/foresight.py`); it has no oracle row (its foresight states are not latents).

Works for policies that inject a world memory (`world_f` variant F on either path, `smolvla_world`).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import sys
from pathlib import Path

ABLATIONS = ("zero", "shuffle", "random")
DEFAULT_MODES = ("pred", *ABLATIONS, "oracle")
# Training memories under which the action path has seen the true future.
ORACLE_TRAINED = ("oracle", "scheduled")


class ProbeError(ValueError):
    """A checkpoint or setting the probe cannot work with; the message says what to do instead."""


def has_world_model_only(cfg) -> bool:
    """Whether the checkpoint has an action-conditioned world model but no injected memory (e.g. A + dynamics)."""
    return getattr(cfg, "dynamics", "none") == "action_conditioned" and not getattr(cfg, "inject_memory", False)


def check_probe_target(cfg) -> None:
    """Refuse checkpoints with neither an injected world memory nor a world model, naming what to do instead.

    A checkpoint with only an action-conditioned world model (`has_world_model_only`) is accepted: the
    probe then reports that model's prediction against the copy baseline, and no memory verdict.
    """
    if has_world_model_only(cfg):
        return
    if not hasattr(cfg, "inject_memory") or not hasattr(cfg, "memory_mode_train"):
        raise ProbeError(
            f"A '{cfg.type}' checkpoint has no injected world memory to probe. The probe runs on world_f "
            "(variant F) and smolvla_world; for world_token_c compare a variant C checkpoint with a variant B "
            "one under lerobot-eval instead."
        )
    if not cfg.inject_memory:
        raise ProbeError(
            f"This {cfg.type} checkpoint was trained without memory injection (variant A or B_cont) or as "
            "the A_hist control: its actions never read a world memory. Probe a variant F checkpoint, and "
            "compare F's success against this one under lerobot-eval (A_hist is the control for F's "
            "history, B_cont for its world loss alone). With --policy.dynamics=action_conditioned the probe "
            "reports the world model's prediction instead."
        )


def in_trunk(cfg) -> bool:
    """Whether the checkpoint reads its foresight inside the trunk (world_f world_path=in_trunk)."""
    return getattr(cfg, "world_path", "cross_attn") == "in_trunk"


def parse_episodes(text: str, total: int) -> list[int]:
    """'40:50' (start:stop, either side optional), '1,3,5' or 'all' -> sorted episode indices < total."""
    text = text.strip()
    try:
        if text == "all":
            chosen = list(range(total))
        elif ":" in text:
            start, stop = text.split(":", 1)
            chosen = list(range(int(start or 0), int(stop) if stop else total))
        else:
            chosen = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise ProbeError(f"--episodes='{text}' is not a range (40:50), a list (1,3,5) or 'all'.") from None
    bad = [e for e in chosen if not 0 <= e < total]
    if bad or not chosen:
        raise ProbeError(f"--episodes='{text}' names no episode or episodes outside 0..{total - 1}: {bad[:5]}.")
    return sorted(set(chosen))


def trained_episodes(policy_path) -> list[int] | None:
    """The `dataset.episodes` of the checkpoint's train_config.json (None: all episodes, or unknown)."""
    path = Path(policy_path) / "train_config.json"
    if not path.exists():
        return None
    return (json.loads(path.read_text()).get("dataset") or {}).get("episodes")


def choose_episodes(policy_path, total: int, text: str | None) -> tuple[list[int] | None, bool, str]:
    """(episodes to probe or None for all, held_out, one line saying which frames these are)."""
    trained = trained_episodes(policy_path)
    if text is not None:
        episodes = parse_episodes(text, total)
        if trained is None:
            return episodes, False, (
                f"episodes {text}: the checkpoint records no episode subset (trained on all episodes, or no "
                "train_config.json), so these are training frames unless --dataset.root is another dataset"
            )
        overlap = sorted(set(episodes) & set(trained))
        held_out = not overlap
        note = f"episodes {text}" + (
            " (held out from training)" if held_out else f": {len(overlap)} of them were trained on"
        )
        return episodes, held_out, note
    if trained is None:
        return None, False, (
            "TRAINING FRAMES: the checkpoint was trained on every episode of the dataset, so these frames are "
            "not held out; train with --dataset.episodes to keep some back, or probe another dataset"
        )
    held = [e for e in range(total) if e not in set(trained)]
    if not held:
        return None, False, "TRAINING FRAMES: the checkpoint's dataset.episodes covers every episode of this dataset"
    return held, True, f"held-out episodes {held[0]}..{held[-1]} ({len(held)} episodes not in dataset.episodes)"


def probe(
    policy, pre, batches: list[dict], modes: tuple[str, ...] = DEFAULT_MODES, seed: int = 0, threshold: float = 0.01
) -> dict:
    """Action loss of `policy` on `batches` under each memory mode, and what it says.

    Every mode sees the same frames and, through `seed`, the same random draws; only the memory the
    action path reads changes. `threshold` is the relative change of the action loss (zero or shuffled
    memory vs predicted, either way) from which the policy counts as reading its memory.
    """
    from .report import mean_forward_scalars

    if "pred" not in modes:
        raise ProbeError("--modes must include 'pred' (the rollout memory every other mode is compared with).")
    if "shuffle" in modes and min(len(b["index"]) for b in batches) < 2:
        raise ProbeError("The shuffle memory needs batches of at least 2 frames: raise --batch_size.")
    cfg = policy.config
    if "oracle" in modes and in_trunk(cfg):
        raise ProbeError(
            "The in-trunk path has no oracle memory (its foresight states are trunk hidden states, not latents): "
            "drop 'oracle' from --modes, or probe a cross_attn checkpoint for the oracle bound."
        )
    saved_mode = cfg.memory_mode_train
    per_mode: dict[str, dict] = {}
    try:
        for mode in modes:
            cfg.memory_mode_train = mode  # eval-mode forward reads the training mode's memory
            per_mode[mode] = mean_forward_scalars(policy, pre, batches, seed=seed)
    finally:
        cfg.memory_mode_train = saved_mode
    base = per_mode["pred"]["action_loss"]
    rel = {m: (per_mode[m]["action_loss"] - base) / max(abs(base), 1e-12) for m in modes if m != "pred"}
    ablated = [rel[m] for m in ("zero", "shuffle") if m in rel]
    pred = per_mode["pred"]
    result = {
        "policy_type": cfg.type,
        "world_path": getattr(cfg, "world_path", "cross_attn"),
        "frames": sum(len(b["index"]) for b in batches),
        "oracle_off_distribution": saved_mode not in ORACLE_TRAINED,
        "action_loss": {m: per_mode[m]["action_loss"] for m in modes},
        "action_loss_change_vs_pred": rel,
        "reads_memory": bool(ablated) and max(abs(x) for x in ablated) >= threshold,
        "threshold": threshold,
        "gate": pred.get("gate"),
        "gate_abs_max": pred.get("gate_abs_max"),
        "attn_entropy": pred.get("attn_entropy"),
        "attn_entropy_uniform": math.log(cfg.future_frames),
        "memory_norm": pred.get("memory_norm"),
        "world_cosine": {k: v for k, v in pred.items() if k.startswith("world_cos_h")},
        # What the world cosine has to beat (copying z_t), and whether the predicted change points the right way.
        "world_copy_cosine": {k: v for k, v in pred.items() if k.startswith("world_copy_cos_h")},
        "world_motion_cosine": {k: v for k, v in pred.items() if k.startswith("world_motion_cos_h")},
        # The action-conditioned world model (--policy.dynamics), on the same frames and their true actions.
        "dynamics_cosine": {k: v for k, v in pred.items() if k.startswith("dyn_cos_h")},
        "dynamics_motion_cosine": {k: v for k, v in pred.items() if k.startswith("dyn_motion_cos_h")},
    }
    result["summary"] = summarise(result)
    return result


def planning_check(policy, pre, batches: list[dict], seed: int = 0) -> dict | None:
    """Can the planner's score tell a good chunk from a bad one? None without a world model and a head to
    score with (goal images are not in the probe's frames); `score` names the one the planner uses
    (`WorldPath.score_kind`).

    On each frame the dataset's own chunk (the demonstrator's) competes with `planner_samples` - 1
    perturbations of it at `planner_noise` (`world.planner.reference_rank`): the fraction of them it
    outscores (0.5 = the score cannot tell them apart) and how often it is the best (chance 1 / N); and
    how often it lies between the scores of mirrored perturbations chunk +/- eps
    (`world.planner.mirrored_slope`: near 1 when the score is a slope through the chunk, near 0 at a peak);
    and whether the configured planner (rerank when none is set), started from the chunk knocked off by
    `planner_noise`, moves back toward it (`world.planner.toward_reference`: below 1 it corrects, about 2
    is a random pick).
    Also the Spearman correlation of the progress head's remaining fraction with the true one (and of the
    reward head's reward with the dataset's `next.reward`), and
    whether the world model reads the actions at all: its loss with each frame's own chunk against
    another frame's chunk (a world model that ignores them cannot rank chunks, however good its cosine).
    """
    import torch
    from scipy.stats import spearmanr

    from ..constants import NEXT_REWARD, OBS_WORLD_LATENT, OBS_WORLD_REMAINING
    from ..world.memory import derangement, world_loss
    from ..world.planner import mirrored_slope, reference_rank, toward_reference

    world, cfg = getattr(policy, "world", None), policy.config
    if world is None or getattr(world, "dynamics", None) is None:
        return None
    progress, reward_head = getattr(world, "progress", None), getattr(world, "reward", None)
    try:
        kind = world.score_kind(None)
    except RuntimeError:  # no head to score with, or planner_score="goal" (the probe's frames carry no goal)
        return None
    settings = cfg.planner_settings()
    if settings.kind == "none":
        settings = dataclasses.replace(settings, kind="rerank")
    span = world.dynamics.action_len
    horizon = getattr(cfg, "planner_horizon", 0) or cfg.future_frames
    generator = torch.Generator().manual_seed(seed)
    # Its own stream, so adding this check left the draws (and figures) of the others unchanged.
    mirror_gen = torch.Generator().manual_seed(seed + 1)
    toward_gen = torch.Generator().manual_seed(seed + 2)
    beats, best, slope, toward, predicted, remaining, own, other = [], [], [], [], [], [], [], []
    predicted_reward, true_reward = [], []
    with torch.no_grad():
        for batch in batches:
            b = pre(dict(batch))
            history, targets, valid = world.training_inputs(b)
            swap = derangement(len(history), generator)
            own.append(float(world_loss(world.imagine(history, b["action"]), targets, valid, world.loss_type)))
            other.append(float(world_loss(world.imagine(history, b["action"][swap]), targets, valid, world.loss_type)))
            def score(chunks, h=history):
                return world.score_chunks(h, chunks, None, horizon)

            rank, top = reference_rank(b["action"], score, cfg.planner_samples, cfg.planner_noise, generator)
            beats.append(rank)
            best.append(top.float())
            pairs = max(1, (cfg.planner_samples - 1) // 2)
            slope.append(mirrored_slope(b["action"], score, pairs, cfg.planner_noise, mirror_gen))
            toward.append(toward_reference(b["action"], score, settings, cfg.planner_noise, span, toward_gen))
            if progress is not None and OBS_WORLD_REMAINING in b:
                predicted.append(torch.sigmoid(world.progress(b[OBS_WORLD_LATENT])).flatten())
                remaining.append(b[OBS_WORLD_REMAINING].float().flatten())
            if reward_head is not None and NEXT_REWARD in b:
                predicted_reward.append(reward_head(b[OBS_WORLD_LATENT]).float().flatten())
                true_reward.append(b[NEXT_REWARD].float().flatten())
    out = {
        "score": kind,
        "planner": settings.kind,
        "planner_samples": cfg.planner_samples,
        "planner_noise": cfg.planner_noise,
        "planner_horizon": horizon,
        "expert_beats_perturbations": float(torch.cat(beats).mean()),
        "expert_is_best": float(torch.cat(best).mean()),
        "expert_is_best_chance": 1.0 / cfg.planner_samples,
        "expert_between_mirrored": float(torch.cat(slope).mean()),
        # Median, not mean: a ratio of two squared distances has a long upper tail.
        "planned_distance_ratio": float(torch.cat(toward).median()),
        "progress_spearman": None,
        "reward_spearman": None,
        "dynamics_loss": sum(own) / len(own),
        "dynamics_loss_other_actions": sum(other) / len(other),
    }
    out["dynamics_action_sensitivity"] = (out["dynamics_loss_other_actions"] - out["dynamics_loss"]) / max(
        abs(out["dynamics_loss"]), 1e-12
    )
    if predicted:
        rho = spearmanr(torch.cat(predicted).numpy(), torch.cat(remaining).numpy()).statistic
        out["progress_spearman"] = None if math.isnan(rho) else float(rho)
    if predicted_reward:
        rho = spearmanr(torch.cat(predicted_reward).numpy(), torch.cat(true_reward).numpy()).statistic
        out["reward_spearman"] = None if math.isnan(rho) else float(rho)
    return out


def planning_summary(check: dict) -> str:
    """One plain-language line on `planning_check`."""
    line = (
        f"The planner's score ({check.get('score', 'progress')}) prefers the dataset's chunk to its {check['planner_samples'] - 1} perturbations "
        f"(noise {check['planner_noise']:g}) in {100 * check['expert_beats_perturbations']:.1f}% of pairs "
        f"(50% = it cannot tell them apart) and ranks it best in {100 * check['expert_is_best']:.1f}% of "
        f"frames (chance {100 * check['expert_is_best_chance']:.1f}%)."
    )
    if check.get("expert_between_mirrored") is not None:
        line += (
            f" Between the scores of mirrored perturbations (chunk +/- noise) in "
            f"{100 * check['expert_between_mirrored']:.1f}% of pairs (near 100%: the score is a slope through "
            "the chunk, not a peak at it, so planning pushes the actions along it)."
        )
    if check.get("planned_distance_ratio") is not None:
        line += (
            f" {check.get('planner', 'rerank')} from the chunk knocked off by the noise ends "
            f"{check['planned_distance_ratio']:.2f}x as far from it as the knocked-off proposal (median; below 1 "
            "planning corrects, about 2 is a random pick)."
        )
    if check.get("reward_spearman") is not None:
        line += f" Reward head vs the step's true reward: Spearman {check['reward_spearman']:.2f}."
    if check.get("progress_spearman") is not None:
        line += f" Progress head vs true remaining fraction: Spearman {check['progress_spearman']:.2f}."
    line += (
        f" Another frame's actions raise the world model's loss by {100 * check['dynamics_action_sensitivity']:+.1f}%"
        + (" (it barely reads the actions)." if check["dynamics_action_sensitivity"] < 0.05 else ".")
    )
    return line


def summarise(r: dict) -> list[str]:
    """Plain-language reading of a probe result, one finding per line."""
    lines = []
    change = r["action_loss_change_vs_pred"]
    ablated = {m: change[m] for m in ("zero", "shuffle") if m in change}
    if ablated:
        worst = max(ablated, key=lambda m: abs(ablated[m]))
        if r["reads_memory"] and ablated[worst] > 0:
            lines.append(
                f"The action path reads the world memory: with '{worst}' memory the action loss rises by "
                f"{100 * ablated[worst]:.1f}% (threshold {100 * r['threshold']:.1f}%)."
            )
        elif r["reads_memory"]:
            lines.append(
                f"The action path reads the world memory, and does better without it: with '{worst}' memory "
                f"the action loss falls by {100 * -ablated[worst]:.1f}% (threshold {100 * r['threshold']:.1f}%)."
            )
        else:
            advice = (
                f"The gate opening is {r['gate']:.2g}: train longer, or give the gate more room (e.g. --policy.gate_init)."
                if r.get("gate") is not None
                else "Train longer, or on a task whose actions depend on what comes next."
            )
            lines.append(
                f"The action path ignores the world memory: '{worst}' memory changes the action loss by only "
                f"{100 * ablated[worst]:+.2f}% (threshold {100 * r['threshold']:.1f}%). {advice}"
            )
    if "oracle" in change:
        gain = -change["oracle"]
        if gain >= r["threshold"]:
            lines.append(
                f"With the true future as memory the action loss is {100 * gain:.1f}% lower: a better Prophet "
                "would help the actions."
            )
        else:
            lines.append(
                f"The true future as memory changes the action loss by {100 * -gain:+.2f}%: the prediction already "
                "carries what the action path uses (or the action path does not use the memory)."
            )
        if r.get("oracle_off_distribution", True):
            lines.append(
                "The oracle row is OFF-DISTRIBUTION: this model was trained on its own predictions and never saw "
                "the true future as memory, so its oracle loss mixes 'a better Prophet' with 'an input it never met'."
            )
    copy = r.get("world_copy_cosine", {})
    horizons = [(k[len("dyn_cos_"):], v) for k, v in r.get("dynamics_cosine", {}).items()]
    pairs = [(h, v, copy[f"world_copy_cos_{h}"]) for h, v in horizons if f"world_copy_cos_{h}" in copy]
    if pairs:
        beats = [h for h, v, c in pairs if v > c]
        lines.append(
            "The action-conditioned world model beats copying z_t at "
            + (f"{len(beats)} of {len(pairs)} horizons ({', '.join(beats)})" if beats else "no horizon")
            + ": " + ", ".join(f"{h} {v:.4f} vs {c:.4f}" for h, v, c in pairs) + "."
        )
    if r["attn_entropy"] is not None:
        lines.append(
            f"Attention over the memory slots: entropy {r['attn_entropy']:.3f} nats (uniform: "
            f"{r['attn_entropy_uniform']:.3f})."
        )
    return lines


def eval_commands(policy_path: str, world_model_only: bool = False) -> list[str]:
    """The lerobot-eval pair that measures the same question as success rates in the simulator.

    With a memory: pred vs zero memory. With only a world model: planning off vs on (it is used only there).
    """
    flag, values = ("planner", ("none", "cem")) if world_model_only else ("memory_mode_rollout", ("pred", "zero"))
    return [
        f"lerobot-eval --policy.path={policy_path} --policy.{flag}={v} <your --env.* and --eval.* flags>"
        for v in values
    ]


def print_report(r: dict, policy_path: str) -> None:
    """The probe's table and findings on stdout."""
    print(f"\nworld-memory probe of {policy_path} ({r['policy_type']}, {r['world_path']}, {r['frames']} frames)")
    print(f"frames from: {r['episodes_note']}\n")
    print(f"  {'memory':10s} {'action loss':>12s} {'vs pred':>9s}")
    for mode, loss in r["action_loss"].items():
        delta = "" if mode == "pred" else f"{100 * r['action_loss_change_vs_pred'][mode]:+8.2f}%"
        label = "  (off-distribution)" if mode == "oracle" and r["oracle_off_distribution"] else ""
        print(f"  {mode:10s} {loss:12.5f} {delta:>9s}{label}")
    cos = "  ".join(f"{k[len('world_cos_'):]} {v:.3f}" for k, v in r["world_cosine"].items())
    if cos:
        print(f"\n  world cosine (Prophet vs true future): {cos}")
    for key, label in (("world_copy_cosine", "copy baseline (z_t vs true future)"),
                       ("world_motion_cosine", "motion cosine (predicted vs true change)"),
                       ("dynamics_cosine", "world model (action-conditioned) vs true future"),
                       ("dynamics_motion_cosine", "world model motion cosine")):  # fmt: skip
        vals = "  ".join(f"{k.rsplit('_', 1)[1]} {v:.3f}" for k, v in r.get(key, {}).items())
        if vals:
            print(f"  {label}: {vals}")
    if r["gate"] is not None:
        print(f"  gate tanh(gate): {r['gate']:.4g}" + (f" (max |.| {r['gate_abs_max']:.4g})" if r["gate_abs_max"] else ""))
    print()
    for line in r["summary"]:
        print(f"- {line}")
    what = "planning" if r.get("world_model_only") else "the memory"
    print(f"\nSuccess in the simulator with and without {what} (same seeds):")
    for cmd in eval_commands(policy_path, bool(r.get("world_model_only"))):
        print(f"  {cmd}")


def parse_args(argv=None) -> argparse.Namespace:
    """Command-line options."""
    p = argparse.ArgumentParser(prog="lerobot-wm-probe", description=__doc__.splitlines()[0])
    p.add_argument("--policy.path", dest="policy_path", required=True,
                   help="A checkpoint folder written by lerobot-train (<output_dir>/checkpoints/<step>/pretrained_model).")
    p.add_argument("--dataset.root", dest="root", required=True,
                   help="The dataset to probe on: its latent-only training view (no video decoding) or the dataset itself.")
    p.add_argument("--dataset.repo_id", dest="repo_id", default=None,
                   help="Dataset repo id (default: the one recorded in the checkpoint's config).")
    p.add_argument("--episodes", default=None,
                   help="Episodes to probe: a range (40:50), a list (1,3,5) or 'all' (default: the episodes the "
                        "checkpoint's train_config.json did not train on; all of them, flagged, if it trained on all).")
    p.add_argument("--batches", type=int, default=8, help="Number of fixed batches (default 8).")
    p.add_argument("--batch_size", type=int, default=32, help="Frames per batch (default 32).")
    p.add_argument("--seed", type=int, default=0, help="Seed of the frame draw and of every random draw (default 0).")
    p.add_argument("--modes", default=None,
                   help=f"Comma-separated memories to compare (default {','.join(DEFAULT_MODES)}, without oracle on the "
                        "in-trunk path; 'pred' is required).")
    p.add_argument("--threshold", type=float, default=0.01,
                   help="Relative action-loss change (zero / shuffle vs pred, either way) that counts as reading the memory (default 0.01).")
    p.add_argument("--video_backend", default="pyav", help="Video decoder when probing on a video dataset (default pyav).")
    p.add_argument("--planner", choices=("rerank", "cem"), default=None,
                   help="Planner of the planning check (default: the checkpoint's own, rerank when it has none).")
    p.add_argument("--planner_score", choices=("critic", "reward", "progress"), default=None,
                   help="Score of the planning check (default: the checkpoint's planner_score, see docs/planning.md).")
    p.add_argument("--out", default=None, help="Also write the result as JSON here (atomically).")
    return p.parse_args(argv)


def override_planner(cfg, planner: str | None, score: str | None) -> None:
    """Point the planning check at another planner or score than the checkpoint's (rollout-time fields,
    so the same weights); raises ProbeError, naming the flag, when the checkpoint cannot plan that way."""
    if planner is None and score is None:
        return
    if getattr(cfg, "dynamics", "none") == "none":
        raise ProbeError("--planner / --planner_score need a checkpoint trained with --policy.dynamics=action_conditioned.")
    if planner is not None:
        cfg.planner = planner
    if score is not None:
        cfg.planner_score = score
    try:
        cfg.validate_dynamics()
    except ValueError as err:
        raise ProbeError(f"{err} (from --planner / --planner_score)") from None


def main(argv=None) -> None:
    """Console entry point of lerobot-wm-probe."""
    from ..checkpoints import CheckpointMismatchError
    from ..fileio import atomic_write_bytes
    from ..world.memory import MEMORY_MODES
    from .report import fixed_batches, load_checkpoint

    args = parse_args(argv)
    modes = tuple(m.strip() for m in (args.modes or ",".join(DEFAULT_MODES)).split(",") if m.strip())
    unknown = [m for m in modes if m not in MEMORY_MODES or m == "scheduled"]
    if unknown:
        raise SystemExit(f"Unknown memory mode(s) {unknown} in --modes; use some of {DEFAULT_MODES}.")
    if args.batches < 1 or args.batch_size < 1:
        raise SystemExit("--batches and --batch_size must be >= 1.")
    try:
        cfg, policy, pre = load_checkpoint(args.policy_path)
        check_probe_target(cfg)
        override_planner(policy.config, args.planner, args.planner_score)
        world_model_only = has_world_model_only(cfg)
        if world_model_only:  # no memory to intervene on: the frames' forward pass gives the world model's scalars
            modes = ("pred",)
        if args.modes is None and in_trunk(cfg):
            modes = tuple(m for m in modes if m != "oracle")
        from lerobot.datasets.lerobot_dataset import LeRobotDatasetMetadata

        repo_id = args.repo_id or getattr(cfg, "dataset_repo_id", None) or "local/dataset"
        total = LeRobotDatasetMetadata(repo_id, root=args.root).total_episodes
        episodes, held_out, note = choose_episodes(args.policy_path, total, args.episodes)
        batches = fixed_batches(
            cfg, args.root, args.batches, args.batch_size, args.repo_id, args.seed, args.video_backend, episodes
        )
        result = probe(policy, pre, batches, modes, args.seed, args.threshold)
    except (ProbeError, FileNotFoundError, CheckpointMismatchError) as err:
        raise SystemExit(f"lerobot-wm-probe: {err}") from None
    if world_model_only:
        result.update(world_model_only=True, reads_memory=None)
        result["summary"].insert(0, "No world memory: the actions read none. Only the action-conditioned world "
                                    "model is reported; it acts only through the planner.")
    check = planning_check(policy, pre, batches, args.seed)
    if check is not None:
        result["planning"] = check
        result["summary"].append(planning_summary(check))
    result.update(held_out=held_out, episodes=episodes, episodes_note=note)
    if not held_out:
        result["summary"].insert(0, f"Not held out: {note}. A memory effect here may be memorisation.")
    result["policy_path"] = str(args.policy_path)
    result["eval_commands"] = eval_commands(str(args.policy_path), world_model_only)
    print_report(result, str(args.policy_path))
    if args.out:
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(out, (json.dumps(result, indent=2) + "\n").encode())
        print(f"\nwrote {out}")


if __name__ == "__main__":
    main(sys.argv[1:])
