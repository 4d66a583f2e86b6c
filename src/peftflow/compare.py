"""A leaderboard of evaluated methods: quality beside cost, one row per method.

Reads the ``metrics.json`` files that evaluation writes and ranks them by the promotion metric, so
the leaderboard and the registry agree on what "better" means.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from peftflow.config import PromoteParams

COLUMNS = (  # (header, metrics key, format)
    ("accuracy", "test_accuracy", "{:.1%}"),
    ("test loss", "test_loss", "{:.4f}"),
    ("trainable %", "trainable_pct", "{:.3f}"),
    ("artifact MiB", "artifact_bytes", "{:.1f}"),
    ("tokens/s", "tokens_per_s", "{:,.0f}"),
    ("train min", "train_seconds", "{:.1f}"),
    ("peak memory GiB", "peak_memory_bytes", "{:.2f}"),
)
_SCALE = {"artifact_bytes": 2**20, "train_seconds": 60, "peak_memory_bytes": 2**30}


def leaderboard(metrics_files: list[Path], policy: PromoteParams) -> list[dict[str, Any]]:
    """The evaluated runs, best first by ``policy.metric``; a file without it is an error."""
    rows = []
    for path in metrics_files:
        result = json.loads(Path(path).read_text())
        if policy.metric not in result:
            raise KeyError(f"{path}: no {policy.metric!r} (the promotion metric); was it written by evaluate?")
        rows.append(result)
    return sorted(rows, key=lambda r: r[policy.metric], reverse=policy.higher_is_better)


def markdown(rows: list[dict[str, Any]]) -> str:
    """The leaderboard as a Markdown table, with the base model's zero-shot accuracy as a first row."""
    lines = ["| method | " + " | ".join(h for h, _, _ in COLUMNS) + " |", "|---" * (len(COLUMNS) + 1) + "|"]
    if rows and "test_accuracy" in rows[0].get("zeroshot", {}):
        zs = rows[0]["zeroshot"]
        cells = [f"{zs['test_accuracy']:.1%}", f"{zs['test_loss']:.4f}"] + ["-"] * (len(COLUMNS) - 2)
        lines.append("| base, zero-shot | " + " | ".join(cells) + " |")
    for r in rows:
        cells = [fmt.format(r[key] / _SCALE.get(key, 1)) if key in r else "-" for _, key, fmt in COLUMNS]
        lines.append(f"| {r['method']} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"
