"""Faults a production user hits, injected into real processes: a flow killed with -9 mid-finetune
and run again."""

from __future__ import annotations

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
    set_keys(root / "params" / "base.yaml", {"train.max_steps": 600, "train.save_every": 25, "train.eval_every": 0})
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
    [run] = _runs(root)  # the same MLflow run, continued: no second run, none left RUNNING
    assert run.info.run_id == killed.info.run_id and run.info.status == "FINISHED"
    assert run.data.tags["peftflow.resumed_from"].startswith("step-")
    client = MlflowClient(f"sqlite:///{root / 'mlflow.db'}")
    steps = [m.step for m in client.get_metric_history(run.info.run_id, "train_loss")]
    assert min(steps) <= 25 and max(steps) == 600  # logged before the kill and after, in one run
    [version] = client.search_model_versions("name='peftflow-sentiment'")
    assert version.run_id == run.info.run_id
