"""A tracking URI with credentials (``http://user:secret@host``) leaves the password in none of what
a flow run writes: files, MLflow params, tags and artifacts, stdout/stderr, Prefect's flow and task
run parameters and artifacts; and MLflow's client still sends it."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from mlflow import MlflowClient

from flows.serve import _process, prefect_server
from peftflow import secrets, tracking
from peftflow.pipeline import Project
from tests.project import BIN, make_project
from tests.test_serve import free_port

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


def test_a_credential_in_the_tracking_uri_is_written_nowhere(tmp_path, tiny_model_dir, monkeypatch):
    root = make_project(tmp_path / "proj", tiny_model_dir)
    monkeypatch.setenv("PREFECT_HOME", str(tmp_path / "prefect"))  # the Prefect server's database, scanned below
    store, port = tmp_path / "mlflow-server", free_port()
    store.mkdir()
    server = [f"{BIN}/mlflow", "server", "--backend-store-uri", f"sqlite:///{store / 'mlflow.db'}",
              "--artifacts-destination", str(store / "artifacts"), "--host", "127.0.0.1", "--port", str(port),
              "--workers", "1"]  # fmt: skip
    env = {**os.environ, "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "PREFECT_HOME": str(tmp_path / "prefect"),
           "HF_HUB_OFFLINE": "1", "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}",
           "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}  # fmt: skip
    for key in ("MLFLOW_TRACKING_URI", "MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD", "PREFECT_API_URL"):
        env.pop(key, None)
    uri = f"http://alice:{PASSWORD}@127.0.0.1:{port}"
    with (
        _process(server, env, tmp_path / "mlflow.log", f"http://127.0.0.1:{port}/health", "MLflow"),
        prefect_server(free_port(), None, tmp_path / "logs") as api,
    ):
        flow = [sys.executable, "-m", "flows", "experiment", "-m", "lora", "--root", str(root)]
        out = subprocess.run(
            [*flow, "-s", f"tracking.uri={uri}"], cwd=root, env={**env, "PREFECT_API_URL": api},
            capture_output=True, text=True, timeout=900,
        )  # fmt: skip
        assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
        leaks = [name for name, text in (("stdout", out.stdout), ("stderr", out.stderr)) if PASSWORD in text]

        # everything the Prefect server holds of the flow run: parameters, task inputs, artifacts, logs
        from prefect.client.orchestration import get_client
        from prefect.settings import PREFECT_API_URL, temporary_settings

        with temporary_settings(updates={PREFECT_API_URL: api}), get_client(sync_client=True) as client:
            flow_runs = client.read_flow_runs()
            held = [r.model_dump_json() for r in flow_runs]
            held += [r.model_dump_json() for r in client.read_task_runs()]
            held += [a.model_dump_json() for a in client.read_artifacts()]
            held += [log.model_dump_json() for log in client.read_logs()]
        # the flow's own parameters name the URI, by reference
        assert any("tracking.uri=http://alice:${PEFTFLOW_SECRET_" in str(r.parameters) for r in flow_runs), flow_runs
        assert len(held) > 5
        leaks += [f"Prefect: {h[:200]}" for h in held if PASSWORD in h]

    # every MLflow param, tag and metric key of every run and registered version
    client = MlflowClient(f"sqlite:///{store / 'mlflow.db'}")
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()])
    assert runs and any(
        r.data.params.get("tracking.uri", "").startswith("http://alice:${PEFTFLOW_SECRET_") for r in runs
    )
    for r in runs:
        leaks += [f"run {r.info.run_id} {k}" for k, v in {**r.data.params, **r.data.tags}.items() if PASSWORD in v]
    versions = client.search_model_versions()
    assert versions, "the experiment registered a version"
    leaks += [f"version {v.version} {k}" for v in versions for k, t in v.tags.items() if PASSWORD in t]

    # every file the run wrote: the project (runs/, reports/, params.yaml copies), the artifact store,
    # MLflow's and Prefect's databases
    for path in [*root.rglob("*"), *store.rglob("*"), *(tmp_path / "prefect").rglob("*")]:
        if path.is_file() and ".git" not in path.parts and PASSWORD.encode() in path.read_bytes():
            leaks.append(str(path))
    assert not leaks, leaks
