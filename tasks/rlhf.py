"""Prefect tasks for the RLHF chain; the logic is in ``peftflow.rlhf.stages``."""

from __future__ import annotations

from prefect import get_run_logger, task
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.cache_policies import NO_CACHE

from peftflow.pipeline import DataVersion, Project
from peftflow.rlhf import stages
from tasks.pipeline import prefect_tags


@task(name="rlhf-prepare-data", cache_policy=NO_CACHE, retries=1, retry_delay_seconds=5)  # dvc repro is idempotent
def prepare_data(project: Project) -> DataVersion:
    version = stages.prepare_data(project)
    ran = ", ".join(version.stages_run) or "nothing (DVC had it all)"
    get_run_logger().info("RLHF data version %s (DVC %s); ran %s", version.version, version.dvc_md5, ran)
    return version


@task(name="rlhf-stage", cache_policy=NO_CACHE, task_run_name="rlhf-{stage}")
def run_stage(
    project: Project, stage: str, data_version: DataVersion, inputs: dict[str, stages.StageResult], force: bool
) -> stages.StageResult:
    result = stages.run_stage(project, stage, data_version, inputs, prefect_tags(), force)
    how = "reused (same params, data and inputs)" if result.reused else f"trained in MLflow run {result.run_id}"
    get_run_logger().info("%s: %s version %s %s", stage, result.model_name, result.version, how)
    return result


@task(name="rlhf-publish", cache_policy=NO_CACHE)
def publish(data_version: DataVersion, results: list[stages.StageResult]) -> None:
    rows = stages.summary_rows(results)
    lines = [f"# RLHF chain on data {data_version.version} (DVC {data_version.dvc_md5})", ""]
    lines += [f"- **{r['stage']}**: {r['version']} ({r['how']}, MLflow run {r['run']}): {r['result']}" for r in rows]
    create_markdown_artifact("\n".join(lines), key="rlhf-summary", description="the RLHF chain's stages")
    create_table_artifact(rows, key="rlhf-results", description="one row per stage")
