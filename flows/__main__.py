"""``python -m flows experiment -m lora -m ia3``: start a flow from the command line."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from peftflow.pipeline import Project

app = typer.Typer(help="Run peftflow's Prefect flows.", no_args_is_help=True, add_completion=False)
Root = Annotated[Path, typer.Option("--root", help="Project folder (params/, dvc.yaml, .dvc/).")]
Overrides = Annotated[list[str] | None, typer.Option("--set", "-s", help="KEY.PATH=VALUE override. Repeatable.")]


@app.command()
def experiment(
    method: Annotated[list[str], typer.Option("--method", "-m", help="Method(s), trained in order.")],
    root: Root = Path("."),
    overrides: Overrides = None,
) -> None:
    """prepare -> finetune -> evaluate -> register -> promote, per method."""
    from flows.pipeline import experiment as flow

    results = flow(methods=method, project=Project(root=root, overrides=overrides or []))
    for r in results:
        verdict = "promoted to champion" if r["promoted"] else "not promoted"
        typer.echo(f"{r['method']}: run {r['run_id']}, version {r['version']}, {verdict}: {'; '.join(r['reasons'])}")


@app.command()
def reproduce(
    run_id: str,
    root: Root = Path("."),
    allow_code_change: Annotated[bool, typer.Option(help="Run even if the code is not at the run's commit.")] = False,
) -> None:
    """Re-run a logged run and print each metric's drift."""
    from flows.pipeline import reproduce as flow

    typer.echo(
        json.dumps(flow(run_id=run_id, allow_code_change=allow_code_change, project=Project(root=root)), indent=2)
    )


if __name__ == "__main__":
    app()
