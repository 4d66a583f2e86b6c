"""Starting the worker processes of one run, and knowing whether this process is one of them.

peftflow launches its own workers with torch's elastic launcher API (what ``torchrun`` runs), on
this machine, rendezvous on 127.0.0.1: gloo on CPU, NCCL on CUDA (chosen by accelerate in each
worker). The workers run a module-level function of their arguments (spawned, so they import
everything afresh); rank 0's return value is the launch's. A worker's exception comes back as one
line naming the rank. Runs started by ``torchrun`` or ``accelerate launch`` instead are joined as
they are: their environment says they are workers.
"""

from __future__ import annotations

import logging
import os
import socket
import uuid
from collections.abc import Callable
from typing import Any

import torch
from torch.distributed.elastic.multiprocessing.errors import record

from peftflow.chatter import quiet_workers
from peftflow.distributed.params import DistributedParams

log = logging.getLogger(__name__)

WORKER_ENV = "PEFTFLOW_WORKER"  # set in the processes peftflow launched


class LaunchError(RuntimeError):
    """A worker failed; ``str(err)`` is one line: which rank, and its error."""


def launched_externally() -> bool:
    """Whether this process was started by torchrun / accelerate launch as one of several."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1 and WORKER_ENV not in os.environ


def in_worker() -> bool:
    """Whether this process is a worker of a launch (peftflow's, torchrun's or accelerate's)."""
    return WORKER_ENV in os.environ or launched_externally()


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def worker_env(dist: DistributedParams) -> dict[str, str]:
    """What each worker's environment adds: the marker, CPU threads split between the workers (so
    N workers on a CPU do not oversubscribe it), and what accelerate and DeepSpeed read."""
    env = {WORKER_ENV: "1"}
    if not torch.cuda.is_available():
        threads = max(1, (os.cpu_count() or 1) // dist.num_processes)
        env.update(OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", str(threads)))
    if dist.strategy == "deepspeed":
        env["ACCELERATE_USE_DEEPSPEED"] = "true"
        if not torch.cuda.is_available():
            env["DS_ACCELERATOR"] = "cpu"
    return env


@record  # a failing worker writes its error where the launcher reads it
def _entry(env: dict[str, str], fn: Callable[..., Any], args: tuple) -> Any:
    """What a worker runs: its environment first, then ``fn(*args)`` (a module-level function)."""
    os.environ.update(env)
    quiet_workers()
    if int(os.environ.get("RANK", "0")) > 0:  # progress bars (loading weights...) from the main process only
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
    if "OMP_NUM_THREADS" in env:
        torch.set_num_threads(int(env["OMP_NUM_THREADS"]))
    return fn(*args)


def _first_error(err: Exception) -> str:
    failures = getattr(err, "failures", {})
    for rank, failure in sorted(failures.items()):
        message = failure.message
        if isinstance(message, dict):  # the error file @record wrote: {"message": "...", "extraInfo": ...}
            message = message.get("message", message)
        text = str(message).strip().splitlines()
        first = text[-1] if text else f"exit code {failure.exitcode}"
        if failure.exitcode and failure.exitcode < 0:
            first = f"killed by signal {-failure.exitcode}"
        return f"worker rank {rank} failed: {first}"
    return f"the workers failed: {' '.join(str(err).split())[:300]}"


def launch(dist: DistributedParams, fn: Callable[..., Any], *args: Any) -> Any:
    """Run ``fn(*args)`` in ``dist.num_processes`` workers on this machine; rank 0's return value."""
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    port = dist.port or _free_port()
    config = LaunchConfig(
        min_nodes=1,
        max_nodes=1,
        nproc_per_node=dist.num_processes,
        run_id=f"peftflow-{uuid.uuid4().hex[:8]}",
        rdzv_backend="c10d",
        rdzv_endpoint=f"127.0.0.1:{port}",
        rdzv_configs={"timeout": 120},
        max_restarts=0,  # a failed worker fails the run; resume from its checkpoint instead
        monitor_interval=0.5,
        start_method="spawn",
        local_addr="127.0.0.1",
    )
    log.info("launching %d %s workers (rendezvous 127.0.0.1:%d)", dist.num_processes, dist.strategy, port)
    try:
        results = elastic_launch(config, _entry)(worker_env(dist), fn, args)
    except ChildFailedError as e:
        raise LaunchError(_first_error(e)) from None
    return results[0]
