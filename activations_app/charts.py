"""The extraction detail's pictures as inline-SVG geometry (no chart framework): per hook
type, mean token L2 norm and sparsity across the chosen layers; per file, the histogram
of token L2 norms in the statistics' fixed log-spaced bins."""

from __future__ import annotations

import math

from mistudio.charts import HOOK_COLOURS, HOOK_LABELS  # noqa: F401 - the page's names and colours

from .ml.extract import file_stem


# Each panel's label sits in the margin above it (TOP), never where its line can cross it.
WIDTH, PANEL, GAP, LEFT, BOTTOM, TOP = 320, 64, 32, 44, 18, 16


def _x(layer: int, first: int, last: int) -> float:
    """Where a layer sits across the plot (a single layer: in the middle)."""
    return LEFT + (0.5 if first == last else (layer - first) / (last - first)) * (WIDTH - LEFT - 8)


def _scale(values: list[float], low: float, high: float, top: float, height: float) -> list[float]:
    span = (high - low) or 1.0
    return [top + height - (v - low) / span * height for v in values]


def _panel(label: str, unit: str, layers: list[int], values: list[float | None], top: float) -> dict | None:
    known = [(layer, v) for layer, v in zip(layers, values) if v is not None and math.isfinite(v)]
    if not known:
        return None
    low, high = min(v for _, v in known), max(v for _, v in known)
    if low == high:
        low, high = low - (abs(low) * 0.1 or 1.0), high + (abs(high) * 0.1 or 1.0)
    xs = [_x(layer, layers[0], layers[-1]) for layer, _ in known]
    ys = _scale([v for _, v in known], low, high, top, PANEL)
    return {
        "label": label, "unit": unit, "top": top, "bottom": top + PANEL, "low": low, "high": high,
        "points": " ".join(f"{x:.1f},{y:.1f}" for x, y in zip(xs, ys)),
        "dots": [{"x": round(x, 1), "y": round(y, 1), "layer": layer, "value": v} for x, y, (layer, v) in zip(xs, ys, known)],
    }  # fmt: skip


def layer_charts(statistics: dict, layers: list[int], hooks: list[str]) -> list[dict]:
    """One chart per hook type: mean L2 norm (top panel) and sparsity % (bottom) by layer."""
    layers = sorted(layers)
    charts = []
    for hook in hooks:
        figures = [statistics.get(file_stem(layer, hook), {}) for layer in layers]
        panels = [
            _panel("mean token L2 norm", "", layers, [f.get("mean_l2_norm") for f in figures], TOP),
            _panel("sparsity", "%", layers, [f.get("sparsity_percent") for f in figures], TOP + PANEL + GAP),
        ]
        panels = [p for p in panels if p]
        if not panels:
            continue
        height = TOP + 2 * PANEL + GAP + BOTTOM
        ticks = layers if len(layers) <= 8 else [layers[int(round(i * (len(layers) - 1) / 5))] for i in range(6)]
        charts.append({
            "hook": hook, "title": HOOK_LABELS.get(hook, hook), "colour": HOOK_COLOURS.get(hook, "#94a3b8"), "width": WIDTH,
            "height": height, "left": LEFT,
            "right": WIDTH - 8, "panels": panels,
            "ticks": [{"x": round(_x(layer, layers[0], layers[-1]), 1), "label": f"L{layer}"} for layer in dict.fromkeys(ticks)],
            "axis_y": height - 4,
            "summary": "; ".join(f"L{layer}: L2 {f.get('mean_l2_norm', 0) or 0:.3g}, sparsity {f.get('sparsity_percent', 0) or 0:.3g}%"
                                 for layer, f in zip(layers, figures)),
        })  # fmt: skip
    return charts


HIST_WIDTH, HIST_HEIGHT = 192, 40


def norm_histogram(figures: dict) -> dict | None:
    """Bars for one file's token-norm histogram (the 64 log bins of 10^-3…10^5, with the
    occupied range shown and counts on a log scale, log10(1 + count), so a bin of one
    outlier token stays visible beside a bin of ten thousand)."""
    histogram = figures.get("norm_histogram") or {}
    counts = list(histogram.get("counts") or [])
    if not counts or not any(counts):
        return None
    occupied = [i for i, c in enumerate(counts) if c]
    lo, hi = max(0, occupied[0] - 1), min(len(counts) - 1, occupied[-1] + 1)
    shown = counts[lo : hi + 1]
    peak = math.log10(1 + max(shown))
    bar = HIST_WIDTH / len(shown)
    edge = lambda i: 10 ** (-3 + 8 * i / 64)  # noqa: E731 - the bins' lower edges
    return {
        "width": HIST_WIDTH, "height": HIST_HEIGHT,
        "bars": [{"x": round(i * bar, 2), "w": round(max(bar - 0.5, 0.5), 2), "h": round(HIST_HEIGHT * math.log10(1 + c) / peak, 2),
                  "y": round(HIST_HEIGHT - HIST_HEIGHT * math.log10(1 + c) / peak, 2)} for i, c in enumerate(shown) if c],
        "from": edge(lo), "to": edge(hi + 1), "below": histogram.get("below", 0), "above": histogram.get("above", 0),
        "tokens": sum(counts) + histogram.get("below", 0) + histogram.get("above", 0),
    }  # fmt: skip


def file_histograms(statistics: dict) -> list[dict]:
    found = []
    for stem, figures in statistics.items():
        drawn = norm_histogram(figures)
        if drawn:
            hook = stem.rsplit("_", 1)[-1]
            found.append({"stem": stem, "colour": HOOK_COLOURS.get(hook, "#94a3b8"), **drawn})
    return found


def outlier_rows(statistics: dict) -> list[dict]:
    """Each file's outlier report (ml.outliers), as the page's table shows it: tokens shown
    as text with their spaces and newlines visible."""
    rows = []
    for stem, figures in statistics.items():
        report = figures.get("outliers") if isinstance(figures, dict) else None
        if not report:
            continue
        threshold = report.get("threshold")
        largest = [{**token, "token": None if token.get("token") is None else repr(token["token"])[1:-1] or "∅",
                    "is_outlier": threshold is not None and token["norm"] > threshold}
                   for token in report.get("largest", [])]  # fmt: skip
        rows.append({"stem": stem, "median_norm": report.get("median_norm"), "count": report.get("count", 0),
                     "percent": 100.0 * report.get("share", 0.0), "largest": largest})  # fmt: skip
    return rows
