"""One Prefect task per pipeline step. The logic is in ``peftflow.pipeline``; here: logging to the
Prefect run, retries where a step is idempotent, and no Prefect-side caching (DVC and MLflow keep
the versions; a cached task result would hide a changed dataset or a moved alias)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from prefect import get_run_logger, task
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.cache_policies import NO_CACHE
from prefect.runtime import flow_run
from prefect.settings import PREFECT_UI_URL

from peftflow import compare, nightly, pipeline, registry, report, sweep, tracking
from peftflow import reproduce as reproduce_core
from peftflow.cluster import jobs
from peftflow.pipeline import DataVersion, Project


@task(name="check-runner", cache_policy=NO_CACHE)
def check_runner(project: Project, sweep_storage: str | None = None) -> None:
    """A remote cluster whose workers could not reach the stores stops the flow here, in one line."""
    jobs.check_runner(project, sweep_storage)


@task(name="prepare-data", cache_policy=NO_CACHE, retries=1, retry_delay_seconds=5)  # dvc repro is idempotent
def prepare_data(project: Project, version: str | None = None) -> DataVersion:
    version = pipeline.prepare_data(project, version)
    ran = ", ".join(version.stages_run) or "nothing (DVC had it all)"
    get_run_logger().info("data version %s (DVC %s), %s; ran %s", version.version, version.dvc_md5, version.rows, ran)
    return version


@task(name="finetune", cache_policy=NO_CACHE, task_run_name="finetune-{method}")
def finetune(project: Project, method: str, data_version: DataVersion, tags: dict[str, str] | None = None) -> str:
    run_id = pipeline.finetune(project, method, data_version, {**prefect_tags(), **(tags or {})})
    get_run_logger().info("%s trained: MLflow run %s", method, run_id)
    return run_id


@task(name="evaluate", cache_policy=NO_CACHE, retries=1)  # re-scoring the same artifact is idempotent
def evaluate(project: Project, run_id: str, data_version: DataVersion | None = None) -> dict[str, float]:
    metrics = pipeline.evaluate(project, run_id, data_version)
    shown = {k: round(v, 4) for k, v in metrics.items() if k.startswith(("test_", "zeroshot_test_acc"))}
    get_run_logger().info("run %s: %s", run_id, shown)
    return metrics


@task(name="register", cache_policy=NO_CACHE)
def register(project: Project, run_id: str, seed_runs: list[str] | None = None) -> str:
    version = pipeline.register(project, run_id, seed_runs)
    get_run_logger().info("run %s registered as version %s (alias candidate)", run_id, version)
    return version


@task(name="promote", cache_policy=NO_CACHE)
def promote(project: Project, version: str, data_version: DataVersion | None = None) -> dict:
    decision = pipeline.promote(project, version, data_version)
    get_run_logger().info("version %s: %s", version, decision.summary)
    return {"promoted": decision.promote, "summary": decision.summary, "reasons": decision.reasons}


@task(name="reproduce", cache_policy=NO_CACHE)
def reproduce(project: Project, run_id: str, allow_code_change: bool = False) -> dict:
    result = reproduce_core.reproduce(run_id, project.root, project.params(None), allow_code_change)
    get_run_logger().info("run %s reproduced as %s; drift %s", run_id, result["run_id"], result["drift"])
    return {k: result[k] for k in ("original", "run_id", "drift")}


@task(name="predict", cache_policy=NO_CACHE)
def predict(project: Project, input_path: Path, model_uri: str | None = None) -> dict:
    result = pipeline.predict(project, input_path, model_uri)
    figures = ", ".join(f"{k} {v:.4f}" for k, v in result.metrics.items() if "." not in k) or "no labels to score"
    get_run_logger().info("%d rows scored with %s -> %s (%s)", result.rows, result.model, result.output, figures)
    return result.model_dump(mode="json")


def prefect_tags() -> dict[str, str]:
    """The flow run a user started (the root of this run's tree), for the MLflow run: its id and UI page."""
    root = flow_run.root_flow_run_id
    if not root:
        return {}
    ui = PREFECT_UI_URL.value()
    return {"prefect.flow_run_id": root, **({"prefect.flow_run_url": f"{ui}/runs/flow-run/{root}"} if ui else {})}


@task(name="champion", cache_policy=NO_CACHE)
def champion(project: Project) -> dict[str, Any] | None:
    """The current champion (version, run, method, metrics), or None."""
    params = project.params(None)
    client, _ = tracking.connect(params, project.root)
    return registry.aliased(client, params.promote.model_name, registry.CHAMPION)


@task(name="nightly-check", cache_policy=NO_CACHE)
def nightly_check(project: Project, methods: list[str] | None, data_version: DataVersion) -> nightly.Check:
    check = nightly.check(project, methods, data_version)
    get_run_logger().info("%s", check.reason)
    return check


@task(name="nightly-mark", cache_policy=NO_CACHE)
def nightly_mark(project: Project, run_ids: list[str], check: nightly.Check) -> None:
    nightly.mark(project, run_ids, check)


@task(name="publish", cache_policy=NO_CACHE)
def publish(
    project: Project,
    key: str,
    headline: str,
    data_version: DataVersion,
    results: list[dict[str, Any]],
    before: dict[str, Any] | None,
    after: dict[str, Any] | None,
) -> None:
    """The run's summary as Prefect artifacts (under the flow run, and ``key`` keeps their history):
    Markdown (what happened and why, champion before and after, MLflow links), and a results table."""
    table = report.rows(project, results) if results else []
    links = {r["run_id"]: row["mlflow_run"] for r, row in zip(results, table, strict=True)}  # one MLflow lookup
    text = report.markdown(project, key, headline, data_version, results, before, after, links)
    create_markdown_artifact(text, key=f"{key}-summary", description=headline[:200])
    if results:
        create_table_artifact(table, key=f"{key}-results", description="test split")


@task(name="workspace-data", cache_policy=NO_CACHE)
def workspace_data(project: Project) -> DataVersion:
    """The workspace's prepared data as it is (no `dvc repro`: inside a DVC stage it is a dependency)."""
    version = pipeline.prepare_data(project, repro=False)
    get_run_logger().info("data version %s (DVC %s), %s", version.version, version.dvc_md5, version.rows)
    return version


@task(name="compare-plan", cache_policy=NO_CACHE)
def compare_plan(
    project: Project, data_version: DataVersion, methods: list[str] | None, seeds: int | None, budget: int | None
) -> compare.Plan:
    plan = compare.plan(project, data_version, methods, seeds, budget)
    steps = ", ".join(f"{r.method}/{r.seed}: {r.max_steps}" for r in plan.runs)
    get_run_logger().info("%d runs of %s tokens on %s; steps %s", len(plan.runs), f"{plan.token_budget:,}",
                          plan.device, steps)  # fmt: skip
    return plan


@task(name="compare-start", cache_policy=NO_CACHE)
def compare_start(project: Project, plan: compare.Plan, data_version: DataVersion) -> str:
    run_id = compare.start(project, plan, data_version, prefect_tags())
    get_run_logger().info("comparison: MLflow parent run %s", run_id)
    return run_id


@task(name="compare-finish", cache_policy=NO_CACHE)
def compare_finish(
    project: Project, plan: compare.Plan, data_version: DataVersion, records: list[dict], parent: str
) -> dict[str, Any]:
    report = compare.finish(project, plan, data_version, records, parent)
    for line in report["notes"]:
        get_run_logger().info("%s", line)
    return report


@task(name="compare-abort", cache_policy=NO_CACHE)
def compare_abort(project: Project, parent: str) -> None:
    compare.abort(project, parent)


@task(name="publish-compare", cache_policy=NO_CACHE)
def publish_compare(project: Project, report: dict[str, Any]) -> None:
    """The leaderboard as a table artifact (key ``compare-leaderboard``) and a Markdown summary
    (``compare-summary``: notes, table, where the files and the MLflow parent run are)."""
    params = project.params(None)
    metric = params.promote.reported_metric
    table = [{k: v for k, v in r.items() if k != "run_ids"} for r in report["table"]]
    create_table_artifact(table, key="compare-leaderboard", description=f"best first by {metric}")
    _, experiment_id = tracking.connect(params, project.root)
    link = tracking.run_url(params, project.root, report["parent_run_id"], experiment_id)
    where = f"files: `{report['out_dir']}` (leaderboard.csv/.md/.html, plots); [MLflow parent run]({link})"
    text = compare.summary_markdown("compare", [*report["notes"], where], report["table"], metric)
    create_markdown_artifact(text, key="compare-summary", description="quality vs compute")


@task(name="sweep-plan", cache_policy=NO_CACHE)
def sweep_plan(project: Project, data_version: DataVersion, method: str | None, trials: int | None) -> sweep.Plan:
    plan = sweep.plan(project, data_version, method, trials)
    space = ", ".join(f"{k} {v}" for k, v in plan.sweep.space.items())
    get_run_logger().info("%d trials of %s over %s; objective %s", plan.trials, plan.method, space, plan.metric)
    return plan


@task(name="sweep-start", cache_policy=NO_CACHE)
def sweep_start(project: Project, plan: sweep.Plan, data_version: DataVersion) -> str:
    run_id = sweep.start(project, plan, data_version, prefect_tags())
    get_run_logger().info("sweep: MLflow parent run %s", run_id)
    return run_id


@task(name="sweep-finish", cache_policy=NO_CACHE)
def sweep_finish(project: Project, plan: sweep.Plan, rows: list[dict], parent: str) -> dict[str, Any]:
    report = sweep.finish(project, plan, rows, parent)
    for line in report["notes"]:
        get_run_logger().info("%s", line)
    text = (Path(report["out_dir"]) / "sweep.md").read_text()
    create_markdown_artifact(text, key="sweep-summary", description=report["notes"][0][:200])
    return report


@task(name="sweep-abort", cache_policy=NO_CACHE)
def sweep_abort(project: Project, parent: str) -> None:
    sweep.abort(project, parent)


@task(name="mark-pruned", cache_policy=NO_CACHE)
def mark_pruned(project: Project, run_id: str | None, reason: str | None) -> None:
    """A pruned trial's MLflow run: KILLED (stopped on purpose), not FAILED, with the reason."""
    if run_id:
        client, _ = tracking.connect(project.params(None), project.root)
        client.set_tag(run_id, "peftflow.sweep.pruned", reason or "pruned")
        client.set_terminated(run_id, "KILLED")
