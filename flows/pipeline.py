"""The pipeline flows. Each step is also a flow of its own, so it can be started alone from
Python, ``python -m flows`` or the Prefect UI (the pydantic parameters render as a form)."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from prefect import flow

from peftflow import compare as compare_core
from peftflow import sweep as sweep_core
from peftflow.cluster import jobs as jobs_core
from peftflow.cluster.jobs import Job, JobResult
from peftflow.cluster.params import RunnerParams
from peftflow.methods import method_names
from peftflow.pipeline import DataVersion, Project
from tasks import cluster
from tasks import pipeline as steps

HERE = Project()  # the project in the working directory, with its params/
# the registered methods: a pick list in the UI's form, checked by the server before a run starts
Method = Literal[tuple(method_names())]
DEFAULT_METHODS = ["lora"]


@flow(name="prepare_data")
def prepare_data(project: Project = HERE, data_version: str | None = None) -> DataVersion:
    """DVC-versioned base model and data: `dvc repro` (cached stages skipped), `dvc push`; with
    `data_version` (a DVC hash, or a data version a logged run names), that earlier data, restored."""
    project = project.frozen()  # every step of this run reads the params files as they are now
    return steps.prepare_data(project, data_version)


@flow(name="finetune")
def finetune(method: Method, data_version: DataVersion, project: Project = HERE) -> str:
    """One method on one data version; returns the MLflow run id."""
    project = project.frozen()
    return steps.finetune(project, method, data_version)


@flow(name="evaluate")
def evaluate(run_id: str, project: Project = HERE, data_version: DataVersion | None = None) -> dict[str, float]:
    """Test metrics of a run, beside the base model's zero-shot figures."""
    project = project.frozen()
    return steps.evaluate(project, run_id, data_version)


@flow(name="register")
def register(run_id: str, project: Project = HERE, seed_runs: list[str] | None = None) -> str:
    """A new registry version from the run's artifact; alias `candidate` moves to it. `seed_runs`:
    every run of a multi-seed candidate (promote.seeds), which promotion judges by their mean."""
    project = project.frozen()
    return steps.register(project, run_id, seed_runs)


@flow(name="promote")
def promote(version: str, project: Project = HERE, data_version: DataVersion | None = None) -> dict:
    """Alias `champion` moves to registered `version` only if the promotion policy says it is better."""
    project = project.frozen()
    return steps.promote(project, version, data_version)


@flow(name="runs")
def runs(jobs: list[Job], runner: RunnerParams) -> list[JobResult]:
    """Each job (one method trained and scored) in a process of its own, on this flow's task
    runner (the ``runner:`` params); the results in the jobs' order, failed ones with their error."""
    results: list[JobResult | None] = [None] * len(jobs)
    for i, result in cluster.submit_all(jobs, runner):
        results[i] = result
    return results


def on_runner(project: Project, jobs: list[Job]) -> list[JobResult]:
    """The ``runs`` subflow on the task runner the project's ``runner:`` params name."""
    runner = project.params(None).runner
    return runs.with_options(task_runner=cluster.task_runner(runner, str(project.root)))(jobs, runner)


def _job(project: Project, method: str, data: DataVersion, name: str, tags: dict[str, str] | None = None) -> Job:
    runner = project.params(None).runner
    project = project.at(project.root.resolve())  # the same folder from a worker's working directory
    return Job(project=project, method=method, data_version=data, tags={**steps.prefect_tags(), **(tags or {})},
               threads=cluster.threads(runner), name=name)  # fmt: skip


def _each_method(methods: list[Method], data: DataVersion, project: Project) -> tuple[list[dict], list[JobResult]]:
    """finetune -> evaluate for every method (``promote.seeds`` runs each, seeds seed, seed+1, ...)
    on the runner (at once, where it runs several), then register -> promote for each in order:
    with several seeds the best one's adapter is registered and their mean is judged. The results,
    and the runs that failed (their method left out: the flow fails naming them once the others
    are registered and published)."""
    policy = project.params(None).promote
    jobs, owner = [], []
    for method in methods:
        first = project.params(method).seed
        for seed in range(first, first + policy.seeds) if policy.seeds > 1 else [None]:
            run_project = project if seed is None else project.model_copy(
                update={"overrides": [*project.overrides, f"seed={seed}"]})  # fmt: skip
            jobs.append(_job(run_project, method, data, method if seed is None else f"{method}-seed{seed}"))
            owner.append(method)
    trained = on_runner(project, jobs)
    results, failed = [], [r for r in trained if r.error]
    for method in methods:
        runs = [r for m, r in zip(owner, trained, strict=True) if m == method]
        if any(r.error for r in runs):
            continue  # a mean over the seeds that finished would not be the candidate asked for
        sign = 1 if policy.higher_is_better else -1
        best = max(runs, key=lambda r: sign * r.metrics.get(policy.metric, -sign * float("inf")))
        version = register(best.run_id, project, [r.run_id for r in runs] if len(runs) > 1 else None)
        decision = promote(version, project, data)  # this flow's version, wherever `candidate` points now
        results.append({"method": method, "run_id": best.run_id, "version": version, "metrics": best.metrics,
                        "seed_runs": [r.run_id for r in runs], **decision})  # fmt: skip
    return results, failed


def _fail_if(failed: list[JobResult], methods: list[str], project: Project) -> None:
    if failed:  # every method trains promote.seeds runs
        raise jobs_core.RunsFailed(failed, len(methods) * project.params(None).promote.seeds)


@flow(name="experiment")
def experiment(
    methods: list[Method] = DEFAULT_METHODS, project: Project = HERE, data_version: str | None = None
) -> list[dict]:
    """prepare_data -> finetune -> evaluate for each method, each run in a process of its own on the
    runner (params: runner.*; at once on Ray), then register -> promote for each, in order.

    Args:
        methods: PEFT methods to train, in order (names of params/methods/*.yaml)
        project: the project folder, its params folder and KEY.PATH=VALUE overrides (train.lr=1.0e-4)
        data_version: a DVC hash (dvc.data_md5 of a run) or data version to train on; empty: the workspace's data
    """
    project = project.frozen()
    steps.check_runner(project)
    data = prepare_data(project, data_version)
    before = steps.champion(project)
    results, failed = _each_method(methods, data, project)
    steps.publish(
        project, "experiment", f"trained {', '.join(methods)}", data, results, before, steps.champion(project)
    )
    _fail_if(failed, methods, project)
    return results


@flow(name="compare")
def compare(
    methods: list[Method] | None = None,
    seeds: int | None = None,
    token_budget: int | None = None,
    project: Project = HERE,
    data_version: str | None = None,
    prepare: bool = True,
) -> dict:
    """Methods side by side on one data version, one base model and one token budget, N seeds each:
    each run an MLflow child run of one parent run; a leaderboard (CSV, Markdown, HTML) with plots of
    quality vs trainable parameters, vs peak memory, and tokens/s; nothing is registered.

    Args:
        methods: methods to compare; empty: params' compare.methods, else every method in params/methods/
        seeds: runs per method (seeds seed, seed+1, ...); empty: params' compare.seeds, else 3 on CUDA, 1 on CPU
        token_budget: training tokens per run; empty: params' compare.token_budget
        project: the project folder, its params folder and KEY.PATH=VALUE overrides
        data_version: a DVC hash or data version to compare on; empty: the workspace's data
        prepare: run `dvc repro` first (off inside a DVC stage, which has its data already)
    """
    project = project.frozen()
    steps.check_runner(project)
    data = prepare_data(project, data_version) if prepare else steps.workspace_data(project)
    plan = steps.compare_plan(project, data, methods, seeds, token_budget)
    parent = steps.compare_start(project, plan, data)
    try:
        jobs = [
            _job(compare_core.run_project(project, run), run.method, data, f"{run.method}-seed{run.seed}",
                 compare_core.child_tags(parent, run))
            for run in plan.runs
        ]  # fmt: skip
        results = on_runner(project, jobs)
        records = [
            compare_core.record(run, r.run_id, r.metrics, r.error) for run, r in zip(plan.runs, results, strict=True)
        ]
        report = steps.compare_finish(project, plan, data, records, parent)
    except BaseException:
        steps.compare_abort(project, parent)
        raise
    steps.publish_compare(project, report)
    if report["failed"]:
        raise compare_core.ComparisonFailed(report["failed"])
    return report


@flow(name="trials")
def trials(project: Project, plan: sweep_core.Plan, data: DataVersion, parent: str, runner: RunnerParams) -> list[dict]:
    """The sweep's search on this flow's task runner: Optuna asks for as many trials as the runner
    runs at once, each is a run in a process of its own (an MLflow child run of ``parent``) that
    reports its validations to its Optuna trial, and Optuna is told how each ended."""

    journal = project.root.resolve() / plan.journal_dir
    study = sweep_core.create_study(plan.sweep, f"{plan.method}-{parent}", sweep_core.storage(plan.sweep, journal),
                                    plan.seed)  # fmt: skip
    where = plan.sweep.storage or str(journal / "optuna.journal")  # what each trial's process opens
    width = cluster.capacity(runner, project.params(plan.method).distributed.num_processes)
    space, rows = sweep_core.distributions(plan.sweep), []
    while len(rows) < plan.trials:
        asked = [study.ask(space) for _ in range(min(width, plan.trials - len(rows)))]
        jobs = []
        for t in asked:
            run_project = project.model_copy(
                update={"overrides": [*project.overrides, *sweep_core.overrides(t.params)]}
            )
            ref = sweep_core.TrialRef(
                storage=where,
                study=study.study_name,
                trial_id=t._trial_id,
                number=t.number,
                metric=plan.metric,
                pruner=plan.sweep.pruner,
                startup_trials=plan.sweep.startup_trials,
                warmup_step=plan.warmup_step,
            )
            job = _job(run_project, plan.method, data, f"trial-{t.number}", sweep_core.child_tags(parent, t.number))
            jobs.append(job.model_copy(update={"score": False, "trial": ref}))
        for i, result in cluster.submit_all(jobs, runner):
            rows.append(_told(study, asked[i], result, plan, project))
    return sorted(rows, key=lambda r: r["number"])


def _told(study, trial, result: JobResult, plan: sweep_core.Plan, project: Project) -> dict:
    """Tell Optuna how a trial ended; its row."""
    from optuna.trial import TrialState

    value = sweep_core.objective(result.evals, plan.metric) if not result.error else None
    if result.error_type == "TrialPruned":
        state = "pruned"
        study.tell(trial, state=TrialState.PRUNED)
        steps.mark_pruned(project, result.run_id, result.error)
    elif value is None:
        state = "failed"
        study.tell(trial, state=TrialState.FAIL)
    else:
        state = "complete"
        study.tell(trial, value)
    error = result.error if state == "failed" else None
    if state == "failed" and not error:
        error = f"no {plan.metric} at any validation"
    return {"number": trial.number, "state": state, "value": value, "params": trial.params, "run_id": result.run_id,
            "error": error}  # fmt: skip


@flow(name="sweep")
def sweep(
    method: Method | None = None,
    n_trials: int | None = None,
    train_best: bool = False,
    project: Project = HERE,
    data_version: str | None = None,
) -> dict:
    """Hyperparameter search with Optuna over the params keys in params' sweep.space: each trial a
    run on the runner (several at once on Ray), scored on the validation split and pruned early when
    it trails; a parent MLflow run with a child per trial; the best params as a params file
    (<sweep.out_dir>/<method>/best.yaml), and with `train_best` trained, evaluated, registered and
    promoted like an experiment.

    Args:
        method: the method to tune; empty: params' sweep.method
        n_trials: trials; empty: params' sweep.trials
        train_best: train the best params through the experiment path (register, promote)
        project: the project folder, its params folder and KEY.PATH=VALUE overrides
        data_version: a DVC hash or data version to search on; empty: the workspace's data
    """
    project = project.frozen()
    steps.check_runner(project, project.params(None).sweep.storage)
    data = prepare_data(project, data_version)
    plan = steps.sweep_plan(project, data, method, n_trials)
    parent = steps.sweep_start(project, plan, data)
    runner = project.params(None).runner
    try:
        rows = trials.with_options(task_runner=cluster.task_runner(runner, str(project.root)))(
            project, plan, data, parent, runner
        )
        report = steps.sweep_finish(project, plan, rows, parent)
    except BaseException:
        steps.sweep_abort(project, parent)
        raise
    if report["best"] is None:
        raise sweep_core.SweepFailed(f"sweep of {plan.method}: no trial completed; see {report['out_dir']}/sweep.md")
    if train_best:
        best = project.model_copy(
            update={"overrides": [*project.overrides, *sweep_core.overrides(report["best"]["params"])]}
        )
        before = steps.champion(best)
        results, failed = _each_method([plan.method], data, best)
        steps.publish(best, "sweep-best", f"trained the best of the {plan.method} sweep", data, results, before,
                      steps.champion(best))  # fmt: skip
        _fail_if(failed, [plan.method], best)
        report["trained"] = results[0]
    return report


@flow(name="nightly-retrain")
def nightly_retrain(methods: list[Method] | None = None, project: Project = HERE) -> dict:
    """Retrain the configured methods (params: nightly.methods) unless data and params are unchanged
    since the last nightly run that finished; register, and promote if the policy says so.

    Args:
        methods: methods to retrain; empty: params' nightly.methods
        project: the project folder, its params folder and KEY.PATH=VALUE overrides
    """
    project = project.frozen()
    steps.check_runner(project)
    data = prepare_data(project)
    check = steps.nightly_check(project, methods, data)
    before = steps.champion(project)
    if check.skip:
        steps.publish(project, "nightly-retrain", check.reason, data, [], before, before)
        return {"trained": False, "reason": check.reason, "results": []}
    results, failed = _each_method(check.methods, data, project)
    if not failed:  # only a nightly run that trained everything counts as the last one that finished
        steps.nightly_mark(project, [r["run_id"] for r in results], check)
    steps.publish(project, "nightly-retrain", check.reason, data, results, before, steps.champion(project))
    _fail_if(failed, check.methods, project)
    return {"trained": True, "reason": check.reason, "results": results}


@flow(name="predict")
def predict(input_path: Path, model_uri: str | None = None, project: Project = HERE) -> dict:
    """Score a JSONL or CSV file (relative to the project) with a registered model: predictions
    written next to it (DVC-tracked), the run logged, with metrics when the rows have labels.
    `model_uri`: models:/NAME@ALIAS or models:/NAME/VERSION; empty: the champion of promote.model_name."""
    project = project.frozen()
    return steps.predict(project, input_path, model_uri)


@flow(name="reproduce")
def reproduce(run_id: str, allow_code_change: bool = False, project: Project = HERE) -> dict:
    """Re-run a logged run from its params, commit and data version; the metrics' drift."""
    project = project.frozen()
    return steps.reproduce(project, run_id, allow_code_change)
