"""`peftflow serve` for real: a Prefect server and the MLflow UI on free loopback ports, the
deployments served, flow runs created through the REST API as the UI's Run buttons do, on the
tiny model in a temporary project. Headless Chromium drives the Prefect UI in test_browser.py."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from zoneinfo import ZoneInfo

import pytest
from mlflow import MlflowClient

from peftflow import tracking
from tests.conftest import make_rows
from tests.project import BIN, commit, make_project, set_keys

MODEL = "peftflow-sentiment"
TERMINAL = {"COMPLETED", "FAILED", "CRASHED", "CANCELLED"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Served:
    api: str
    mlflow_ui: str
    root: Path
    log: Path
    pid: int  # of `peftflow serve`

    def call(self, method: str, path: str, body: dict | None = None):
        """One REST call; a 503 (what the server answers for retryable errors, such as SQLite being
        busy) is retried with backoff, as Prefect's own client does."""
        data = json.dumps(body).encode() if body is not None else None
        for attempt in range(6):
            req = urllib.request.Request(
                f"{self.api}{path}", data=data, method=method, headers={"Content-Type": "application/json"}
            )
            try:
                with urllib.request.urlopen(req, timeout=30) as r:
                    return json.loads(r.read() or "null")
            except urllib.error.HTTPError as e:
                if e.code != 503 or attempt == 5:
                    raise
                time.sleep(2**attempt)

    def deployment(self, flow: str, name: str) -> dict:
        return self.call("GET", f"/deployments/name/{flow}/{name}")

    def run_deployment(self, flow: str, name: str, parameters: dict | None = None) -> str:
        """POST create_flow_run with the body the Prefect UI sends: its "Quick run" menu item
        (no parameters: the deployment's defaults) or its "Custom run" form."""
        deployment_id = self.deployment(flow, name)["id"]
        if parameters is None:
            body = {"state": {"type": "SCHEDULED", "message": "Run from the Prefect UI with defaults"}}
        else:
            body = {
                "state": {"type": "SCHEDULED", "message": "Run from the Prefect UI"},
                "parameters": parameters,
                "enforce_parameter_schema": True,
            }
        return self.call("POST", f"/deployments/{deployment_id}/create_flow_run", body)["id"]

    def wait(self, flow_run_id: str, timeout: float = 900) -> dict:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            run = self.call("GET", f"/flow_runs/{flow_run_id}")
            if run["state_type"] in TERMINAL:
                assert run["state_type"] == "COMPLETED", f"flow run {run['state_name']}:\n{self.logs(flow_run_id)}"
                return run
            time.sleep(1)
        raise AssertionError(f"flow run {flow_run_id} not finished in {timeout} s:\n{self.logs(flow_run_id)}")

    def logs(self, flow_run_id: str) -> str:
        rows = self.call("POST", "/logs/filter", {"logs": {"flow_run_id": {"any_": [flow_run_id]}}, "limit": 200})
        served = self.log.read_text()[-3000:]
        return "\n".join(r["message"] for r in rows)[-6000:] + f"\n--- serve log ---\n{served}"

    def artifacts(self, flow_run_id: str) -> dict[str, dict]:
        """The flow run's artifacts (its subflows' included) by type: markdown, table."""
        runs = self.call("POST", "/flow_runs/filter", {"flow_runs": {"parent_flow_run_id": {"any_": [flow_run_id]}}})
        ids = [flow_run_id, *[r["id"] for r in runs]]
        found = self.call("POST", "/artifacts/filter", {"artifacts": {"flow_run_id": {"any_": ids}}})
        return {a["type"]: a for a in found}


def _loopback_only(pids: set[int]) -> list[str]:
    """The listening TCP sockets of these processes that are not on 127.0.0.1 (empty: all loopback)."""
    inodes = set()
    for pid in pids:
        fd_dir = Path(f"/proc/{pid}/fd")
        for fd in fd_dir.iterdir() if fd_dir.exists() else []:
            try:
                target = os.readlink(fd)
            except OSError:
                continue
            if target.startswith("socket:["):
                inodes.add(target[8:-1])
    bad, listening = [], 0
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            cols = line.split()
            if cols[3] == "0A" and cols[9] in inodes:  # state LISTEN, owned by our processes
                listening += 1
                if cols[1].split(":")[0] not in ("0100007F", "00000000000000000000000001000000"):
                    bad.append(f"{table}: {cols[1]}")
    assert listening >= 2, "found neither server listening"
    return bad


def _descendants(pid: int) -> set[int]:
    out = subprocess.run(["ps", "-e", "-o", "pid=,ppid="], capture_output=True, text=True).stdout
    children: dict[int, list[int]] = {}
    for line in out.splitlines():
        p, pp = map(int, line.split())
        children.setdefault(pp, []).append(p)
    found, todo = {pid}, [pid]
    while todo:
        for c in children.get(todo.pop(), []):
            found.add(c)
            todo.append(c)
    return found


def _answers(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=2):
            return True
    except (urllib.error.URLError, OSError):
        return False


@pytest.fixture(scope="module")
def served(tmp_path_factory, tiny_model_dir):
    """`peftflow serve` of a tiny project, stopped (and checked stopped) at the end of the module."""
    tmp = tmp_path_factory.mktemp("serve")
    root = make_project(tmp / "proj", tiny_model_dir)
    set_keys(root / "params" / "base.yaml", {"nightly.cron": "30 2 * * *", "nightly.timezone": "Europe/Berlin"})
    commit(root, "nightly at 02:30 Berlin time")
    port, mlflow_port = free_port(), free_port()
    env = {
        **os.environ,
        # without this environment's bin: serve must find `peftflow` for the DVC stages itself
        "PATH": os.pathsep.join(d for d in os.environ["PATH"].split(os.pathsep) if Path(d) != Path(BIN)),
        "PREFECT_HOME": str(tmp / "prefect-home"),
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "HF_HUB_OFFLINE": "1",
    }
    for key in ("MLFLOW_TRACKING_URI", "PREFECT_API_URL", "PREFECT_UI_URL"):
        env.pop(key, None)
    log = tmp / "serve.log"
    cmd = [f"{BIN}/peftflow", "serve", "--root", str(root), "--port", str(port), "--mlflow-port", str(mlflow_port)]
    with log.open("w") as out:
        proc = subprocess.Popen(cmd, cwd=root, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    api, ui = f"http://127.0.0.1:{port}/api", f"http://127.0.0.1:{mlflow_port}"
    s = Served(api=api, mlflow_ui=ui, root=root, log=log, pid=proc.pid)
    try:
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            assert proc.poll() is None, f"peftflow serve exited ({proc.returncode}):\n{log.read_text()[-4000:]}"
            try:
                names = {d["name"] for d in s.call("POST", "/deployments/filter", {})}
                if {"experiment", "compare", "nightly-retrain", "rlhf", "predict"} <= names:
                    break
            except OSError:
                pass
            time.sleep(1)
        else:
            raise AssertionError(f"deployments not served in 300 s:\n{log.read_text()[-4000:]}")
        yield s
    finally:
        proc.send_signal(signal.SIGTERM)  # what Ctrl-C or `kill` does: serve stops its servers itself
        try:
            proc.wait(timeout=90)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            raise
    assert not _answers(f"{api}/health"), "the Prefect server outlived `peftflow serve`"
    assert not _answers(f"{ui}/health"), "the MLflow UI outlived `peftflow serve`"


def test_servers_listen_on_loopback_only(served):
    assert _answers(f"{served.api}/health") and _answers(f"{served.mlflow_ui}/health")
    assert _loopback_only(_descendants(served.pid)) == []


def test_ui_run_of_experiment_registers_a_version_with_lineage(served):
    parameters = {
        "methods": ["lora"],
        "project": {"root": str(served.root), "params_dir": "params", "overrides": ["train.max_steps=12"]},
        "data_version": None,
    }
    flow_run_id = served.run_deployment("experiment", "experiment", parameters)
    served.wait(flow_run_id)

    client = MlflowClient(f"sqlite:///{served.root / 'mlflow.db'}")
    runs = client.search_runs(
        [client.get_experiment_by_name("peftflow").experiment_id],
        filter_string=f"tags.`prefect.flow_run_id` = '{flow_run_id}'",
    )
    assert len(runs) == 1, "the MLflow run is tagged with the Prefect flow run that made it"
    run = runs[0]
    assert run.data.params["train.max_steps"] == "12"  # the form's overrides reached training
    assert run.data.tags["prefect.flow_run_url"].endswith(f"/runs/flow-run/{flow_run_id}")
    versions = client.search_model_versions(f"run_id = '{run.info.run_id}'")
    assert len(versions) == 1
    version = versions[0]
    assert set(tracking.LINEAGE_KEYS) <= set(version.tags)
    assert version.tags["peftflow.method"] == "lora" and version.tags["dvc.data_md5"].endswith(".dir")

    # the Prefect artifacts link back to the MLflow run
    artifacts = served.artifacts(flow_run_id)
    link = f"/#/experiments/{run.info.experiment_id}/runs/{run.info.run_id}?workflowType=machine_learning"
    assert link in artifacts["markdown"]["data"]
    assert served.mlflow_ui in artifacts["markdown"]["data"]
    rows = artifacts["table"]["data"]
    rows = json.loads(rows) if isinstance(rows, str) else rows
    assert rows[0]["method"] == "lora" and rows[0]["version"] == str(version.version)


def test_ui_run_of_predict_scores_a_file_with_the_champion_and_mlflow_opens_on_model_training(served):
    """After the experiment above promoted its version: the predict deployment with the UI's form.
    And MLflow's REST API says the experiment is model training, so its UI opens on runs, not Traces."""
    texts = ["a wonderful moving film", "dull boring plot"]
    (served.root / "data" / "score.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    project = {"root": str(served.root), "params_dir": "params", "overrides": []}
    parameters = {"input_path": "data/score.jsonl", "model_uri": None, "project": project}
    served.wait(served.run_deployment("predict", "predict", parameters))
    written = [json.loads(line) for line in (served.root / "data" / "score.predictions.jsonl").read_text().splitlines()]
    assert [w["text"] for w in written] == texts and {w["prediction"] for w in written} <= {"positive", "negative"}

    url = f"{served.mlflow_ui}/api/2.0/mlflow/experiments/get-by-name?experiment_name=peftflow"
    with urllib.request.urlopen(url, timeout=30) as r:
        tags = {t["key"]: t["value"] for t in json.loads(r.read())["experiment"].get("tags", [])}
    assert tags["mlflow.experimentKind"] == "custom_model_development"


def test_ui_form_rejects_an_unknown_method_before_a_run_starts(served):
    with pytest.raises(urllib.error.HTTPError) as err:
        served.run_deployment("experiment", "experiment", {"methods": ["lorra"]})
    body = err.value.read().decode()
    # the answer names the bad value and the choices
    assert err.value.code in (409, 422) and "lorra" in body and "lora" in body, body


def _nightly_outcome(served: Served, flow_run_id: str) -> str:
    return served.artifacts(flow_run_id)["markdown"]["data"]


def test_nightly_schedule_skip_and_retrain_after_a_data_change(served):
    deployment = served.deployment("nightly-retrain", "nightly-retrain")
    (schedule,) = deployment["schedules"]
    assert schedule["schedule"]["cron"] == "30 2 * * *"  # from the project's params
    assert schedule["schedule"]["timezone"] == "Europe/Berlin"
    assert schedule["active"] and not deployment["paused"]
    # the server's scheduler has created the upcoming nightly runs: 02:30 in Berlin, every day
    deadline, upcoming = time.monotonic() + 120, []
    while not upcoming and time.monotonic() < deadline:
        upcoming = served.call(
            "POST",
            "/flow_runs/filter",
            {"flow_runs": {"deployment_id": {"any_": [deployment["id"]]}, "state": {"type": {"any_": ["SCHEDULED"]}}}},
        )
        time.sleep(2)
    assert upcoming, "the scheduler created no nightly runs (see runs/serve/prefect-server.log)"
    berlin = [datetime.fromisoformat(r["expected_start_time"]).astimezone(ZoneInfo("Europe/Berlin")) for r in upcoming]
    assert {(t.hour, t.minute) for t in berlin} == {(2, 30)}
    assert len({t.date() for t in berlin}) == len(berlin) > 1  # one a day, several days ahead

    client = MlflowClient(f"sqlite:///{served.root / 'mlflow.db'}")

    def n_runs() -> int:
        return len(client.search_runs([client.get_experiment_by_name("peftflow").experiment_id]))

    first = served.run_deployment("nightly-retrain", "nightly-retrain")  # the UI's "Quick run"
    served.wait(first)
    assert "no earlier nightly run" in _nightly_outcome(served, first)
    trained = n_runs()

    second = served.run_deployment("nightly-retrain", "nightly-retrain")
    run = served.wait(second)
    summary = _nightly_outcome(served, second)
    assert "skipped: data" in summary and "are unchanged since nightly run" in summary, summary
    assert n_runs() == trained, "a skipped night trains nothing"
    print(f"skipped nightly run: {run['total_run_time']:.1f} s flow run time")  # bench/nightly_skip.py measures it

    raw = served.root / "data" / "raw" / "reviews.jsonl"
    raw.write_text(raw.read_text() + "".join(json.dumps(r) + "\n" for r in make_rows(40, seed=7)))
    third = served.run_deployment("nightly-retrain", "nightly-retrain")
    served.wait(third)
    summary = _nightly_outcome(served, third)
    assert "data changed since nightly run" in summary, summary
    assert n_runs() == trained + 1
    latest = client.search_runs(
        [client.get_experiment_by_name("peftflow").experiment_id], order_by=["attributes.start_time DESC"]
    )[0]
    assert latest.data.tags["prefect.flow_run_id"] == third
    assert client.search_model_versions(f"run_id = '{latest.info.run_id}'"), "the retrained run was registered"


CHROMIUM = Path("/usr/bin/chromium")


def test_browser_quick_run_from_the_prefect_ui(served, tmp_path):
    """Deployments -> experiment -> Run -> Quick run -> View run, then the run page shows Completed."""
    if not CHROMIUM.exists():
        message = f"{CHROMIUM} missing: `make browser` installs Debian's chromium"
        if os.environ.get("PEFTFLOW_REQUIRE_BROWSER") == "1":  # CI: a skipped UI test must not pass silently
            pytest.fail(message)
        pytest.skip(message)
    from playwright.sync_api import expect, sync_playwright

    ui = served.api.removesuffix("/api")
    flags = ["--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking"]
    flags += ["--disable-component-update", "--disable-sync"]  # no calls out of this machine
    with sync_playwright() as pw:
        browser = pw.chromium.launch_persistent_context(
            str(tmp_path / "profile"),  # a fresh --user-data-dir
            executable_path=str(CHROMIUM),
            headless=True,
            args=flags,
            viewport={"width": 1400, "height": 900},
        )
        try:
            page = browser.new_page()
            page.goto(f"{ui}/deployments")
            page.get_by_role("link", name="experiment", exact=True).first.click()
            expect(page.get_by_text("flows.pipeline.experiment")).to_be_visible()  # the deployment's page
            page.get_by_role("button", name="Run", exact=True).click()
            page.get_by_text("Quick run").first.click()
            page.locator("button:visible", has_text="View run").last.click()  # the toast on top
            page.wait_for_url("**/runs/flow-run/**")
            flow_run_id = page.url.rstrip("/").rsplit("/", 1)[-1]
            # the run's own state badge in the page heading (its subflows and tasks have badges too, and
            # finish first); the UI polls the server; a tiny-model experiment takes about a minute here
            badge = page.locator(".page-heading-flow-run__meta .state-badge")
            expect(badge).to_have_text("Completed", timeout=600_000)
            page.screenshot(path=str(tmp_path / "completed.png"))

            # the MLflow run's link, as peftflow gives it, opens the model-training view (runs, models),
            # not the GenAI one MLflow defaults to (its side bar: Overview, Traces, Sessions, Judges, ...)
            client = MlflowClient(f"sqlite:///{served.root / 'mlflow.db'}")
            (made,) = client.search_runs(
                [client.get_experiment_by_name("peftflow").experiment_id],
                filter_string=f"tags.`prefect.flow_run_id` = '{flow_run_id}'",
            )
            page.goto(tracking.ui_link(served.mlflow_ui, made.info.experiment_id, made.info.run_id))
            expect(page.get_by_text("Model registry").first).to_be_visible(timeout=60_000)
            expect(page.get_by_text("Judges")).to_have_count(0)
            page.screenshot(path=str(tmp_path / "mlflow-run.png"))
        finally:
            browser.close()
    run = served.wait(flow_run_id, timeout=30)  # what the page showed is what the server holds
    assert run["deployment_id"] == served.deployment("experiment", "experiment")["id"]
    # the deployment's defaults, as Quick run sends them (files: the flow snapshots the params itself)
    project = {"root": str(served.root), "params_dir": "params", "overrides": [], "files": None}
    assert run["parameters"] == {"project": project}
    client = MlflowClient(f"sqlite:///{served.root / 'mlflow.db'}")
    runs = client.search_runs(
        [client.get_experiment_by_name("peftflow").experiment_id],
        filter_string=f"tags.`prefect.flow_run_id` = '{flow_run_id}'",
    )
    assert [r.data.tags["peftflow.method"] for r in runs] == ["lora"]  # the flow's default method, trained
