"""The project's report charts, drawn with matplotlib (Agg, no display) and embedded as base64 PNG.

One module for every report (the demo's and `lerobot-wm-compare`'s): a chart is a PNG in an `<img>`
tag whose `data:` URI carries the image, so an HTML page stays a single file readable offline. The
tag's alt text names the chart and its series, which is also what tests read.
"""

from __future__ import annotations

import base64
import html
import io
import math

# Colours of successive series (Okabe-Ito, colour-blind friendly).
PALETTE = ["#0072b2", "#d55e00", "#009e73", "#cc79a7", "#e69f00", "#56b4e9", "#7f7f7f", "#000000"]


def _figure(title: str, xlabel: str, ylabel: str, width: float = 5.4, height: float = 3.2):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(width, height), dpi=100)
    ax.set_title(title, fontsize=11, fontweight="bold")
    ax.set_xlabel(xlabel, fontsize=9)
    ax.set_ylabel(ylabel, fontsize=9)
    ax.tick_params(labelsize=8)
    ax.grid(True, color="#e5e5e5", linewidth=0.8)
    ax.set_axisbelow(True)
    return fig, ax


def figure_png(fig) -> bytes:
    """A finished matplotlib figure as PNG bytes; the figure is closed."""
    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buf, format="png")
    plt.close(fig)
    return buf.getvalue()


def img_tag(png: bytes, alt: str) -> str:
    """An `<img>` tag that carries `png` inline (data URI), with `alt` as its text."""
    data = base64.b64encode(png).decode("ascii")
    return f'<img class="chart" alt="{html.escape(alt)}" src="data:image/png;base64,{data}"/>'


def line_chart(
    series: dict[str, list[tuple[float, float]]],
    title: str,
    xlabel: str = "training step",
    ylabel: str = "",
    y_range: tuple[float, float] | None = None,
) -> str:
    """A line chart of named (x, y) series as an inline-PNG `<img>` tag ("no data" when empty)."""
    fig, ax = _figure(title, xlabel, ylabel)
    drawn = []
    for i, (name, data) in enumerate(series.items()):
        data = sorted((x, y) for x, y in data if math.isfinite(y))
        if not data:
            continue
        xs, ys = zip(*data, strict=True)
        ax.plot(xs, ys, color=PALETTE[i % len(PALETTE)], linewidth=1.6, marker="o" if len(data) <= 40 else None,
                markersize=3, label=name)  # fmt: skip
        drawn.append(name)
    if drawn:
        ax.legend(fontsize=8, loc="best")
        if y_range is not None:
            lo, hi = y_range
            pad = 0.05 * ((hi - lo) or 1.0)
            ax.set_ylim(lo - pad, hi + pad)
    else:
        ax.text(0.5, 0.5, "no data", ha="center", va="center", color="#888", transform=ax.transAxes)
    return img_tag(figure_png(fig), f"{title}: {', '.join(drawn) or 'no data'}")


def bar_chart(
    labels: list[str],
    values: list[float],
    title: str,
    ylabel: str = "success %",
    errors: list[tuple[float, float]] | None = None,
    y_max: float = 100.0,
) -> str:
    """Bars with their values written on them and, when given, (low, high) error bars, as an `<img>` tag."""
    fig, ax = _figure(title, "", ylabel, width=max(5.4, 0.6 * len(labels) + 2))
    xs = list(range(len(labels)))
    vals = [v if math.isfinite(v) else 0.0 for v in values]
    yerr = None
    if errors:
        yerr = [[max(0.0, v - lo) for v, (lo, _) in zip(vals, errors, strict=True)],
                [max(0.0, hi - v) for v, (_, hi) in zip(vals, errors, strict=True)]]  # fmt: skip
    ax.bar(xs, vals, color=[PALETTE[i % len(PALETTE)] for i in xs], yerr=yerr, capsize=3, width=0.6)
    for x, v, raw in zip(xs, vals, values, strict=True):
        ax.text(x, min(v, y_max) + y_max * 0.02, "n/a" if not math.isfinite(raw) else f"{raw:.0f}%",
                ha="center", va="bottom", fontsize=8)  # fmt: skip
    ax.set_xticks(xs, labels, rotation=30 if len(labels) > 4 else 0, ha="right" if len(labels) > 4 else "center",
                  fontsize=8)  # fmt: skip
    ax.set_ylim(0, y_max * 1.12)
    return img_tag(figure_png(fig), f"{title}: {', '.join(labels)}")


def grouped_bars_png(
    categories: list[str],
    groups: dict[str, list[tuple[float, float, float]]],
    title: str,
    ylabel: str = "success %",
    y_max: float = 100.0,
) -> bytes:
    """Bars grouped per category (e.g. task), one colour per group (e.g. arm@mode), as PNG bytes.

    `groups[name][i]` is (value, low, high) for `categories[i]`; a NaN value is drawn as a missing bar.
    """
    n = max(1, len(groups))
    width = 0.8 / n
    # The legend sits right of the axes, so the figure widens with its longest label (about 0.055 in per
    # character at 7 pt) instead of squeezing the bars and their category labels.
    legend = 0.055 * max((len(name) for name in groups), default=0)
    fig, ax = _figure(title, "", ylabel, width=max(5.4, 0.35 * n * len(categories) + 1.5) + legend, height=3.6)
    if n > len(PALETTE):  # more groups than the palette: tab20 keeps every bar's colour distinct
        import matplotlib

        colours = [matplotlib.colors.to_hex(matplotlib.colormaps["tab20"](j % 20)) for j in range(n)]
    else:
        colours = PALETTE
    for j, (name, cells) in enumerate(groups.items()):
        xs = [i - 0.4 + width * (j + 0.5) for i in range(len(categories))]
        vals = [v if math.isfinite(v) else 0.0 for v, _, _ in cells]
        err = [[max(0.0, v - lo) if math.isfinite(lo) else 0.0 for v, (_, lo, _) in zip(vals, cells, strict=True)],
               [max(0.0, hi - v) if math.isfinite(hi) else 0.0 for v, (_, _, hi) in zip(vals, cells, strict=True)]]  # fmt: skip
        ax.bar(xs, vals, width=width * 0.9, yerr=err, capsize=2, color=colours[j], label=name,
               error_kw={"linewidth": 0.8})  # fmt: skip
    ax.set_xticks(range(len(categories)), categories, fontsize=8)
    ax.set_ylim(0, y_max * 1.05)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    return figure_png(fig)
