"""`lerobot-wm-probe`: does a trained policy read its world memory, and would a better Prophet help?

    lerobot-wm-probe --policy.path=outputs/world_f/checkpoints/last/pretrained_model \
        --dataset.root=<training view or dataset> [--batches=8 --batch_size=32 --out=probe.json]

Reloads the checkpoint exactly as lerobot-eval does and computes its action loss on the same fixed
frames of the dataset (eval mode, same random draws) once per memory the action path can be given:
`pred` (what it reads at rollout), `zero`, `shuffle` (another sample's memory), `random` (noise at the
prediction's scale) and `oracle` (the true future latents). If replacing the prediction by zeros or by
another sample's memory leaves the action loss where it was, the action path ignores the world memory,
whatever the world loss says; if the true future lowers it, a better Prophet would help. The report
also gives the gate opening tanh(gate), the attention entropy over the K memory slots and the world
cosine per horizon, and prints the `lerobot-eval` commands that measure the same question in the
simulator (success with `--policy.memory_mode_rollout=pred` vs `zero`).

Works for policies that inject a world memory (`world_f` variant F, `smolvla_world`).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

ABLATIONS = ("zero", "shuffle", "random")
DEFAULT_MODES = ("pred", *ABLATIONS, "oracle")


class ProbeError(ValueError):
    """A checkpoint or setting the probe cannot work with; the message says what to do instead."""


def check_probe_target(cfg) -> None:
    """Refuse checkpoints without an injected world memory (nothing to probe), naming what to do instead."""
    if not hasattr(cfg, "inject_memory") or not hasattr(cfg, "memory_mode_train"):
        raise ProbeError(
            f"A '{cfg.type}' checkpoint has no injected world memory to probe. The probe runs on world_f "
            "(variant F) and smolvla_world; for world_token_c compare a variant C checkpoint with a variant B "
            "one under lerobot-eval instead."
        )
    if not cfg.inject_memory:
        raise ProbeError(
            f"This {cfg.type} checkpoint was trained without memory injection (variant A or B_cont): its "
            "actions never read the world memory. Probe a variant F checkpoint, or compare F against this "
            "one under lerobot-eval."
        )


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
        "frames": sum(len(b["index"]) for b in batches),
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
    }
    result["summary"] = summarise(result)
    return result


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
            lines.append(
                f"The action path ignores the world memory: '{worst}' memory changes the action loss by only "
                f"{100 * ablated[worst]:+.2f}% (threshold {100 * r['threshold']:.1f}%). The gate opening is "
                f"{r['gate']:.2g}: train longer, or give the gate more room (e.g. --policy.gate_init)."
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
    if r["attn_entropy"] is not None:
        lines.append(
            f"Attention over the memory slots: entropy {r['attn_entropy']:.3f} nats (uniform: "
            f"{r['attn_entropy_uniform']:.3f})."
        )
    return lines


def eval_commands(policy_path: str) -> list[str]:
    """The lerobot-eval pair that measures the same question as success rates in the simulator."""
    return [
        f"lerobot-eval --policy.path={policy_path} --policy.memory_mode_rollout={mode} <your --env.* and --eval.* flags>"
        for mode in ("pred", "zero")
    ]


def print_report(r: dict, policy_path: str) -> None:
    """The probe's table and findings on stdout."""
    print(f"\nworld-memory probe of {policy_path} ({r['policy_type']}, {r['frames']} frames)\n")
    print(f"  {'memory':10s} {'action loss':>12s} {'vs pred':>9s}")
    for mode, loss in r["action_loss"].items():
        delta = "" if mode == "pred" else f"{100 * r['action_loss_change_vs_pred'][mode]:+8.2f}%"
        print(f"  {mode:10s} {loss:12.5f} {delta:>9s}")
    cos = "  ".join(f"{k[len('world_cos_'):]} {v:.3f}" for k, v in r["world_cosine"].items())
    if cos:
        print(f"\n  world cosine (Prophet vs true future): {cos}")
    if r["gate"] is not None:
        print(f"  gate tanh(gate): {r['gate']:.4g}" + (f" (max |.| {r['gate_abs_max']:.4g})" if r["gate_abs_max"] else ""))
    print()
    for line in r["summary"]:
        print(f"- {line}")
    print("\nSuccess in the simulator with and without the memory (same seeds):")
    for cmd in eval_commands(policy_path):
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
    p.add_argument("--batches", type=int, default=8, help="Number of fixed batches (default 8).")
    p.add_argument("--batch_size", type=int, default=32, help="Frames per batch (default 32).")
    p.add_argument("--seed", type=int, default=0, help="Seed of the frame draw and of every random draw (default 0).")
    p.add_argument("--modes", default=",".join(DEFAULT_MODES),
                   help=f"Comma-separated memories to compare (default {','.join(DEFAULT_MODES)}; 'pred' is required).")
    p.add_argument("--threshold", type=float, default=0.01,
                   help="Relative action-loss change (zero / shuffle vs pred, either way) that counts as reading the memory (default 0.01).")
    p.add_argument("--video_backend", default="pyav", help="Video decoder when probing on a video dataset (default pyav).")
    p.add_argument("--out", default=None, help="Also write the result as JSON here (atomically).")
    return p.parse_args(argv)


def main(argv=None) -> None:
    """Console entry point of lerobot-wm-probe."""
    from ..checkpoints import CheckpointMismatchError
    from ..latents.cache import atomic_write_bytes
    from ..world.memory import MEMORY_MODES
    from .report import fixed_batches, load_checkpoint

    args = parse_args(argv)
    modes = tuple(m.strip() for m in args.modes.split(",") if m.strip())
    unknown = [m for m in modes if m not in MEMORY_MODES or m == "scheduled"]
    if unknown:
        raise SystemExit(f"Unknown memory mode(s) {unknown} in --modes; use some of {DEFAULT_MODES}.")
    if args.batches < 1 or args.batch_size < 1:
        raise SystemExit("--batches and --batch_size must be >= 1.")
    try:
        cfg, policy, pre = load_checkpoint(args.policy_path)
        check_probe_target(cfg)
        batches = fixed_batches(cfg, args.root, args.batches, args.batch_size, args.repo_id, args.seed, args.video_backend)
        result = probe(policy, pre, batches, modes, args.seed, args.threshold)
    except (ProbeError, FileNotFoundError, CheckpointMismatchError) as err:
        raise SystemExit(f"lerobot-wm-probe: {err}") from None
    result["policy_path"] = str(args.policy_path)
    result["eval_commands"] = eval_commands(str(args.policy_path))
    print_report(result, str(args.policy_path))
    if args.out:
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(out, (json.dumps(result, indent=2) + "\n").encode())
        print(f"\nwrote {out}")


if __name__ == "__main__":
    main(sys.argv[1:])
