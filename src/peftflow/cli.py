"""The core's commands: convert the base model, prepare data, train, evaluate, rank, merge, load, adapters.

They need no orchestration. The ``peftflow`` console script is ``flows.cli``, which adds the
Prefect-backed commands (``compare``, ``serve``, ...) to these, so the core never imports Prefect;
``python -m peftflow.cli`` (e.g. under ``accelerate launch``) runs these alone.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from peftflow.cli_common import console, fail, run_or_exit, setup_logging
from peftflow.rlhf.cli import rlhf_app

app = typer.Typer(
    help="peftflow: parameter-efficient fine-tuning experiments as reproducible pipelines.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

ParamsDir = Annotated[Path, typer.Option("--params-dir", help="Folder with base.yaml, data.yaml and methods/*.yaml.")]
Overrides = Annotated[
    list[str] | None,
    typer.Option(
        "--set", "-s", help="Override a param: KEY.PATH=VALUE (YAML value), e.g. -s train.lr=1.0e-4. Repeatable."
    ),
]


@app.callback()
def _setup(verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Debug logging.")] = False) -> None:
    setup_logging(verbose)


def _params(method: str | None, params_dir: Path, overrides: list[str] | None):
    from peftflow.config import load_params

    return run_or_exit(load_params, method, params_dir, overrides or [])


@app.command("convert-base")
def convert_base(
    params_dir: ParamsDir = Path("params"),
    overrides: Overrides = None,
    force: Annotated[bool, typer.Option(help="Convert again even if the checkpoint exists.")] = False,
) -> None:
    """Convert the embedded SmolLM2-135M-Instruct GGUF into a safetensors checkpoint (once)."""
    from peftflow.model import convert_embedded

    params = _params(None, params_dir, overrides)
    out = params.model.embedded_dir
    if (out / "config.json").is_file() and not force:
        console.print(f"base model already converted: {out}")
        return
    run_or_exit(convert_embedded, out)
    console.print(f"[green]base model written to {out}[/]")


@app.command()
def prepare(params_dir: ParamsDir = Path("params"), overrides: Overrides = None) -> None:
    """Read the configured data, split it (seeded) and write train/val/test JSONL + manifest."""
    from peftflow.data import prepare as prepare_data

    params = _params(None, params_dir, overrides)
    manifest = run_or_exit(prepare_data, params.data)
    sizes = ", ".join(f"{k} {v['rows']}" for k, v in manifest["files"].items())
    console.print(
        f"[green]data version {manifest['version']}[/] ({manifest['source']}: {sizes}) in {params.data.out_dir}"
    )
    console.print(_cut_report(params))


def _cut_report(params) -> str:
    """How many examples the configured model's tokens make longer than data.max_length, per split."""
    from peftflow.objectives import cut_counts

    try:
        counts = cut_counts(params)
    except (OSError, ValueError) as e:  # e.g. the embedded model not converted yet: its tokenizer is not there
        return f"examples longer than data.max_length not counted: {' '.join(str(e).split())[:200]}"
    limit = f"data.max_length ({params.data.max_length} tokens of {params.model.name_or_path})"
    if not any(n for n, _ in counts.values()):
        return f"no example is longer than {limit}"
    found = ", ".join(f"{n:,} of {total:,} {split}" for split, (n, total) in counts.items())
    return f"[yellow]longer than {limit}, cut to fit: {found}[/]"


@app.command()
def train(
    method: Annotated[str, typer.Option("--method", "-m", help="Method name (see `peftflow methods`).")],
    params_dir: ParamsDir = Path("params"),
    overrides: Overrides = None,
    resume: Annotated[bool, typer.Option(help="Continue from the run's newest checkpoint, if any.")] = True,
    nproc: Annotated[
        int | None,
        typer.Option(
            "--nproc",
            min=1,
            help="Train on N processes (one per GPU; gloo on CPU): distributed.num_processes=N, with "
            "distributed.strategy ddp unless the params name fsdp or deepspeed.",
        ),
    ] = None,
) -> None:
    """Fine-tune the base model with one method; writes runs/<method>/ (artifact, summary, params)."""
    from peftflow.training.sft import train as train_core

    params = _params(method, params_dir, [*(overrides or []), *_nproc_overrides(nproc, method, params_dir, overrides)])
    summary = run_or_exit(train_core, params, resume=resume)
    if int(os.environ.get("RANK", "0")) > 0:  # one of several processes torchrun started: rank 0 reports
        return
    on = f" on {summary.num_processes} processes ({summary.strategy})" if summary.num_processes > 1 else ""
    console.print(
        f"[green]{method}{on}: {summary.steps} steps, loss {summary.first_train_loss:.4f} -> "
        f"{summary.final_train_loss:.4f}, {summary.tokens_per_s:,.0f} tokens/s, "
        f"{summary.train_seconds / 60:.1f} min[/] -> {params.run_dir}"
    )


def _nproc_overrides(nproc: int | None, method: str, params_dir: Path, overrides: list[str] | None) -> list[str]:
    """What ``--nproc N`` means as overrides: N processes, DDP unless a sharded strategy is set."""
    if nproc is None:
        return []
    strategy = _params(method, params_dir, overrides).distributed.strategy
    extra = [f"distributed.num_processes={nproc}"]
    if strategy == "none" and nproc > 1:
        extra.append("distributed.strategy=ddp")
    return extra


def _table(result: dict) -> Table:
    """Metrics as rows, the zero-shot base model and the fine-tuned run as columns."""
    table = Table(title=f"{result['method']} on data version {result['data_version']}", title_justify="left")
    table.add_column("test split")
    table.add_column("base model, zero-shot", justify="right")
    table.add_column(f"{result['method']}, fine-tuned", justify="right")
    zs = result["zeroshot"]
    if "test_accuracy" in result:
        table.add_row("accuracy", f"{100 * zs['test_accuracy']:.1f}%", f"{100 * result['test_accuracy']:.1f}%")
    if "test_macro_f1" in result and "test_macro_f1" in zs:
        table.add_row("macro-F1", f"{100 * zs['test_macro_f1']:.1f}%", f"{100 * result['test_macro_f1']:.1f}%")
    per_label = result.get("test_per_label_accuracy") or {}
    if len(per_label) > 2:  # beside accuracy, which a large class can carry
        for label, value in sorted(per_label.items()):
            zero = (zs.get("test_per_label_accuracy") or {}).get(label)
            table.add_row(f"  {label}", "-" if zero is None else f"{100 * zero:.1f}%", f"{100 * value:.1f}%")
    classifier = result.get("task") == "sequence_classification"
    table.add_row(f"loss (nats/{'example' if classifier else 'token'})", f"{zs['test_loss']:.4f}",
                  f"{result['test_loss']:.4f}")  # fmt: skip
    if not classifier:
        table.add_row("perplexity", f"{zs['test_perplexity']:.3f}", f"{result['test_perplexity']:.3f}")
    if "trainable_params" in result:
        trainable = f"{result['trainable_params']:,} ({result['trainable_pct']:.2f}%)"
        table.add_row("trainable params", "0", trainable)
        table.add_row("artifact size", "-", f"{result.get('artifact_bytes', 0) / 2**20:.1f} MiB")
        table.add_row("train tokens/s", "-", f"{result['tokens_per_s']:,.0f}")
        table.add_row("train time", "-", f"{result['train_seconds'] / 60:.1f} min")
        table.add_row("peak memory", "-", f"{result['peak_memory_bytes'] / 2**30:.2f} GiB")
    return table


@app.command()
def evaluate(
    method: Annotated[
        str | None, typer.Option("--method", "-m", help="Evaluate runs/<method> (params as for train).")
    ] = None,
    run: Annotated[Path | None, typer.Option("--run", help="A run folder; its params.yaml is used.")] = None,
    params_dir: ParamsDir = Path("params"),
    overrides: Overrides = None,
    metrics_out: Annotated[Path | None, typer.Option(help="Also write the metrics to this file.")] = None,
) -> None:
    """Score a trained run and the base model (zero-shot) on the test split; writes metrics.json."""
    from peftflow.config import read_resolved
    from peftflow.evaluate import evaluate_run

    if (method is None) == (run is None):
        fail("give exactly one of --method or --run")
    if run is not None and overrides:
        fail("--run evaluates with the run's own params.yaml; -s overrides go with --method")
    if run is not None:
        params = run_or_exit(read_resolved, run / "params.yaml")
    else:
        params = _params(method, params_dir, overrides)
        run = params.run_dir
    result = run_or_exit(evaluate_run, run, params).flat()
    if metrics_out is not None:
        metrics_out.parent.mkdir(parents=True, exist_ok=True)
        metrics_out.write_text((run / "metrics.json").read_text())
    console.print(_table(result))
    console.print(f"base model: {result['base_model']}\nmetrics written to {run / 'metrics.json'}")


@app.command()
def leaderboard(
    metrics_dir: Annotated[Path, typer.Option(help="Folder of <method>.json metrics files.")] = Path("metrics"),
    out_dir: Annotated[Path, typer.Option(help="Where to write the leaderboard and plots.")] = Path(
        "reports/leaderboard"
    ),
    params_dir: ParamsDir = Path("params"),
    overrides: Overrides = None,
) -> None:
    """The leaderboard and plots of the metrics files `peftflow evaluate --metrics-out` wrote (the
    train@/evaluate@ stages of dvc.yaml), ranked by the promotion metric."""
    from peftflow import compare as core
    from peftflow import leaderboard as board

    files = sorted(metrics_dir.glob("*.json"))
    if not files:
        fail(f"{metrics_dir}: no metrics files; run `peftflow evaluate --metrics-out {metrics_dir}/<method>.json`")
    params = _project_params(params_dir, overrides)
    records = run_or_exit(core.from_metrics_files, files)
    table = run_or_exit(board.rows, records, params.promote)
    metric = params.promote.reported_metric
    lines = [f"{len(files)} metrics files from {metrics_dir}, ranked by {metric}", *core.frontier_notes(table, metric)]
    core.write_report(out_dir, table, records, metric, "peftflow leaderboard", lines)
    typer.echo(board.to_markdown(table, metric))  # not wrapped: it is Markdown, to paste
    for line in lines[1:]:
        typer.echo(line)
    typer.echo(f"leaderboard and plots written to {out_dir}/")


@app.command()
def merge(
    run: Annotated[Path, typer.Option("--run", help="A finished run folder (with model/ and params.yaml).")],
    out: Annotated[Path, typer.Option("--out", help="Where to write the merged checkpoint.")],
) -> None:
    """Fold a run's adapter into the base weights (lora, dora, qlora, adalora, ia3): a plain checkpoint."""
    from peftflow.artifacts import merge_and_save
    from peftflow.config import read_resolved

    params = run_or_exit(read_resolved, run / "params.yaml")
    run_or_exit(merge_and_save, params, run, out)
    console.print(f"[green]merged checkpoint written to {out}[/] (loads with transformers alone)")


def _project_params(params_dir: Path, overrides: list[str] | None):
    """Params for commands that use no method (tracking store, promotion policy)."""
    from peftflow.config import without_method

    return _params(None, params_dir, run_or_exit(without_method, overrides or []))


@app.command()
def reproduce(
    run_id: Annotated[str, typer.Argument(help="The MLflow run to re-run.")],
    params_dir: ParamsDir = Path("params"),
    overrides: Overrides = None,
    allow_code_change: Annotated[
        bool, typer.Option(help="Re-run even if the code is not at the run's git commit.")
    ] = False,
) -> None:
    """Re-run a logged run from its params, git commit and DVC data version; print each metric's drift."""
    from peftflow.reproduce import reproduce as reproduce_core

    params = _project_params(params_dir, overrides)
    result = run_or_exit(reproduce_core, run_id, Path("."), params, allow_code_change)
    table = Table(title=f"run {run_id} reproduced as {result['run_id']}", title_justify="left")
    for col in ("metric", "original", "reproduced", "drift"):
        table.add_column(col, justify="left" if col == "metric" else "right")
    for key, drift in result["drift"].items():
        table.add_row(key, f"{result['original_metrics'][key]:.6f}", f"{result['metrics'][key]:.6f}", f"{drift:+.2e}")
    console.print(table)


@app.command()
def load(
    uri: Annotated[str, typer.Argument(help="models:/NAME@ALIAS or models:/NAME/VERSION")],
    text: Annotated[
        list[str] | None, typer.Option("--text", "-t", help="Label (or answer) this text. Repeatable.")
    ] = None,
    params_dir: ParamsDir = Path("params"),
    overrides: Overrides = None,
) -> None:
    """Load a registered model (base + adapter) as MLflow's pyfunc does; answer --text inputs with it."""
    from peftflow.registry import load as load_registered

    params = _project_params(params_dir, overrides)
    predictor, version = run_or_exit(load_registered, uri, Path("."), params)
    tags = version.tags
    console.print(
        f"[green]{uri}[/] = {version.name} version {version.version}: {predictor.params.method.name} on "
        f"{tags.get('peftflow.base_model')}, data {tags.get('peftflow.data_version')}, "
        f"commit {tags.get('git.commit', '?')[:12]}, run {version.run_id}"
    )
    answers = run_or_exit(predictor.predict, text).to_dict("records") if text else []
    for t, row in zip(text or [], answers, strict=True):
        if "label" in row:
            console.print(f"{row['label']:>10} ({row['score']:.3f})  {t}")
        else:
            console.print(f"[bold]{t}[/]\n{row['generated_text']}")


@app.command()
def adapters(
    out: Annotated[Path, typer.Option("--out", "-o", help="The folder to write the MLflow model to.")],
    routes: Annotated[list[str], typer.Argument(help="models:/NAME@ALIAS (named NAME), or ADAPTER=models:/...")],
    params_dir: ParamsDir = Path("params"),
    overrides: Overrides = None,
) -> None:
    """Several registered adapters on one base as one MLflow model, each request routed by its `adapter`."""
    from peftflow.adapters import build, parse

    params = _project_params(params_dir, overrides)
    named = run_or_exit(parse, routes)
    run_or_exit(build, named, out, Path("."), params)
    console.print(f"[green]{out}[/]: adapters {', '.join(named)} on one base; serve it with")
    console.print(f"  mlflow models serve -m {out} --env-manager local -h 127.0.0.1 -p 5002")


@app.command()
def methods() -> None:
    """List the registered fine-tuning methods."""
    from peftflow.methods import get_method, method_names

    for name in method_names():
        console.print(f"[bold]{name:12}[/] {get_method(name).doc}")


@app.command()
def show_params(
    method: Annotated[str | None, typer.Option("--method", "-m")] = None,
    params_dir: ParamsDir = Path("params"),
    overrides: Overrides = None,
) -> None:
    """Print the resolved params (after merging YAML files and overrides) as JSON."""
    console.print_json(json.dumps(_params(method, params_dir, overrides).to_dict()))


app.add_typer(rlhf_app, name="rlhf")


def main() -> None:  # `python -m peftflow.cli`; the console script is flows.cli:main
    sys.exit(app())


if __name__ == "__main__":
    main()
