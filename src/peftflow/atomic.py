"""Folders and files that appear whole or not at all (checkpoints, artifacts, prepared data, converted
models, evaluation outputs)."""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


@contextmanager
def atomic_dir(final: Path) -> Iterator[Path]:
    """Yield a scratch folder beside ``final``; on success it replaces ``final`` in one rename, on an
    error it is removed, so a reader never sees a half-written ``final``."""
    final = Path(final)
    tmp = final.with_name(final.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)


def write_text(path: Path, text: str) -> Path:
    """Write ``path`` through a scratch file beside it and one rename: a reader never sees half of it."""
    path = Path(path)
    tmp = path.with_name(path.name + ".partial")
    tmp.write_text(text)
    os.replace(tmp, path)
    return path
