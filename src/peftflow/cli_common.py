"""What every command line of peftflow shares: the consoles, logging set-up and one-line errors.

Its own module so that ``peftflow.cli``, ``peftflow.rlhf.cli`` and the flows' commands all import
it, and none of them has to import another's command module (which made import cycles).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import NoReturn, TypeVar

import typer
from rich.console import Console
from rich.logging import RichHandler
from rich.markup import escape

from peftflow.chatter import quiet_libraries

console = Console()
err_console = Console(stderr=True)

T = TypeVar("T")


def setup_logging(verbose: bool = False) -> None:
    """Log records as plain lines on stderr (debug with ``verbose``), library chatter silenced."""
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(message)s",
        handlers=[RichHandler(console=err_console, show_path=False, show_time=False)],
    )
    quiet_libraries()


def fail(message: str) -> NoReturn:
    """One red line on stderr (credentials in URLs masked), exit code 2."""
    from peftflow.secrets import mask

    one_line = " ".join(mask(message).split())  # a library's multi-line message too
    err_console.print(f"[bold red]error:[/] {escape(one_line)}", highlight=False, soft_wrap=True)
    raise typer.Exit(2)


def run_or_exit(fn: Callable[..., T], *args, **kwargs) -> T:
    """Call the core; turn a user-facing error into one red line and exit code 2."""
    # imported here, not at the top: `peftflow --help` should not wait for MLflow to import
    from peftflow.config import ParamsError
    from peftflow.data import DataError
    from peftflow.distributed.launch import LaunchError
    from peftflow.tracking import TrackingError
    from peftflow.versioning import VersioningError

    try:
        return fn(*args, **kwargs)
    except (
        ParamsError,
        DataError,
        LaunchError,
        TrackingError,
        VersioningError,
        FileNotFoundError,
        PermissionError,  # a read-only runs/ or data/: the path is in the message
        ValueError,
        KeyError,
    ) as e:
        fail(e.args[0] if isinstance(e, KeyError) and e.args else str(e))  # str(KeyError) adds quotes
