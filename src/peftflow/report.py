"""What a flow run did, as Markdown and table rows for Prefect artifacts (``tasks/`` publishes them).

A result is the dict the experiment flow collects per method: ``method``, ``run_id``, ``version``,
``metrics`` (MLflow's flat metrics), ``promoted``, ``summary`` (the decision in one line),
``reasons``. Each row links the MLflow run.
"""

from __future__ import annotations

from typing import Any

from peftflow import leaderboard, tracking
from peftflow.pipeline import DataVersion, Project


def _links(project: Project, results: list[dict[str, Any]]) -> dict[str, str]:
    params = project.params(None)
    _, experiment_id = tracking.connect(params, project.root)
    return {r["run_id"]: tracking.run_url(params, project.root, r["run_id"], experiment_id) for r in results}


def rows(project: Project, results: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One flat row per trained method (a Prefect table artifact)."""
    links = _links(project, results)
    out = []
    for r in results:
        m = r["metrics"]
        out.append(
            {
                "method": r["method"],
                "version": r["version"],
                "val_accuracy": round(m["val_accuracy"], 4) if "val_accuracy" in m else None,
                "test_accuracy": round(m["test_accuracy"], 4) if "test_accuracy" in m else None,
                "test_macro_f1": round(m["test_macro_f1"], 4) if "test_macro_f1" in m else None,
                "test_loss": round(m["test_loss"], 4),
                "zeroshot_accuracy": round(m["zeroshot_test_accuracy"], 4) if "zeroshot_test_accuracy" in m else None,
                "trainable_pct": round(m.get("trainable_pct", 0.0), 4),
                "tokens_per_s": round(m.get("tokens_per_s", 0.0), 1),
                "outcome": "promoted" if r["promoted"] else "kept",
                "decision": r.get("summary", ""),
                "mlflow_run": links[r["run_id"]],
            }
        )
    return out


def _champion(c: dict[str, Any] | None, metric: str) -> str:
    if c is None:
        return "none"
    value = c["metrics"].get(metric)
    shown = f", {metric} {value:.4f}" if value is not None else ""
    return f"version {c['version']} ({c['method']}, run `{c['run_id']}`{shown})"


def markdown(
    project: Project,
    title: str,
    headline: str,
    data_version: DataVersion,
    results: list[dict[str, Any]],
    before: dict[str, Any] | None,
    after: dict[str, Any] | None,
    links: dict[str, str] | None = None,
) -> str:
    """A summary: what happened and why, the data, each method's metrics and outcome, the champion
    before and after. ``links``: MLflow run URLs by run id, if the caller has them already."""
    policy = project.params(None).promote
    metric = policy.metric
    lines = [
        f"# {title}",
        "",
        headline,
        "",
        f"- data version `{data_version.version}` (DVC `{data_version.dvc_md5}`), rows {data_version.rows}",
        f"- champion before: {_champion(before, metric)}",
        f"- champion after: {_champion(after, metric)}",
    ]
    if results:
        links = links or _links(project, results)
        records = [{"method": r["method"], "seed": "", "run_id": r["run_id"], "metrics": r["metrics"], "error": None}
                   for r in results]  # fmt: skip
        table = leaderboard.rows(records, policy)
        lines += ["", "## Results (test split)", "", leaderboard.to_markdown(table, policy.reported_metric)]
        lines += ["## Outcome (decided on the validation split)", ""]
        for r in results:
            verdict = "promoted to champion" if r["promoted"] else "kept as candidate"
            lines.append(
                f"- **{r['method']}**: version {r['version']} {verdict}: {r.get('summary', '')} "
                f"([MLflow run]({links[r['run_id']]}))"
            )
            lines += [f"  - {reason}" for reason in r["reasons"]]
    return "\n".join(lines) + "\n"
