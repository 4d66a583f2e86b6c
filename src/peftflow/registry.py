"""The MLflow model registry: register a run's adapter, promote by policy, load by alias.

Aliases, not the deprecated stages: ``candidate`` is the newest registered version, ``champion``
the one in production. A version is created only for a finished, evaluated run whose artifact is
in the store, and deleted again if setting its alias fails, so no version lacks its artifact and no
alias points at a failed run. Promotion judges one named version, moves ``champion`` to it only when
:func:`peftflow.promote.decide` says so, and records the decision on that version.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import random
import shutil
import socket
import tempfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import mlflow
from mlflow import MlflowClient
from mlflow.entities import RunStatus
from mlflow.exceptions import MlflowException

from peftflow import checksums, data, tracking
from peftflow.atomic import atomic_dir
from peftflow.config import Params
from peftflow.promote import Decision, Evidence, decide, example_figure

log = logging.getLogger(__name__)

CANDIDATE, CHAMPION = "candidate", "champion"
LOCK_SUFFIX = ".promotion-lock"  # a registered model that exists only while a promotion moves the champion


def _version_by_alias(client: MlflowClient, name: str, alias: str):
    """The version an alias points at, or None; a clear error if the model is not registered."""
    try:
        model = client.get_registered_model(name)
    except MlflowException:
        names = [m.name for m in client.search_registered_models() if not m.name.endswith(LOCK_SUFFIX)]
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


FIGURES = ("val_accuracy", "val_loss", "test_accuracy", "test_loss")  # on every version, as tags


def register(client: MlflowClient, run_id: str, name: str, seed_runs: list[str] | None = None) -> str:
    """Register the run's ``model/`` artifact as a new version of ``name``; point ``candidate`` at it.

    ``seed_runs``: every run of a multi-seed candidate (this one, the best, among them): promotion
    judges their mean, and the version names them (``peftflow.seed_runs``)."""
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
    # the figures it is decided on (val) and reported by (test), side by side on the version
    tags |= {f"peftflow.{k}": f"{run.data.metrics[k]:.4f}" for k in FIGURES if k in run.data.metrics}
    if seed_runs and len(seed_runs) > 1:
        tags["peftflow.seed_runs"] = ",".join(seed_runs)  # peftflow.seed (lineage) says which one this is
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
    _download(client, version.source, dst)


def _download(client: MlflowClient, source: str, dst: Path) -> None:
    with tempfile.TemporaryDirectory(prefix="peftflow-download-") as tmp:
        got = mlflow.artifacts.download_artifacts(artifact_uri=source, dst_path=tmp, tracking_uri=client.tracking_uri)
        Path(dst).mkdir(parents=True, exist_ok=True)
        for item in Path(got).iterdir():
            shutil.move(item, Path(dst) / item.name)


def _logged_selection(client: MlflowClient, run_id: str) -> dict[str, Any] | None:
    """A run's per-example validation values (selection.json, logged by its evaluation), or None."""
    from peftflow.evaluate import SELECTION_FILE

    with tempfile.TemporaryDirectory(prefix="peftflow-selection-") as tmp:
        try:
            path = client.download_artifacts(run_id, SELECTION_FILE, tmp)
        except (MlflowException, OSError):
            return None
        return json.loads(Path(path).read_text())


def selection_of(client: MlflowClient, run_id: str, source: str, what: str, root: Path, params: Params) -> dict:
    """A run's per-example values on the validation split of ``params``'s data: as its evaluation
    logged them when that was the same data, else scored now from its artifact at ``source`` (a
    champion from older data, or one registered before per-example values were kept)."""
    want = data.read_manifest(params.rebased(root).data.out_dir)["version"]
    logged = _logged_selection(client, run_id)
    if logged is not None and logged.get("data_version") == want:
        return logged
    from peftflow.evaluate import select_artifact  # torch and the model code, only when re-scored

    log.info("%s: scoring it on the validation split of data %s", what, want)
    with tempfile.TemporaryDirectory(prefix="peftflow-version-") as tmp:
        _download(client, source, Path(tmp) / "model")
        return select_artifact(Path(tmp), root, params)


def _mean_selection(selections: list[dict[str, Any]]) -> dict[str, Any]:
    """Several seeds' per-example values as one: each example's values averaged over the seeds."""
    first = selections[0]
    if any(s["ids"] != first["ids"] for s in selections):
        raise tracking.TrackingError("the seeds of one candidate were scored on different examples")
    out = dict(first)
    for key in ("nll", "tokens", "correct"):
        if key in first:
            out[key] = [sum(vals) / len(vals) for vals in zip(*(s[key] for s in selections), strict=True)]
    return out


def candidate_evidence(client: MlflowClient, version, root: Path, params: Params) -> Evidence:
    """What the candidate brings: its run's figures and per-example values, or with several seeds
    (the version's ``peftflow.seed_runs``) their mean, the registered run first."""
    metric = params.promote.metric
    run_ids = [version.run_id]
    run_ids += [r for r in version.tags.get("peftflow.seed_runs", "").split(",") if r and r != version.run_id]
    selections, figures, seeds = [], [], []
    for run_id in run_ids:
        run = tracking.get_run(client, run_id)
        source = version.source if run_id == version.run_id else f"{run.info.artifact_uri}/model"
        selections.append(selection_of(client, run_id, source, f"run {run_id}", root, params))
        figures.append(dict(run.data.metrics))
        value = example_figure(selections[-1], metric)
        seeds.append({"seed": run.data.tags.get("peftflow.seed", "?"), "run_id": run_id,
                      "value": value if value is not None else figures[-1].get(metric, math.nan)})  # fmt: skip
    keys = set.intersection(*(set(f) for f in figures))
    metrics = {k: sum(f[k] for f in figures) / len(figures) for k in keys}
    label = f"version {version.version} ({version.tags.get('peftflow.method', '?')})"
    return Evidence(metrics, _mean_selection(selections), seeds, selections if len(selections) > 1 else [], label)


@contextlib.contextmanager
def champion_lock(client: MlflowClient, name: str, timeout_s: float, stale_s: float = 300.0) -> Iterator[None]:
    """Serialize moves of ``name``'s champion alias across processes and machines.

    The lock is a registered model, ``<name>.promotion-lock``, tagged with its holder: creating one
    that exists fails in a database-backed store itself (a unique name, for a SQLite file and for
    a tracking server on a database alike), so exactly one creator holds it; its holder deletes
    it on release. A file-based registry (``file:`` or a folder) checks the name and then creates
    it, not atomically, so there a file lock beside the store serializes the creators too. The
    lock is held while the champion is re-read, the alias set and the decision recorded (well
    under a second; longer only while the store is retried). One that this process has seen
    unchanged, same holder and creation time, for ``stale_s`` (on its own clock: the store's may
    differ) was left by a process that died holding it, and is removed."""
    lock, me = f"{name}{LOCK_SUFFIX}", f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
    deadline = time.monotonic() + timeout_s
    seen: tuple[str, int] | None = None  # the holder and creation time of the lock last seen
    since = time.monotonic()
    with _store_file_lock(client, lock, timeout_s):
        while True:
            try:
                client.create_registered_model(
                    lock, tags={"peftflow.lock_owner": me},
                    description=f"held while peftflow moves the champion alias of {name}; removed right after",
                )  # fmt: skip
                break
            except MlflowException as e:
                if e.error_code != "RESOURCE_ALREADY_EXISTS":
                    raise
            held = _lock_holder(client, lock)
            if held is not None and held[0] == me:
                break  # our own create, retried by the client after its reply was lost
            if held is not None and held != seen:
                seen, since = held, time.monotonic()
            elif held is not None and time.monotonic() - since > stale_s and _lock_holder(client, lock) == seen:
                log.warning("%s: removing a promotion lock %s has held for over %.0f s (its process is gone)",
                            name, held[0], stale_s)  # fmt: skip
                with contextlib.suppress(MlflowException):
                    client.delete_registered_model(lock)
                continue
            if time.monotonic() > deadline:
                owner = held[0] if held else "?"
                raise tracking.TrackingError(
                    f"promotion of {name}: another promotion ({owner}) holds {lock!r}; waited "
                    f"promote.lock_timeout_s={timeout_s:g} s"
                )
            time.sleep(0.1 + random.random() * 0.2)
        try:
            yield
        finally:
            if (_lock_holder(client, lock) or ("",))[0] == me:  # never another holder's (one that took a stale lock)
                with contextlib.suppress(MlflowException):
                    client.delete_registered_model(lock)


def _lock_holder(client: MlflowClient, lock: str) -> tuple[str, int] | None:
    """(holder, creation time) of the lock, or None if it is not held."""
    try:
        held = client.get_registered_model(lock)
    except MlflowException:
        return None
    return held.tags.get("peftflow.lock_owner", "?"), int(held.creation_timestamp or 0)


@contextlib.contextmanager
def _store_file_lock(client: MlflowClient, lock: str, timeout_s: float) -> Iterator[None]:
    """A file lock in a local file-based registry's folder (whose creates are not atomic); else nothing."""
    from urllib.parse import urlparse

    uri = client._registry_uri
    parsed = urlparse(uri)
    if parsed.scheme not in ("", "file"):
        yield
        return
    from filelock import FileLock, Timeout

    folder = Path(parsed.path if parsed.scheme == "file" else uri)
    folder.mkdir(parents=True, exist_ok=True)
    try:
        with FileLock(str(folder / f".{lock}.lock"), timeout=timeout_s):
            yield
    except Timeout:
        raise tracking.TrackingError(f"promotion: another promotion holds {folder}/.{lock}.lock") from None


def promote(client: MlflowClient, root: Path, params: Params, version: str) -> Decision:
    """Move ``champion`` to ``version`` if the policy in ``params.promote`` says it is better.

    The version is named, not read from ``candidate``: another flow may register (and move
    ``candidate``) between this flow's register and promote steps. The comparison (minutes, when
    the champion must be scored on this data first) runs unlocked; then under
    :func:`champion_lock` the champion is read again, and if another promotion moved it meanwhile,
    the candidate is judged again against the new one. So concurrent promotions end with one
    champion, the best, and every decision recorded against the champion it was made against."""
    policy, name = params.promote, params.promote.model_name
    _version_by_alias(client, name, CHAMPION)  # the model-exists check
    try:
        cand = client.get_model_version(name, version)
    except MlflowException:
        raise tracking.TrackingError(f"registered model {name!r} has no version {version!r}") from None
    _check_data_for(cand, root, params)
    candidate = candidate_evidence(client, cand, root, params)
    judged: dict[str, Evidence] = {}
    while True:
        champ = _version_by_alias(client, name, CHAMPION)
        if champ is not None and champ.version == cand.version:
            return Decision(False, [f"version {cand.version} is already the champion"], "already the champion")
        champion = None
        if champ is not None:
            _comparable(cand, champ, policy)
            if champ.version not in judged:
                if champ.tags.get("peftflow.data_version") != cand.tags.get("peftflow.data_version"):
                    log.info("champion v%s was evaluated on other data; scoring it on the candidate's", champ.version)
                figures = _champion_figures(client, champ, cand, policy)  # before minutes of scoring
                examples = selection_of(client, champ.run_id, champ.source, f"champion v{champ.version}", root, params)
                judged[champ.version] = Evidence(figures, examples, [], f"version {champ.version}")
            champion = judged[champ.version]
        decision = decide(candidate, champion, policy)
        with champion_lock(client, name, policy.lock_timeout_s):
            now = _version_by_alias(client, name, CHAMPION)
            if (now and now.version) != (champ and champ.version):
                log.info("%s: champion moved to v%s while v%s was judged; judging it again", name, now.version,
                         cand.version)  # fmt: skip
                continue
            if decision.promote:
                client.set_registered_model_alias(name, CHAMPION, cand.version)
            against = f"v{champ.version}" if champ is not None else "none"
            # recorded once the alias has moved (or stayed), so the tag never claims a move that failed
            _record(client, cand, against, decision)
        log.info("%s v%s vs champion %s: %s", name, cand.version, against, decision.summary)
        return decision


def _comparable(cand, champ, policy) -> None:
    """A sequence classifier's losses are per example, a causal LM's per answer token: a policy that
    reads a loss cannot judge one against the other (versions from before the tag are causal LMs)."""
    task, champion_task = (v.tags.get("peftflow.task", "causal_lm") for v in (cand, champ))
    losses = [k for k in [policy.metric, *policy.guards] if k.endswith(("loss", "perplexity", "ppl"))]
    if task != champion_task and losses:
        raise tracking.TrackingError(
            f"promote: version {cand.version} is a {task} model and the champion v{champ.version} a {champion_task} "
            f"one: {', '.join(losses)} is per example for one and per answer token for the other; decide on "
            f"val_accuracy without loss guards (promote.guards: {{}}), or register it under another promote.model_name"
        )


def _champion_figures(client: MlflowClient, champ, cand, policy) -> dict[str, float]:
    """The champion's logged figures that compare with the candidate's: all of them on the same
    data; on other data only the cost figures (quality is re-scored per example), and a policy
    metric that is neither fails in one line."""
    from peftflow.promote import PAIRED
    from peftflow.results import EFFICIENCY, TRAIN_METRICS

    metrics = tracking.run_metrics(client, champ.run_id)
    if champ.tags.get("peftflow.data_version") == cand.tags.get("peftflow.data_version"):
        return metrics
    costs = (set(TRAIN_METRICS) | set(EFFICIENCY)) - {"final_train_loss"}
    for key in [policy.metric, *policy.guards]:
        if key not in PAIRED and key not in costs:
            raise tracking.TrackingError(
                f"promote: the champion v{champ.version}'s {key} was measured on other data "
                f"({champ.tags.get('peftflow.data_version')}) and has no per-example values to score again; "
                f"decide on {' or '.join(PAIRED)}"
            )
    return {k: v for k, v in metrics.items() if k in costs}


def _check_data_for(cand, root: Path, params: Params) -> None:
    """A candidate is judged on the data it was evaluated on (and the champion scored on it too)."""
    want = cand.tags.get("peftflow.data_version")
    have = data.read_manifest(params.rebased(root).data.out_dir)["version"]
    if have != want:
        raise tracking.TrackingError(
            f"version {cand.version} is judged on the data it was evaluated on ({want}), but "
            f"{params.data.out_dir} holds {have}; run prepare_data for that data first"
        )


def _record(client: MlflowClient, cand, against: str, decision: Decision) -> None:
    """The decision on the version (tags), and in its run (a tag, the interval as metrics, the
    whole decision as ``promotion/v<N>.json``)."""
    name, number = cand.name, cand.version
    outcome = "promoted" if decision.promote else "kept"
    tags = {"peftflow.promotion_against": against, "peftflow.promotion_reasons": "; ".join(decision.reasons),
            "peftflow.promotion_summary": decision.summary, "peftflow.promotion": outcome}  # fmt: skip
    for key, value in tags.items():
        client.set_model_version_tag(name, number, key, value[:5000])
    client.set_tag(cand.run_id, f"peftflow.promotion.v{number}", f"{decision.summary} (against {against})"[:5000])
    c = decision.comparison
    if c is not None:
        tracking.log_metrics(client, cand.run_id, {"promotion_gain": c.gain, "promotion_ci_low": c.low,
                                                   "promotion_ci_high": c.high}, step=int(number))  # fmt: skip
    client.log_dict(cand.run_id, {"version": number, "against": against, **decision.record()},
                    f"promotion/v{number}.json")  # fmt: skip


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


def load(uri: str, root: Path, params: Params) -> tuple[Any, Any]:
    """A registered model ready for inference: (its :class:`peftflow.serving.Predictor`, the
    version); the same model ``mlflow.pyfunc.load_model(uri)`` gives."""
    from peftflow.serving import Predictor

    parse_uri(uri)  # a malformed URI is named before any store is opened
    client, _ = tracking.connect(params, root)
    version = resolve(client, uri)
    dst = fetched(client, version, root, params)
    return Predictor(dst, root, verified=True), version  # fetched() checked its files
