"""Nightly retraining: whether tonight's run has anything new to learn from.

A nightly run retrains only when what its models depend on changed since the last nightly run
that finished: the prepared data (its DVC hash) or those resolved params of a configured method
that change the trained model or its figures, as the schema declares them
(:func:`peftflow.config.fingerprint`: where runs are logged, when they run, how often they log or
save, and what wins do not count). The
fingerprint of both is tagged ``peftflow.nightly`` on a night's MLflow runs once every step of the
night is done (trained, evaluated, registered, promotion decided), so a night that failed half-way
does not count and the next night trains again.
"""

from __future__ import annotations

import hashlib
import json
from datetime import UTC, datetime

from pydantic import BaseModel

from peftflow import config, tracking
from peftflow.pipeline import DataVersion, Project

TAG = "peftflow.nightly"


class Check(BaseModel):
    methods: list[str]  # what the night trains (params' nightly.methods unless the run named some)
    skip: bool
    reason: str  # one line, for the log and the Prefect artifact
    fingerprint: str
    last_run: str | None  # the MLflow run id of the last finished nightly run


def _training_params(project: Project, method: str) -> dict[str, str]:
    """The params that change the method's model or figures, as MLflow logs them (text)."""
    return {k: str(v) for k, v in config.fingerprint(project.params(method), config.FIGURES).items()}


def fingerprint(project: Project, methods: list[str], data_version: DataVersion) -> str:
    blob = {
        "data": data_version.dvc_md5 or data_version.version,
        "methods": list(methods),
        "params": {m: _training_params(project, m) for m in methods},
    }
    return hashlib.sha256(json.dumps(blob, sort_keys=True).encode()).hexdigest()[:16]


def check(project: Project, methods: list[str] | None, data_version: DataVersion) -> Check:
    """Skip if the last finished nightly run had the same data and params; say why either way."""
    methods = list(methods or project.params(None).nightly.methods)
    for method in methods:
        project.params(method)  # an unknown method or bad params: the one-line error, before training
    fp = fingerprint(project, methods, data_version)
    client, experiment_id = tracking.connect(project.params(None), project.root)
    last = client.search_runs(
        [experiment_id],
        filter_string=f"tags.`{TAG}` LIKE '%'",
        order_by=["attributes.start_time DESC"],
        max_results=1,
    )
    if not last:
        return Check(
            methods=methods, skip=False, reason="no earlier nightly run: training", fingerprint=fp, last_run=None
        )
    run = last[0]
    when = datetime.fromtimestamp(run.info.start_time / 1000, UTC).strftime("%Y-%m-%d %H:%M UTC")
    since = f"nightly run {run.info.run_id} ({when})"
    if run.data.tags[TAG] == fp:
        reason = (
            f"skipped: data {data_version.dvc_md5 or data_version.version} and the params of "
            f"{', '.join(methods)} are unchanged since {since}"
        )
        return Check(methods=methods, skip=True, reason=reason, fingerprint=fp, last_run=run.info.run_id)
    before = run.data.tags.get("dvc.data_md5", "none")
    if before != (data_version.dvc_md5 or "none"):
        reason = f"data changed since {since}: DVC {before} -> {data_version.dvc_md5}; training"
    else:
        reason = f"params changed since {since}: {_changed(client, run, project, methods)}; training"
    return Check(methods=methods, skip=False, reason=reason, fingerprint=fp, last_run=run.info.run_id)


def _changed(client, run, project: Project, methods: list[str]) -> str:
    """Which params differ from the runs of the last night (e.g. ``lora: train.lr 0.0005 -> 0.001``)."""
    night = client.search_runs(
        [run.info.experiment_id], filter_string=f"tags.`{TAG}` = '{run.data.tags[TAG]}'", max_results=50
    )
    logged = {r.data.tags.get("peftflow.method"): r.data.params for r in night}
    parts = []
    for method in methods:
        if method not in logged:
            parts.append(f"{method} added")
            continue
        now, then = _training_params(project, method), logged[method]
        diff = [
            f"{k} {then.get(k, '-')} -> {now.get(k, '-')}"
            for k in sorted(now)  # the keys that matter now (a run logs every key)
            if now.get(k) != then.get(k)
        ]
        if diff:
            parts.append(f"{method}: {', '.join(diff[:5])}" + (f" (+{len(diff) - 5} more)" if len(diff) > 5 else ""))
    parts += [f"{m} dropped" for m in logged if m not in methods]
    return "; ".join(parts) or "the method list"


def mark(project: Project, run_ids: list[str], check: Check) -> None:
    """Record a finished night: its runs carry the fingerprint the next night compares against."""
    client, _ = tracking.connect(project.params(None), project.root)
    for run_id in run_ids:
        client.set_tag(run_id, TAG, check.fingerprint)
