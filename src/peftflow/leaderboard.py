"""Quality against compute, one row per method: the leaderboard and its efficient frontiers.

Pure functions over *records*, one per training run: ``{"method", "seed", "run_id", "metrics",
"error"}``, where ``metrics`` are the run's flat MLflow metrics (``test_accuracy``,
``zeroshot_test_accuracy``, ``trainable_params``, ``peak_memory_bytes``, ...) and ``error`` is None
or the one-line reason the run failed. A method's row aggregates its seeds: the primary metric's mean,
sample standard deviation, min and max; costs are the mean over seeds, peak memory the max.

A method is on a cost axis's *efficient frontier* when no other method is at least as good for at
most the cost and strictly better on one of the two (a Pareto front). Two axes are reported:
trainable parameters and peak memory. The base model's zero-shot figures are row 0; a method that
does not beat them is marked. On classification data every row also carries its macro-F1 and,
with more than two classes, each class's accuracy (means over seeds), which a large class's share
of the examples cannot carry the way it carries accuracy.
"""

from __future__ import annotations

import csv
import html
import io
import statistics
from collections.abc import Callable
from typing import Any

from peftflow.config import PromoteParams

AXES = {"params": "trainable_params", "memory": "peak_memory_bytes"}  # frontier name -> cost metric
_MEAN = ("test_loss", "trainable_params", "trainable_pct", "artifact_bytes", "tokens_per_s", "train_seconds")
_MEAN += ("wall_seconds", "train_tokens", "steps", "test_macro_f1")
PER_LABEL = "test_per_label_accuracy."  # a flat metric per true label: test_per_label_accuracy.<label>


def _mean(values: list[float]) -> float | None:
    return statistics.fmean(values) if values else None


def frontier(points: dict[str, tuple[float, float]], higher_is_better: bool = True) -> set[str]:
    """The names whose (cost, quality) no other point dominates (lower cost is better)."""

    def better_or_equal(a: tuple[float, float], b: tuple[float, float]) -> bool:
        quality_ok = a[1] >= b[1] if higher_is_better else a[1] <= b[1]
        return a[0] <= b[0] and quality_ok

    return {
        name
        for name, p in points.items()
        if not any(other != name and better_or_equal(q, p) and q != p for other, q in points.items())
    }


def rows(records: list[dict[str, Any]], policy: PromoteParams) -> list[dict[str, Any]]:
    """One row per method, best first by the mean of ``policy.reported_metric``; methods whose every run failed
    come last with their error. Row 0 is the base model zero-shot (from any run that has it)."""
    metric = policy.reported_metric  # a report of held-out figures; promotion decides on validation
    by_method: dict[str, list[dict[str, Any]]] = {}
    for r in records:
        by_method.setdefault(r["method"], []).append(r)
    out = []
    for method, runs in by_method.items():
        ok = [r for r in runs if not r.get("error")]
        missing = [r.get("run_id") or method for r in ok if metric not in r["metrics"]]
        if missing:
            raise KeyError(f"run {missing[0]} ({method}): no {metric!r} (the promotion metric); was it evaluated?")
        values = [r["metrics"][metric] for r in ok]
        row: dict[str, Any] = {
            "method": method,
            "runs": len(ok),
            "failed": len(runs) - len(ok),
            "seeds": " ".join(str(r["seed"]) for r in ok),
            "error": next((r["error"] for r in runs if r.get("error")), None),
            f"{metric}_mean": _mean(values),
            f"{metric}_std": statistics.stdev(values) if len(values) > 1 else None,
            f"{metric}_min": min(values, default=None),
            f"{metric}_max": max(values, default=None),
            "peak_memory_bytes": max((r["metrics"]["peak_memory_bytes"] for r in ok if "peak_memory_bytes" in
                                      r["metrics"]), default=None),
            "run_ids": " ".join(r["run_id"] for r in ok if r.get("run_id")),
        }  # fmt: skip
        for key in _MEAN:
            row[key] = _mean([r["metrics"][key] for r in ok if key in r["metrics"]])
        row["per_label"] = _per_label([r["metrics"] for r in ok])
        out.append(row)
    good = [r for r in out if r["runs"]]
    sign = -1 if policy.higher_is_better else 1
    good.sort(key=lambda r: sign * r[f"{metric}_mean"])
    for n, r in enumerate(good, 1):
        r["rank"] = n
    for axis, key in AXES.items():
        points = {r["method"]: (r[key], r[f"{metric}_mean"]) for r in good if r[key] is not None}
        on = frontier(points, policy.higher_is_better)
        for r in good:
            r[f"frontier_{axis}"] = r["method"] in on
    base = zeroshot(records, metric)
    for r in good:
        beats = None if base is None else (r[f"{metric}_mean"] - base[f"{metric}_mean"]) * -sign > 0
        r["beats_zeroshot"] = beats
    failed = [{**r, "rank": None, "frontier_params": False, "frontier_memory": False} for r in out if not r["runs"]]
    return ([base] if base else []) + good + failed


def zeroshot(records: list[dict[str, Any]], metric: str) -> dict[str, Any] | None:
    """Row 0: the base model's zero-shot figures, as one run's evaluation recorded them."""
    for r in records:
        m = r.get("metrics") or {}
        if f"zeroshot_{metric}" in m:
            return {
                "rank": 0,
                "method": "base (zero-shot)",
                "runs": 0,
                f"{metric}_mean": m[f"zeroshot_{metric}"],
                "test_loss": m.get("zeroshot_test_loss"),
                "test_macro_f1": m.get("zeroshot_test_macro_f1"),
                "per_label": _per_label(
                    [{k.removeprefix("zeroshot_"): v for k, v in m.items() if k.startswith("zeroshot_")}]
                ),
                "trainable_params": 0,
                "trainable_pct": 0.0,
            }
    return None


def _per_label(runs: list[dict[str, float]]) -> dict[str, float]:
    """Each true label's accuracy, the mean over ``runs`` (flat metrics) that have it."""
    labels = sorted({k.removeprefix(PER_LABEL) for m in runs for k in m if k.startswith(PER_LABEL)})
    return {label: _mean([m[PER_LABEL + label] for m in runs if PER_LABEL + label in m]) for label in labels}


def many_classes(table: list[dict[str, Any]]) -> list[str]:
    """The labels, when the data has more than two (then each gets a figure of its own); else []."""
    labels = sorted({label for r in table for label in r.get("per_label") or {}})
    return labels if len(labels) > 2 else []


def frontier_methods(table: list[dict[str, Any]], axis: str) -> list[str]:
    """The methods on ``axis``'s frontier, cheapest first."""
    on = [r for r in table if r.get(f"frontier_{axis}")]
    return [r["method"] for r in sorted(on, key=lambda r: r[AXES[axis]])]


# --- formats -------------------------------------------------------------------------------------

CSV_COLUMNS = (
    "rank method runs seeds {m}_mean {m}_std {m}_min {m}_max test_macro_f1 test_loss trainable_params trainable_pct "
    "artifact_bytes peak_memory_bytes tokens_per_s train_seconds wall_seconds train_tokens steps "
    "frontier_params frontier_memory beats_zeroshot failed error run_ids"
).split()


def _fmt_metric(metric: str) -> Callable[[float], str]:
    return (lambda v: f"{100 * v:.1f}%") if "accuracy" in metric else (lambda v: f"{v:.4f}")


def _cells(r: dict[str, Any], metric: str, labels: list[str]) -> list[str]:
    """A row as display strings: quality (macro-F1 and, for ``labels``, each class's accuracy), then costs."""
    fmt = _fmt_metric(metric)

    def num(key: str, scale: float = 1, spec: str = "{:,.0f}") -> str:
        v = r.get(key)
        return "-" if v is None else spec.format(v / scale)

    if not r.get("runs") and r.get("rank") != 0:
        return [f"failed: {r.get('error')}"] + ["-"] * (9 + bool(labels))
    mean, std = r[f"{metric}_mean"], r.get(f"{metric}_std")
    quality = fmt(mean) + (f" ± {fmt(std).rstrip('%')}" if std is not None else "")
    marks = [name for name in AXES if r.get(f"frontier_{name}")]
    per = r.get("per_label") or {}
    classes = [" / ".join("-" if per.get(label) is None else f"{100 * per[label]:.0f}" for label in labels)]
    return [
        quality,
        num("test_macro_f1", 0.01, "{:.1f}%"),
        *(classes if labels else []),
        num("test_loss", spec="{:.4f}"),
        num("trainable_params"),
        num("trainable_pct", spec="{:.3f}%"),
        num("artifact_bytes", 2**20, "{:.2f}"),
        num("peak_memory_bytes", 2**30, "{:.2f}"),
        num("tokens_per_s"),
        num("wall_seconds", 60, "{:.1f}"),
        ", ".join(marks + (["below zero-shot"] if r.get("beats_zeroshot") is False else [])),
    ]


def headers(metric: str, labels: list[str] = ()) -> list[str]:
    classes = [f"accuracy per class, % ({' / '.join(labels)})"] if labels else []
    return ["#", "method", "runs", metric, "macro-F1", *classes, "test loss", "trainable", "trainable %",
            "adapter MiB", "peak mem GiB", "tokens/s", "wall min", "frontier"]  # fmt: skip


def to_markdown(table: list[dict[str, Any]], metric: str) -> str:
    labels = many_classes(table)
    columns = headers(metric, labels)
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for r in table:
        rank = "-" if r.get("rank") is None else str(r["rank"])
        cells = [rank, r["method"], str(r.get("runs", 0)), *_cells(r, metric, labels)]
        lines.append("| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |")
    return "\n".join(lines) + "\n"


def to_csv(table: list[dict[str, Any]], metric: str) -> str:
    buf = io.StringIO()
    labels = many_classes(table)
    columns = [c.format(m=metric) for c in CSV_COLUMNS] + [PER_LABEL + label for label in labels]
    writer = csv.DictWriter(buf, columns, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    for r in table:
        per = {PER_LABEL + label: v for label, v in (r.get("per_label") or {}).items()}
        writer.writerow({k: ("" if v is None else v) for k, v in {**r, **per}.items()})
    return buf.getvalue()


def to_html(table: list[dict[str, Any]], metric: str, title: str, notes: list[str], images: dict[str, str]) -> str:
    """A self-contained page: the table, the notes and the plots (``images``: caption -> base64 PNG)."""
    labels = many_classes(table)
    head = "".join(f"<th>{html.escape(h)}</th>" for h in headers(metric, labels))
    body = []
    for r in table:
        rank = "-" if r.get("rank") is None else str(r["rank"])
        cells = [rank, r["method"], str(r.get("runs", 0)), *_cells(r, metric, labels)]
        cls = ' class="front"' if r.get("frontier_params") or r.get("frontier_memory") else ""
        body.append(f"<tr{cls}>" + "".join(f"<td>{html.escape(c)}</td>" for c in cells) + "</tr>")
    figures = "".join(
        f'<figure><img alt="{html.escape(cap)}" src="data:image/png;base64,{b64}"><figcaption>'
        f"{html.escape(cap)}</figcaption></figure>"
        for cap, b64 in images.items()
    )
    items = "".join(f"<li>{html.escape(n)}</li>" for n in notes)
    style = (
        "body{font-family:system-ui,sans-serif;margin:2em;color:#222}table{border-collapse:collapse}"
        "td,th{padding:4px 10px;border-bottom:1px solid #ddd;text-align:right}td:nth-child(2),th:nth-child(2)"
        "{text-align:left}tr.front td{background:#eef6ee;font-weight:600}figure{display:inline-block;margin:1em}"
        "img{max-width:640px}"
    )
    return (
        f'<!doctype html><html><head><meta charset="utf-8"><title>{html.escape(title)}</title>'
        f"<style>{style}</style></head><body><h1>{html.escape(title)}</h1><ul>{items}</ul>"
        f"<table><thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table>{figures}</body></html>\n"
    )
