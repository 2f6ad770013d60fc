"""The model's fidelity to FP32 as inline-SVG geometry (no chart framework): mean cosine
per token by layer, one line per hook type in the UI contract's colours, the warning
threshold dashed across."""

from __future__ import annotations

from mistudio.charts import HOOK_COLOURS, HOOK_LABELS

from .ml.fidelity import HOOKS, weakest

WIDTH, HEIGHT, LEFT, RIGHT, TOP, BOTTOM = 480, 200, 56, 12, 14, 30


def fidelity_chart(fidelity: dict, threshold: float) -> dict | None:
    """The chart's lines, axis ticks and threshold, or None without a table."""
    rows = (fidelity or {}).get("layers") or []
    if not rows:
        return None
    low = min(weakest(fidelity)[2], threshold)
    low -= max((1 - low) * 0.15, 1e-6)
    plot_w, plot_h = WIDTH - LEFT - RIGHT, HEIGHT - TOP - BOTTOM
    last = max(len(rows) - 1, 1)

    def x(layer: int) -> float:
        return LEFT + layer / last * plot_w

    def y(cosine: float) -> float:
        return TOP + (1 - cosine) / (1 - low) * plot_h

    series = [{"hook": hook, "label": HOOK_LABELS[hook], "colour": HOOK_COLOURS[hook],
               "points": " ".join(f"{x(row['layer']):.1f},{y(row[hook]['cosine']):.1f}" for row in rows),
               "flagged": [row["layer"] for row in rows if row[hook]["cosine"] < threshold]} for hook in HOOKS]  # fmt: skip
    layers = [row["layer"] for row in rows]
    ticks = layers if len(layers) <= 8 else [layers[round(i * (len(layers) - 1) / 5)] for i in range(6)]
    return {
        "width": WIDTH, "height": HEIGHT, "left": LEFT, "right": WIDTH - RIGHT, "top": TOP, "bottom": HEIGHT - BOTTOM,
        "series": series, "threshold": threshold, "threshold_y": round(y(threshold), 1), "low": low, "low_y": round(y(low), 1),
        "x_ticks": [{"x": round(x(layer), 1), "layer": layer} for layer in ticks],
        "lowest": weakest(fidelity),
        "output": fidelity.get("output") or {}, "tokens": fidelity.get("tokens"),
    }  # fmt: skip


def by_layer(fidelity: dict, threshold: float) -> dict[int, list[dict]]:
    """Each block's three figures for the architecture viewer's rows."""
    return {row["layer"]: [{"hook": hook, "colour": HOOK_COLOURS[hook], "cosine": row[hook]["cosine"],
                            "rel_error": row[hook]["rel_error"], "low": row[hook]["cosine"] < threshold} for hook in HOOKS]
            for row in (fidelity or {}).get("layers") or []}  # fmt: skip
