"""Many runs at once, each in a process of its own: compare on a real local Ray cluster, a run
killed with SIGKILL, the runner's params, a sweep with Optuna. Prefect's test harness, a SQLite
MLflow store and DVC with a local remote, in a temporary project on the tiny model."""

from __future__ import annotations

import os
import signal
import threading
import time

import pytest
from mlflow import MlflowClient

from peftflow.config import ParamsError
from peftflow.pipeline import Project
from tests.project import BIN, make_project

QUALITY = ("final_train_loss", "test_loss", "test_accuracy", "val_loss", "train_tokens", "steps")


@pytest.fixture(scope="module")
def harness():
    from prefect.testing.utilities import prefect_test_harness

    os.environ["PREFECT_SERVER_ANALYTICS_ENABLED"] = "false"
    with prefect_test_harness(server_startup_timeout=180):
        yield


@pytest.fixture(scope="module")
def project(tmp_path_factory, tiny_model_dir):
    saved = {k: os.environ.get(k) for k in ("PATH", "MLFLOW_TRACKING_URI")}
    os.environ["PATH"] = f"{BIN}{os.pathsep}{os.environ['PATH']}"
    os.environ.pop("MLFLOW_TRACKING_URI", None)
    yield make_project(tmp_path_factory.mktemp("cluster") / "proj", tiny_model_dir)
    for k, v in saved.items():
        os.environ.pop(k, None) if v is None else os.environ.__setitem__(k, v)


def _client(root) -> MlflowClient:
    return MlflowClient(f"sqlite:///{root / 'mlflow.db'}")


def _children(client: MlflowClient, parent: str) -> dict[str, object]:
    experiment = client.get_experiment_by_name("peftflow").experiment_id
    runs = client.search_runs([experiment], filter_string=f"tags.mlflow.parentRunId = '{parent}'")
    return {r.data.tags["peftflow.method"]: r for r in runs}


def test_compare_on_a_local_ray_cluster_runs_at_once_with_the_sequential_metrics(project, harness):
    from flows.pipeline import compare

    common = ["train.eval_every=4", "runner.cpus_per_run=1"]  # one torch thread per run on either runner
    sequential = compare(["lora", "ia3"], token_budget=1500, project=Project(root=project, overrides=common))
    ray = Project(root=project, overrides=[*common, "runner.kind=ray"])  # a local cluster, started for the flow
    on_ray = compare(["lora", "ia3"], token_budget=1500, project=ray)

    client = _client(project)
    one, other = _children(client, sequential["parent_run_id"]), _children(client, on_ray["parent_run_id"])
    assert sorted(one) == sorted(other) == ["ia3", "lora"]
    for method in one:
        a, b = one[method].data.metrics, other[method].data.metrics
        assert {k: a[k] for k in QUALITY} == {k: b[k] for k in QUALITY}, method
        assert other[method].info.status == "FINISHED"
    # on Ray both ran at once: each run started before the other ended
    lora, ia3 = other["lora"].info, other["ia3"].info
    assert lora.start_time < ia3.end_time and ia3.start_time < lora.end_time
    assert other["lora"].data.tags["peftflow.pid"] != other["ia3"].data.tags["peftflow.pid"]
    # one after another on the default runner
    lora, ia3 = sorted((one["lora"].info, one["ia3"].info), key=lambda i: i.start_time)
    assert lora.end_time <= ia3.start_time


def test_a_run_killed_with_sigkill_is_a_failed_row_and_the_others_finish(project, harness):
    from flows.pipeline import compare
    from peftflow.compare import ComparisonFailed

    client = _client(project)
    experiment = client.get_experiment_by_name("peftflow")
    killed: dict[str, str] = {}

    def kill_lora_once_it_trains() -> None:  # what the kernel's OOM killer does, mid-training
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline and not killed:
            for r in client.search_runs([experiment.experiment_id], filter_string="attributes.status = 'RUNNING'"):
                if r.data.tags.get("peftflow.method") == "lora" and "train_loss" in r.data.metrics:
                    os.kill(int(r.data.tags["peftflow.pid"]), signal.SIGKILL)
                    killed[r.info.run_id] = r.data.tags["peftflow.pid"]
                    return
            time.sleep(0.2)

    watcher = threading.Thread(target=kill_lora_once_it_trains, daemon=True)
    watcher.start()
    overrides = ["train.eval_every=0", "train.log_every=1"]
    with pytest.raises(ComparisonFailed, match=r"1 of 2 comparison runs failed: lora \(seed 42\): .*killed by SIGKILL"):
        compare(["lora", "ia3"], token_budget=6000, project=Project(root=project, overrides=overrides))
    watcher.join()
    (run_id,) = killed
    run = client.get_run(run_id)
    assert run.info.status == "FAILED" and "SIGKILL" in run.data.tags["peftflow.failure"]  # not RUNNING forever
    table = (project / "reports" / "compare" / "leaderboard.md").read_text()
    assert "| 1 | ia3 |" in table and "| - | lora | 0 | failed: the run's process was killed by SIGKILL" in table
    parent = client.get_run(run.data.tags["mlflow.parentRunId"])
    assert parent.info.status == "FAILED"
    assert _children(client, parent.info.run_id)["ia3"].info.status == "FINISHED"


def test_the_runner_params_refuse_threads_and_unreachable_stores(project):
    with pytest.raises(ParamsError, match=r"runner.kind: 'thread': runs cannot share a process"):
        Project(root=project, overrides=["runner.kind=thread"]).params(None)
    with pytest.raises(ParamsError, match=r"'runner.max_parallel=2': runner.max_parallel: 2 with kind process"):
        Project(root=project, overrides=["runner.max_parallel=2"]).params(None)
    from peftflow.cluster.jobs import check_runner

    remote = Project(root=project, overrides=["runner.kind=ray", "runner.address=ray://10.1.2.3:10001"])
    with pytest.raises(ParamsError, match=r"^tracking.uri: sqlite:///.*mlflow.db is on this machine; "):
        check_runner(remote)
    check_runner(Project(root=project, overrides=["runner.kind=ray"]))  # a local cluster reaches everything


def test_the_remote_cluster_check_stops_the_flow_before_any_run(project, harness):
    from typer.testing import CliRunner

    from flows.__main__ import app

    client = _client(project)
    experiment = client.get_experiment_by_name("peftflow")
    before = len(client.search_runs([experiment.experiment_id])) if experiment else 0
    args = ["compare", "-m", "lora", "--root", str(project), "-s", "runner.kind=ray", "-s", "runner.address=auto"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 2 and "tracking.uri: sqlite:///" in result.output, result.output
    experiment = client.get_experiment_by_name("peftflow")
    assert (len(client.search_runs([experiment.experiment_id])) if experiment else 0) == before


def test_a_sweep_writes_the_best_params_and_one_child_run_per_trial(project, harness):
    import yaml

    from flows.pipeline import sweep

    space = '{"train.lr": {"low": 1.0e-4, "high": 1.0e-2, "log": true}, "method.r": {"choices": [2, 8]}}'
    overrides = [f"sweep.space={space}", "sweep.startup_trials=2", "sweep.metric=val_loss", "train.max_steps=8",
                 "train.eval_every=2"]  # fmt: skip
    report = sweep("lora", n_trials=5, train_best=True, project=Project(root=project, overrides=overrides))

    client = _client(project)
    parent = client.get_run(report["parent_run_id"])
    assert parent.info.status == "FINISHED" and parent.data.tags["peftflow.sweep"] == "parent"
    experiment = parent.info.experiment_id
    children = client.search_runs([experiment], filter_string=f"tags.mlflow.parentRunId = '{parent.info.run_id}'")
    assert sorted(int(c.data.tags["peftflow.sweep.trial"]) for c in children) == [0, 1, 2, 3, 4]
    rows = {r["number"]: r for r in report["rows"]}
    for c in children:  # each trial trained its sampled params, scored on validation, not on test
        row = rows[int(c.data.tags["peftflow.sweep.trial"])]
        assert float(c.data.params["train.lr"]) == pytest.approx(row["params"]["train.lr"])
        assert c.data.params["method.r"] == str(row["params"]["method.r"])
        assert "test_accuracy" not in c.data.metrics and "val_accuracy" in c.data.metrics
        expected = {"complete": "FINISHED", "pruned": "KILLED"}[row["state"]]
        assert c.info.status == expected, (row, c.info.status)
    pruned = [c for c in children if c.info.status == "KILLED"]  # the slowest learner stopped at its first validation
    assert [rows[int(c.data.tags["peftflow.sweep.trial"])]["state"] for c in pruned] == ["pruned"]
    assert "pruned at step 2: val_loss" in pruned[0].data.tags["peftflow.sweep.pruned"]
    best = report["best"]
    assert best["value"] == min(r["value"] for r in report["rows"] if r["state"] == "complete")
    assert parent.data.metrics["best_val_loss"] == best["value"]
    written = yaml.safe_load((project / "reports" / "sweep" / "lora" / "best.yaml").read_text())
    assert written == {"train": {"lr": best["params"]["train.lr"]}, "method": {"r": best["params"]["method.r"]}}
    assert {a.path for a in client.list_artifacts(parent.info.run_id, "sweep")} >= {
        "sweep/best.yaml", "sweep/trials.csv", "sweep/sweep.md"}  # fmt: skip

    # --train-best: the best params trained through the experiment path, scored on test and registered
    trained = report["trained"]
    final = client.get_run(trained["run_id"])
    assert float(final.data.params["train.lr"]) == best["params"]["train.lr"]
    assert final.data.params["method.r"] == str(best["params"]["method.r"])
    assert "test_accuracy" in final.data.metrics and "mlflow.parentRunId" not in final.data.tags
    (version,) = client.search_model_versions(f"run_id = '{trained['run_id']}'")
    assert str(version.version) == trained["version"]


def test_a_sweep_refuses_a_key_that_is_not_a_param(project):
    from peftflow import pipeline, sweep

    data = pipeline.prepare_data(Project(root=project))
    bad = Project(root=project, overrides=['sweep.space={"train.lrr": {"low": 0.1, "high": 0.2}}'])
    with pytest.raises(ParamsError, match=r"sweep.space: train.lrr=0.1: .*train.lrr"):
        sweep.plan(bad, data)
    none = Project(root=project, overrides=["train.eval_every=0"])
    with pytest.raises(ParamsError, match=r"train.eval_every: 0: a sweep scores each trial at its periodic"):
        sweep.plan(none, data)


def test_a_run_on_a_machine_without_the_data_fetches_it_by_its_dvc_hash(project, tmp_path):
    from peftflow import data, pipeline
    from peftflow.cluster.jobs import Job, here
    from tests.project import commit, run

    version = pipeline.prepare_data(Project(root=project))  # prepared and pushed to the DVC remote
    commit(project, "prepared")
    clone = tmp_path / "worker"  # another machine: the project from git, no data, the same DVC remote
    run(["git", "clone", "-q", str(project), str(clone)], tmp_path)
    run([f"{BIN}/dvc", "remote", "modify", "local", "url", str(project / "dvcstore")], clone)
    assert not (clone / version.out_dir).exists()
    job = here(Job(project=Project(root=clone).frozen(), method="lora", data_version=version))
    assert data.read_manifest(clone / job.data_version.out_dir)["version"] == version.version
    assert not (clone / "data" / "prepared").exists()  # restored by hash alone, where the flow's steps read it


def test_a_run_ends_when_the_process_that_started_it_is_killed():
    import subprocess
    import sys

    from tests.test_serve import _descendants

    code = "import time; from peftflow.cluster import isolated; isolated.call(time.sleep, 600)"
    caller = subprocess.Popen([sys.executable, "-c", code])
    try:
        deadline = time.monotonic() + 240
        while len(_descendants(caller.pid)) < 3:  # the caller, its fork server, the run
            assert caller.poll() is None and time.monotonic() < deadline
            time.sleep(0.5)
        below = _descendants(caller.pid) - {caller.pid}
        caller.kill()  # no cleanup in the caller: kill -9
        caller.wait()
        deadline = time.monotonic() + 30
        while any(os.path.exists(f"/proc/{pid}") and "zombie" not in _state(pid) for pid in below):
            assert time.monotonic() < deadline, f"still running: {below}"
            time.sleep(0.2)
    finally:
        caller.kill()


def _state(pid: int) -> str:
    try:
        return open(f"/proc/{pid}/status").read().split("State:")[1].split("\n")[0].lower()
    except (OSError, IndexError):
        return "zombie"
