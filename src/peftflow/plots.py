"""The comparison's three plots (PNG, matplotlib's Agg backend, no display needed).

- quality vs trainable parameters (log x) and quality vs peak memory: every method a point (error
  bar: the spread over seeds), the efficient frontier drawn as a line through its methods, the base
  model zero-shot as a dashed line;
- tokens/s per method, frontier methods highlighted.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # before pyplot: files only, no display
import matplotlib.pyplot as plt  # noqa: E402

from peftflow.leaderboard import AXES  # noqa: E402

FILES = {
    "params": "quality_vs_params.png",
    "memory": "quality_vs_memory.png",
    "speed": "tokens_per_s.png",
}
_FRONT, _OTHER = "#1b7837", "#999999"


def _scale(metric: str) -> tuple[float, str]:
    return (100.0, f"{metric} (%)") if "accuracy" in metric else (1.0, metric)


def quality_vs_cost(table: list[dict[str, Any]], metric: str, axis: str, path: Path, title: str) -> Path:
    """Quality against one cost axis (``params``: log scale; ``memory``: GiB)."""
    key, scale_y = AXES[axis], _scale(metric)
    rows = [r for r in table if r.get("runs") and r.get(key) is not None]
    fig, ax = plt.subplots(figsize=(7.5, 5), dpi=110)
    x_of = (lambda r: r[key]) if axis == "params" else (lambda r: r[key] / 2**30)
    for r in rows:
        on = r.get(f"frontier_{axis}")
        y = r[f"{metric}_mean"] * scale_y[0]
        err = (r.get(f"{metric}_std") or 0) * scale_y[0]
        ax.errorbar(x_of(r), y, yerr=err or None, fmt="o", ms=8, capsize=3, color=_FRONT if on else _OTHER,
                    mfc=_FRONT if on else "white", zorder=3)  # fmt: skip
        ax.annotate(r["method"], (x_of(r), y), textcoords="offset points", xytext=(6, 5), fontsize=9)
    front = sorted((r for r in rows if r.get(f"frontier_{axis}")), key=x_of)
    if len(front) > 1:
        ax.plot([x_of(r) for r in front], [r[f"{metric}_mean"] * scale_y[0] for r in front], "-", color=_FRONT,
                lw=1.5, label="efficient frontier", zorder=2)  # fmt: skip
    base = next((r for r in table if r.get("rank") == 0), None)
    if base is not None:
        ax.axhline(base[f"{metric}_mean"] * scale_y[0], ls="--", color="#b2182b", lw=1, label="base, zero-shot")
    if axis == "params":
        ax.set_xscale("log")
        ax.set_xlabel("trainable parameters (log scale)")
    else:
        ax.set_xlabel("peak memory (GiB)")
    ax.set_ylabel(scale_y[1] + " (higher is better)" if "accuracy" in metric else scale_y[1])
    ax.set_title(title, fontsize=11)
    ax.grid(True, which="major", alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(loc="lower right", fontsize=9)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def speed(table: list[dict[str, Any]], path: Path, title: str) -> Path:
    """Training tokens per second per method, fastest first."""
    rows = sorted((r for r in table if r.get("runs") and r.get("tokens_per_s")), key=lambda r: r["tokens_per_s"])
    fig, ax = plt.subplots(figsize=(7.5, 0.45 * len(rows) + 1.5), dpi=110)
    colors = [_FRONT if r.get("frontier_params") or r.get("frontier_memory") else _OTHER for r in rows]
    ax.barh([r["method"] for r in rows], [r["tokens_per_s"] for r in rows], color=colors)
    for i, r in enumerate(rows):
        ax.text(r["tokens_per_s"], i, f" {r['tokens_per_s']:,.0f}", va="center", fontsize=9)
    ax.set_xlabel("training tokens/s (green: on an efficient frontier)")
    ax.set_title(title, fontsize=11)
    ax.margins(x=0.15)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def all_plots(table: list[dict[str, Any]], metric: str, out_dir: Path, subtitle: str) -> dict[str, Path]:
    """The three plots in ``out_dir``; their paths by name (``params``, ``memory``, ``speed``)."""
    out_dir = Path(out_dir)
    return {
        "params": quality_vs_cost(table, metric, "params", out_dir / FILES["params"],
                                  f"{metric} vs trainable parameters\n{subtitle}"),
        "memory": quality_vs_cost(table, metric, "memory", out_dir / FILES["memory"],
                                  f"{metric} vs peak memory\n{subtitle}"),
        "speed": speed(table, out_dir / FILES["speed"], f"training throughput\n{subtitle}"),
    }  # fmt: skip
