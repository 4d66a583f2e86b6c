"""``peftflow serve``: a Prefect server and the MLflow UI on 127.0.0.1, and the deployments served.

Deployments are served by this long-running process (``prefect.serve``), not a work pool and a
worker: one command, nothing to create first, and flow runs start as subprocesses of this process,
in this environment, beside the models and data. Runs from the UI, the REST API or a schedule
queue up to ``--limit`` at a time (default 1: one machine, one training at a time). For a team,
run the server elsewhere (``prefect server start`` with a PostgreSQL database) and start
``peftflow serve --api-url http://HOST:4200/api`` on the machine that trains.

Stopping ``serve`` (Ctrl-C) pauses the deployments, so scheduled runs do not pile up as late;
the next ``serve`` resumes them.

``serve --work-pool NAME`` instead sends the deployments to a Prefect work pool (a process pool,
created if missing, its concurrency limit ``--limit``), and any number of ``prefect worker start
--pool NAME`` processes, on other machines too, run them. Each flow run starts with pull steps:
``git clone`` of the project's repository at the commit ``serve`` saw, then ``dvc pull`` of its
data from the DVC remote, in a fresh folder that becomes the run's project root. The workers log to
the MLflow tracking server, which ``serve`` hands them (``MLFLOW_TRACKING_URI``); with the local
store that is the MLflow server ``serve`` started, on 127.0.0.1 (workers on this machine only).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

from prefect.runner.storage import GitRepository

from peftflow import tracking
from peftflow.pipeline import Project

LOOPBACK = "127.0.0.1"


class ServeError(RuntimeError):
    """A server did not start; one line saying which and where its log is."""


def deployments(project: Project) -> list:
    """``experiment``, ``compare``, ``sweep``, ``nightly-retrain``, ``rlhf`` and ``predict``, each
    defaulting to ``project``."""
    from prefect.schedules import Cron
    from prefect.types.entrypoint import EntrypointType

    from flows.pipeline import compare, experiment, nightly_retrain, predict, sweep
    from flows.rlhf import rlhf

    nightly = project.params(None).nightly
    defaults = {"project": project.model_dump(mode="json")}
    # entrypoint by module (flows is installed): the same from any working directory
    common = {"parameters": defaults, "tags": ["peftflow"], "entrypoint_type": EntrypointType.MODULE_PATH}
    return [
        experiment.to_deployment(name="experiment", **common),
        compare.to_deployment(name="compare", **common),
        sweep.to_deployment(name="sweep", **common),
        nightly_retrain.to_deployment(
            name="nightly-retrain",
            **common,
            schedules=[Cron(nightly.cron, timezone=nightly.timezone)],
            description=f"{', '.join(nightly.methods)} at `{nightly.cron}` ({nightly.timezone}); skipped when "
            f"the DVC data version and params are unchanged since the last nightly run that finished",
        ),
        rlhf.to_deployment(name="rlhf", **common),
        predict.to_deployment(name="predict", **common),
    ]


class ProjectSource(GitRepository):
    """Where a worker gets a flow run's project: a clone of the repository at the commit (Prefect's
    git step), then ``dvc pull`` of the data (outputs missing from the remote are rebuilt by the
    flow's ``dvc repro``); the clone is the run's working directory."""

    def to_pull_step(self) -> list[dict]:
        clone = super().to_pull_step()
        clone["prefect.deployments.steps.git_clone"]["id"] = "clone"
        here = "{{ clone.directory }}"
        return [
            clone,
            {"prefect.deployments.steps.run_shell_script": {
                "directory": here, "script": "dvc pull --allow-missing", "stream_output": True}},
            {"prefect.deployments.steps.set_working_directory": {"directory": here}},
        ]  # fmt: skip


def _git(root: Path, *args: str) -> str | None:
    out = subprocess.run(["git", *args], cwd=root, capture_output=True, text=True)
    return out.stdout.strip() if out.returncode == 0 else None


def pool_source(project: Project, repo: str | None) -> tuple[str, str]:
    """(repository URL, commit) the workers clone; one-line errors for what they could not clone or pull."""
    from peftflow.versioning import default_remote, git_dirty

    root = project.root
    commit = _git(root, "rev-parse", "HEAD")
    if commit is None:
        raise ServeError(f"{root}: not a git repository with a commit; workers clone the project from git")
    if git_dirty(root):
        raise ServeError(
            f"{root}: uncommitted changes; workers clone commit {commit[:12]}: commit (and push) them first"
        )
    url = repo or _git(root, "remote", "get-url", "origin")
    if not url:
        raise ServeError(f"{root}: no git remote 'origin'; give --repo URL, a repository the workers can clone")
    remote = default_remote(root)
    if remote is None or ("://" not in remote[1] and not Path(remote[1]).is_absolute()):
        found = f"{remote[0]!r} is {remote[1]}, a path inside each clone" if remote else "none is set"
        raise ServeError(
            f"DVC remote: {found}; workers `dvc pull` the data from the default remote: "
            f"`dvc remote add -d NAME s3://BUCKET/PATH` (or an absolute path they share), then commit .dvc/config"
        )
    return url, commit


def worker_tracking_uri(project: Project, ui: str | None) -> str:
    """The MLflow store a worker logs to: the configured one, or the server ``serve`` started;
    without credentials (they would be stored in the pool's job variables): a worker's machine
    holds its own MLFLOW_TRACKING_USERNAME/MLFLOW_TRACKING_PASSWORD."""
    params = project.params(None)
    if params.tracking.uri or os.environ.get("MLFLOW_TRACKING_URI"):
        return tracking.tracking_uri(params, project.root)
    if ui is None:
        raise ServeError(
            "tracking.uri: null (the project's own mlflow.db): a worker runs in a fresh clone and would log to a "
            "store of its own; set tracking.uri to an MLflow tracking server, or let serve start one (--mlflow-port)"
        )
    return ui


def to_work_pool(project: Project, pool: str, limit: int, repo: str | None, ui: str | None) -> list[str]:
    """The deployments in work pool ``pool`` (a process pool, created if missing; its concurrency
    limit ``limit``), with the pull steps; their names."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import WorkPoolCreate, WorkPoolUpdate
    from prefect.exceptions import ObjectNotFound
    from prefect.workers.process import ProcessWorker

    url, commit = pool_source(project, repo)
    env = {"MLFLOW_TRACKING_URI": worker_tracking_uri(project, ui)}
    if ui:
        env["PEFTFLOW_MLFLOW_UI_URL"] = ui
    with get_client(sync_client=True) as client:
        try:
            client.read_work_pool(pool)
            client.update_work_pool(pool, WorkPoolUpdate(concurrency_limit=limit))
        except ObjectNotFound:
            template = ProcessWorker.get_default_base_job_template()
            client.create_work_pool(WorkPoolCreate(name=pool, type="process", base_job_template=template,
                                                   concurrency_limit=limit))  # fmt: skip
    # in the clone, the project is the working directory: no path of this machine in the deployment
    here = project.model_copy(update={"root": Path(".")})
    names = []
    for deployment in deployments(here):
        deployment.storage = ProjectSource(url=url, commit_sha=commit)
        deployment.job_variables = {"env": env}
        deployment.apply(work_pool_name=pool)
        names.append(f"{deployment.flow_name}/{deployment.name}")
    return names


def _port_free(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex((LOOPBACK, port)) != 0


def _wait_healthy(url: str, proc: subprocess.Popen, log: Path, what: str, timeout: float = 180) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            tail = " | ".join(log.read_text().strip().splitlines()[-3:])
            raise ServeError(f"{what} exited with code {proc.returncode} (log {log}): {tail[-400:]}")
        try:
            with urllib.request.urlopen(url, timeout=2):
                return
        except OSError:
            time.sleep(0.5)
    raise ServeError(f"{what} did not answer {url} within {timeout:.0f} s (log {log})")


@contextlib.contextmanager
def _process(cmd: list[str], env: dict[str, str], log: Path, health: str, what: str) -> Iterator[subprocess.Popen]:
    """A server in its own process group, healthy on entry, stopped (the whole group) on exit."""
    log.parent.mkdir(parents=True, exist_ok=True)
    with log.open("w") as out:
        proc = subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        _wait_healthy(health, proc, log, what)
        yield proc
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def _exe(name: str) -> str:
    """A console script of this environment (beside this Python), else from PATH."""
    here = Path(sys.executable).with_name(name)
    return str(here) if here.exists() else (shutil.which(name) or name)


@contextlib.contextmanager
def prefect_server(port: int, database_url: str | None, logs: Path) -> Iterator[str]:
    """``prefect server start`` on 127.0.0.1:port (SQLite in PREFECT_HOME unless ``database_url``); the API URL."""
    if not _port_free(port):
        raise ServeError(
            f"port {port} is taken: a Prefect server already running there? serve against it with "
            f"--api-url http://{LOOPBACK}:{port}/api, or pick another --port"
        )
    api = f"http://{LOOPBACK}:{port}/api"
    env = {
        **os.environ,
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "PREFECT_SERVER_API_HOST": LOOPBACK,
        "PREFECT_SERVER_API_PORT": str(port),
        "PREFECT_UI_API_URL": api,  # else the UI's pages call port 4200 whatever --port says
    }
    if database_url:  # e.g. postgresql+asyncpg://user:pass@db:5432/prefect
        env["PREFECT_SERVER_DATABASE_CONNECTION_URL"] = database_url
    cmd = [_exe("prefect"), "server", "start", "--host", LOOPBACK, "--port", str(port)]
    with _process(cmd, env, logs / "prefect-server.log", f"{api}/health", "the Prefect server"):
        yield api


@contextlib.contextmanager
def mlflow_ui(project: Project, port: int, logs: Path) -> Iterator[str | None]:
    """``mlflow ui`` on 127.0.0.1:port for a local store (a remote store has its own UI); its URL."""
    uri = tracking.tracking_uri(project.params(None), project.root)
    if port == 0 or uri.startswith(("http://", "https://")):
        yield None
        return
    _, experiment_id = tracking.connect(project.params(None), project.root)  # creates the store and experiment
    if not _port_free(port):
        raise ServeError(f"port {port} is taken; pick another --mlflow-port (0: no MLflow UI)")
    url = f"http://{LOOPBACK}:{port}"
    cmd = [_exe("mlflow"), "server", "--backend-store-uri", uri, "--host", LOOPBACK, "--port", str(port)]
    cmd += ["--workers", "1"]
    env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}  # GenAI job workers: not used here
    with _process(cmd, env, logs / "mlflow-ui.log", f"{url}/health", "the MLflow UI"):
        print(f"MLflow experiment: {tracking.ui_link(url, experiment_id)}", flush=True)
        yield url


def _stop_with_parent(parent: int) -> None:
    """In a child before it runs: the kernel sends it SIGTERM when its parent dies (Linux)."""
    import ctypes

    ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    if os.getppid() != parent:  # the parent died before the call above
        os._exit(1)


@contextlib.contextmanager
def temporary_server() -> Iterator[None]:
    """The temporary Prefect server a flow run needs when no Prefect API is configured: Prefect's
    own (started on first use) outlives a parent killed with -9, so this one, started the same way,
    is tied to this process by the kernel (Linux; elsewhere Prefect's own is used)."""
    import tempfile

    import prefect
    from filelock import FileLock
    from prefect.settings import PREFECT_API_URL, get_current_settings, temporary_settings

    if get_current_settings().api.url or not sys.platform.startswith("linux"):
        yield
        return
    with socket.socket() as sock:
        sock.bind((LOOPBACK, 0))
        port = sock.getsockname()[1]
    api = f"http://{LOOPBACK}:{port}/api"
    cmd = [sys.executable, "-m", "uvicorn", "--app-dir", str(Path(prefect.__file__).parents[1]),
           "--factory", "prefect.server.api.server:create_app", "--host", LOOPBACK, "--port", str(port),
           "--log-level", "error", "--lifespan", "on"]  # fmt: skip
    env = {**os.environ, **get_current_settings().to_environment_variables(exclude_unset=True),
           "PREFECT_UI_ENABLED": "0", "PREFECT__SERVER_EPHEMERAL": "1", "PREFECT__SERVER_FINAL": "1"}  # fmt: skip
    log = Path(tempfile.mkstemp(prefix="peftflow-prefect-server-", suffix=".log")[1])
    home = Path(get_current_settings().home)
    home.mkdir(parents=True, exist_ok=True)
    print(f"Starting a temporary Prefect server on {api} (it stops with this process)", file=sys.stderr)
    parent, proc = os.getpid(), None
    try:
        # one server at a time starts: each migrates the database they share (PREFECT_HOME's), and two
        # flows started at once had one server fail ("Online migration expected to match one row")
        with FileLock(home / ".peftflow-server-start.lock"):
            with log.open("w") as out:
                proc = subprocess.Popen(
                    cmd, env=env, stdout=out, stderr=subprocess.STDOUT, preexec_fn=lambda: _stop_with_parent(parent)
                )
            _wait_healthy(f"{api}/health", proc, log, "the temporary Prefect server")
        os.environ["PREFECT_API_URL"] = api  # for the run's processes (Ray workers, isolated runs)
        with temporary_settings(updates={PREFECT_API_URL: api}):
            yield
    finally:
        os.environ.pop("PREFECT_API_URL", None)
        if proc is not None:
            _drain_to(proc)
            proc.terminate()
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        log.unlink(missing_ok=True)


def _drain_to(server: subprocess.Popen) -> None:
    """Send the logs and events still queued while the server is up: left for interpreter exit,
    Prefect's workers retry against a stopped server for over a minute before giving up."""
    if server.poll() is not None:
        return
    from prefect.events.worker import EventsWorker
    from prefect.logging.handlers import APILogWorker

    for worker in (APILogWorker, EventsWorker):
        worker.drain_all(timeout=15)


def _interrupt(signum, frame) -> None:
    raise KeyboardInterrupt


def serve(
    project: Project,
    port: int = 4200,
    api_url: str | None = None,
    database_url: str | None = None,
    mlflow_port: int = 5000,
    limit: int = 1,
    work_pool: str | None = None,
    repo: str | None = None,
) -> None:
    """Start what is missing (Prefect server unless ``api_url``, MLflow UI), then serve until stopped;
    with ``work_pool``, send the deployments to that pool for its workers instead."""
    from prefect import serve as prefect_serve
    from prefect.settings import PREFECT_API_URL, PREFECT_UI_URL, temporary_settings

    signal.signal(signal.SIGTERM, _interrupt)  # `kill` stops it as Ctrl-C does: servers stopped too
    project = project.model_copy(update={"root": project.root.resolve()})
    project.params(None)  # bad params: the one-line error before anything starts
    logs = project.root / project.params(None).train.output_dir / "serve"
    with contextlib.ExitStack() as stack:
        if api_url is None:
            api_url = stack.enter_context(prefect_server(port, database_url, logs))
        ui = stack.enter_context(mlflow_ui(project, mlflow_port, logs))
        ui_url = api_url.removesuffix("/api")
        print(f"Prefect UI: {ui_url}  (API {api_url})", flush=True)
        print(f"MLflow UI:  {ui or 'not started (remote store, or --mlflow-port 0)'}", flush=True)
        print(f"server logs: {logs}", flush=True)
        settings = {PREFECT_API_URL: api_url, PREFECT_UI_URL: ui_url}
        with temporary_settings(updates=settings):
            os.environ["PREFECT_API_URL"] = api_url  # the flow-run subprocesses read it from the environment
            # dvc stages call `peftflow`: this environment's, even when serve was started without activating it
            os.environ["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"
            os.environ["PREFECT_UI_URL"] = ui_url
            if ui:
                os.environ["PEFTFLOW_MLFLOW_UI_URL"] = ui  # links in the runs' artifacts
            if work_pool:
                names = to_work_pool(project, work_pool, limit, repo, ui)
                print(f"deployments {', '.join(names)} in work pool {work_pool!r} (at most {limit} runs at once)")
                print(f"run them with: PREFECT_API_URL={api_url} prefect worker start --pool {work_pool}", flush=True)
                if stack._exit_callbacks:  # servers of ours: keep them up for the workers until stopped
                    with contextlib.suppress(KeyboardInterrupt):
                        while True:
                            time.sleep(3600)
                return
            prefect_serve(*deployments(project), limit=limit)
