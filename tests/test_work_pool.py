"""`peftflow serve --work-pool` for real: a Prefect server and MLflow server on loopback, the
deployments sent to a process work pool, and a real `prefect worker start` subprocess that clones
the project's commit from its git remote, pulls its data from the DVC remote and runs an experiment
in that fresh clone, on the tiny model."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

from mlflow import MlflowClient

from peftflow import pipeline, tracking
from peftflow.pipeline import Project
from tests.project import BIN, commit, make_project, run
from tests.test_serve import Served, free_port


def _start(cmd: list[str], log: Path, env: dict[str, str], cwd: Path) -> subprocess.Popen:
    with log.open("w") as out:
        return subprocess.Popen(cmd, cwd=cwd, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def test_a_worker_elsewhere_runs_an_experiment_from_git_and_the_dvc_remote(tmp_path, tiny_model_dir):
    root = make_project(tmp_path / "proj", tiny_model_dir)
    # what a team has: a git remote the workers clone, and a DVC remote outside the project
    run(["git", "init", "-q", "--bare", str(tmp_path / "origin.git")], tmp_path)
    run([f"{BIN}/dvc", "remote", "modify", "local", "url", str(tmp_path / "dvcstore")], root)
    pipeline.prepare_data(Project(root=root))  # prepared here once: dvc.lock names it, the DVC remote holds it
    sha = commit(root, "a project for the work pool")
    run(["git", "remote", "add", "origin", str(tmp_path / "origin.git")], root)
    run(["git", "push", "-q", "origin", "HEAD:refs/heads/main"], root)

    port, mlflow_port, pool = free_port(), free_port(), "gpu-pool"
    env = {**os.environ, "PREFECT_HOME": str(tmp_path / "prefect-home"), "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
           "HF_HUB_OFFLINE": "1", "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}"}  # fmt: skip
    for key in ("MLFLOW_TRACKING_URI", "PREFECT_API_URL", "PREFECT_UI_URL"):
        env.pop(key, None)
    serve_log, worker_log = tmp_path / "serve.log", tmp_path / "worker.log"
    cmd = [f"{BIN}/peftflow", "serve", "--root", str(root), "--port", str(port), "--mlflow-port", str(mlflow_port),
           "--work-pool", pool, "--limit", "2"]  # fmt: skip
    serve = _start(cmd, serve_log, env, root)
    api = f"http://127.0.0.1:{port}/api"
    served = Served(api=api, mlflow_ui=f"http://127.0.0.1:{mlflow_port}", root=root, log=serve_log, pid=serve.pid)
    worker = None
    try:
        deadline = time.monotonic() + 300
        while "prefect worker start" not in serve_log.read_text():
            assert serve.poll() is None, f"serve exited ({serve.returncode}):\n{serve_log.read_text()[-4000:]}"
            assert time.monotonic() < deadline, serve_log.read_text()[-4000:]
            time.sleep(1)
        deployment = served.deployment("experiment", "experiment")
        assert deployment["work_pool_name"] == pool and str(root) not in str(deployment["parameters"])
        steps = [next(iter(s)) for s in deployment["pull_steps"]]
        assert steps == ["prefect.deployments.steps.git_clone", "prefect.deployments.steps.run_shell_script",
                         "prefect.deployments.steps.set_working_directory"]  # fmt: skip
        assert served.call("GET", f"/work_pools/{pool}")["concurrency_limit"] == 2

        # a worker in another folder, as on another machine: nothing of the project there but git and DVC
        elsewhere = tmp_path / "worker-machine"
        elsewhere.mkdir()
        worker = _start([f"{BIN}/prefect", "worker", "start", "--pool", pool, "--type", "process"], worker_log,
                        {**env, "PREFECT_API_URL": api}, elsewhere)  # fmt: skip
        flow_run_id = served.run_deployment(
            "experiment",
            "experiment",
            {"methods": ["lora"], "project": {"root": ".", "overrides": ["train.max_steps=2"]}},
        )
        try:
            served.wait(flow_run_id, timeout=600)
        except AssertionError as e:
            raise AssertionError(f"{e}\n--- worker log ---\n{worker_log.read_text()[-4000:]}") from None
    finally:
        for proc in (worker, serve):
            if proc is not None:
                _stop(proc)

    client = MlflowClient(f"sqlite:///{root / 'mlflow.db'}")  # the store the MLflow server served to the worker
    (mlflow_run,) = client.search_runs(
        [client.get_experiment_by_name("peftflow").experiment_id],
        filter_string=f"tags.`prefect.flow_run_id` = '{flow_run_id}'",
    )
    assert mlflow_run.data.tags["git.commit"] == sha and mlflow_run.data.tags["git.dirty"] == "false"
    assert mlflow_run.data.params["train.max_steps"] == "2"
    (version,) = client.search_model_versions(f"run_id = '{mlflow_run.info.run_id}'")
    assert set(tracking.LINEAGE_KEYS) <= set(version.tags) and version.tags["dvc.data_md5"].endswith(".dir")
    assert not (root / "runs" / mlflow_run.info.run_id).exists(), "the run trained here, not in the worker's clone"
