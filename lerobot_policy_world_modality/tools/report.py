"""Checkpoint metrics and the demo's one-page report (HTML with hand-written inline SVG charts, plus JSON).

`checkpoint_metrics` is the reusable piece (built from `load_checkpoint`, `fixed_batches` and
`mean_forward_scalars`, which `lerobot-wm-probe` uses too): it reloads a saved policy and its
preprocessor from a checkpoint directory exactly as `lerobot-eval` does, runs `policy.forward` in eval
mode on a few fixed batches of a LeRobotDataset (with the policy's own delta timestamps), and returns
the averaged scalars the policy logs (action loss, world loss, world cosine per horizon, tanh(gate),
...). lerobot-train's console log only prints the total loss, so the report's training curves come
from here.

No plotting library is needed: the charts are small SVG documents written by hand.
"""

from __future__ import annotations

import html
import json
import math
import re
from pathlib import Path

# Colours of successive series (colour-blind friendly palette).
PALETTE = ["#0072b2", "#d55e00", "#009e73", "#cc79a7", "#e69f00", "#56b4e9", "#7f7f7f", "#000000"]


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


# ------------------------------------------------------------------------------------------------- SVG
def _nice_ticks(lo: float, hi: float, n: int = 5) -> list[float]:
    """About n round tick values covering [lo, hi]."""
    if not math.isfinite(lo) or not math.isfinite(hi):
        return [0.0, 1.0]
    if hi <= lo:
        hi = lo + (abs(lo) or 1.0)
    raw = (hi - lo) / max(n - 1, 1)
    mag = 10 ** math.floor(math.log10(raw))
    step = next(m * mag for m in (1, 2, 2.5, 5, 10) if m * mag >= raw)
    start = math.floor(lo / step) * step
    ticks, t = [], start
    while t <= hi + step * 1e-9:
        ticks.append(round(t, 12))
        t += step
    if ticks[-1] < hi:
        ticks.append(round(t, 12))
    return ticks


def _fmt(v: float) -> str:
    if v == 0:
        return "0"
    if abs(v) >= 1000:
        return f"{v / 1000:g}k"
    return f"{v:.3g}"


def line_chart(
    series: dict[str, list[tuple[float, float]]],
    title: str,
    xlabel: str = "training step",
    ylabel: str = "",
    y_range: tuple[float, float] | None = None,
    width: int = 520,
    height: int = 300,
) -> str:
    """An inline SVG line chart of named (x, y) series, with axes, ticks, markers and a legend."""
    left, right, top, bottom = 58, 16, 34, 46
    pts = [(x, y) for s in series.values() for x, y in s if math.isfinite(y)]
    head = (
        f'<svg xmlns="http://www.w3.org/2000/svg" class="chart" width="{width}" height="{height}" '
        f'viewBox="0 0 {width} {height}" role="img" aria-label="{html.escape(title)}">'
        f'<rect width="{width}" height="{height}" fill="white"/>'
        f'<text x="{width / 2}" y="20" text-anchor="middle" font-size="14" font-weight="bold">{html.escape(title)}</text>'
    )
    if not pts:
        return head + f'<text x="{width / 2}" y="{height / 2}" text-anchor="middle" fill="#888">no data</text></svg>'
    xs, ys = [p[0] for p in pts], [p[1] for p in pts]
    x_ticks = _nice_ticks(min(xs), max(xs))
    y_ticks = _nice_ticks(*(y_range or (min(ys), max(ys))))
    x0, x1, y0, y1 = x_ticks[0], x_ticks[-1], y_ticks[0], y_ticks[-1]
    pw, ph = width - left - right, height - top - bottom

    def sx(x):
        return left + (x - x0) / ((x1 - x0) or 1) * pw

    def sy(y):
        return top + ph - (min(max(y, y0), y1) - y0) / ((y1 - y0) or 1) * ph

    out = [head]
    for t in y_ticks:
        out.append(f'<line x1="{left}" x2="{left + pw}" y1="{sy(t):.1f}" y2="{sy(t):.1f}" stroke="#e5e5e5"/>')
        out.append(f'<text x="{left - 6}" y="{sy(t) + 4:.1f}" text-anchor="end" font-size="11">{_fmt(t)}</text>')
    for t in x_ticks:
        out.append(f'<line x1="{sx(t):.1f}" x2="{sx(t):.1f}" y1="{top + ph}" y2="{top + ph + 4}" stroke="#333"/>')
        out.append(f'<text x="{sx(t):.1f}" y="{top + ph + 16}" text-anchor="middle" font-size="11">{_fmt(t)}</text>')
    out.append(f'<rect x="{left}" y="{top}" width="{pw}" height="{ph}" fill="none" stroke="#333"/>')
    out.append(f'<text x="{left + pw / 2}" y="{height - 8}" text-anchor="middle" font-size="12">{html.escape(xlabel)}</text>')
    out.append(
        f'<text transform="translate(14 {top + ph / 2}) rotate(-90)" text-anchor="middle" font-size="12">'
        f"{html.escape(ylabel)}</text>"
    )
    for i, (name, data) in enumerate(series.items()):
        color = PALETTE[i % len(PALETTE)]
        data = sorted((x, y) for x, y in data if math.isfinite(y))
        if len(data) > 1:
            path = " ".join(f"{sx(x):.1f},{sy(y):.1f}" for x, y in data)
            out.append(f'<polyline class="series" fill="none" stroke="{color}" stroke-width="2" points="{path}"/>')
        if len(data) <= 40:
            out += [f'<circle cx="{sx(x):.1f}" cy="{sy(y):.1f}" r="3" fill="{color}"/>' for x, y in data]
        ly = top + 8 + 15 * i
        out.append(f'<rect x="{left + pw - 150}" y="{ly}" width="10" height="10" fill="{color}"/>')
        out.append(f'<text x="{left + pw - 136}" y="{ly + 9}" font-size="11">{html.escape(name)}</text>')
    out.append("</svg>")
    return "".join(out)


def bar_chart(bars: list[tuple[str, float]], title: str, ylabel: str = "", y_max: float = 100.0,
              width: int = 520, height: int = 300) -> str:
    """An inline SVG bar chart (values on [0, y_max]) with each bar's value written above it."""
    left, right, top, bottom = 58, 16, 34, 46
    pw, ph = width - left - right, height - top - bottom
    out = [
        f'<svg xmlns="http://www.w3.org/2000/svg" class="chart" width="{width}" height="{height}" '
        f'viewBox="0 0 {width} {height}" role="img" aria-label="{html.escape(title)}">'
        f'<rect width="{width}" height="{height}" fill="white"/>'
        f'<text x="{width / 2}" y="20" text-anchor="middle" font-size="14" font-weight="bold">{html.escape(title)}</text>'
    ]
    for t in _nice_ticks(0, y_max):
        y = top + ph - t / y_max * ph
        out.append(f'<line x1="{left}" x2="{left + pw}" y1="{y:.1f}" y2="{y:.1f}" stroke="#e5e5e5"/>')
        out.append(f'<text x="{left - 6}" y="{y + 4:.1f}" text-anchor="end" font-size="11">{_fmt(t)}</text>')
    out.append(f'<rect x="{left}" y="{top}" width="{pw}" height="{ph}" fill="none" stroke="#333"/>')
    out.append(
        f'<text transform="translate(14 {top + ph / 2}) rotate(-90)" text-anchor="middle" font-size="12">'
        f"{html.escape(ylabel)}</text>"
    )
    slot = pw / max(len(bars), 1)
    for i, (label, value) in enumerate(bars):
        h = max(0.0, min(value, y_max)) / y_max * ph
        x = left + i * slot + slot * 0.2
        out.append(f'<rect class="bar" x="{x:.1f}" y="{top + ph - h:.1f}" width="{slot * 0.6:.1f}" '
                   f'height="{h:.1f}" fill="{PALETTE[i % len(PALETTE)]}"/>')
        # The value sits above the bar, or inside it (in white) when the bar reaches the top.
        inside = h > ph - 16
        ty, fill = (top + ph - h + 16, "white") if inside else (top + ph - h - 5, "#222")
        out.append(f'<text x="{x + slot * 0.3:.1f}" y="{ty:.1f}" text-anchor="middle" fill="{fill}" '
                   f'font-size="12">{value:.0f}%</text>')
        out.append(f'<text x="{x + slot * 0.3:.1f}" y="{top + ph + 16}" text-anchor="middle" font-size="11">'
                   f"{html.escape(label)}</text>")
    out.append("</svg>")
    return "".join(out)


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


def build_charts(report: dict) -> list[str]:
    """The report's SVG charts: losses, world cosine per horizon, gate opening, success rate."""
    per_ckpt = report.get("per_checkpoint_metrics", [])
    losses = metric_series(
        per_ckpt, ["action_loss", "world_loss"],
        {"action_loss": "action loss (fixed batches)", "world_loss": "world loss (fixed batches)"},
    )  # fmt: skip
    if report.get("train_loss_curve"):
        losses = {"train loss (console)": report["train_loss_curve"], **losses}
    horizons = sorted({k for m in per_ckpt for k in m if k.startswith("world_cos_h")}, key=lambda k: int(k[11:]))
    cos = metric_series(per_ckpt, horizons, {k: f"horizon {k[11:]}" for k in horizons})
    gate = metric_series(per_ckpt, ["gate", "gate_abs_max"], {"gate": "tanh(gate)", "gate_abs_max": "max |tanh(gate)|"})
    evals = report.get("evaluations") or []
    bars = [(f"step {e['train_step']}", e["success_rate"] * 100) for e in evals]
    return [
        line_chart(losses, "Training losses", ylabel="loss"),
        line_chart(cos, "World cosine per horizon", ylabel="cos(pred, true future latent)"),
        line_chart(gate, "Gate opening over training", ylabel="tanh(gate)", y_range=_with_zero(gate)),
        bar_chart(bars, f"Success rate ({report.get('eval_episodes', '?')} episodes)", ylabel="success %"),
    ]


def _rel(path: str | None, base: Path) -> str:
    if not path:
        return ""
    try:
        return str(Path(path).resolve().relative_to(base.resolve()))
    except ValueError:
        return str(Path(path).resolve())


def render_html(report: dict, base: Path) -> str:
    """The one-page HTML report (self-contained: charts are inline SVG; videos are linked files)."""
    esc = html.escape
    rate = report.get("success_rate")
    rows = [
        ("task", report["task"]),
        ("dataset", f"{report['episodes']} episodes, {report['frames']} frames ({report.get('dataset_root', '')})"),
        ("policy", report.get("policy", "")),
        ("training", f"{report['train_steps']} steps in {report['train_seconds']:.0f} s"),
        ("evaluation", f"{report['eval_episodes']} episodes, episode_length {report.get('episode_length', '?')}"),
        ("success rate", "n/a" if rate is None else f"{100 * rate:.0f}%"),
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
    charts = "".join(f"<div class='cell'>{svg}</div>" for svg in build_charts(report))
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>world_f demo: {esc(report['task'])}</title>
<style>
body {{ font-family: system-ui, sans-serif; margin: 24px; color: #222; max-width: 1120px; }}
table {{ border-collapse: collapse; margin: 8px 0 16px; }}
th, td {{ border: 1px solid #ddd; padding: 4px 8px; text-align: left; font-size: 13px; }}
th {{ background: #f5f5f5; }}
.grid {{ display: flex; flex-wrap: wrap; gap: 12px; }}
.cell {{ border: 1px solid #ddd; }}
pre {{ background: #f7f7f7; padding: 6px; font-size: 11px; white-space: pre-wrap; word-break: break-all; }}
figure {{ display: inline-block; margin: 4px; }}
</style></head><body>
<h1>world_f on MetaWorld <code>{esc(report['task'])}</code></h1>
<p>Expert demonstrations &rarr; world latents (encoder <code>{esc(report.get('encoder', ''))}</code>) &rarr;
<code>lerobot-train --policy.type=world_f</code> &rarr; <code>lerobot-eval --env.type=metaworld</code>.
Curves are measured on fixed dataset batches at each saved checkpoint (eval mode).</p>
<table>{table}</table>
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
