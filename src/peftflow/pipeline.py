"""The pipeline's steps as plain functions over a project folder; ``tasks/`` wraps each in Prefect.

A project is a folder with ``params/``, ``dvc.yaml`` and a DVC setup (this repository is one).
Between steps only small values travel: a :class:`DataVersion`, an MLflow run id, a registry
version, a decision.

Who owns what: DVC owns the data graph (``base_model`` -> ``prepare``), so data is prepared by
``dvc repro``, which skips up-to-date stages and restores cached outputs instead of recomputing
them, then pushed to the DVC remote. MLflow owns experiments: each ``finetune`` is a new run by
intent (nightly retraining must retrain), logged with the DVC hash of the data it used. The
``train``/``evaluate`` stages in ``dvc.yaml`` serve ``dvc repro`` and ``dvc exp run`` users.
"""

from __future__ import annotations

import logging
import re
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, field_validator

from peftflow import data, registry, runs, secrets, tracking, versioning
from peftflow.config import Params, ParamsError, load_params, parse_override, snapshot, without_method
from peftflow.predict import Prediction, predict_file
from peftflow.promote import Decision
from peftflow.training.sft import Callback

log = logging.getLogger(__name__)


class Project(BaseModel):
    """Where the pipeline runs: the project folder and its params folder (relative to it)."""

    model_config = ConfigDict(extra="forbid")
    root: Path = Field(Path("."), description="project folder: params/, dvc.yaml, .dvc/")
    params_dir: Path = Field(Path("params"), description="params folder, relative to root")
    overrides: list[str] = Field(default_factory=list, description="KEY.PATH=VALUE overrides, e.g. train.lr=1.0e-4")
    _resolved: dict[tuple, Params] = PrivateAttr(default_factory=dict)
    files: dict[str, str] | None = Field(
        None, description="set by the flow at its start: the params files as they were then (leave empty)"
    )

    @field_validator("overrides")
    @classmethod
    def _no_secrets_in_overrides(cls, value: list[str]) -> list[str]:
        return [secrets.stash(v) for v in value]  # a flow's parameters must not show a password

    @field_validator("files")
    @classmethod
    def _no_secrets_in_files(cls, value: dict[str, str] | None) -> dict[str, str] | None:
        return None if value is None else {k: secrets.stash(v) for k, v in value.items()}

    def frozen(self) -> Project:
        """This project with its params files read once, now: every later step of a flow run resolves
        its params from this snapshot, whatever happens to the files meanwhile."""
        if self.files is not None:
            return self
        files = {k: secrets.stash(v) for k, v in snapshot(self.root / self.params_dir).items()}
        return self.model_copy(update={"files": files})  # (model_copy skips the validators)

    def at(self, root: Path) -> Project:
        """This project in another folder (a worker's copy of it), its params snapshot too."""
        root = Path(root)
        files = self.files
        if files is not None:
            old, new = str(self.root / self.params_dir), str(root / self.params_dir)
            files = {new + k[len(old) :] if k.startswith(old) else k: v for k, v in files.items()}
        return self.model_copy(update={"root": root, "files": files})

    def params(self, method: str | None) -> Params:
        """Resolved params; for steps without a method, method.* overrides do not apply. A frozen
        project resolves and validates each method's params once; callers get their own copy."""
        overrides = self.overrides if method else without_method(self.overrides)
        # copies of a project (model_copy) share this cache: the key holds all that resolving reads
        files = frozenset(self.files.items()) if self.files is not None else None
        key = (method, tuple(overrides), str(self.root), str(self.params_dir), files)
        if self.files is None or key not in self._resolved:
            resolved = load_params(method, self.root / self.params_dir, overrides, self.files)
            if self.files is None:
                return resolved
            self._resolved[key] = resolved
        return self._resolved[key].model_copy(deep=True)


class DataVersion(BaseModel):
    version: str  # content hash of the prepared splits (manifest.json)
    dvc_md5: str | None  # DVC's hash of the prepared folder: restores it from the cache or remote
    out_dir: Path  # relative to the project root
    rows: dict[str, int]
    stages_run: list[str]  # empty: DVC had everything up to date


# data.* comes from params files that dvc.yaml lists; an override would prepare data DVC does not know
_DVC_OWNED = ("data",)


def check_overrides(overrides: list[str]) -> None:
    for item in overrides:
        head, sep, rest = item.partition(":")  # STAGE:KEY=VALUE (RLHF stages) names the key after the colon
        path, _ = parse_override(rest if sep and "=" not in head else item)
        if path[0] in _DVC_OWNED or path[:2] == ("rlhf", "data"):
            raise ParamsError(
                f"override {item!r}: {'.'.join(path[: 2 if path[0] == 'rlhf' else 1])}.* is DVC-tracked; set it in "
                f"params/data.yaml or params/rlhf/base.yaml (or `dvc exp run -S`), "
                f"so the prepared data and its version match the params"
            )


def prepare_data(project: Project, version: str | None = None, repro: bool = True) -> DataVersion:
    """The data to train on, pushed to the DVC remote: with ``version`` None, the workspace's
    (``dvc repro`` of the base model (embedded only) and prepared data); else that earlier data
    version (its DVC hash, or the data version a logged run names), restored from the DVC cache or
    remote into ``<train.output_dir>/data/<hash>``. ``repro=False``: the workspace's data as it is,
    neither reproduced nor pushed (for a caller that is itself a DVC stage, which holds DVC's lock).
    Either way the flow's steps read ``<train.output_dir>/data/<hash>``, which nothing rewrites, and
    the data step holds the project's data lock (another flow's waits for it)."""
    check_overrides(project.overrides)
    params = project.params(None)
    with versioning.project_lock(project.root, "prepare_data", params.runner.data_lock_timeout_s):
        ran = reproduce_stage(project, params, "prepare") if repro else []
        out_dir, md5 = params.data.out_dir, versioning.out_hash(project.root, str(params.data.out_dir))
        if version and version not in (md5, data.read_manifest(project.root / out_dir)["version"]):
            md5 = _dvc_hash_of(project, version)
            out_dir = versioning.restored(project.root, md5, params.train.output_dir)
        else:  # what the flow's steps read: a copy that no later `dvc repro prepare` rewrites
            out_dir = versioning.frozen(project.root, out_dir, md5, params.train.output_dir)
    return data_version(project, out_dir, md5, ran)


def reproduce_stage(project: Project, params: Params, stage: str) -> list[str]:
    """``dvc repro`` of a data stage (and of the embedded base model it needs), then ``dvc push``
    of its outputs; the stages that ran (empty: DVC had them up to date)."""
    targets = (["base_model"] if params.model.name_or_path == "embedded" else []) + [stage]
    ran = versioning.repro(project.root, targets)
    log.info("dvc repro %s: %s", " ".join(targets), f"ran {', '.join(ran)}" if ran else "all up to date")
    versioning.push(project.root, [stage])
    return ran


def data_version(project: Project, out_dir: Path, md5: str | None, ran: list[str]) -> DataVersion:
    """The data version of the prepared folder ``out_dir`` (relative to the project), from its manifest."""
    manifest = data.read_manifest(project.root / out_dir)
    return DataVersion(
        version=manifest["version"],
        dvc_md5=md5,
        out_dir=out_dir,
        rows={k: v["rows"] for k, v in manifest["files"].items()},
        stages_run=ran,
    )


def _dvc_hash_of(project: Project, version: str) -> str:
    """A DVC hash as given, or the one recorded by a logged run with that data version."""
    if re.fullmatch(r"[0-9a-f]{32}(\.dir)?", version):
        return version if version.endswith(".dir") else f"{version}.dir"
    client, experiment_id = tracking.connect(project.params(None), project.root)
    runs = client.search_runs(
        [experiment_id], filter_string=f"tags.`peftflow.data_version` = '{version}'", max_results=1
    )
    md5 = runs[0].data.tags.get("dvc.data_md5", "none") if runs else "none"
    if md5 == "none":
        raise data.DataError(
            f"data version {version!r}: no logged run names it with a DVC hash; give the DVC hash "
            f"(dvc.data_md5 on a run, or the prepare stage's md5 in a dvc.lock)"
        )
    return md5


def with_data(params: Params, data_version: DataVersion | None) -> Params:
    """``params`` reading the data of ``data_version`` (None: the workspace's prepared data)."""
    if data_version is not None:
        params.data.out_dir = data_version.out_dir
    return params


def finetune(
    project: Project,
    method: str,
    data_version: DataVersion,
    tags: dict[str, str] | None = None,
    callbacks: tuple[Callback, ...] = (),
) -> str:
    """Train one method on ``data_version`` in a new MLflow run (with extra ``tags``, and ``callbacks``
    that see every logged metric too); the run id."""
    check_overrides(project.overrides)
    params = with_data(project.params(method), data_version)
    found = data.read_manifest(params.rebased(project.root).data.out_dir)["version"]
    if found != data_version.version:
        raise data.DataError(
            f"{params.data.out_dir}: holds data version {found}, expected {data_version.version}; "
            f"prepare the data again (dvc repro prepare)"
        )
    return runs.train_tracked(params, project.root, data_version.dvc_md5, tags, callbacks)


def evaluate(project: Project, run_id: str, data_version: DataVersion | None = None) -> dict[str, float]:
    """Test metrics of a run (and the base model's zero-shot figures) on the test split of
    ``data_version`` (None: the workspace's), logged to the run."""
    result = runs.evaluate_tracked(run_id, project.root, with_data(project.params(None), data_version))
    return tracking.metrics_to_log(result.flat())


def register(project: Project, run_id: str, seed_runs: list[str] | None = None) -> str:
    """Register the run's artifact as a new version; alias ``candidate`` -> it. The version
    number, which the caller hands to :func:`promote` (``candidate`` may move on meanwhile).
    ``seed_runs``: all runs of a multi-seed candidate (``promote.seeds``), judged by their mean."""
    params = project.params(None)
    client, _ = tracking.connect(params, project.root)
    return registry.register(client, run_id, params.promote.model_name, seed_runs)


def predict(project: Project, input_path: Path, model_uri: str | None = None) -> Prediction:
    """Score a file of the project with a registered model (default: the champion of promote.model_name)."""
    params = project.params(None)
    uri = model_uri or f"models:/{params.promote.model_name}@{registry.CHAMPION}"
    source = input_path if Path(input_path).is_absolute() else project.root / input_path
    return predict_file(uri, source, project.root, params)


def promote(project: Project, version: str, data_version: DataVersion | None = None) -> Decision:
    """Move alias ``champion`` to registered ``version`` if the promotion policy says it is better,
    on the validation split of ``data_version`` (a champion from other data is scored on it first)."""
    params = with_data(project.params(None), data_version)
    client, _ = tracking.connect(params, project.root)
    return registry.promote(client, project.root, params, version)
