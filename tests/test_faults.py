"""Faults a production user hits, injected into real processes: a flow killed with -9 mid-finetune
and run again."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import psutil
from mlflow import MlflowClient

from tests.project import BIN, commit, make_project, set_keys


def _env(tmp_path: Path) -> dict[str, str]:
    env = {**os.environ, "PREFECT_HOME": str(tmp_path / "prefect"), "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
           "HF_HUB_OFFLINE": "1", "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}"}  # fmt: skip
    for key in ("MLFLOW_TRACKING_URI", "PREFECT_API_URL"):  # the project's own store, a temporary Prefect server
        env.pop(key, None)
    return env


def _runs(root: Path) -> list:
    client = MlflowClient(f"sqlite:///{root / 'mlflow.db'}")
    return client.search_runs([client.get_experiment_by_name("peftflow").experiment_id])


def test_a_flow_killed_mid_finetune_is_continued_by_its_rerun(tmp_path, tiny_model_dir):
    root = make_project(tmp_path / "proj", tiny_model_dir)
    set_keys(root / "params" / "base.yaml", {"train.max_steps": 300, "train.save_every": 25, "train.eval_every": 0})
    commit(root, "a longer training, checkpointed")
    cmd, env = [sys.executable, "-m", "flows", "experiment", "-m", "lora", "--root", str(root)], _env(tmp_path)

    flow = subprocess.Popen(cmd, cwd=root, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 600
    while not list((root / "runs").glob("*/checkpoints/step-*")):
        assert flow.poll() is None, "the flow ended before its first checkpoint"
        assert time.monotonic() < deadline, "no checkpoint within 10 minutes"
        time.sleep(0.1)
    helpers = psutil.Process(flow.pid).children(recursive=True)  # the run's process, Prefect's server, ...
    flow.kill()
    flow.wait()
    [killed] = _runs(root)
    assert killed.info.status == "RUNNING"  # what the kill left: the next run of the flow must settle it

    # the flow's helpers do not outlive it: the run's process, the fork server, the temporary Prefect server
    gone, alive = psutil.wait_procs(helpers, timeout=60)
    assert not alive, [" ".join(p.cmdline()[:6]) for p in alive]

    again = subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True, timeout=900)
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    assert "Error logging to API" not in again.stderr  # its logs were sent before its Prefect server stopped
    [run] = _runs(root)  # the same MLflow run, continued: no second run, none left RUNNING
    assert run.info.run_id == killed.info.run_id and run.info.status == "FINISHED"
    assert run.data.tags["peftflow.resumed_from"].startswith("step-")
    client = MlflowClient(f"sqlite:///{root / 'mlflow.db'}")
    steps = [m.step for m in client.get_metric_history(run.info.run_id, "train_loss")]
    assert min(steps) <= 25 and max(steps) == 300  # logged before the kill and after, in one run
    [version] = client.search_model_versions("name='peftflow-sentiment'")
    assert version.run_id == run.info.run_id


def test_a_tracking_outage_loses_no_metric_and_a_credential_is_written_nowhere(tmp_path, tiny_model_dir, monkeypatch):
    """One flow run against an MLflow server with credentials in its URI, stopped mid-training
    (longer than MLflow's own retries would wait) and started again on the same store."""
    from flows.serve import _process, prefect_server
    from tests.test_secrets import PASSWORD, leaks
    from tests.test_serve import free_port

    root = make_project(tmp_path / "proj", tiny_model_dir)
    set_keys(root / "params" / "base.yaml", {"train.max_steps": 300, "train.eval_every": 0, "train.log_every": 2})
    commit(root, "a longer training")
    store, port = tmp_path / "store", free_port()
    store.mkdir()
    server = [f"{BIN}/mlflow", "server", "--backend-store-uri", f"sqlite:///{store / 'mlflow.db'}",
              "--artifacts-destination", str(store / "artifacts"), "--host", "127.0.0.1", "--port", str(port),
              "--workers", "1"]  # fmt: skip
    monkeypatch.setenv("PREFECT_HOME", str(tmp_path / "prefect"))  # the Prefect server's database, scanned below
    env = {**_env(tmp_path), "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    for key in ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD"):
        env.pop(key, None)
    health, uri = f"http://127.0.0.1:{port}/health", f"http://alice:{PASSWORD}@127.0.0.1:{port}"
    cmd = [sys.executable, "-m", "flows", "experiment", "-m", "lora", "--root", str(root), "-s", f"tracking.uri={uri}"]
    client = MlflowClient(f"sqlite:///{store / 'mlflow.db'}")  # the store itself, whether its server is up or not

    log = tmp_path / "flow.log"
    with prefect_server(free_port(), None, tmp_path / "logs") as api:
        with _process(server, env, tmp_path / "mlflow-1.log", health, "MLflow"):
            flow = subprocess.Popen(cmd, cwd=root, env={**env, "PREFECT_API_URL": api}, stdout=log.open("w"),
                                    stderr=subprocess.STDOUT)  # fmt: skip
            deadline = time.monotonic() + 600
            while not _logged_steps(client):
                assert flow.poll() is None, log.read_text()[-3000:]
                assert time.monotonic() < deadline, "no metric reached MLflow within 10 minutes"
                time.sleep(0.2)
        # the server is down: the training must go on
        [summary] = _wait_for(lambda: list((root / "runs").glob("*/train_summary.json")), flow, log)
        assert max(_logged_steps(client)) < 300, "the training ended before the outage began: nothing was tested"
        with _process(server, env, tmp_path / "mlflow-2.log", health, "MLflow"):  # back, on the same store
            assert flow.wait(timeout=900) == 0, log.read_text()[-3000:]
        output = log.read_text()
        assert "does not answer" in output and "answers again" in output
        [run] = client.search_runs([client.get_experiment_by_name("peftflow").experiment_id])
        assert run.info.status == "FINISHED" and run.info.run_id == summary.parent.name
        assert _logged_steps(client) == list(range(2, 301, 2)), "every step's metrics, those of the outage too"
        found = leaks(
            PASSWORD, {"the flow's output": output}, store / "mlflow.db", api, [root, store, tmp_path / "prefect"]
        )
    assert not found, found


def _logged_steps(client: MlflowClient) -> list[int]:
    experiment = client.get_experiment_by_name("peftflow")
    runs = client.search_runs([experiment.experiment_id]) if experiment else []
    return sorted({m.step for r in runs for m in client.get_metric_history(r.info.run_id, "train_loss")})


def _wait_for(found, proc: subprocess.Popen, log: Path, timeout: float = 600):
    deadline = time.monotonic() + timeout
    while not (result := found()):
        assert proc.poll() is None, f"the flow exited ({proc.returncode}):\n{log.read_text()[-3000:]}"
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.2)
    return result


def test_two_flows_share_one_data_preparation_and_keep_their_data_while_it_changes(tmp_path, tiny_model_dir):
    from peftflow.data import read_manifest
    from tests.conftest import make_rows

    root = make_project(tmp_path / "proj", tiny_model_dir)
    set_keys(root / "params" / "base.yaml", {"train.max_steps": 300, "train.eval_every": 0})
    commit(root, "a longer training")
    raw = root / "data" / "raw" / "reviews.jsonl"
    raw.write_text("".join(json.dumps(r) + "\n" for r in make_rows(160, seed=1)))  # both flows must re-prepare
    env = _env(tmp_path)
    logs = [tmp_path / "a.log", tmp_path / "b.log"]
    flows = [
        subprocess.Popen([sys.executable, "-m", "flows", "experiment", "-m", "lora", "--root", str(root)],
                         cwd=root, env=env, stdout=log.open("w"), stderr=subprocess.STDOUT)
        for log in logs
    ]  # fmt: skip
    # once both got their data (each has a run folder), it changes: a user's `dvc repro prepare` of other rows
    deadline = time.monotonic() + 600
    while len(list((root / "runs").glob("*/params.yaml"))) < 2:
        assert any(f.poll() is None for f in flows) and time.monotonic() < deadline, logs[1].read_text()[-3000:]
        time.sleep(0.2)
    assert any(f.poll() is None for f in flows), "both flows ended before the data changed: nothing was tested"
    raw.write_text("".join(json.dumps(r) + "\n" for r in make_rows(160, seed=2)))
    subprocess.run([f"{BIN}/dvc", "repro", "prepare"], cwd=root, env=env, check=True, capture_output=True)
    changed = read_manifest(root / "data" / "prepared")["version"]

    for flow, log in zip(flows, logs, strict=True):
        assert flow.wait(timeout=900) == 0, log.read_text()[-3000:]
        assert "failed to reproduce" not in log.read_text() and "LockError" not in log.read_text()
    runs = _runs(root)
    assert len(runs) == 2 and all(r.info.status == "FINISHED" for r in runs)
    trained_on = {r.data.tags["peftflow.data_version"] for r in runs}
    assert len(trained_on) == 1 and changed not in trained_on  # one preparation, shared; not the later data
    client = MlflowClient(f"sqlite:///{root / 'mlflow.db'}")
    for r in runs:  # evaluated on the data it trained on, not on what `prepare` wrote meanwhile
        evaluated = json.loads(
            Path(client.download_artifacts(r.info.run_id, "metrics.json", str(tmp_path))).read_text()
        )
        assert evaluated["data_version"] in trained_on, evaluated["data_version"]
