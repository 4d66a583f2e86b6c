"""A tracking URI with credentials (``http://user:secret@host``): MLflow's client still sends them,
and :func:`leaks` finds where a flow run wrote the password (used by the real flow run of
``tests/test_faults.py``, against an MLflow server that also goes down mid-run)."""

from __future__ import annotations

from pathlib import Path

import pytest
from mlflow import MlflowClient

from peftflow import secrets, tracking
from peftflow.pipeline import Project

PASSWORD = "pw-8cK2qZ"  # noqa: S105 - the secret the test looks for


def test_the_mlflow_client_gets_the_credentials_the_uri_no_longer_shows(monkeypatch):
    for name in ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD"):
        monkeypatch.delenv(name, raising=False)
    project = Project(root=Path("."), overrides=[f"tracking.uri=http://alice:{PASSWORD}@127.0.0.1:9/x"])
    assert PASSWORD not in " ".join(project.overrides) and PASSWORD not in project.model_dump_json()
    params = project.params(None)
    assert PASSWORD not in params.model_dump_json()
    uri = tracking.tracking_uri(params, Path("."))
    assert uri == "http://127.0.0.1:9/x"
    creds = MlflowClient(uri)._tracking_client.store.get_host_creds()
    assert (creds.username, creds.password) == ("alice", PASSWORD)

    monkeypatch.delenv(params.tracking.uri.split("${")[1].split("}")[0])  # a machine without the variable
    with pytest.raises(secrets.SecretError, match=r"^tracking.uri: the credential \$\{PEFTFLOW_SECRET_\w+\} is not"):
        tracking.tracking_uri(params, Path("."))


def leaks(secret: str, outputs: dict[str, str], mlflow_db: Path, prefect_api: str, folders: list[Path]) -> list[str]:
    """Where ``secret`` was written: the outputs (name: text), the Prefect server (flow and task runs
    with their parameters, artifacts, logs), every MLflow param and tag of every run and registered
    version, and every file under ``folders`` (the project, the artifact store, the databases)."""
    from prefect.client.orchestration import get_client
    from prefect.settings import PREFECT_API_URL, temporary_settings

    found = [name for name, text in outputs.items() if secret in text]
    with temporary_settings(updates={PREFECT_API_URL: prefect_api}), get_client(sync_client=True) as client:
        flow_runs = client.read_flow_runs()
        held = [r.model_dump_json() for r in flow_runs]
        held += [r.model_dump_json() for r in client.read_task_runs()]
        held += [a.model_dump_json() for a in client.read_artifacts()]
        held += [log.model_dump_json() for log in client.read_logs()]
    # the flow's own parameters name the URI, by reference
    assert any("tracking.uri=http://alice:${PEFTFLOW_SECRET_" in str(r.parameters) for r in flow_runs), flow_runs
    found += [f"Prefect: {h[:200]}" for h in held if secret in h]

    client = MlflowClient(f"sqlite:///{mlflow_db}")
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()])
    assert any(r.data.params.get("tracking.uri", "").startswith("http://alice:${PEFTFLOW_SECRET_") for r in runs)
    for r in runs:
        found += [f"run {r.info.run_id} {k}" for k, v in {**r.data.params, **r.data.tags}.items() if secret in v]
    versions = client.search_model_versions()
    assert versions, "the flow registered a version"
    found += [f"version {v.version} {k}" for v in versions for k, t in v.tags.items() if secret in t]
    for path in (p for folder in folders for p in folder.rglob("*")):
        if path.is_file() and ".git" not in path.parts and secret.encode() in path.read_bytes():
            found.append(str(path))
    return found
