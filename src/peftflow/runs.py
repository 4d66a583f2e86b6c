"""A fine-tuning run and its evaluation, each through the one tracked-run path
(:func:`peftflow.tracking.tracked_run`): train -> log -> artifact, and score -> log.

The run's ``model/`` artifact is what the method trained plus ``params.yaml``; evaluation reads the
artifact back from MLflow, so what is scored is exactly what gets registered.
"""

from __future__ import annotations

import logging
from pathlib import Path

from peftflow import data, tracking
from peftflow.config import Params
from peftflow.evaluate import score_artifact
from peftflow.results import TRAIN_METRICS, EvalResult
from peftflow.training.sft import Callback, train

log = logging.getLogger(__name__)


def train_tracked(
    params: Params,
    root: Path,
    data_md5: str | None,
    tags: dict[str, str] | None = None,
    callbacks: tuple[Callback, ...] = (),
) -> str:
    """Train ``params.method`` in a new MLflow run; its id. ``params`` paths are relative to ``root``."""
    root = Path(root)
    local = params.rebased(root)
    manifest = data.read_manifest(local.data.out_dir)
    run_tags = {**tracking.lineage(params, root, manifest, data_md5), **(tags or {})}
    with tracking.tracked_run(params, root, params.method.name, run_tags) as run:
        local.train.run_name = run.run_id  # the run folder is named after the MLflow run
        tracking.log_datasets(run.client, run.run_id, params, manifest, data_md5)
        summary = train(local, resume=False, callbacks=(run.metrics_logger(), *callbacks))
        run.log_metrics(summary.final_metrics(), summary.steps)
        run.log_artifact(local.run_dir / "train_summary.json")
        run.log_artifacts(local.run_dir / "model", "model")
    log.info("MLflow run %s: %s trained, artifact logged", run.run_id, params.method.name)
    return run.run_id


def evaluate_tracked(run_id: str, root: Path, params: Params) -> EvalResult:
    """Score the run's logged artifact on the test split; log the metrics to the run. Returns metrics.json.

    ``params`` gives the tracking store and, when the run's data is elsewhere, the data folder.
    """
    client, _ = tracking.connect(params, root)
    with tracking.downloaded(client, run_id) as run_dir, tracking.running(client, run_id):
        result = score_artifact(run_dir, root, params)
        logged = tracking.metrics_to_log(result.flat())
        scored = {k: v for k, v in logged.items() if k not in TRAIN_METRICS}  # training logged those already
        tracking.log_metrics(client, run_id, scored)
        client.log_artifact(run_id, str(run_dir / "metrics.json"))
        client.set_tag(run_id, "peftflow.evaluated", "true")
    return result
