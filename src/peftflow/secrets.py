"""Credentials in URLs (``http://user:secret@host``, ``postgresql://user:secret@host/db``) never
reach what peftflow writes: params files, MLflow params and artifacts, logs, Prefect flow
parameters and artifacts.

Where params are read (:func:`peftflow.config.load_params`, a flow's :class:`~peftflow.pipeline.Project`),
a password written in a URL is moved into an environment variable of this process and the URL
keeps a reference to it, ``http://user:${PEFTFLOW_SECRET_1f2e3d4c}@host``: that is what every
file, param and log line shows. Users may write such references themselves (``${MLFLOW_PW}``).
Only the code that connects (:func:`reveal`) puts the password back, and the MLflow client gets
it through MLflow's own ``MLFLOW_TRACKING_USERNAME``/``MLFLOW_TRACKING_PASSWORD``
(:func:`mlflow_uri`), so MLflow's "View run at" lines show a clean URL too. The run's child
processes inherit the environment; a worker on another machine needs the variable set there.

Hand-written: neither MLflow nor Prefect mask a URL's credentials in params or parameters.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re

# scheme://user:password@ (a password, or a reference to one); the user alone is not a secret
_USERINFO = re.compile(r"(?P<head>[A-Za-z][A-Za-z0-9+.-]*://[^\s/:@]*):(?P<password>[^\s/@]+)@")
_TOKEN = re.compile(r"(?P<head>[A-Za-z][A-Za-z0-9+.-]*://)(?P<token>[^\s/:@]+)@")  # https://TOKEN@host
_REFERENCE = re.compile(r"\$\{(?P<name>[A-Za-z_][A-Za-z0-9_]*)\}")
PREFIX = "PEFTFLOW_SECRET_"


class SecretError(ValueError):
    """A reference to a credential that this process's environment does not hold."""


def _variable(secret: str) -> str:
    return PREFIX + hashlib.sha256(secret.encode()).hexdigest()[:8]


def stash(text: str) -> str:
    """``text`` with each password in a URL moved into an environment variable, a ``${NAME}``
    reference in its place (references already there are kept)."""

    def moved(m: re.Match) -> str:
        password = m["password"]
        if _REFERENCE.fullmatch(password):
            return m[0]
        name = _variable(password)
        os.environ[name] = password
        return f"{m['head']}:${{{name}}}@"

    return _USERINFO.sub(moved, text)


def stash_all(value):
    """:func:`stash` over every string in a nested dict/list (a params tree)."""
    if isinstance(value, str):
        return stash(value)
    if isinstance(value, dict):
        return {k: stash_all(v) for k, v in value.items()}
    if isinstance(value, list):
        return [stash_all(v) for v in value]
    return value


def reveal(text: str, where: str) -> str:
    """The URL with its ``${NAME}`` references replaced from the environment (to connect with);
    ``where`` names the setting in the error if one is not set here."""

    def value(m: re.Match) -> str:
        if m["name"] not in os.environ:
            raise SecretError(
                f"{where}: the credential ${{{m['name']}}} is not in this process's environment (set it here, "
                f"as on the machine where the params were read)"
            )
        return os.environ[m["name"]]

    return _REFERENCE.sub(value, text)


def mask(text: str) -> str:
    """``text`` with passwords and bare tokens in URLs shown as ``***`` (for logs and errors)."""
    text = _USERINFO.sub(lambda m: f"{m['head']}:***@", text)
    return _TOKEN.sub(lambda m: m[0] if m["token"] == "***" else f"{m['head']}***@", text)


def mlflow_uri(uri: str, where: str) -> str:
    """An MLflow tracking URI without its password; ``user:password`` is handed to MLflow's client
    as ``MLFLOW_TRACKING_USERNAME``/``MLFLOW_TRACKING_PASSWORD`` (how MLflow takes credentials)."""
    m = re.match(r"(?P<scheme>https?://)(?P<user>[^\s/:@]*):(?P<password>[^\s/@]*)@(?P<rest>.*)", reveal(uri, where))
    if m is None:
        return uri
    os.environ.update(MLFLOW_TRACKING_USERNAME=m["user"], MLFLOW_TRACKING_PASSWORD=m["password"])
    return m["scheme"] + m["rest"]


def mask_logs() -> None:
    """Mask URL credentials in every log record this process creates, whichever logger and handler
    (Prefect's, which sends records to its API, too): defence in depth, since a library's message
    may quote a URL it was given."""
    make = logging.getLogRecordFactory()
    if getattr(make, "masks", False):
        return

    def masked(*args, **kwargs) -> logging.LogRecord:
        record = make(*args, **kwargs)
        try:
            message = record.getMessage()
        except Exception:  # a bad format string: logging reports it itself, later
            return record
        if "@" in message and mask(message) != message:
            record.msg, record.args = mask(message), None
        return record

    masked.masks = True
    logging.setLogRecordFactory(masked)
