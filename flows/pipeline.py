"""The pipeline flows. Each step is also a flow of its own, so it can be started alone from
Python, ``python -m flows`` or the Prefect UI (the pydantic parameters render as a form)."""

from __future__ import annotations

from typing import Literal

from prefect import flow

from peftflow.methods import method_names
from peftflow.pipeline import DataVersion, Project
from tasks import pipeline as steps

HERE = Project()  # the project in the working directory, with its params/
# the registered methods: a pick list in the UI's form, checked by the server before a run starts
Method = Literal[tuple(method_names())]
DEFAULT_METHODS = ["lora"]
COMPARE_METHODS = ["lora", "ia3"]


@flow(name="prepare_data")
def prepare_data(project: Project = HERE, data_version: str | None = None) -> DataVersion:
    """DVC-versioned base model and data: `dvc repro` (cached stages skipped), `dvc push`; with
    `data_version` (a DVC hash, or a data version a logged run names), that earlier data, restored."""
    return steps.prepare_data(project, data_version)


@flow(name="finetune")
def finetune(method: Method, data_version: DataVersion, project: Project = HERE) -> str:
    """One method on one data version; returns the MLflow run id."""
    return steps.finetune(project, method, data_version)


@flow(name="evaluate")
def evaluate(run_id: str, project: Project = HERE, data_version: DataVersion | None = None) -> dict[str, float]:
    """Test metrics of a run, beside the base model's zero-shot figures."""
    return steps.evaluate(project, run_id, data_version)


@flow(name="register")
def register(run_id: str, project: Project = HERE) -> str:
    """A new registry version from the run's artifact; alias `candidate` moves to it."""
    return steps.register(project, run_id)


@flow(name="promote")
def promote(project: Project = HERE, data_version: DataVersion | None = None) -> dict:
    """Alias `champion` moves to `candidate` only if the promotion policy says it is better."""
    return steps.promote(project, data_version)


def _each_method(methods: list[Method], data: DataVersion, project: Project) -> list[dict]:
    """finetune -> evaluate -> register -> promote, per method, in order."""
    results = []
    for method in methods:
        run_id = finetune(method, data, project)
        metrics = evaluate(run_id, project, data)
        version = register(run_id, project)
        decision = promote(project, data)
        results.append({"method": method, "run_id": run_id, "version": version, "metrics": metrics, **decision})
    return results


@flow(name="experiment")
def experiment(
    methods: list[Method] = DEFAULT_METHODS, project: Project = HERE, data_version: str | None = None
) -> list[dict]:
    """prepare_data -> (finetune -> evaluate -> register -> promote) for each method, in order.

    Args:
        methods: PEFT methods to train, in order (names of params/methods/*.yaml)
        project: the project folder, its params folder and KEY.PATH=VALUE overrides (train.lr=1.0e-4)
        data_version: a DVC hash (dvc.data_md5 of a run) or data version to train on; empty: the workspace's data
    """
    data = prepare_data(project, data_version)
    before = steps.champion(project)
    results = _each_method(methods, data, project)
    steps.publish(
        project, "experiment", f"trained {', '.join(methods)}", data, results, before, steps.champion(project)
    )
    return results


@flow(name="compare")
def compare(methods: list[Method] = COMPARE_METHODS, project: Project = HERE) -> list[dict]:
    """Every listed method on the same data, one after another; a leaderboard artifact ranks them.

    Args:
        methods: PEFT methods to compare (names of params/methods/*.yaml)
        project: the project folder, its params folder and KEY.PATH=VALUE overrides
    """
    results = experiment(methods, project)
    steps.publish_leaderboard(project, results)
    return results


@flow(name="nightly-retrain")
def nightly_retrain(methods: list[Method] | None = None, project: Project = HERE) -> dict:
    """Retrain the configured methods (params: nightly.methods) unless data and params are unchanged
    since the last nightly run that finished; register, and promote if the policy says so.

    Args:
        methods: methods to retrain; empty: params' nightly.methods
        project: the project folder, its params folder and KEY.PATH=VALUE overrides
    """
    data = prepare_data(project)
    check = steps.nightly_check(project, methods, data)
    before = steps.champion(project)
    if check.skip:
        steps.publish(project, "nightly-retrain", check.reason, data, [], before, before)
        return {"trained": False, "reason": check.reason, "results": []}
    results = _each_method(check.methods, data, project)
    steps.nightly_mark(project, [r["run_id"] for r in results], check)
    steps.publish(project, "nightly-retrain", check.reason, data, results, before, steps.champion(project))
    return {"trained": True, "reason": check.reason, "results": results}


@flow(name="reproduce")
def reproduce(run_id: str, allow_code_change: bool = False, project: Project = HERE) -> dict:
    """Re-run a logged run from its params, commit and data version; the metrics' drift."""
    return steps.reproduce(project, run_id, allow_code_change)
