"""One Prefect task per pipeline step. The logic is in ``peftflow.pipeline``; here: logging to the
Prefect run, retries where a step is idempotent, and no Prefect-side caching (DVC and MLflow keep
the versions; a cached task result would hide a changed dataset or a moved alias)."""

from __future__ import annotations

from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE

from peftflow import pipeline
from peftflow import reproduce as reproduce_core
from peftflow.pipeline import DataVersion, Project


@task(name="prepare-data", cache_policy=NO_CACHE, retries=1, retry_delay_seconds=5)  # dvc repro is idempotent
def prepare_data(project: Project) -> DataVersion:
    version = pipeline.prepare_data(project)
    ran = ", ".join(version.stages_run) or "nothing (DVC had it all)"
    get_run_logger().info("data version %s (DVC %s), %s; ran %s", version.version, version.dvc_md5, version.rows, ran)
    return version


@task(name="finetune", cache_policy=NO_CACHE, task_run_name="finetune-{method}")
def finetune(project: Project, method: str, data_version: DataVersion) -> str:
    run_id = pipeline.finetune(project, method, data_version)
    get_run_logger().info("%s trained: MLflow run %s", method, run_id)
    return run_id


@task(name="evaluate", cache_policy=NO_CACHE, retries=1)  # re-scoring the same artifact is idempotent
def evaluate(project: Project, run_id: str) -> dict[str, float]:
    metrics = pipeline.evaluate(project, run_id)
    shown = {k: round(v, 4) for k, v in metrics.items() if k.startswith(("test_", "zeroshot_test_acc"))}
    get_run_logger().info("run %s: %s", run_id, shown)
    return metrics


@task(name="register", cache_policy=NO_CACHE)
def register(project: Project, run_id: str) -> str:
    version = pipeline.register(project, run_id)
    get_run_logger().info("run %s registered as version %s (alias candidate)", run_id, version)
    return version


@task(name="promote", cache_policy=NO_CACHE)
def promote(project: Project) -> dict:
    decision = pipeline.promote(project)
    get_run_logger().info("%s", decision)
    return {"promoted": decision.promote, "reasons": decision.reasons}


@task(name="reproduce", cache_policy=NO_CACHE)
def reproduce(project: Project, run_id: str, allow_code_change: bool = False) -> dict:
    result = reproduce_core.reproduce(run_id, project.root, project.params(None), allow_code_change)
    get_run_logger().info("run %s reproduced as %s; drift %s", run_id, result["run_id"], result["drift"])
    return {k: result[k] for k in ("original", "run_id", "drift")}
