"""The MLflow model registry: register a run's adapter, promote by policy, load by alias.

Aliases, not the deprecated stages: ``candidate`` is the newest registered version, ``champion``
the one in production. A version is created only for a finished, evaluated run whose artifact is
in the store, and deleted again if setting its alias fails, so no version lacks its artifact and no
alias points at a failed run. Promotion judges one named version, moves ``champion`` to it only when
:func:`peftflow.promote.decide` says so, and records the decision on that version.
"""

from __future__ import annotations

import logging
import shutil
import tempfile
from pathlib import Path
from typing import Any

import mlflow
from mlflow import MlflowClient
from mlflow.entities import RunStatus
from mlflow.exceptions import MlflowException

from peftflow import checksums, data, tracking
from peftflow.atomic import atomic_dir
from peftflow.config import Params, read_resolved
from peftflow.promote import Decision, decide

log = logging.getLogger(__name__)

CANDIDATE, CHAMPION = "candidate", "champion"


def _version_by_alias(client: MlflowClient, name: str, alias: str):
    """The version an alias points at, or None; a clear error if the model is not registered."""
    try:
        model = client.get_registered_model(name)
    except MlflowException:
        names = [m.name for m in client.search_registered_models()]
        raise tracking.TrackingError(
            f"no registered model {name!r}; registered: {', '.join(names) or 'none'}"
        ) from None
    if alias not in model.aliases:
        return None
    return client.get_model_version(name, model.aliases[alias])


def aliased(client: MlflowClient, name: str, alias: str) -> dict[str, Any] | None:
    """What an alias points at, for reports: version, run id, method and the run's metrics; None
    if the model is not registered yet or lacks the alias."""
    try:
        version = _version_by_alias(client, name, alias)
    except tracking.TrackingError:
        return None
    if version is None:
        return None
    return {
        "version": str(version.version),
        "run_id": version.run_id,
        "method": version.tags.get("peftflow.method", "?"),
        "metrics": tracking.run_metrics(client, version.run_id),
    }


def register(client: MlflowClient, run_id: str, name: str) -> str:
    """Register the run's ``model/`` artifact as a new version of ``name``; point ``candidate`` at it."""
    run = tracking.get_run(client, run_id)
    status = run.info.status
    if status != RunStatus.to_string(RunStatus.FINISHED):
        raise tracking.TrackingError(f"run {run_id} is {status}, not FINISHED; only finished runs are registered")
    if run.data.tags.get("peftflow.evaluated") != "true":
        raise tracking.TrackingError(f"run {run_id} has no test metrics; evaluate it before registering")
    files = {Path(f.path).name for f in client.list_artifacts(run_id, "model")}
    if not {"peftflow.json", "params.yaml"} <= files:
        raise tracking.TrackingError(f"run {run_id}: its model/ artifact is incomplete ({sorted(files)})")

    try:
        client.get_registered_model(name)
    except MlflowException:
        client.create_registered_model(name, description="peftflow fine-tuned models; aliases: candidate, champion")
    tags = {k: v for k, v in run.data.tags.items() if k in tracking.LINEAGE_KEYS}
    version = client.create_model_version(
        name, source=f"{run.info.artifact_uri}/model", run_id=run_id, tags=tags, description=run.info.run_name
    )
    try:
        client.set_registered_model_alias(name, CANDIDATE, version.version)
    except Exception:
        client.delete_model_version(name, version.version)  # no version left without its alias step done
        raise
    log.info("registered %s version %s (run %s) as %s", name, version.version, run_id, CANDIDATE)
    return str(version.version)


def download(client: MlflowClient, version, dst: Path) -> None:
    """The files of a version's source (its run's model/ artifact) into the folder ``dst``."""
    with tempfile.TemporaryDirectory(prefix="peftflow-download-") as tmp:
        got = mlflow.artifacts.download_artifacts(
            artifact_uri=version.source, dst_path=tmp, tracking_uri=client.tracking_uri
        )
        Path(dst).mkdir(parents=True, exist_ok=True)
        for item in Path(got).iterdir():
            shutil.move(item, Path(dst) / item.name)


def evaluate_version(client: MlflowClient, name: str, version: str, root: Path, params: Params) -> dict[str, float]:
    """Score a registered version on the test split in ``params`` (the candidate's data)."""
    from peftflow.evaluate import score_artifact  # torch and the model code, only when a champion is re-scored

    with tempfile.TemporaryDirectory(prefix="peftflow-version-") as tmp:
        download(client, client.get_model_version(name, version), Path(tmp) / "model")
        return tracking.metrics_to_log(score_artifact(Path(tmp), root, params).flat())


def promote(client: MlflowClient, root: Path, params: Params, version: str) -> Decision:
    """Move ``champion`` to ``version`` if the policy in ``params.promote`` says it is better.

    The version is named, not read from ``candidate``: another flow may register (and move
    ``candidate``) between this flow's register and promote steps."""
    policy, name = params.promote, params.promote.model_name
    champ = _version_by_alias(client, name, CHAMPION)  # also the model-exists check
    try:
        cand = client.get_model_version(name, version)
    except MlflowException:
        raise tracking.TrackingError(f"registered model {name!r} has no version {version!r}") from None
    if champ is not None and champ.version == cand.version:
        return Decision(False, [f"version {cand.version} is already the champion"])

    cand_metrics = tracking.run_metrics(client, cand.run_id)
    champ_metrics = None
    if champ is not None:
        champ_metrics = tracking.run_metrics(client, champ.run_id)
        if champ.tags.get("peftflow.data_version") != cand.tags.get("peftflow.data_version"):
            # figures from two test sets do not compare: score the champion on the candidate's data
            want = cand.tags.get("peftflow.data_version")
            have = data.read_manifest(params.rebased(root).data.out_dir)["version"]
            if have != want:
                raise tracking.TrackingError(
                    f"the champion must be re-scored on the candidate's data ({want}), but "
                    f"{params.data.out_dir} holds {have}; run prepare_data for that data first"
                )
            log.info("champion v%s was evaluated on other data; evaluating it on the candidate's", champ.version)
            champ_metrics = evaluate_version(client, name, champ.version, root, params)
    decision = decide(cand_metrics, champ_metrics, policy)
    against = f"v{champ.version}" if champ is not None else "none"
    if decision.promote:
        client.set_registered_model_alias(name, CHAMPION, cand.version)
    # recorded once the alias has moved (or stayed), so the tag never claims a move that failed
    client.set_model_version_tag(name, cand.version, "peftflow.promotion_against", against)
    client.set_model_version_tag(name, cand.version, "peftflow.promotion_reasons", "; ".join(decision.reasons))
    client.set_model_version_tag(name, cand.version, "peftflow.promotion", "promoted" if decision.promote else "kept")
    log.info("%s v%s vs champion %s: %s", name, cand.version, against, decision)
    return decision


def fetched(client: MlflowClient, version, root: Path, params: Params) -> Path:
    """A local copy of a version's files, under ``<train.output_dir>/registry/``: downloaded once
    (versions never change), atomically, and checked against the digests saved with the artifact;
    a cached copy that no longer matches is fetched again, a stored one that does not is an error."""
    from peftflow import artifacts

    dst = Path(root) / params.train.output_dir / "registry" / f"{version.name}-v{version.version}"
    if (dst / "peftflow.json").is_file():
        try:
            artifacts.verify(dst)
            return dst
        except checksums.CorruptError as e:
            log.warning("%s; fetching it again", e)
    with atomic_dir(dst) as tmp:
        download(client, version, tmp)
        try:
            artifacts.verify(tmp)
        except checksums.CorruptError as e:
            raise tracking.TrackingError(
                f"{version.name} version {version.version}: the stored artifact ({version.source}) is corrupt: "
                f"{str(e).split(': ', 2)[-1]}"
            ) from None
    return dst


def parse_uri(uri: str) -> tuple[str, str | None, str | None]:
    """``models:/NAME@ALIAS`` -> (NAME, ALIAS, None); ``models:/NAME/VERSION`` -> (NAME, None, VERSION)."""
    ref = uri.removeprefix("models:/") if uri.startswith("models:/") else ""
    name, at, alias = ref.partition("@")
    if not at:
        name, _, number = ref.rpartition("/")
        if name and number.isdigit():
            return name, None, number
    elif name and alias and "/" not in alias:
        return name, alias, None
    raise tracking.TrackingError(f"{uri}: expected models:/NAME@ALIAS or models:/NAME/VERSION")


def resolve(client: MlflowClient, uri: str):
    """``models:/NAME@ALIAS`` or ``models:/NAME/VERSION`` -> the model version, with clear errors."""
    name, alias, number = parse_uri(uri)
    if alias is not None:
        version = _version_by_alias(client, name, alias)
        if version is None:
            aliases = ", ".join(client.get_registered_model(name).aliases) or "none"
            raise tracking.TrackingError(f"{uri}: model {name!r} has no alias {alias!r}; its aliases: {aliases}")
        return version
    _version_by_alias(client, name, CHAMPION)  # the model-exists check
    try:
        return client.get_model_version(name, number)
    except MlflowException:
        raise tracking.TrackingError(f"{uri}: model {name!r} has no version {number!r}") from None


def load(uri: str, root: Path, params: Params) -> tuple[Any, Any, Params, Any]:
    """A registered model ready for inference: (model in eval mode, tokenizer, its params, the version)."""
    from peftflow import artifacts
    from peftflow.model import load_base_for, load_tokenizer

    parse_uri(uri)  # a malformed URI is named before any store is opened
    client, _ = tracking.connect(params, root)
    version = resolve(client, uri)
    dst = fetched(client, version, root, params)
    model_params = read_resolved(dst / "params.yaml").rebased(root)
    model = artifacts.load(load_base_for(model_params), dst, verified=True)  # fetched() checked it
    return model.eval(), load_tokenizer(model_params.model), model_params, version
