"""MLflow: the one place that owns a run's life, and knows MLflow, not training.

:func:`tracked_run` opens a run with its lineage tags (which code, data, model and seed made it),
logs the resolved params (flattened, and the merged YAML as ``params.yaml``, also inside the
``model/`` artifact so a registered version is self-contained), hands the caller a
:class:`TrackedRun` to log metrics and artifacts through, and marks it FINISHED, or FAILED (KILLED
on Ctrl-C) if the block raises. Fine-tuning, every RLHF stage, a comparison's child runs and
reproduce all open their runs here; a comparison's parent run, which outlives one call, uses
:func:`start_run` / :func:`end_run`.
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import json
import logging
import os
import socket
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from mlflow import MlflowClient
from mlflow.entities import Dataset, DatasetInput, InputTag, Metric, Param, RunTag
from mlflow.exceptions import MlflowException
from mlflow.utils.mlflow_tags import MLFLOW_DATASET_CONTEXT

from peftflow import secrets
from peftflow.config import Params, flatten, read_resolved, save_params
from peftflow.versioning import git_commit, git_dirty

log = logging.getLogger(__name__)

PACKAGES = ("torch", "transformers", "peft", "accelerate", "bitsandbytes", "trl", "mlflow", "dvc", "prefect")
# tags that say which code, data, model and seed made a run; copied onto registry versions
LINEAGE_KEYS = (
    "peftflow.method",
    "peftflow.base_model",
    "peftflow.task",
    "peftflow.seed",
    "peftflow.data_version",
    "peftflow.data_source",
    "dvc.data_md5",
    "git.commit",
    "git.dirty",
    "peftflow.version",
    *(f"pkg.{p}" for p in PACKAGES),
)


class TrackingError(RuntimeError):
    """MLflow is unreachable or lacks what was asked for; one line saying which."""


# What an experiment is, for the MLflow UI: without a kind it guesses GenAI and opens on "Traces". The
# UI of MLflow 3.17 goes by a view switch of its own (GenAI | Model training, default GenAI) that a
# link sets, so every link peftflow prints opens the model-training view: runs, charts, models
KIND_TAG, KIND = "mlflow.experimentKind", "custom_model_development"
UI_VIEW = "?workflowType=machine_learning"


def tracking_uri(params: Params, root: Path) -> str:
    """The store: ``tracking.uri``, else $MLFLOW_TRACKING_URI, else the project's ``mlflow.db``;
    without credentials (those go to MLflow's client through its environment variables)."""
    if params.tracking.uri:
        return secrets.mlflow_uri(params.tracking.uri, "tracking.uri")
    if os.environ.get("MLFLOW_TRACKING_URI"):
        return secrets.mlflow_uri(os.environ["MLFLOW_TRACKING_URI"], "MLFLOW_TRACKING_URI")
    return f"sqlite:///{(Path(root) / 'mlflow.db').resolve()}"


def connect(params: Params, root: Path) -> tuple[MlflowClient, str]:
    """A client for the configured store (checked to answer) and the experiment's id.

    Everything goes through this client: MLflow's fluent API keeps one tracking URI per process
    (and exports it to the environment), which a long-lived Prefect worker serving several
    projects must not share.
    """
    uri = tracking_uri(params, root)
    try:
        with _fail_fast(), _creating(uri):
            client = MlflowClient(uri, registry_uri=uri)
            client.search_registered_models(max_results=1)  # both stores opened (created) under the lock
            experiment = client.get_experiment_by_name(params.tracking.experiment)
            if experiment is not None:
                if KIND_TAG not in experiment.tags:  # one made before peftflow set its kind; a user's own kept
                    client.set_experiment_tag(experiment.experiment_id, KIND_TAG, KIND)
                return client, experiment.experiment_id
            location = None
            if uri.startswith("sqlite:") and not params.tracking.uri:  # the embedded local store
                location = (Path(root) / params.tracking.artifact_dir).resolve().as_uri()
            return client, client.create_experiment(
                params.tracking.experiment, artifact_location=location, tags={KIND_TAG: KIND}
            )
    except Exception as e:  # requests' and SQLAlchemy's errors alike: say where, in one line
        first = " ".join(str(e).split())[:300]
        raise TrackingError(f"MLflow tracking URI {uri}: unreachable or unusable ({first})") from None


@contextlib.contextmanager
def _creating(uri: str) -> Iterator[None]:
    """For a SQLite store, one process at a time in the block: two flows that open a new store at
    once would both create its tables (MLflow fails with "table ... already exists"), or both the
    experiment."""
    if not uri.startswith("sqlite:///"):
        yield
        return
    from filelock import FileLock

    db = Path(uri.removeprefix("sqlite:///"))
    with FileLock(db.with_name(db.name + ".lock")):
        yield


@contextlib.contextmanager
def _fail_fast() -> Iterator[None]:
    """MLflow requests in the block are tried once, with a 10 s timeout (MLflow's own retries
    back off for minutes: right for a blip, wrong for a question whose answer is "unreachable")."""
    keys = ("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "MLFLOW_HTTP_REQUEST_TIMEOUT")
    saved = {k: os.environ.get(k) for k in keys}
    os.environ.update(MLFLOW_HTTP_REQUEST_MAX_RETRIES="0", MLFLOW_HTTP_REQUEST_TIMEOUT="10")
    try:
        yield
    finally:
        for k, v in saved.items():
            os.environ.pop(k, None) if v is None else os.environ.__setitem__(k, v)


def run_url(params: Params, root: Path, run_id: str, experiment_id: str) -> str:
    """Where the MLflow UI shows a run: ``tracking.ui_url``, else $PEFTFLOW_MLFLOW_UI_URL (set by
    ``peftflow serve`` for its flow runs), else the tracking URI if it is a server, else the address
    ``mlflow ui`` listens on by default."""
    uri = tracking_uri(params, root)
    base = params.tracking.ui_url or os.environ.get("PEFTFLOW_MLFLOW_UI_URL")
    base = base or (uri if uri.startswith(("http://", "https://")) else "http://127.0.0.1:5000")
    return ui_link(base, experiment_id, run_id)


def ui_link(base: str, experiment_id: str, run_id: str | None = None) -> str:
    """An experiment's (or run's) page in the MLflow UI at ``base``, in its model-training view."""
    return f"{base.rstrip('/')}/#/experiments/{experiment_id}{f'/runs/{run_id}' if run_id else ''}{UI_VIEW}"


_CODE_VERSIONS: dict[Path, dict[str, str]] = {}


def code_version(root: Path) -> dict[str, str]:
    """The project's git commit and dirtiness as first seen by this process: the code a process
    runs is the code it imported, so commits made while a flow runs must not relabel its later runs."""
    key = Path(root).resolve()
    if key not in _CODE_VERSIONS:
        _CODE_VERSIONS[key] = {"git.commit": git_commit(key) or "none", "git.dirty": str(git_dirty(key)).lower()}
    return dict(_CODE_VERSIONS[key])


def lineage(params: Params, root: Path, manifest: dict[str, Any], data_md5: str | None) -> dict[str, str]:
    from peftflow.model import base_model_id, task_of

    tags = {
        "peftflow.method": params.method.name,
        "peftflow.base_model": base_model_id(params.rebased(root).model),
        "peftflow.task": task_of(params.rebased(root).model),  # what its losses are per: token or example
        "peftflow.seed": str(params.seed),
        "peftflow.data_version": manifest["version"],
        "peftflow.data_source": manifest["source"],
        "dvc.data_md5": data_md5 or "none",
        **code_version(root),
    }
    for name in ("peftflow", *PACKAGES):
        try:
            version = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            version = "none"
        tags["peftflow.version" if name == "peftflow" else f"pkg.{name}"] = version
    return tags


def log_datasets(client: MlflowClient, run_id: str, params: Params, manifest: dict, md5: str | None) -> None:
    """The train and test splits as MLflow dataset inputs; digest = the data version."""
    inputs = []
    for split, context in (("train", "training"), ("test", "testing")):
        dataset = Dataset(
            name=f"{Path(manifest['source']).stem}-{split}",
            digest=manifest["version"],
            source_type="dvc",
            source=json.dumps(
                {"path": f"{params.data.out_dir}/{split}.jsonl", "dvc_md5": md5, "origin": manifest["source"]}
            ),
            schema=json.dumps({"columns": ["prompt", "completion"], "targets": "completion"}),
            profile=json.dumps({"num_rows": manifest["files"][split]["rows"]}),
        )
        inputs.append(DatasetInput(dataset, tags=[InputTag(MLFLOW_DATASET_CONTEXT, context)]))
    for attempt in range(3):
        try:
            client.log_inputs(run_id, datasets=inputs)
            return
        except Exception as e:
            # two runs logging the same new dataset at once both insert it (MLflow's store gets or
            # creates it in two steps); the loser's retry finds it
            if "UNIQUE constraint" not in str(e) and "IntegrityError" not in str(e) or attempt == 2:
                raise
            time.sleep(0.2 * (attempt + 1))


OWNER_TAGS = ("peftflow.host", "peftflow.pid", "peftflow.pid_started")


def owner() -> dict[str, str]:
    """Tags naming the process that holds a run RUNNING (its host, pid and the pid's start time,
    so a reused pid is not taken for the same process)."""
    import psutil

    return dict(
        zip(OWNER_TAGS, (socket.gethostname(), str(os.getpid()), f"{psutil.Process().create_time():.2f}"), strict=True)
    )


def owner_gone(tags: dict[str, str]) -> bool:
    """Whether the process those tags name is certainly gone: it ran on this host and its pid is
    dead or now another process. (A run from another host, or from before these tags, is not judged.)"""
    import psutil

    if tags.get("peftflow.host") != socket.gethostname() or "peftflow.pid_started" not in tags:
        return False
    try:
        return f"{psutil.Process(int(tags['peftflow.pid'])).create_time():.2f}" != tags["peftflow.pid_started"]
    except (psutil.NoSuchProcess, ValueError):
        return True


def interrupted(client: MlflowClient, experiment_id: str) -> list:
    """The experiment's runs left RUNNING by a process of this host that is gone (killed, or its
    machine went down mid-run)."""
    found = client.search_runs([experiment_id], filter_string="attributes.status = 'RUNNING'", max_results=1000)
    return [r for r in found if owner_gone(r.data.tags)]


def end_interrupted(client: MlflowClient, run, reason: str) -> None:
    """End a run its process left RUNNING: FAILED, with the reason as tag ``peftflow.failure``."""
    tags = run.data.tags
    why = f"interrupted: its process (pid {tags.get('peftflow.pid')} on {tags.get('peftflow.host')}) is gone; {reason}"
    client.set_tag(run.info.run_id, "peftflow.failure", why[:5000])
    client.set_terminated(run.info.run_id, "FAILED")
    log.warning("MLflow run %s (%s) was left RUNNING: marked FAILED (%s)", run.info.run_id, run.info.run_name, reason)


@contextlib.contextmanager
def running(client: MlflowClient, run_id: str) -> Iterator[None]:
    """Mark the run RUNNING, held by this process (:func:`owner`); FINISHED on success, FAILED
    (KILLED on Ctrl-C) if the block raises."""
    from mlflow.entities import RunTag

    client.update_run(run_id, status="RUNNING")
    client.log_batch(run_id, tags=[RunTag(k, v) for k, v in owner().items()])  # one request, not three
    try:
        yield
    except KeyboardInterrupt:
        client.set_terminated(run_id, "KILLED")
        raise
    except BaseException:
        client.set_terminated(run_id, "FAILED")
        raise
    client.set_terminated(run_id, "FINISHED")


class MetricsLogger:
    """A training recipe's ``(metrics, step)`` callback that logs to one run by its id. It pickles
    as (tracking URI, run id), so it can travel to a run's worker processes, where only the main
    process calls it: one training is one MLflow run, whatever its process count.

    A store that stops answering does not stop the training: metrics are kept (in memory, with
    their step and time) and sent with the next batch once it answers, tried again every
    ``RETRY_S``; :meth:`close`, when training ends, waits up to ``patience`` seconds for the
    store, then fails naming what could not be sent."""

    RETRY_S = 10.0
    BATCH = 1000  # metrics per request: MLflow's limit

    def __init__(self, uri: str, run_id: str, patience: float = 600.0):
        self.uri, self.run_id, self.patience = uri, run_id, patience
        self._client: MlflowClient | None = None
        self._pending: list[Metric] = []
        self._down_since: float | None = None
        self._next_try = 0.0

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_client": None}

    def __call__(self, metrics: dict[str, float], step: int = 0) -> None:
        now = int(time.time() * 1000)
        self._pending += [Metric(k, float(v), now, step) for k, v in metrics.items()]
        if time.monotonic() >= self._next_try:
            self._send()

    def _send(self) -> bool:
        """Send what is pending; False (and kept) if the store does not answer."""
        if self._client is None:
            self._client = MlflowClient(self.uri, registry_uri=self.uri)
        try:
            with _fail_fast():
                while self._pending:
                    self._client.log_batch(self.run_id, metrics=self._pending[: self.BATCH])
                    del self._pending[: self.BATCH]
        except Exception as e:  # noqa: BLE001 - any failure to send: keep the metrics, go on training
            if self._down_since is None:
                self._down_since = time.monotonic()
                log.warning(
                    "MLflow tracking URI %s does not answer (%s): training goes on, its metrics are kept and "
                    "sent when the store is back", self.uri, " ".join(str(e).split())[:200],
                )  # fmt: skip
            self._next_try = time.monotonic() + self.RETRY_S
            return False
        if self._down_since is not None:
            log.warning(
                "MLflow answers again after %.0f s: the kept metrics are sent", time.monotonic() - self._down_since
            )
            self._down_since = None
        return True

    def close(self) -> None:
        """Send what is still kept, waiting up to ``patience`` seconds for the store."""
        deadline = time.monotonic() + self.patience
        while self._pending and not self._send():
            if time.monotonic() >= deadline:
                raise TrackingError(
                    f"MLflow tracking URI {self.uri}: no answer for {self.patience:.0f} s "
                    f"(tracking.outage_wait_s); {len(self._pending)} metrics of run {self.run_id} were not sent"
                )
            time.sleep(min(self.RETRY_S, max(deadline - time.monotonic(), 0.1)))


class TrackedRun:
    """An open MLflow run: what a caller logs through while :func:`tracked_run` holds it."""

    def __init__(self, client: MlflowClient, run_id: str, experiment_id: str, patience: float = 600.0):
        self.client, self.run_id, self.experiment_id = client, run_id, experiment_id
        self.patience = patience  # tracking.outage_wait_s

    def log_metrics(self, metrics: dict[str, float], step: int = 0) -> None:
        """Also the per-step callback a training recipe takes: ``(metrics, step)``."""
        log_metrics(self.client, self.run_id, metrics, step)

    def metrics_logger(self) -> MetricsLogger:
        """:meth:`log_metrics` as a callback that other processes can call too."""
        return MetricsLogger(self.client.tracking_uri, self.run_id, self.patience)

    def log_artifact(self, path: Path, under: str | None = None) -> None:
        self.client.log_artifact(self.run_id, str(path), under)

    def log_artifacts(self, folder: Path, under: str | None = None) -> None:
        self.client.log_artifacts(self.run_id, str(folder), under)

    def log_json(self, name: str, value: Any) -> None:
        with tempfile.TemporaryDirectory() as tmp:
            (Path(tmp) / name).write_text(json.dumps(value, indent=2, default=str) + "\n")
            self.client.log_artifact(self.run_id, str(Path(tmp) / name))

    def set_tag(self, key: str, value: str) -> None:
        self.client.set_tag(self.run_id, key, value)


def start_run(
    params: Params, root: Path, name: str, tags: dict[str, str], logged: dict[str, Any] | None = None
) -> TrackedRun:
    """A new RUNNING run with ``tags`` and either ``params`` (flattened, and as ``params.yaml``) or,
    given, the flat ``logged`` values as its params. End it with :func:`end_run`."""
    client, experiment_id = connect(params, root)
    created = client.create_run(experiment_id, tags={**tags, **owner()}, run_name=name)
    run = TrackedRun(client, created.info.run_id, experiment_id, params.tracking.outage_wait_s)
    try:
        if logged is None:
            log_params(client, run.run_id, params)
            log_params_file(client, run.run_id, params)
        else:
            log_param_dict(client, run.run_id, logged)
    except BaseException:
        end_run(run, "FAILED")
        raise
    return run


def end_run(run: TrackedRun, status: str = "FINISHED") -> None:
    """FINISHED, FAILED or KILLED."""
    run.client.set_terminated(run.run_id, status)


@contextlib.contextmanager
def tracked_run(
    params: Params, root: Path, name: str, tags: dict[str, str], resume: str | None = None
) -> Iterator[TrackedRun]:
    """A run for the block: FINISHED if it returns, FAILED (KILLED on Ctrl-C) if it raises.
    ``resume``: the id of an interrupted run to continue instead of a new one (its params and
    datasets stay as logged; ``tags`` are set again)."""
    if resume is None:
        run = start_run(params, root, name, tags)
    else:
        client, experiment_id = connect(params, root)
        run = TrackedRun(client, resume, experiment_id, params.tracking.outage_wait_s)
        client.log_batch(resume, tags=[RunTag(k, v) for k, v in tags.items()])
    with running(run.client, run.run_id):
        yield run


def log_params(client: MlflowClient, run_id: str, params: Params) -> None:
    """The resolved params, flattened (``train.lr``), as the run's MLflow params."""
    log_param_dict(client, run_id, flatten(params.to_dict()))


def log_param_dict(client: MlflowClient, run_id: str, values: dict[str, Any]) -> None:
    """Flat ``{key: value}`` as MLflow params (values as text, cut to the store's limit)."""
    flat = [Param(k, str(v)[:6000]) for k, v in values.items()]
    for i in range(0, len(flat), 100):  # the store takes at most 100 params per batch
        client.log_batch(run_id, params=flat[i : i + 100])


def log_params_file(client: MlflowClient, run_id: str, params: Params) -> None:
    """The resolved params as ``params.yaml``, beside the run and inside its ``model/`` artifact (so a
    registered version is self-contained), with paths as the user wrote them, not this machine's."""
    with tempfile.TemporaryDirectory() as tmp:
        save_params(params, Path(tmp) / "params.yaml")
        client.log_artifact(run_id, str(Path(tmp) / "params.yaml"))
        client.log_artifact(run_id, str(Path(tmp) / "params.yaml"), "model")


@contextlib.contextmanager
def downloaded(client: MlflowClient, run_id: str) -> Iterator[Path]:
    """A temporary copy of a run's ``model/`` artifact and summary (a folder shaped like a run folder)."""
    with tempfile.TemporaryDirectory(prefix="peftflow-run-") as tmp:
        try:
            client.download_artifacts(run_id, "model", tmp)
        except (MlflowException, OSError) as e:
            raise TrackingError(f"run {run_id}: no model artifact ({' '.join(str(e).split())[:200]})") from None
        with contextlib.suppress(MlflowException, OSError):
            client.download_artifacts(run_id, "train_summary.json", tmp)
        yield Path(tmp)


def log_metrics(client: MlflowClient, run_id: str, metrics: dict[str, float], step: int = 0) -> None:
    now = int(time.time() * 1000)
    client.log_batch(run_id, metrics=[Metric(k, float(v), now, step) for k, v in metrics.items()])


def metrics_to_log(result: dict[str, Any]) -> dict[str, float]:
    """metrics.json -> flat numeric MLflow metrics; the base model's figures as zeroshot_*."""
    flat = flatten({k: v for k, v in result.items() if k != "zeroshot"})
    flat.update({f"zeroshot_{k}": v for k, v in flatten(result.get("zeroshot", {})).items()})
    return {k: float(v) for k, v in flat.items() if isinstance(v, int | float) and not isinstance(v, bool)}


def get_run(client: MlflowClient, run_id: str):
    """The run, or one line saying the store has no such run."""
    try:
        return client.get_run(run_id)
    except MlflowException:
        raise TrackingError(f"no MLflow run {run_id!r} in {client.tracking_uri}") from None


def run_metrics(client: MlflowClient, run_id: str) -> dict[str, float]:
    return dict(client.get_run(run_id).data.metrics)


def run_params(client: MlflowClient, run_id: str) -> Params:
    """The resolved params a run logged (paths relative to its project)."""
    with tempfile.TemporaryDirectory(prefix="peftflow-params-") as tmp:
        try:
            path = client.download_artifacts(run_id, "params.yaml", tmp)
        except (MlflowException, OSError):
            raise TrackingError(f"run {run_id}: no params.yaml artifact; not a peftflow run") from None
        return read_resolved(Path(path))
