"""A fine-tuning run and its evaluation, each through the one tracked-run path
(:func:`peftflow.tracking.tracked_run`): train -> log -> artifact, and score -> log.

The run's ``model/`` artifact is what the method trained plus ``params.yaml``, and the files that make
it an MLflow model (:mod:`peftflow.serving`); evaluation reads the artifact back from MLflow, so what
is scored is exactly what gets registered.
"""

from __future__ import annotations

import hashlib
import json
import logging
import tempfile
from pathlib import Path

from peftflow import data, serving, tracking
from peftflow.config import Params
from peftflow.evaluate import SELECTION_FILE, score_artifact
from peftflow.results import TRAIN_METRICS, EvalResult
from peftflow.training import checkpoint
from peftflow.training.sft import Callback, resume_fingerprint, train

log = logging.getLogger(__name__)


RESUME_KEY = "peftflow.resume_key"


def resume_key(params: Params, data_version: str) -> str:
    """What two trainings share when one may continue the other: the digest of their resume
    fingerprint (the params that change the model, the data version, the base weights)."""
    fp = resume_fingerprint(params, data_version)
    return hashlib.sha256(json.dumps(fp, sort_keys=True, default=str).encode()).hexdigest()[:16]


def train_tracked(
    params: Params,
    root: Path,
    data_md5: str | None,
    tags: dict[str, str] | None = None,
    callbacks: tuple[Callback, ...] = (),
) -> str:
    """Train ``params.method`` in an MLflow run; its id. ``params`` paths are relative to ``root``.

    Runs whose process died and left them RUNNING (a flow killed with -9, a machine that went down)
    are not left so: one with the same resume key and a checkpoint in its run folder is continued
    (the same MLflow run, from its newest valid checkpoint), the others are ended FAILED."""
    root = Path(root)
    local = params.rebased(root)
    manifest = data.read_manifest(local.data.out_dir)
    key = resume_key(local, manifest["version"])
    run_tags = {**tracking.lineage(params, root, manifest, data_md5), **(tags or {}), RESUME_KEY: key}
    resume = _interrupted_run(local, root, key)
    with tracking.tracked_run(params, root, params.method.name, run_tags, resume=resume) as run:
        local.train.run_name = run.run_id  # the run folder is named after the MLflow run
        if resume is None:
            tracking.log_datasets(run.client, run.run_id, params, manifest, data_md5)
        summary = train(local, resume=resume is not None, callbacks=(run.metrics_logger(), *callbacks))
        run.log_metrics(summary.final_metrics(), summary.steps)
        run.log_artifact(local.run_dir / "train_summary.json")
        run.log_artifacts(local.run_dir / "model", "model")
        with tempfile.TemporaryDirectory(prefix="peftflow-mlmodel-") as tmp:
            run.log_artifacts(serving.write_mlflow_model(Path(tmp), params, local), "model")  # an MLflow model too
    log.info("MLflow run %s: %s trained, artifact logged", run.run_id, params.method.name)
    return run.run_id


def _interrupted_run(local: Params, root: Path, key: str) -> str | None:
    """The interrupted run this training continues, if any; the other interrupted runs end FAILED."""
    client, experiment_id = tracking.connect(local, root)
    chosen = None
    for run in tracking.interrupted(client, experiment_id):
        ckpt = checkpoint.latest(local.train.output_dir / run.info.run_id / "checkpoints")
        if chosen is None and run.data.tags.get(RESUME_KEY) == key and ckpt is not None:
            chosen = run.info.run_id
            client.set_tag(chosen, "peftflow.resumed_from", ckpt.name)
            log.warning("MLflow run %s was interrupted: continuing it from %s", chosen, ckpt)
        elif run.data.tags.get(RESUME_KEY) != key:
            tracking.end_interrupted(client, run, "not this training's to continue (other params or data)")
        else:
            tracking.end_interrupted(
                client, run, "no checkpoint to continue from" if ckpt is None else "a newer one is continued"
            )
    return chosen


def evaluate_tracked(run_id: str, root: Path, params: Params) -> EvalResult:
    """Score the run's logged artifact on the test and validation splits; log the metrics (at the
    run's last step: ``val_loss`` then ends the validation curve), metrics.json and selection.json
    to the run. Returns metrics.json.

    ``params`` gives the tracking store and, when the run's data is elsewhere, the data folder.
    """
    client, _ = tracking.connect(params, root)
    with tracking.downloaded(client, run_id) as run_dir, tracking.running(client, run_id):
        result = score_artifact(run_dir, root, params)
        logged = tracking.metrics_to_log(result.flat())
        scored = {k: v for k, v in logged.items() if k not in TRAIN_METRICS}  # training logged those already
        tracking.log_metrics(client, run_id, scored, step=result.steps or 0)
        client.log_artifact(run_id, str(run_dir / "metrics.json"))
        client.log_artifact(run_id, str(run_dir / SELECTION_FILE))
        client.set_tag(run_id, "peftflow.evaluated", "true")
    return result
