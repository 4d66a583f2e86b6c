"""The pipeline flows. Each step is also a flow of its own, so it can be started alone from
Python, ``python -m flows`` or the Prefect UI (the pydantic parameters render as a form)."""

from __future__ import annotations

from prefect import flow

from peftflow.pipeline import DataVersion, Project
from tasks import pipeline as steps

HERE = Project()  # the project in the working directory, with its params/
DEFAULT_METHODS = ["lora"]


@flow(name="prepare_data")
def prepare_data(project: Project = HERE) -> DataVersion:
    """DVC-versioned base model and data: `dvc repro` (cached stages skipped), `dvc push`."""
    return steps.prepare_data(project)


@flow(name="finetune")
def finetune(method: str, data_version: DataVersion, project: Project = HERE) -> str:
    """One method on one data version; returns the MLflow run id."""
    return steps.finetune(project, method, data_version)


@flow(name="evaluate")
def evaluate(run_id: str, project: Project = HERE) -> dict[str, float]:
    """Test metrics of a run, beside the base model's zero-shot figures."""
    return steps.evaluate(project, run_id)


@flow(name="register")
def register(run_id: str, project: Project = HERE) -> str:
    """A new registry version from the run's artifact; alias `candidate` moves to it."""
    return steps.register(project, run_id)


@flow(name="promote")
def promote(project: Project = HERE) -> dict:
    """Alias `champion` moves to `candidate` only if the promotion policy says it is better."""
    return steps.promote(project)


@flow(name="experiment")
def experiment(methods: list[str] = DEFAULT_METHODS, project: Project = HERE) -> list[dict]:
    """prepare_data -> (finetune -> evaluate -> register -> promote) for each method, in order."""
    data_version = prepare_data(project)
    results = []
    for method in methods:
        run_id = finetune(method, data_version, project)
        metrics = evaluate(run_id, project)
        version = register(run_id, project)
        decision = promote(project)
        results.append({"method": method, "run_id": run_id, "version": version, "metrics": metrics, **decision})
    return results


@flow(name="reproduce")
def reproduce(run_id: str, allow_code_change: bool = False, project: Project = HERE) -> dict:
    """Re-run a logged run from its params, commit and data version; the metrics' drift."""
    return steps.reproduce(project, run_id, allow_code_change)
