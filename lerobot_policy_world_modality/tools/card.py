"""`lerobot-wm-card`: refresh the model card of a saved checkpoint with the results found next to it.

    lerobot-wm-card outputs/world_f/checkpoints/last/pretrained_model \\
        [--probe=outputs/world_f/probe.json] [--eval=outputs/eval/eval_info.json ...] \\
        [--env_type=metaworld --env_task=button-press-v3]

The policy's own save writes the card (`model_card.py`) with what training knows. Probe and evaluation
results come later, from other commands, so this tool adds them: the probe verdict of a
`lerobot-wm-probe --out` JSON and the success rate of each `lerobot-eval` `eval_info.json`, with its
Wilson 95% interval. Without explicit paths it takes the probe JSONs of this checkpoint (their recorded
policy path) in the folder and up to three folders above it, and the eval_info.json files inside the
folder (run `lerobot-eval --output_dir=<folder>/eval_<name>`). It reads files only (no model is built); the training figures
and gate opening are kept from the previous card. Push the refreshed folder with
`huggingface-cli upload <user>/<name> <folder>`.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

# Folders above the checkpoint searched for results (pretrained_model -> <step> -> checkpoints -> run).
SEARCH_DEPTH = 3


def is_probe(d: dict) -> bool:
    """Whether a JSON document is a `lerobot-wm-probe --out` result."""
    return "reads_memory" in d and "action_loss_change_vs_pred" in d


def is_eval_info(d: dict) -> bool:
    """Whether a JSON document is a `lerobot-eval` eval_info.json."""
    return isinstance(d.get("per_task"), list) and "overall" in d


def _same_checkpoint(path: str | None, folder: Path) -> bool:
    """Whether a result's recorded policy path is `folder` (`checkpoints/last` resolves to its step)."""
    return path is not None and Path(path).expanduser().resolve() == folder.resolve()


def find_results(folder: Path) -> tuple[list[Path], list[Path]]:
    """(probe JSONs, eval_info JSONs) that belong to the checkpoint in `folder`.

    Probes: in `folder` and up to SEARCH_DEPTH folders above it, when their recorded `policy_path` is this
    folder (a run directory holds the probes of several checkpoints). Evaluations: `eval_info.json` does
    not record its policy, so only those inside `folder` (or its `eval*/` subfolders) count.
    """
    probes, evals = [], []
    dirs = [folder, *list(folder.resolve().parents)[:SEARCH_DEPTH]]
    for path in [p for d in dirs for p in sorted(d.glob("*.json"))] + sorted(
        folder.glob("eval*/eval_info.json")
    ):
        try:
            doc = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        if not isinstance(doc, dict):
            continue
        if is_probe(doc) and _same_checkpoint(doc.get("policy_path"), folder):
            probes.append(path)
        elif is_eval_info(doc) and folder.resolve() in (path.parent.resolve(), path.parent.parent.resolve()):
            evals.append(path)
    return probes, evals


def eval_rows(path: Path) -> list[dict]:
    """One card row per task of an eval_info.json: successes, episodes, rate, Wilson 95% interval."""
    from .stats import wilson_interval

    rows = []
    for task in json.loads(path.read_text())["per_task"]:
        outcomes = [bool(s) for s in task["metrics"]["successes"]]
        n, k = len(outcomes), sum(outcomes)
        if n:
            rows.append({"source": f"{path.parent.name}/{path.name}",
                         "task": task.get("task_group"), "successes": k, "episodes": n, "rate": k / n,
                         "wilson95": list(wilson_interval(k, n))})  # fmt: skip
    return rows


def collect_results(folder: Path, probe: Path | None, evals: list[Path], env_type, env_task) -> dict:
    """The `results` argument of `build_model_card` from the given or discovered result files."""
    from .report import probe_verdict

    found_probes, found_evals = find_results(folder)
    probe = probe or (found_probes[0] if found_probes else None)
    evals = evals or found_evals
    results: dict = {"evals": [row for p in evals for row in eval_rows(p)]}
    if probe is not None:
        results["probe"] = {"verdict": probe_verdict(json.loads(probe.read_text())), "source": probe.name}
    train_cfg = folder / "train_config.json"
    env = (json.loads(train_cfg.read_text()).get("env") or {}) if train_cfg.is_file() else {}
    results["env"] = {"type": env_type or env.get("type"), "task": env_task or env.get("task"),
                      "n_episodes": max((r["episodes"] for r in results["evals"]), default=None)}  # fmt: skip
    return results


def refresh_card(folder: str | Path, probe=None, evals=(), env_type=None, env_task=None, policy_path=None):
    """Rewrite `folder/README.md` from its config.json, its previous card and the results; returns the card."""
    from ..model_card import build_model_card, read_card_figures

    folder = Path(folder)
    config_file = folder / "config.json"
    if not config_file.is_file():
        raise FileNotFoundError(f"{folder} has no config.json: pass a saved pretrained_model folder.")
    config = json.loads(config_file.read_text())
    previous = read_card_figures(folder)
    results = collect_results(
        folder, Path(probe) if probe else None, [Path(e) for e in evals], env_type, env_task
    )
    card = build_model_card(config, training=previous.get("training"), gate=previous.get("gate_opening"),
                            results=results, policy_path=policy_path)  # fmt: skip
    card.save(str(folder / "README.md"))
    return card


def main(argv: list[str] | None = None) -> int:
    """Console entry point of `lerobot-wm-card`."""
    p = argparse.ArgumentParser(prog="lerobot-wm-card", description=__doc__.split("\n\n")[0])
    p.add_argument("folder", help="A saved pretrained_model folder (written by lerobot-train).")
    p.add_argument(
        "--probe", default=None, help="A lerobot-wm-probe --out JSON (default: found next to the folder)."
    )
    p.add_argument("--eval", action="append", default=[], help="A lerobot-eval eval_info.json (repeatable).")
    p.add_argument("--env_type", default=None, help="--env.type of the evaluation command shown on the card.")
    p.add_argument("--env_task", default=None, help="--env.task of the evaluation command shown on the card.")
    p.add_argument(
        "--policy_path", default=None, help="--policy.path shown on the card (default: its repo_id)."
    )
    args = p.parse_args(argv)
    try:
        refresh_card(args.folder, args.probe, args.eval, args.env_type, args.env_task, args.policy_path)
    except FileNotFoundError as err:
        print(f"lerobot-wm-card: {err}", file=sys.stderr)
        return 2
    print(f"wrote {Path(args.folder) / 'README.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
