"""MLflow's entry point for a peftflow model (``MLmodel``'s ``loader_module``): one function,
:func:`_load_pyfunc`, in a module of its own so that :mod:`peftflow.serving` and
:mod:`peftflow.adapters` need not import each other."""

from __future__ import annotations

from pathlib import Path

from peftflow.adapters import MANIFEST, Routed
from peftflow.chatter import quiet_libraries
from peftflow.serving import Predictor


def _load_pyfunc(data_path: str):
    """The model in ``data_path`` (the folder ``MLmodel`` is in): several adapters on one base when a
    manifest is there, else one trained artifact on its base."""
    quiet_libraries()
    folder = Path(data_path)
    return Routed(folder) if (folder / MANIFEST).is_file() else Predictor(folder)
