"""Checkpoint metrics and the demo's one-page report (HTML with inline PNG charts from `plots`, plus JSON).

`checkpoint_metrics` is the reusable piece (built from `load_checkpoint`, `fixed_batches` and
`mean_forward_scalars`, which `lerobot-wm-probe` uses too): it reloads a saved policy and its
preprocessor from a checkpoint directory exactly as `lerobot-eval` does, runs `policy.forward` in eval
mode on a few fixed batches of a LeRobotDataset (with the policy's own delta timestamps), and returns
the averaged scalars the policy logs (action loss, world loss, world cosine per horizon, tanh(gate),
...). lerobot-train's console log only prints the total loss, so the report's training curves come
from here.

The charts come from `plots` (matplotlib), embedded in the page as base64 PNG.
"""

from __future__ import annotations

import html
import json
import math
import re
from pathlib import Path

from .plots import bar_chart, line_chart


# ---------------------------------------------------------------------------------------------- metrics
def load_checkpoint(ckpt_dir: str | Path):
    """(config, policy in eval mode, preprocessor) of a saved `pretrained_model` folder, as lerobot-eval loads them."""
    from lerobot.configs.policies import PreTrainedConfig
    from lerobot.policies.factory import get_policy_class
    from lerobot.processor import PolicyProcessorPipeline
    from lerobot.utils.constants import POLICY_PREPROCESSOR_DEFAULT_NAME

    import lerobot_policy_world_modality  # noqa: F401  (registers the policy types)

    ckpt_dir = Path(ckpt_dir)
    if not (ckpt_dir / "config.json").exists():
        raise FileNotFoundError(
            f"{ckpt_dir} is not a policy checkpoint (no config.json): pass a "
            "'<output_dir>/checkpoints/<step>/pretrained_model' folder written by lerobot-train."
        )
    cfg = PreTrainedConfig.from_pretrained(ckpt_dir)
    policy = get_policy_class(cfg.type).from_pretrained(ckpt_dir, config=cfg)
    policy.eval()
    pre = PolicyProcessorPipeline.from_pretrained(
        ckpt_dir, config_filename=f"{POLICY_PREPROCESSOR_DEFAULT_NAME}.json"
    )
    return cfg, policy, pre


def fixed_batches(
    cfg,
    dataset_root: str | Path,
    n_batches: int,
    batch_size: int,
    repo_id: str | None = None,
    seed: int = 0,
    video_backend: str = "pyav",
    episodes: list[int] | None = None,
) -> list[dict]:
    """`n_batches` collated batches of `batch_size` frames of the dataset, drawn with a fixed seed.

    Frames come with the policy's own delta timestamps (history, future, action chunk), so the same
    seed gives the same frames to every checkpoint and every probe setting. `episodes`: draw only from
    these episodes (default: all).
    """
    import torch
    from lerobot.datasets.factory import resolve_delta_timestamps
    from lerobot.datasets.lerobot_dataset import LeRobotDataset, LeRobotDatasetMetadata

    repo_id = repo_id or getattr(cfg, "dataset_repo_id", None) or "local/dataset"
    meta = LeRobotDatasetMetadata(repo_id, root=dataset_root)
    dataset = LeRobotDataset(
        repo_id, root=dataset_root, episodes=episodes, delta_timestamps=resolve_delta_timestamps(cfg, meta),
        video_backend=video_backend,
    )
    gen = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(dataset), generator=gen)[: n_batches * batch_size].tolist()
    return [
        torch.utils.data.default_collate([dataset[i] for i in order[b : b + batch_size]])
        for b in range(0, len(order), batch_size)
    ]


def mean_forward_scalars(policy, pre, batches: list[dict], seed: int | None = None) -> dict[str, float]:
    """Average of the scalars `policy.forward` returns (loss included) over `batches`, in eval mode.

    With `seed`, the global RNG is reseeded before each batch, so stochastic parts (random memory,
    flow-matching noise) draw the same numbers in every call: settings then differ only by themselves.
    """
    import torch

    sums: dict[str, float] = {}
    with torch.no_grad():
        for i, batch in enumerate(batches):
            if seed is not None:
                torch.manual_seed(seed + i)
            loss, info = policy.forward(pre(dict(batch)))
            for key, value in {"loss": float(loss), **{k: float(v) for k, v in info.items()}}.items():
                sums[key] = sums.get(key, 0.0) + value
    return {key: value / len(batches) for key, value in sums.items()}


def checkpoint_metrics(
    ckpt_dir: str | Path,
    dataset_root: str | Path,
    n_batches: int = 4,
    batch_size: int = 32,
    repo_id: str | None = None,
    seed: int = 0,
    video_backend: str = "pyav",
) -> dict[str, float]:
    """Average `policy.forward` scalars of the checkpoint `ckpt_dir` (a `pretrained_model` folder).

    The policy and its preprocessor are loaded from disk; the batches are `n_batches` x `batch_size`
    frames of `LeRobotDataset(repo_id, root=dataset_root)` drawn with a fixed seed (the same frames for
    every checkpoint, so curves compare like with like). Use the latent-only training view as
    `dataset_root` to avoid decoding video. Runs in eval mode (no dropout) under no_grad.
    """
    cfg, policy, pre = load_checkpoint(ckpt_dir)
    batches = fixed_batches(cfg, dataset_root, n_batches, batch_size, repo_id, seed, video_backend)
    return mean_forward_scalars(policy, pre, batches)


def parse_train_log(text: str, log_freq: int) -> list[tuple[int, float]]:
    """(step, loss) pairs from lerobot-train's console lines (`... step:750 ... loss:0.123 ...`).

    The console rounds large steps ("1K"); then the step comes from the tqdm counter printed just
    before the log line ("750/2500 [..]INFO ..."), or, failing that, from the line's position.
    """
    points: dict[int, float] = {}
    for line in text.splitlines():
        m = re.search(r" step:(\d+(?:\.\d+)?)([KMB]?) .*? loss:([-\d.e]+)", line)
        if not m:
            continue
        if not m.group(2):
            step = int(float(m.group(1)))
        else:
            counters = re.findall(r"(\d+)/\d+ \[[^\]]*\]", line.split("INFO", 1)[0])
            step = int(counters[-1]) if counters else (len(points) + 1) * log_freq
        points[step] = float(m.group(3))  # a resumed run overwrites the steps it repeats
    return sorted(points.items())


# ---------------------------------------------------------------------------------------------- report
def metric_series(per_ckpt: list[dict], keys: list[str], labels: dict[str, str] | None = None) -> dict:
    """Chart series {label: [(step, value)]} of `keys` present in the per-checkpoint metric dicts."""
    labels = labels or {}
    out = {}
    for key in keys:
        data = [(m["step"], m[key]) for m in per_ckpt if key in m]
        if data:
            out[labels.get(key, key)] = data
    return out


def _with_zero(series: dict) -> tuple[float, float] | None:
    """A y range that includes 0 (so a gate opening is seen against its closed start)."""
    ys = [y for s in series.values() for _, y in s if math.isfinite(y)]
    return (min(0.0, *ys), max(0.0, *ys)) if ys else None


def probe_verdict(probe: dict | None) -> str:
    """One line saying whether `lerobot-wm-probe`'s result shows the actions reading the world memory.

    Shown next to every success rate of a policy with a memory, so that a success rate is never read
    as evidence for a memory the policy ignores.
    """
    if not probe:
        return "no world memory (nothing to probe)"
    if "error" in probe:
        return f"probe failed: {probe['error']}"
    if probe.get("world_model_only"):
        return "no world memory; its world model acts only through the planner"
    change = probe.get("action_loss_change_vs_pred", {})
    ablated = {m: change[m] for m in ("zero", "shuffle") if m in change}
    worst = max(ablated, key=lambda m: abs(ablated[m])) if ablated else None
    detail = f"'{worst}' memory changes the action loss by {100 * ablated[worst]:+.1f}%" if worst else ""
    gate = probe.get("gate")
    gate_txt = f", gate tanh(g) {gate:.2g}" if isinstance(gate, (int, float)) else ""
    if probe.get("reads_memory"):
        return f"reads its world memory ({detail}{gate_txt})"
    return f"IGNORES its world memory ({detail}{gate_txt}): the success rate says nothing about the memory"


def world_cos_keys(keys) -> list[str]:
    """The world-cosine scalars among `keys`, by horizon: world_cos_h{k} with its copy-baseline and motion
    companions (`world_copy_cos_h{k}`, `world_motion_cos_h{k}`) next to it when they exist."""
    found = [k for k in keys if re.fullmatch(r"world_(copy_|motion_)?cos_h\d+", k)]
    kind = {"world_cos": 0, "world_copy_cos": 1, "world_motion_cos": 2}
    return sorted(set(found), key=lambda k: (int(k.rsplit("_h", 1)[1]), kind[k.rsplit("_h", 1)[0]]))


def _cos_label(key: str) -> str:
    name, h = key.rsplit("_h", 1)
    return {"world_cos": f"horizon {h}", "world_copy_cos": f"copy baseline h{h}",
            "world_motion_cos": f"motion cos h{h}"}[name]  # fmt: skip


def build_charts(report: dict) -> list[str]:
    """The report's charts (inline PNG): losses, world cosine per horizon, gate opening, success rate."""
    from .stats import wilson_interval

    per_ckpt = report.get("per_checkpoint_metrics", [])
    losses = metric_series(
        per_ckpt, ["action_loss", "world_loss"],
        {"action_loss": "action loss (fixed batches)", "world_loss": "world loss (fixed batches)"},
    )  # fmt: skip
    if report.get("train_loss_curve"):
        losses = {"train loss (console)": report["train_loss_curve"], **losses}
    horizons = world_cos_keys({k for m in per_ckpt for k in m})
    cos = metric_series(per_ckpt, horizons, {k: _cos_label(k) for k in horizons})
    gate = metric_series(per_ckpt, ["gate", "gate_abs_max"], {"gate": "tanh(gate)", "gate_abs_max": "max |tanh(gate)|"})
    evals = report.get("evaluations") or []
    labels = [f"step {e['train_step']}" for e in evals]
    rates = [e["success_rate"] * 100 for e in evals]
    cis = [wilson_interval(round(e["success_rate"] * e["n_episodes"]), e["n_episodes"]) for e in evals]
    return [
        line_chart(losses, "Training losses", ylabel="loss"),
        line_chart(cos, "World cosine per horizon", ylabel="cos(pred, true future latent)"),
        line_chart(gate, "Gate opening over training", ylabel="tanh(gate)", y_range=_with_zero(gate)),
        bar_chart(labels, rates, f"Success rate ({report.get('eval_episodes', '?')} episodes, Wilson 95%)",
                  errors=[(100 * lo, 100 * hi) for lo, hi in cis]),
    ]  # fmt: skip


# Style of the one-page reports (demo and compare).
PAGE_CSS = """
body { font-family: system-ui, sans-serif; margin: 24px; color: #222; max-width: 1200px; }
table { border-collapse: collapse; margin: 8px 0 16px; }
th, td { border: 1px solid #ddd; padding: 4px 8px; text-align: left; font-size: 13px; }
th { background: #f5f5f5; }
.grid { display: flex; flex-wrap: wrap; gap: 12px; }
.cell { border: 1px solid #ddd; }
pre { background: #f7f7f7; padding: 6px; font-size: 11px; white-space: pre-wrap; word-break: break-all; }
figure { display: inline-block; margin: 4px; }
"""


def _rel(path: str | None, base: Path) -> str:
    if not path:
        return ""
    try:
        return str(Path(path).resolve().relative_to(base.resolve()))
    except ValueError:
        return str(Path(path).resolve())


def render_html(report: dict, base: Path) -> str:
    """The one-page HTML report (self-contained: charts are inline PNG; videos are linked files)."""
    esc = html.escape
    rate = report.get("success_rate")
    rows = [
        ("task", report["task"]),
        ("dataset", f"{report['episodes']} episodes, {report['frames']} frames ({report.get('dataset_root', '')})"),
        ("policy", report.get("policy", "")),
        ("training", f"{report['train_steps']} steps in {report['train_seconds']:.0f} s"),
        ("evaluation", f"{report['eval_episodes']} episodes, episode_length {report.get('episode_length', '?')}"),
        ("success rate", "n/a" if rate is None else f"{100 * rate:.0f}%"),
        ("world memory (probe)", probe_verdict(report.get("probe"))),
        ("checkpoint", report["checkpoint"]),
        ("eval videos", report.get("eval_videos") or "none"),
    ]
    table = "".join(f"<tr><th>{esc(k)}</th><td>{esc(str(v))}</td></tr>" for k, v in rows)
    per = report.get("per_checkpoint_metrics", [])
    keys = sorted({k for m in per for k in m if k != "step"}, key=lambda k: (not k.endswith("loss"), k))
    metrics_table = (
        "<table class='metrics'><tr><th>step</th>" + "".join(f"<th>{esc(k)}</th>" for k in keys) + "</tr>"
        + "".join(
            f"<tr><td>{m['step']}</td>" + "".join(f"<td>{m[k]:.4g}</td>" if k in m else "<td></td>" for k in keys)
            + "</tr>"
            for m in per
        )
        + "</table>"
    )
    videos = sorted(Path(report["eval_videos"]).glob("**/*.mp4")) if report.get("eval_videos") else []
    video_html = "".join(
        f'<figure><video src="{esc(_rel(str(v), base))}" controls muted width="240"></video>'
        f"<figcaption>{esc(v.name)}</figcaption></figure>"
        for v in videos[:4]
    )
    commands = "".join(f"<pre>{esc(c)}</pre>" for c in report.get("commands", []))
    probe = report.get("probe") or {}
    probe_html = "".join(f"<li>{esc(line)}</li>" for line in probe.get("summary", []))
    probe_html = f"<h2>World-memory probe</h2><ul>{probe_html}</ul>" if probe_html else ""
    charts = "".join(f"<div class='cell'>{img}</div>" for img in build_charts(report))
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>world_f demo: {esc(report['task'])}</title>
<style>{PAGE_CSS}</style></head><body>
<h1>world_f on MetaWorld <code>{esc(report['task'])}</code></h1>
<p>Expert demonstrations &rarr; world latents (encoder <code>{esc(report.get('encoder', ''))}</code>) &rarr;
<code>lerobot-train --policy.type=world_f</code> &rarr; <code>lerobot-eval --env.type=metaworld</code>.
Curves are measured on fixed dataset batches at each saved checkpoint (eval mode).</p>
<table>{table}</table>
{probe_html}
<div class="grid">{charts}</div>
<h2>Per-checkpoint metrics</h2>{metrics_table}
<h2>Evaluation videos</h2>{video_html or '<p>none</p>'}
<h2>Commands</h2>{commands}
</body></html>
"""


def write_report(report: dict, work_dir: Path) -> tuple[Path, Path]:
    """Write report.json and report.html into `work_dir` (atomically); returns their paths."""
    work_dir.mkdir(parents=True, exist_ok=True)
    paths = work_dir / "report.json", work_dir / "report.html"
    for path, text in zip(paths, (json.dumps(report, indent=2), render_html(report, work_dir)), strict=True):
        tmp = path.with_name(f".{path.name}.tmp")
        tmp.write_text(text)
        tmp.replace(path)
    return paths
