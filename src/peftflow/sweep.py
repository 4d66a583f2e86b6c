"""Hyperparameter search over any params keys with Optuna: the ``sweep:`` params, the search space,
each trial's link to its Optuna trial, and the report.

A sweep is one method on one data version. Each trial is a fine-tuning run with sampled overrides
(``train.lr=3.1e-4``, ``method.r=16``), an MLflow child run of the sweep's parent run, executed by
the runner like any other run (its own process; on Ray, several at once). Its objective is
``sweep.metric`` at its last periodic validation, on the validation split: the test split is not
looked at until the best params are trained through the experiment path. Each periodic validation
is reported to the trial as it happens, so the pruner (median) stops trials that trail the others
at the same step. Sampler and pruner are Optuna's; the trials share an Optuna storage (a journal
file in the sweep's folder by default; a database URL for trials on other machines).
"""

from __future__ import annotations

import csv
import io
import math
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel

from peftflow import secrets
from peftflow.sweep_params import OBJECTIVES, Dimension, SweepParams

__all__ = ["OBJECTIVES", "Dimension", "SweepParams", "Plan", "TrialRef", "plan", "start", "finish"]


class SweepFailed(RuntimeError):
    """No trial of a sweep completed; the report, naming why each ended, was written anyway."""


def _is_int(spec: dict[str, Any]) -> bool:
    return all(isinstance(spec.get(k), int) and not isinstance(spec.get(k), bool) for k in ("low", "high"))


def distributions(sweep: SweepParams) -> dict[str, Any]:
    """The space as Optuna distributions (integer ranges where low and high are integers)."""
    import optuna.distributions as d

    out: dict[str, Any] = {}
    dims = sweep.dimensions()
    for key, spec in sweep.space.items():
        dim = dims[key]
        if dim.choices is not None:
            out[key] = d.CategoricalDistribution(dim.choices)
        elif _is_int(spec) and (dim.step is None or float(dim.step).is_integer()):
            out[key] = d.IntDistribution(int(dim.low), int(dim.high), log=dim.log, step=int(dim.step or 1))
        else:
            out[key] = d.FloatDistribution(dim.low, dim.high, log=dim.log, step=dim.step)
    return out


def sample_overrides(sweep: SweepParams) -> list[list[str]]:
    """Overrides that visit each key's extremes (to check every key before anything trains)."""
    out = []
    for key, dist in distributions(sweep).items():
        values = dist.choices if hasattr(dist, "choices") else (dist.low, dist.high)
        out += [[f"{key}={_text(v)}"] for v in values]
    return out


def _text(value: Any) -> str:
    return yaml.safe_dump(value, default_flow_style=True).strip().removesuffix("...").strip()


def overrides(values: dict[str, Any]) -> list[str]:
    return [f"{k}={_text(v)}" for k, v in values.items()]


def nested(values: dict[str, Any]) -> dict[str, Any]:
    """{"train.lr": 1e-4} -> {"train": {"lr": 1e-4}}: a params file."""
    out: dict[str, Any] = {}
    for dotted, value in values.items():
        node = out
        *parents, last = dotted.split(".")
        for p in parents:
            node = node.setdefault(p, {})
        node[last] = value
    return out


# --- the study -----------------------------------------------------------------------------------


def storage(sweep: SweepParams, folder: Path):
    """The Optuna storage: ``sweep.storage``, else a journal file in ``folder`` (safe for trials in
    several processes on this machine)."""
    if sweep.storage:
        return secrets.reveal(sweep.storage, "sweep.storage")
    from optuna.storages import JournalStorage
    from optuna.storages.journal import JournalFileBackend

    folder.mkdir(parents=True, exist_ok=True)
    return JournalStorage(JournalFileBackend(str(folder / "optuna.journal")))


def create_study(sweep: SweepParams, name: str, store: Any, seed: int):
    import optuna

    sampler = (
        optuna.samplers.TPESampler(seed=seed, n_startup_trials=sweep.startup_trials)
        if sweep.sampler == "tpe"
        else optuna.samplers.RandomSampler(seed=seed)
    )
    return optuna.create_study(
        study_name=name, storage=store, sampler=sampler, pruner=pruner(sweep), direction=sweep.direction
    )


def pruner(sweep: SweepParams | TrialRef):
    import optuna

    if sweep.pruner == "none":
        return optuna.pruners.NopPruner()
    return optuna.pruners.MedianPruner(n_startup_trials=sweep.startup_trials, n_warmup_steps=0)


class TrialRef(BaseModel):
    """What a trial's process needs to report to its Optuna trial: where the study is, and which trial."""

    storage: str  # a URL, or a journal file path
    study: str
    trial_id: int
    number: int
    metric: str
    pruner: Literal["median", "none"] = "median"  # the study's (Optuna keeps no pruner in the storage)
    startup_trials: int = 0
    warmup_step: int = 0  # no pruning before this training step

    def reporter(self) -> Reporter:
        return Reporter(self)


class Reporter:
    """A training callback: each periodic validation's ``metric`` reported to the trial; raises
    ``optuna.TrialPruned`` when the pruner says so. Pickles as its :class:`TrialRef`."""

    def __init__(self, ref: TrialRef):
        self.ref = ref
        self._trial = None

    def __getstate__(self) -> dict[str, Any]:
        return {"ref": self.ref, "_trial": None}

    def _open(self):
        import optuna

        if self._trial is None:
            ref = self.ref
            store = secrets.reveal(ref.storage, "sweep.storage")
            if "://" not in store:
                from optuna.storages import JournalStorage
                from optuna.storages.journal import JournalFileBackend

                store = JournalStorage(JournalFileBackend(store))
            study = optuna.load_study(study_name=ref.study, storage=store, pruner=pruner(ref))
            self._trial = optuna.trial.Trial(study, ref.trial_id)
        return self._trial

    def __call__(self, metrics: dict[str, float], step: int) -> None:
        import optuna

        if self.ref.metric not in metrics:
            return
        trial, value = self._open(), metrics[self.ref.metric]
        trial.report(value, step)
        if step >= self.ref.warmup_step and trial.should_prune():
            raise optuna.TrialPruned(f"trial {self.ref.number} pruned at step {step}: {self.ref.metric} {value:.4f}")


def objective(evals: list[dict[str, float]], metric: str) -> float | None:
    """The trial's value: ``metric`` at its last periodic validation."""
    values = [e[metric] for e in evals if metric in e and not math.isnan(e[metric])]
    return values[-1] if values else None


def trials_csv(rows: list[dict[str, Any]]) -> str:
    keys = ["number", "state", "value", "run_id", "error"]
    space = sorted({k for r in rows for k in r["params"]})
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(keys + space)
    for r in rows:
        writer.writerow(
            [r.get(k) if r.get(k) is not None else "" for k in keys] + [r["params"].get(k, "") for k in space]
        )
    return buf.getvalue()


def markdown(title: str, lines: list[str], rows: list[dict[str, Any]], metric: str) -> str:
    space = sorted({k for r in rows for k in r["params"]})
    head = ["trial", "state", metric, *space, "MLflow run"]
    out = [f"# {title}", "", *(f"- {line}" for line in lines), "", "| " + " | ".join(head) + " |"]
    out.append("|" + "---|" * len(head))
    for r in rows:
        value = "" if r["value"] is None else f"{r['value']:.4f}"
        cells = [
            str(r["number"]),
            r["state"],
            value,
            *(_text(r["params"].get(k, "")) for k in space),
            r["run_id"] or "",
        ]
        out.append("| " + " | ".join(cells) + " |")
    return "\n".join(out) + "\n"


# --- the steps (``flows/pipeline.py`` runs them) -------------------------------------------------

PARENT_TAG = "peftflow.sweep"  # "parent" on the sweep's run, its id on each trial's run


class Plan(BaseModel):
    method: str
    trials: int
    metric: str
    direction: str
    sweep: SweepParams
    seed: int
    warmup_step: int  # training steps before a trial may be pruned
    out_dir: Path  # the report, relative to the project: <sweep.out_dir>/<method>
    journal_dir: Path  # the Optuna journal when sweep.storage is null, relative to the project


def check(project, method: str | None = None, trials: int | None = None) -> tuple[SweepParams, Any]:
    """The sweep's params, its space sampled through the params validation: what needs no data, so
    that the command line checks it before any flow run starts. (The sweep's params, the method's.)"""
    from peftflow.config import ParamsError
    from peftflow.pipeline import check_overrides

    base = project.params(None)
    cfg = base.sweep.model_copy(update={k: v for k, v in (("method", method), ("trials", trials)) if v})
    params = project.params(cfg.method)
    if params.train.eval_every < 1:
        raise ParamsError(
            "train.eval_every: 0: a sweep scores each trial at its periodic validations; set it to a step count"
        )
    for extra in sample_overrides(cfg):
        check_overrides(extra)
        try:
            project.model_copy(update={"overrides": [*project.overrides, *extra]}).params(cfg.method)
        except ParamsError as e:
            raise ParamsError(f"sweep.space: {extra[0]}: {e}") from None
    return cfg, params


def plan(project, data_version, method: str | None = None, trials: int | None = None) -> Plan:
    """The sweep; bad input fails here, in one line, before anything trains."""
    from peftflow import data
    from peftflow.config import ParamsError
    from peftflow.pipeline import with_data

    cfg, params = check(project, method, trials)
    base = project.params(None)
    manifest = data.read_manifest(with_data(base, data_version).rebased(project.root).data.out_dir)
    if cfg.metric == "val_accuracy" and not manifest.get("labels"):
        raise ParamsError("sweep.metric: val_accuracy needs answers from a closed label set (data.format: text_label); "
                          "use val_loss")  # fmt: skip
    return Plan(
        method=cfg.method, trials=cfg.trials, metric=cfg.metric, direction=cfg.direction, sweep=cfg, seed=base.seed,
        warmup_step=cfg.warmup_evals * params.train.eval_every, out_dir=cfg.out_dir / cfg.method,
        journal_dir=base.train.output_dir / "sweeps",
    )  # fmt: skip


def start(project, the_plan: Plan, data_version, tags: dict[str, str] | None = None) -> str:
    """The parent MLflow run (RUNNING until :func:`finish`); its id."""
    from peftflow import tracking

    params = project.params(None)
    run_tags = {PARENT_TAG: "parent", "peftflow.method": the_plan.method,
                "peftflow.data_version": data_version.version, "dvc.data_md5": data_version.dvc_md5 or "none",
                **tracking.code_version(project.root), **(tags or {})}  # fmt: skip
    logged = {f"sweep.{k}": v for k, v in the_plan.sweep.model_dump(mode="json").items() if k != "space"}
    logged.update(
        {
            f"sweep.space.{k}": yaml.safe_dump(v, default_flow_style=True).strip()
            for k, v in the_plan.sweep.space.items()
        }
    )
    return tracking.start_run(params, project.root, f"sweep-{the_plan.method}", run_tags, logged=logged).run_id


def child_tags(parent_run_id: str, number: int) -> dict[str, str]:
    return {"mlflow.parentRunId": parent_run_id, PARENT_TAG: parent_run_id, "peftflow.sweep.trial": str(number)}


def finish(project, the_plan: Plan, rows: list[dict[str, Any]], parent_run_id: str) -> dict[str, Any]:
    """The report (trials.csv, sweep.md, best.yaml) in one folder that appears whole, logged to the
    parent run, which ends FINISHED (FAILED if no trial completed). The best trial and where it all is."""
    from peftflow import tracking
    from peftflow.atomic import atomic_dir

    params = project.params(None)
    done = [r for r in rows if r["state"] == "complete"]
    sign = 1 if the_plan.direction == "maximize" else -1
    best = max(done, key=lambda r: (sign * r["value"], -r["number"])) if done else None
    counts = {s: sum(r["state"] == s for r in rows) for s in ("complete", "pruned", "failed")}
    lines = [
        f"{the_plan.method}: {len(rows)} trials ({counts['complete']} complete, {counts['pruned']} pruned, "
        f"{counts['failed']} failed); objective {the_plan.metric} ({the_plan.direction}) at the last validation"
    ]
    if best:
        found = " ".join(overrides(best["params"]))
        lines.append(f"best: trial {best['number']}, {the_plan.metric} {best['value']:.4f}: {found}")
    out = project.root / the_plan.out_dir
    with atomic_dir(out) as tmp:
        (tmp / "trials.csv").write_text(trials_csv(rows))
        (tmp / "sweep.md").write_text(markdown(f"peftflow sweep: {the_plan.method}", lines, rows, the_plan.metric))
        if best:
            flags = " ".join(f"-s {o}" for o in overrides(best["params"]))
            header = (
                f"# peftflow sweep of {the_plan.method}: trial {best['number']} of {len(rows)}, "
                f"{the_plan.metric} {best['value']:.4f} (MLflow run {best['run_id']})\n"
                f"# use: peftflow experiment -m {the_plan.method} {flags}\n"
            )
            (tmp / "best.yaml").write_text(header + yaml.safe_dump(nested(best["params"]), sort_keys=False))
    client, experiment_id = tracking.connect(params, project.root)
    run = tracking.TrackedRun(client, parent_run_id, experiment_id)
    try:
        run.log_artifacts(out, "sweep")
        run.log_metrics({f"trials_{k}": v for k, v in counts.items()})
        if best:
            run.log_metrics({f"best_{the_plan.metric}": best["value"]})
            run.set_tag("peftflow.sweep.best_run", best["run_id"] or "")
    except BaseException:
        tracking.end_run(run, "FAILED")
        raise
    tracking.end_run(run, "FINISHED" if best else "FAILED")
    return {"best": best, "rows": rows, "notes": lines, "out_dir": str(out), "parent_run_id": parent_run_id,
            "best_file": str(out / "best.yaml") if best else None}  # fmt: skip


def abort(project, parent_run_id: str) -> None:
    from peftflow import tracking

    client, experiment_id = tracking.connect(project.params(None), project.root)
    tracking.end_run(tracking.TrackedRun(client, parent_run_id, experiment_id), "FAILED")
