"""What one isolated run does (in its child process, :mod:`.isolated`), and the caller's side of it.

A job is one method trained and scored on one data version: the unit a comparison, an experiment
and a sweep hand to their runner. Its MLflow run carries the job's key (``peftflow.job``) and where
it ran (``peftflow.host``, ``peftflow.pid``), so the caller can find the run of a job whose process
died, and end it FAILED with the reason instead of leaving it RUNNING forever.
"""

from __future__ import annotations

import json
import logging
import socket
import uuid
from pathlib import Path
from typing import Any

from pydantic import BaseModel, Field

from peftflow import data, pipeline, tracking, versioning
from peftflow.cluster import isolated
from peftflow.pipeline import DataVersion, Project
from peftflow.sweep import TrialRef

log = logging.getLogger(__name__)

JOB_TAG = "peftflow.job"


class RunsFailed(RuntimeError):
    """Some runs of a flow failed (the others finished); one line naming each and why."""

    def __init__(self, failed: list[JobResult], total: int):
        self.failed = failed
        names = "; ".join(f"{r.name}: {r.error}" for r in failed)
        super().__init__(f"{len(failed)} of {total} runs failed: {names}")


class Job(BaseModel):
    """One run for a runner: ``method`` on ``data_version`` with the project's overrides (which
    carry the run's own seed, step budget or sampled hyperparameters), tagged ``tags``."""

    project: Project
    method: str
    data_version: DataVersion
    tags: dict[str, str] = {}
    score: bool = True  # evaluate on the test split after training
    threads: int | None = None  # torch CPU threads in the run's process
    trial: TrialRef | None = None  # a sweep's trial: validations are reported to it, and it may be pruned
    key: str = Field(default_factory=lambda: uuid.uuid4().hex)
    name: str = ""  # for logs and the Prefect task run: method/seed, trial 3, ...


class JobResult(BaseModel):
    """A job's row: its MLflow run (also when it failed after the run started), metrics, or error."""

    name: str
    method: str
    run_id: str | None = None
    metrics: dict[str, float] = {}
    evals: list[dict[str, float]] = []  # the periodic validations: {step, val_loss, val_accuracy}
    error: str | None = None
    error_type: str | None = None
    host: str | None = None


def check_runner(project: Project, sweep_storage: str | None = None) -> None:
    """The runner's params against where the stores are, before any run starts (one line)."""
    from peftflow.cluster.params import check_reachable
    from peftflow.config import ParamsError

    params = project.params(None)
    try:
        check_reachable(params.runner, tracking.tracking_uri(params, project.root), project.root, sweep_storage)
    except ValueError as e:
        raise ParamsError(str(e)) from None


def _located(project: Project) -> Project:
    """The project on this machine: its folder, or (a worker's copy) the current folder."""
    return project if project.root.exists() else project.at(Path.cwd())


def here(job: Job) -> Job:
    """The job as it runs on this machine: a project folder that is not here (a Ray worker's copy
    of the project, in its working directory) becomes the current folder, and data that is not
    here (or not this version) is restored by its DVC hash from the cache or the DVC remote."""
    project, version = _located(job.project), job.data_version
    folder = project.root / version.out_dir
    found = data.read_manifest(folder)["version"] if (folder / "manifest.json").exists() else None
    if found != version.version:
        if not version.dvc_md5:
            raise data.DataError(
                f"{folder}: holds data version {found or 'none'}, expected {version.version}, and the run "
                f"names no DVC hash to fetch it by"
            )
        out = versioning.restored(project.root, version.dvc_md5, project.params(None).train.output_dir)
        version = version.model_copy(update={"out_dir": out})
        log.info("data version %s restored from DVC (%s) into %s", version.version, version.dvc_md5, out)
    return job.model_copy(update={"project": project, "data_version": version})


def train_and_score(job: Job) -> dict[str, Any]:
    """In the job's process: finetune (a new MLflow run), then evaluate on the test split. A sweep's
    trial reports each periodic validation to its Optuna trial, which may prune it."""
    job = here(job)
    tags = {**job.tags, JOB_TAG: job.key}  # where it runs (peftflow.host, peftflow.pid): tracking's owner tags
    callbacks = (job.trial.reporter(),) if job.trial else ()
    run_id = pipeline.finetune(job.project, job.method, job.data_version, tags, callbacks)
    metrics = pipeline.evaluate(job.project, run_id, job.data_version) if job.score else {}
    return {"run_id": run_id, "metrics": metrics, "evals": _evals(job, run_id)}


def _evals(job: Job, run_id: str) -> list[dict[str, float]]:
    """The run's periodic validations, from its summary in the run folder (named after the run)."""
    params = job.project.params(job.method).rebased(job.project.root)
    summary = params.train.output_dir / run_id / "train_summary.json"
    return json.loads(summary.read_text())["evals"] if summary.exists() else []


def run(job: Job) -> JobResult:
    """``job`` in a process of its own; a failure of any kind is the result's ``error``, and an
    MLflow run its process left RUNNING is ended FAILED with the reason (tag ``peftflow.failure``)."""
    outcome = isolated.call(train_and_score, job, threads=job.threads, name=f"peftflow-{job.name or job.method}")
    result = JobResult(name=job.name or job.method, method=job.method, host=socket.gethostname())
    if outcome.ok:
        result.run_id, result.metrics, result.evals = (outcome.value[k] for k in ("run_id", "metrics", "evals"))
    else:
        result.error, result.error_type = outcome.error, outcome.error_type
        result.run_id = _end_orphans(job, outcome.error)
    return result


def _end_orphans(job: Job, reason: str) -> str | None:
    """The MLflow run of a failed job, if it got that far; FAILED if its process left it RUNNING."""
    project = _located(job.project)
    try:
        client, experiment_id = tracking.connect(project.params(None), project.root)
        found = client.search_runs([experiment_id], filter_string=f"tags.`{JOB_TAG}` = '{job.key}'")
    except Exception as e:  # noqa: BLE001 - the job's own error is what the caller must see
        log.warning("could not look up the MLflow run of failed job %s: %s", job.name, isolated.one_line(e))
        return None
    for r in found:
        if r.info.status == "RUNNING":
            client.set_tag(r.info.run_id, "peftflow.failure", reason[:5000])
            client.set_terminated(r.info.run_id, "FAILED")
    return found[0].info.run_id if found else None
