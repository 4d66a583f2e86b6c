"""The command lines of the shell layer: ``python -m flows ...`` starts a flow, and ``peftflow ...``
is the one command line for users: the core's commands (``peftflow.cli``) with the Prefect-backed
ones from here (experiment, compare, nightly, predict, serve). It lives here, not in the core, because the
core never imports Prefect, flows/ or tasks/ (tests/test_layout.py).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated

import typer

# only typer and rich at the top: every `peftflow` command imports this module, and the core's
# commands should not wait for Prefect, MLflow or torch to import; each command imports what it runs
from peftflow import cli as core
from peftflow.cli_common import quiet_libraries, run_or_exit

flows_app = typer.Typer(help="Run peftflow's Prefect flows.", no_args_is_help=True, add_completion=False)
Root = Annotated[Path, typer.Option("--root", help="Project folder (params/, dvc.yaml, .dvc/).")]
Overrides = Annotated[list[str] | None, typer.Option("--set", "-s", help="KEY.PATH=VALUE override. Repeatable.")]


@flows_app.callback()
def _setup() -> None:
    quiet_libraries()


@flows_app.command()
def experiment(
    method: Annotated[list[str], typer.Option("--method", "-m", help="Method(s), trained in order.")],
    root: Root = Path("."),
    overrides: Overrides = None,
    data_version: Annotated[
        str | None, typer.Option(help="Train on this earlier data: a DVC hash, or a data version a run names.")
    ] = None,
) -> None:
    """prepare -> finetune -> evaluate -> register -> promote, per method."""
    from rich.console import Console

    from flows.pipeline import experiment as flow
    from peftflow.pipeline import Project, check_overrides

    project = Project(root=root, overrides=overrides or [])
    run_or_exit(check_overrides, project.overrides)  # bad input: one line, before any flow run starts
    for name in method:
        run_or_exit(project.params, name)
    results = _runs_or_exit(flow, methods=method, project=project, data_version=data_version)
    console = Console()
    console.print(results_table(results))
    for r in results:
        console.print(f"{r['method']} (run {r['run_id']}, version {r['version']}): {r['summary']}")
        for reason in r["reasons"]:
            console.print(f"  - {reason}")


@flows_app.command()
def predict(
    input_path: Annotated[Path, typer.Argument(help="A .jsonl or .csv file, with the model's text column.")],
    model: Annotated[
        str | None, typer.Option("--model", help="models:/NAME@ALIAS or models:/NAME/N; default: the champion.")
    ] = None,
    root: Root = Path("."),
    overrides: Overrides = None,
) -> None:
    """Score a file with a registered model: `<name>.predictions.jsonl` next to it, DVC-tracked, the run logged."""
    from rich.console import Console

    from flows.pipeline import predict as flow
    from peftflow.pipeline import Project, check_overrides

    project = Project(root=root, overrides=overrides or [])
    run_or_exit(check_overrides, project.overrides)
    result = _runs_or_exit(flow, input_path=input_path.resolve(), model_uri=model, project=project)
    console = Console()
    console.print(
        f"[green]{result['output']}[/]: {result['rows']} rows scored with {result['model']} (run {result['run_id']})"
    )
    for key, value in result["metrics"].items():
        console.print(f"  {key}: {value:.4f}")


@flows_app.command()
def compare(
    method: Annotated[
        list[str] | None,
        typer.Option("--method", "-m", help="Method(s); default: compare.methods, else all in params/methods/."),
    ] = None,
    seeds: Annotated[
        int | None, typer.Option(min=1, help="Runs per method; default: compare.seeds, else 3 on CUDA, 1 on CPU.")
    ] = None,
    token_budget: Annotated[
        int | None, typer.Option(min=1, help="Training tokens per run; default: compare.token_budget.")
    ] = None,
    root: Root = Path("."),
    overrides: Overrides = None,
    data_version: Annotated[
        str | None, typer.Option(help="Compare on this earlier data: a DVC hash, or a data version a run names.")
    ] = None,
    prepare: Annotated[bool, typer.Option(help="`dvc repro` the data first; --no-prepare inside a DVC stage.")] = True,
) -> None:
    """Every method on one data version, base model and token budget: a leaderboard (CSV, Markdown,
    HTML) and plots of quality vs trainable parameters, vs peak memory, and tokens/s."""
    from flows.pipeline import compare as flow
    from peftflow import leaderboard
    from peftflow.compare import ComparisonFailed
    from peftflow.pipeline import Project, check_overrides

    project = Project(root=root, overrides=overrides or [])
    run_or_exit(check_overrides, project.overrides)  # bad input: one line, before any flow run starts
    for name in method or []:
        run_or_exit(project.params, name)
    try:
        report = _runs_or_exit(flow, methods=method or None, seeds=seeds, token_budget=token_budget,
                               project=project, data_version=data_version, prepare=prepare)  # fmt: skip
    except ComparisonFailed as e:  # some runs failed; the report, naming them, was still written
        typer.secho(f"error: {e}", fg="red", err=True)
        raise typer.Exit(1) from None
    metric = project.params(None).promote.reported_metric
    typer.echo(leaderboard.to_markdown(report["table"], metric))  # not wrapped: it is Markdown, to paste
    for line in report["notes"]:
        typer.echo(f"- {line}")
    typer.echo(f"leaderboard (CSV, Markdown, HTML) and plots in {report['out_dir']}/")


def _flow_run(flow, **kwargs):
    """The flow run, its bad input one red line and exit code 2; with a temporary Prefect server that
    stops with this process if no Prefect API is configured. Callers check the project first
    (:func:`peftflow.versioning.check_project`), before they open its MLflow store."""
    from flows.serve import ServeError, temporary_server
    from peftflow.cli_common import fail

    try:
        with temporary_server():
            return run_or_exit(flow, **kwargs)
    except ServeError as e:  # the server did not start (its log's last lines are in the message)
        fail(str(e))


def _runs_or_exit(flow, **kwargs):
    """Run a flow whose runs go to the runner: bad input (the runner's check included) is one red
    line and exit code 2; runs that failed (the others were registered) one line and exit code 1."""
    from peftflow import tracking
    from peftflow.cluster.jobs import RunsFailed, check_runner
    from peftflow.versioning import check_project

    project = kwargs["project"]
    run_or_exit(check_project, project.root)
    run_or_exit(check_runner, project)
    run_or_exit(tracking.connect, project.params(None), project.root)  # the store answers, before any run
    try:
        return _flow_run(flow, **kwargs)
    except RunsFailed as e:
        typer.secho(f"error: {e}", fg="red", err=True)
        raise typer.Exit(1) from None


@flows_app.command()
def sweep(
    method: Annotated[str | None, typer.Option("--method", "-m", help="Method to tune; default: sweep.method.")] = None,
    trials: Annotated[int | None, typer.Option(min=1, help="Trials; default: sweep.trials.")] = None,
    train_best: Annotated[
        bool, typer.Option(help="Then train the best params like an experiment (evaluate, register, promote).")
    ] = False,
    root: Root = Path("."),
    overrides: Overrides = None,
    data_version: Annotated[
        str | None, typer.Option(help="Search on this earlier data: a DVC hash, or a data version a run names.")
    ] = None,
) -> None:
    """Hyperparameter search with Optuna over sweep.space (any params keys), each trial scored on the
    validation split and pruned early when it trails: best params in <sweep.out_dir>/<method>/best.yaml."""
    from rich.console import Console

    from flows.pipeline import sweep as flow
    from peftflow import sweep as sweep_core
    from peftflow.pipeline import Project, check_overrides
    from peftflow.sweep import SweepFailed

    project = Project(root=root, overrides=overrides or [])
    run_or_exit(check_overrides, project.overrides)
    run_or_exit(sweep_core.check, project, method, trials)  # the space too: one line before any flow run
    try:
        report = _runs_or_exit(flow, method=method, n_trials=trials, train_best=train_best, project=project,
                               data_version=data_version)  # fmt: skip
    except SweepFailed as e:
        typer.secho(f"error: {e}", fg="red", err=True)
        raise typer.Exit(1) from None
    typer.echo((Path(report["out_dir"]) / "sweep.md").read_text())
    typer.echo(f"best params: {report['best_file']}")
    if "trained" in report:
        Console().print(results_table([report["trained"]]))


def results_table(results: list[dict]):
    """The experiment's results: test metrics, cost and the promotion outcome, a row per method."""
    from rich.table import Table

    def pct(m: dict, key: str) -> str:
        return f"{100 * m[key]:.1f}%" if key in m else "-"

    table = Table(title="experiment: accuracy on val (decides) and test (reported)", title_justify="left")
    for col in ("method", "val", "test", "zero-shot", "test loss", "trainable", "tok/s", "champion"):
        table.add_column(col, justify="left" if col == "method" else "right")
    for r in results:
        m = r["metrics"]
        table.add_row(
            r["method"],
            pct(m, "val_accuracy"),
            pct(m, "test_accuracy"),
            pct(m, "zeroshot_test_accuracy"),
            f"{m['test_loss']:.4f}",
            f"{m.get('trainable_pct', 0):.2f}%",
            f"{m.get('tokens_per_s', 0):,.0f}",
            "promoted" if r["promoted"] else "kept",
        )
    return table


@flows_app.command()
def reproduce(
    run_id: str,
    root: Root = Path("."),
    allow_code_change: Annotated[bool, typer.Option(help="Run even if the code is not at the run's commit.")] = False,
) -> None:
    """Re-run a logged run and print each metric's drift."""
    from flows.pipeline import reproduce as flow
    from peftflow import tracking
    from peftflow.pipeline import Project
    from peftflow.versioning import check_project

    project = Project(root=root)
    run_or_exit(check_project, project.root)
    client, _ = run_or_exit(tracking.connect, project.params(None), project.root)
    run_or_exit(tracking.get_run, client, run_id)  # an unknown run: one line, before the flow starts
    typer.echo(
        json.dumps(_flow_run(flow, run_id=run_id, allow_code_change=allow_code_change, project=project), indent=2)
    )


@flows_app.command()
def nightly(
    method: Annotated[
        list[str] | None, typer.Option("--method", "-m", help="Default: params' nightly.methods.")
    ] = None,
    root: Root = Path("."),
    overrides: Overrides = None,
) -> None:
    """One nightly-retrain run now: skipped if data and params are unchanged since the last one."""
    from rich.console import Console

    from flows.pipeline import nightly_retrain
    from peftflow.pipeline import Project, check_overrides

    project = Project(root=root, overrides=overrides or [])
    run_or_exit(check_overrides, project.overrides)
    for name in method or []:
        run_or_exit(project.params, name)
    outcome = _runs_or_exit(nightly_retrain, methods=method or None, project=project)
    console = Console()
    console.print(outcome["reason"])
    if outcome["results"]:
        console.print(results_table(outcome["results"]))


@flows_app.command()
def rlhf(
    root: Root = Path("."),
    overrides: Overrides = None,
    force: Annotated[list[str] | None, typer.Option("--force", help="Retrain this stage even if unchanged.")] = None,
) -> None:
    """SFT -> reward model and held-out judge -> PPO, and DPO: each stage an MLflow run and a registered version."""
    from rich.console import Console
    from rich.table import Table

    from flows.rlhf import rlhf as flow
    from peftflow.pipeline import Project, check_overrides
    from peftflow.rlhf.stages import STAGES, StageResult, check_judge, load_stage, summary_rows
    from peftflow.versioning import check_project

    project = Project(root=root, overrides=overrides or [])
    run_or_exit(check_overrides, project.overrides)
    for stage in STAGES:  # bad input: one line, before any flow run starts
        run_or_exit(load_stage, stage, root / project.params_dir, project.overrides)
    run_or_exit(check_judge, root / project.params_dir, project.overrides)
    unknown = sorted(set(force or []) - set(STAGES))
    if unknown:
        typer.secho(
            f"error: --force {', '.join(unknown)}: unknown stage; stages: {', '.join(STAGES)}", fg="red", err=True
        )
        raise typer.Exit(2)
    run_or_exit(check_project, project.root)
    results = [StageResult(**r) for r in _flow_run(flow, project=project, force=force or [])]
    table = Table(title="rlhf (held-out prompts and pairs)", title_justify="left")
    for col in ("stage", "version", "how", "result"):
        table.add_column(col)
    for row in summary_rows(results):
        table.add_row(row["stage"], row["version"], row["how"], row["result"])
    Console().print(table)


@flows_app.command()
def serve(
    root: Root = Path("."),
    overrides: Overrides = None,
    port: Annotated[int, typer.Option(help="Port of the Prefect server (UI and API) on 127.0.0.1.")] = 4200,
    api_url: Annotated[
        str | None, typer.Option(help="Serve against this Prefect API instead of starting a server.")
    ] = None,
    database_url: Annotated[
        str | None,
        typer.Option(help="The server's database, e.g. postgresql+asyncpg://user:pass@host/prefect (default SQLite)."),
    ] = None,
    mlflow_port: Annotated[int, typer.Option(help="Port of the MLflow UI on 127.0.0.1 (0: do not start it).")] = 5000,
    limit: Annotated[int, typer.Option(min=1, help="Flow runs at a time (more queue); a work pool's limit.")] = 1,
    work_pool: Annotated[
        str | None,
        typer.Option(
            help="Send the deployments to this Prefect work pool; `prefect worker start --pool NAME` runs them."
        ),
    ] = None,
    repo: Annotated[
        str | None, typer.Option(help="With --work-pool: the git URL workers clone (default: the remote 'origin').")
    ] = None,
) -> None:
    """Prefect server + MLflow UI on 127.0.0.1, and the deployments experiment, compare, sweep,
    nightly-retrain, rlhf and predict served until Ctrl-C (or, with --work-pool, run by that pool's workers)."""
    from flows.serve import ServeError
    from flows.serve import serve as start
    from peftflow.pipeline import Project

    project = Project(root=root, overrides=overrides or [])
    try:
        run_or_exit(start, project, port, api_url, database_url, mlflow_port, limit, work_pool, repo)
    except ServeError as e:
        typer.secho(f"error: {e}", fg="red", err=True)
        raise typer.Exit(2) from None


def _peftflow_app() -> typer.Typer:
    """The core's commands, its `rlhf` group and its --verbose set-up, then the flows' commands;
    `reproduce` and `rlhf` stay the core's (the flows' versions are `python -m flows ...`)."""
    app = typer.Typer(
        help=core.app.info.help, no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False
    )
    app.registered_callback = core.app.registered_callback
    app.registered_commands = [*core.app.registered_commands]
    app.registered_groups = [*core.app.registered_groups]
    for command in (experiment, compare, sweep, nightly, predict, serve):
        app.command(rich_help_panel="Prefect flows")(command)
    return app


app = _peftflow_app()


def main() -> None:  # the `peftflow` console script ([project.scripts] in pyproject.toml)
    sys.exit(app())
