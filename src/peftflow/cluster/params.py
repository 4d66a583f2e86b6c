"""The ``runner:`` params section: where the runs of a comparison, an experiment or a sweep execute.

Every such run is its own process (a crash or an out-of-memory kill ends that run only); the
runner decides how many run at once and on which machines:

- ``process`` (default): one run after another on this machine, each in a child process.
- ``ray``: Prefect's Ray task runner; a local Ray cluster started for the flow (``address: null``),
  or an existing one (``auto``: the cluster this machine belongs to; ``ray://HOST:10001``). Each run
  asks Ray for ``cpus_per_run`` CPUs and ``gpus_per_run`` GPUs, so runs never share a device.

Threads are refused: model loading, seeding, accelerate's state and the peak-memory counters are
process-wide, so two trainings in one process corrupt each other.
"""

from __future__ import annotations

import ipaddress
import os
import socket
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlparse

from pydantic import Field, ValidationInfo, field_validator

from peftflow.schema import Strict

KINDS = ("process", "ray")


class RunnerParams(Strict):
    kind: Literal["process", "ray"] = "process"
    # null starts a local Ray cluster for the flow; "auto" (the cluster this machine is in), or "ray://HOST:10001"
    address: str | None = None
    cpus_per_run: int | None = Field(None, ge=1)  # null: 1 on ray (and 1 torch thread), all cores on process
    gpus_per_run: float | None = Field(None, ge=0)  # null: distributed.num_processes if the cluster has GPUs, else 0
    max_parallel: int | None = Field(None, ge=1)  # runs at once; null: as many as the cluster's resources fit
    # a flow waits this long for another flow run preparing the same project's data (dvc repro, push)
    data_lock_timeout_s: float = Field(900.0, ge=0)

    @field_validator("kind", mode="before")
    @classmethod
    def _no_threads(cls, value: Any) -> Any:
        if value in ("thread", "threads", "threadpool"):
            raise ValueError(
                f"{value!r}: runs cannot share a process (model loading, seeding, accelerate's state and the "
                f"peak-memory counters are process-wide); use one of {', '.join(KINDS)}"
            )
        return value

    @field_validator("max_parallel")
    @classmethod
    def _parallel(cls, value: int | None, info: ValidationInfo) -> int | None:
        if info.data.get("kind") == "process" and (value or 1) > 1:
            raise ValueError(
                f"{value} with kind process: that runner runs one run at a time (each with the whole machine); "
                f"for runs at once use kind ray (a local cluster unless address is set)"
            )
        return value

    @field_validator("address")
    @classmethod
    def _address(cls, value: str | None) -> str | None:
        if value is not None and value != "auto" and not urlparse(value).hostname:
            raise ValueError(f"{value!r}: expected auto or ray://HOST:PORT")
        return value


def is_remote(runner: RunnerParams) -> bool:
    """Whether runs may execute on another machine: a cluster at an address that is not this one
    (``auto`` counts: the cluster this machine belongs to may have other nodes)."""
    if runner.kind == "process" or runner.address is None:
        return False
    if runner.address == "auto":
        return True
    host = urlparse(runner.address).hostname or ""
    return not _is_this_machine(host)


def _is_this_machine(host: str) -> bool:
    if host in ("localhost", socket.gethostname()):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def check_reachable(runner: RunnerParams, tracking_uri: str, root: Path, sweep_storage: str | None = None) -> None:
    """Refuse, before any run starts, a remote cluster whose workers could not reach this machine's
    stores: the MLflow store, the Prefect API, a sweep's Optuna storage. One line naming the setting."""
    if not is_remote(runner):
        return
    where = f"runner.address={runner.address}"
    if not tracking_uri.startswith(("http://", "https://", "databricks")):
        raise ValueError(
            f"tracking.uri: {tracking_uri} is on this machine; the workers of {where} cannot log to it: "
            f"set tracking.uri to an MLflow tracking server they reach (http://HOST:5000)"
        )
    api = os.environ.get("PREFECT_API_URL", "")
    if not api or _is_this_machine(urlparse(api).hostname or ""):
        raise ValueError(
            f"PREFECT_API_URL: {api or 'unset (a temporary server on this machine)'}; the workers of {where} "
            f"report their task runs to it: set PREFECT_API_URL to a Prefect server they reach (http://HOST:4200/api)"
        )
    if sweep_storage is not None and sweep_storage.startswith("sqlite"):
        raise ValueError(
            f"sweep.storage: {sweep_storage} is a file on this machine; trials on {where} report to it: "
            f"set sweep.storage to a database they reach (postgresql://USER:PASSWORD@HOST/optuna)"
        )
    from peftflow.versioning import default_remote

    remote = default_remote(root)
    if remote is None or "://" not in remote[1]:
        found = f"{remote[0]!r} is {remote[1]}, a folder on this machine" if remote else "none is set"
        raise ValueError(
            f"DVC remote: {found}; the workers of {where} fetch the data by its DVC hash from the default "
            f"remote: `dvc remote add -d NAME s3://BUCKET/PATH` (or another URL they reach)"
        )
