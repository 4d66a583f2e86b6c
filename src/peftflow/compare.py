"""Compare fine-tuning methods by quality against compute: one data version, one base model, one
token budget, N seeds per method. The steps as plain functions; ``flows/pipeline.py`` runs them.

- :func:`plan`: which (method, seed) runs, and how many optimizer steps each needs to see the token
  budget. Batch *k* of a run is a pure function of (seed, *k*) (:class:`peftflow.training.sampler.Sampler`), so
  the steps are counted exactly, before training: the first step count whose batches hold at least
  ``compare.token_budget`` training tokens (prompt + answer, no padding) for that method's batch size.
- :func:`start`: the parent MLflow run; each (method, seed) is a child run (``mlflow.parentRunId``).
- :func:`finish`: the leaderboard (:mod:`peftflow.leaderboard`) as CSV, Markdown and a
  self-contained HTML page, the three plots (:mod:`peftflow.plots`), and ``runs.csv`` (one row per
  run), written to ``compare.out_dir`` as one folder that appears whole, and logged to the parent run.
"""

from __future__ import annotations

import base64
import csv
import io
import json
import logging
from pathlib import Path
from typing import Any

import torch
from pydantic import BaseModel

from peftflow import data, leaderboard, plots, tracking
from peftflow.atomic import atomic_dir
from peftflow.config import ParamsError, method_file
from peftflow.methods import method_names
from peftflow.pipeline import DataVersion, Project, with_data

log = logging.getLogger(__name__)

PARENT_TAG = "peftflow.compare"  # "parent" on the comparison's run, its id on each child run


class ComparisonFailed(RuntimeError):
    """Some runs of a comparison failed; the report (which names them) was written anyway."""


class Run(BaseModel):
    method: str
    seed: int
    max_steps: int
    overrides: list[str]  # what this run adds to the project's overrides (seed, train.max_steps)


class Plan(BaseModel):
    methods: list[str]
    seeds: list[int]
    token_budget: int
    device: str
    runs: list[Run]
    out_dir: Path  # relative to the project root


def default_methods(project: Project) -> list[str]:
    """``compare.methods``, or else every registered method with a params file in the project."""
    configured = project.params(None).compare.methods
    if configured:
        return list(configured)
    files = {p.stem for p in (project.root / project.params_dir / "methods").glob("*.yaml")}
    return [m for m in method_names() if m in files]


def steps_for_budget(
    lengths: list[int], batch_size: int, grad_accum: int, seed: int, budget: int, processes: int = 1
) -> int:
    """The fewest optimizer steps whose batches, over all ``processes``, hold at least ``budget`` tokens."""
    from peftflow.training.sampler import Sampler

    samplers = [Sampler(lengths, batch_size, seed, rank, processes) for rank in range(processes)]
    tokens, step = 0, 0
    while tokens < budget:
        step += 1
        tokens += sum(lengths[i] for s in samplers for rows in s.step_indices(step, grad_accum) for i in rows)
    return step


def plan(
    project: Project,
    data_version: DataVersion,
    methods: list[str] | None = None,
    seeds: int | None = None,
    token_budget: int | None = None,
) -> Plan:
    """The runs of a comparison; bad input fails here, in one line, before anything trains."""
    from peftflow import objectives
    from peftflow.model import load_tokenizer

    base = project.params(None)
    cfg = base.compare
    methods = list(methods or default_methods(project))
    for method in methods:
        method_file(project.root / project.params_dir, method, None)
    if len(set(methods)) != len(methods):
        raise ParamsError(f"compare.methods: {methods}: a method is listed twice")
    budget = token_budget or cfg.token_budget
    if budget < 1:
        raise ParamsError(f"compare.token_budget: {budget}: expected a positive number of training tokens")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    n_seeds = seeds or cfg.seeds or (3 if device == "cuda" else 1)
    seed_values = [base.seed + i for i in range(n_seeds)]
    local = with_data(base, data_version).rebased(project.root)
    tokenizer = load_tokenizer(local.model)
    objective = objectives.for_run(local, tokenizer)  # the tokens each example trains on, as the runs encode it
    lengths = [len(objective.encode(ex)) for ex in data.read_split(local.data.out_dir, "train")]
    runs = []
    for method in methods:
        params = project.params(method)
        for seed in seed_values:
            train, world = params.train, params.distributed.num_processes
            steps = steps_for_budget(lengths, train.batch_size, train.grad_accum, seed, budget, world)
            if steps <= params.train.warmup_steps:
                raise ParamsError(
                    f"compare.token_budget: {budget:,} tokens is {steps} steps of {method} (batch "
                    f"{train.batch_size} x {train.grad_accum}" + (f" x {world} processes" if world > 1 else "") + "), "
                    f"not more than train.warmup_steps "
                    f"({params.train.warmup_steps}); raise the budget or lower the warmup"
                )
            runs.append(Run(method=method, seed=seed, max_steps=steps,
                            overrides=[f"seed={seed}", f"train.max_steps={steps}"]))  # fmt: skip
    return Plan(methods=methods, seeds=seed_values, token_budget=budget, device=device, runs=runs, out_dir=cfg.out_dir)


def run_project(project: Project, run: Run) -> Project:
    """The project with one run's overrides added after the user's (so the budget and seed win)."""
    return project.model_copy(update={"overrides": [*project.overrides, *run.overrides]})


def start(project: Project, the_plan: Plan, data_version: DataVersion, tags: dict[str, str] | None = None) -> str:
    """The parent MLflow run (RUNNING until :func:`finish`); its id."""
    params = project.params(None)
    run_tags = {
        PARENT_TAG: "parent",
        "peftflow.data_version": data_version.version,
        "dvc.data_md5": data_version.dvc_md5 or "none",
        **tracking.code_version(project.root),
        **(tags or {}),
    }
    flat = {
        "compare.methods": ",".join(the_plan.methods),
        "compare.seeds": ",".join(map(str, the_plan.seeds)),
        "compare.token_budget": the_plan.token_budget,
        "compare.device": the_plan.device,
        **{f"steps.{r.method}.{r.seed}": r.max_steps for r in the_plan.runs},
    }
    return tracking.start_run(params, project.root, "compare", run_tags, logged=flat).run_id


def child_tags(parent_run_id: str, run: Run) -> dict[str, str]:
    return {"mlflow.parentRunId": parent_run_id, PARENT_TAG: parent_run_id, "peftflow.compare.seed": str(run.seed)}


def record(
    run: Run, run_id: str | None, metrics: dict[str, float] | None, error: BaseException | str | None = None
) -> dict:
    """One run's entry for the leaderboard; ``error`` as one line."""
    message = None if error is None else (" ".join(str(error).split()) or type(error).__name__)[:300]
    return {"method": run.method, "seed": run.seed, "run_id": run_id, "metrics": metrics or {}, "error": message}


def notes(the_plan: Plan, data_version: DataVersion, table: list[dict[str, Any]], metric: str) -> list[str]:
    """What the leaderboard is, and which methods sit on each frontier, in sentences."""
    steps = sorted({r.max_steps for r in the_plan.runs})
    span = f"{steps[0]}" if len(steps) == 1 else f"{steps[0]}-{steps[-1]}"
    span += " optimizer steps" + ("" if len(steps) == 1 else ", by seed and batch size")
    out = [
        f"data version {data_version.version} (DVC {data_version.dvc_md5}); device {the_plan.device}",
        f"token budget {the_plan.token_budget:,} training tokens per run ({span}); "
        f"seeds {', '.join(map(str, the_plan.seeds))}",
        f"ranked by {metric} (mean over seeds, ± sample standard deviation); costs are means over seeds, "
        "peak memory the largest",
    ]
    out += frontier_notes(table, metric)
    failed = [r for r in table if r.get("failed")]
    out += [f"{r['method']}: {r['failed']} run(s) failed: {r['error']}" for r in failed]
    return out


def frontier_notes(table: list[dict[str, Any]], metric: str) -> list[str]:
    """One sentence per cost axis: which methods are on its efficient frontier, cheapest first."""
    return [
        f"efficient frontier, {metric} vs {what}: {', '.join(leaderboard.frontier_methods(table, axis)) or 'none'}"
        for axis, what in (("params", "trainable parameters"), ("memory", "peak memory"))
    ]


def summary_markdown(title: str, lines: list[str], table: list[dict[str, Any]], metric: str) -> str:
    """A heading, the notes as a list, then the leaderboard table."""
    return f"# {title}\n\n" + "".join(f"- {n}\n" for n in lines) + "\n" + leaderboard.to_markdown(table, metric)


def runs_csv(records: list[dict[str, Any]]) -> str:
    keys = ["method", "seed", "run_id", "error"]
    metric_keys = sorted({k for r in records for k in r["metrics"]})
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(keys + metric_keys)
    for r in records:
        writer.writerow([r.get(k) or "" for k in keys] + [r["metrics"].get(k, "") for k in metric_keys])
    return buf.getvalue()


def write_report(out_dir: Path, table: list[dict[str, Any]], records: list[dict], metric: str, title: str,
                 lines: list[str]) -> Path:  # fmt: skip
    """Every report file in ``out_dir``, which appears whole (written beside it, then renamed)."""
    with atomic_dir(Path(out_dir)) as tmp:
        images = plots.all_plots(table, metric, tmp, title)
        encoded = {
            caption: base64.b64encode(images[name].read_bytes()).decode()
            for name, caption in (("params", "quality vs trainable parameters"),
                                  ("memory", "quality vs peak memory"), ("speed", "tokens/s per method"))
        }  # fmt: skip
        (tmp / "leaderboard.csv").write_text(leaderboard.to_csv(table, metric))
        (tmp / "leaderboard.md").write_text(summary_markdown(title, lines, table, metric))
        (tmp / "leaderboard.html").write_text(leaderboard.to_html(table, metric, title, lines, encoded))
        (tmp / "runs.csv").write_text(runs_csv(records))
        (tmp / "leaderboard.json").write_text(json.dumps(table, indent=2) + "\n")
    return Path(out_dir)


def finish(
    project: Project,
    the_plan: Plan,
    data_version: DataVersion,
    records: list[dict[str, Any]],
    parent_run_id: str | None,
    out_dir: Path | None = None,
) -> dict[str, Any]:
    """Build and write the report; log it to the parent run and end that run (FAILED if a run
    failed). Returns the table, the notes, where the report is and ``failed`` (None, or which runs
    failed and why: the caller publishes the report, then fails)."""
    params = project.params(None)
    metric = params.promote.reported_metric
    table = leaderboard.rows(records, params.promote)
    lines = notes(the_plan, data_version, table, metric)
    out = project.root / (out_dir or the_plan.out_dir)
    write_report(out, table, records, metric, "peftflow compare: quality vs compute", lines)
    log.info("comparison written to %s", out)
    failed = failures(records) if any(r["error"] for r in records) else None
    if parent_run_id:
        client, experiment_id = tracking.connect(params, project.root)
        run = tracking.TrackedRun(client, parent_run_id, experiment_id)
        try:
            run.log_artifacts(out, "compare")
            for r in table:
                if r.get("runs"):
                    summary = {f"{metric}_mean": r[f"{metric}_mean"], "peak_memory_bytes": r["peak_memory_bytes"]}
                    summary.update({k: r[k] for k in ("test_loss", "trainable_params", "tokens_per_s") if r.get(k)})
                    run.log_metrics({f"{r['method']}.{k}": v for k, v in summary.items()})
        except BaseException:
            tracking.end_run(run, "FAILED")
            raise
        tracking.end_run(run, "FAILED" if failed else "FINISHED")
    return {"table": table, "notes": lines, "out_dir": str(out), "parent_run_id": parent_run_id, "failed": failed}


def abort(project: Project, parent_run_id: str, status: str = "FAILED") -> None:
    """End the parent run of a comparison that stopped before :func:`finish`."""
    client, experiment_id = tracking.connect(project.params(None), project.root)
    tracking.end_run(tracking.TrackedRun(client, parent_run_id, experiment_id), status)


def failures(records: list[dict[str, Any]]) -> str:
    bad = [f"{r['method']} (seed {r['seed']}): {r['error']}" for r in records if r["error"]]
    return f"{len(bad)} of {len(records)} comparison runs failed: " + "; ".join(bad)


def from_metrics_files(files: list[Path]) -> list[dict[str, Any]]:
    """Records from ``metrics.json`` files that ``peftflow evaluate`` wrote (one run each)."""
    records = []
    for path in files:
        try:
            result = json.loads(Path(path).read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise ValueError(f"{path}: not a metrics file ({e})") from None
        if "method" not in result:
            raise ValueError(f"{path}: no 'method' key; was it written by peftflow evaluate?")
        metrics = tracking.metrics_to_log(result)
        records.append({"method": result["method"], "seed": result.get("seed", ""), "run_id": str(path),
                        "metrics": metrics, "error": None})  # fmt: skip
    return records
