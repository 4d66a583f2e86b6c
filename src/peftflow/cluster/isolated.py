"""One call in a child process of its own: a crash of the run (the kernel's out-of-memory killer, a
segfault in a kernel, ``kill -9``) ends that process only, and comes back as an :class:`Outcome`
that says what happened, not as a dead caller.

Written by hand on :mod:`multiprocessing`'s fork server, because what the libraries offer does not
contain a crash and start fast at once: a Prefect task or a Ray task runs in its worker
process (a run killed there takes the worker and its other tasks with it, and Ray retries it), and
a plain ``python -m`` subprocess per run imports torch, transformers, peft and MLflow again each
time (14 s on 2 cores). The fork server imports them once, before it has started any thread; each
call is a fork of it, with the caller's environment and working directory of the moment applied
first (the fork server's are those of when it started).
"""

from __future__ import annotations

import contextlib
import multiprocessing
import os
import signal
import threading
from collections.abc import Callable
from typing import Any

from pydantic import BaseModel

# imported once into the fork server: everything a training run needs
PRELOAD = ["peftflow.cluster.jobs"]


class Outcome(BaseModel):
    """What a call in a child process came to: its value, or why it has none."""

    value: Any = None
    error: str | None = None  # one line: the exception's message, or how the process died
    error_type: str | None = None  # the exception's class name; "Crashed" when the process died
    exitcode: int | None = None

    @property
    def ok(self) -> bool:
        return self.error is None


def _context():
    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload(PRELOAD)
    return ctx


def one_line(error: BaseException) -> str:
    """The error as one line, with any credentials in URLs masked: it becomes a tag, a row, a log."""
    from peftflow.secrets import mask

    return mask(" ".join(str(error).split())) or type(error).__name__


def crash_reason(exitcode: int | None) -> str:
    """How a child process that reported nothing ended, in words."""
    if exitcode is not None and exitcode < 0:
        name = signal.Signals(-exitcode).name if -exitcode in signal.valid_signals() else f"signal {-exitcode}"
        hint = " (what the kernel's out-of-memory killer sends: see `dmesg`)" if -exitcode == signal.SIGKILL else ""
        return f"the run's process was killed by {name}{hint}"
    return f"the run's process exited with code {exitcode} before it reported a result"


def _exit_with(caller_alive) -> None:
    """End this process when the caller is gone (killed, or stopped without cleaning up): a run
    nobody waits for would hold its device until it finished."""
    try:
        caller_alive.recv()
    except (EOFError, OSError):
        os._exit(70)


def _child(
    conn, alive, env: dict[str, str], cwd: str, threads: int | None, fn: Callable, args: tuple
) -> None:  # fmt: skip
    threading.Thread(target=_exit_with, args=(alive,), daemon=True, name="caller-watch").start()
    os.environ.clear()
    os.environ.update(env)
    os.chdir(cwd)
    from peftflow.chatter import quiet_libraries

    quiet_libraries()  # as in the caller: library chatter off, credentials masked in log records
    if threads:
        import torch

        torch.set_num_threads(threads)  # OMP_NUM_THREADS was read when the fork server imported torch
    try:
        message = ("ok", fn(*args))
    except BaseException as e:  # noqa: BLE001 - every failure is reported to the caller, in one line
        message = ("error", one_line(e), type(e).__name__)
    conn.send(message)
    conn.close()


def call(fn: Callable, *args: Any, threads: int | None = None, name: str = "peftflow-run") -> Outcome:
    """``fn(*args)`` in a fresh child process (``fn`` importable by reference, ``args`` picklable);
    ``threads``: torch's CPU threads there. Interrupting the caller terminates the child."""
    ctx = _context()
    receiver, sender = ctx.Pipe(duplex=False)
    alive_r, alive_w = ctx.Pipe(duplex=False)  # the caller holds the writer: its death is an EOF there
    child_args = (sender, alive_r, dict(os.environ), os.getcwd(), threads, fn, args)
    proc = ctx.Process(target=_child, args=child_args, name=name)
    proc.start()
    sender.close()  # the child holds the only writer: its death is an EOF here
    alive_r.close()
    try:
        try:
            message = receiver.recv()
        except EOFError:
            message = None
        proc.join()
    except BaseException:
        proc.terminate()
        proc.join(10)
        if proc.is_alive():
            proc.kill()
            proc.join()
        raise
    finally:
        for end in (receiver, alive_w):
            with contextlib.suppress(OSError):
                end.close()
    if message is None:
        return Outcome(error=crash_reason(proc.exitcode), error_type="Crashed", exitcode=proc.exitcode)
    if message[0] == "ok":
        return Outcome(value=message[1], exitcode=proc.exitcode)
    return Outcome(error=message[1], error_type=message[2], exitcode=proc.exitcode)
