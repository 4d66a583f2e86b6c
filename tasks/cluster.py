"""Runs on the runner the ``runner:`` params name: the Prefect task runner for each kind, the task
that executes one job (in a process of its own, :mod:`peftflow.cluster.jobs`), and submitting many
at once with the resources each needs."""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import nullcontext
from typing import Any

from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE
from prefect.futures import as_completed
from prefect.task_runners import ThreadPoolTaskRunner

from peftflow.cluster import jobs
from peftflow.cluster.jobs import Job, JobResult
from peftflow.cluster.params import RunnerParams


def task_runner(runner: RunnerParams, root: str) -> Any:
    """The Prefect task runner of ``runner``. ``process``: one job at a time (each job is a child
    process, so the one thread only waits); ``ray``: a local Ray cluster with this machine's CPUs
    (and GPUs), or the cluster at ``address``, which gets the project folder as its working directory."""
    if runner.kind == "process":
        return ThreadPoolTaskRunner(max_workers=1)
    from prefect_ray import RayTaskRunner

    init: dict[str, Any] = {"include_dashboard": False, "configure_logging": False}
    if runner.address is None:
        init["num_cpus"] = os.cpu_count()
    else:
        init["address"] = runner.address
        # the project (code, params, dvc.yaml) as each worker's working directory; data comes by DVC hash
        excludes = [".venv", ".git", "runs", "mlruns", "mlartifacts", "mlflow.db", "data", "models", "reports",
                    ".dvc/cache", "dvcstore"]  # fmt: skip
        init["runtime_env"] = {"working_dir": root, "excludes": excludes}
    return RayTaskRunner(init_kwargs=init)


def threads(runner: RunnerParams) -> int | None:
    """torch's CPU threads in each run: the CPUs Ray reserved for it; all cores for ``process``."""
    return runner.cpus_per_run if runner.kind == "process" else (runner.cpus_per_run or 1)


def _ray_options(runner: RunnerParams, processes: int) -> dict[str, Any]:
    """What Ray reserves for one run: its CPUs, and its GPUs (one per training process when the
    cluster has GPUs), so runs never share a device; no retry (a retried run would be a second MLflow run)."""
    import ray

    gpus = runner.gpus_per_run
    if gpus is None:
        gpus = processes if ray.cluster_resources().get("GPU", 0) > 0 else 0
    return {"num_cpus": runner.cpus_per_run or 1, "num_gpus": gpus, "max_retries": 0}


def _resources(runner: RunnerParams, job: Job):
    if runner.kind == "ray":
        from prefect_ray.context import remote_options

        return remote_options(**_ray_options(runner, job.project.params(job.method).distributed.num_processes))
    return nullcontext()


@task(name="run", cache_policy=NO_CACHE)
def run_job(job: Job) -> JobResult:
    """One job in a process of its own, wherever the task runner put this task."""
    result = jobs.run(job)
    logger = get_run_logger()
    if result.error_type == "TrialPruned":
        logger.info("%s: %s", result.name, result.error)
    elif result.error:
        logger.error("%s failed on %s: %s", result.name, result.host, result.error)
    else:
        shown = {k: round(v, 4) for k, v in result.metrics.items() if k.startswith(("test_accuracy", "test_loss"))}
        logger.info("%s: MLflow run %s on %s %s", result.name, result.run_id, result.host, shown or "")
    return result


def submit_all(jobs_: list[Job], runner: RunnerParams) -> Iterator[tuple[int, JobResult]]:
    """Every job on the flow's task runner, at most ``runner.max_parallel`` at once; (index, result)
    as each finishes. A task that failed outside its job (a lost Ray node) is a failed result too."""
    limit = runner.max_parallel or len(jobs_) or 1
    pending = list(enumerate(jobs_))
    inflight: dict[Any, tuple[int, Job]] = {}
    while pending or inflight:
        while pending and len(inflight) < limit:
            i, job = pending.pop(0)
            with _resources(runner, job):
                future = run_job.with_options(task_run_name=f"run-{job.name or job.method}").submit(job)
            inflight[future] = (i, job)
        future = next(as_completed(list(inflight)))
        i, job = inflight.pop(future)
        yield i, _result(future, job)


def _result(future, job: Job) -> JobResult:
    try:
        return future.result()
    except Exception as e:  # noqa: BLE001 - the task itself failed (its worker died): a failed row
        error = " ".join(str(e).split())[:500] or type(e).__name__
        return JobResult(name=job.name or job.method, method=job.method, error=error, error_type=type(e).__name__)


def capacity(runner: RunnerParams, processes: int = 1) -> int:
    """How many runs the runner runs at once: ``max_parallel``, else what the cluster's CPUs (or
    GPUs, when runs take GPUs) fit; 1 for ``process``. Call inside a flow on that runner."""
    if runner.kind == "process":
        return 1
    if runner.max_parallel:
        return runner.max_parallel
    import ray

    total, options = ray.cluster_resources(), _ray_options(runner, processes)
    fits = [total.get("CPU", 0) // options["num_cpus"]]
    if options["num_gpus"]:
        fits.append(total.get("GPU", 0) // options["num_gpus"])
    return max(1, int(min(fits)))
