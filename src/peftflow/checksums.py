"""Per-file SHA-256 digests of a folder: written with every checkpoint, trained artifact and prepared
data set, checked before any of them is read, so a truncated or altered file is named in one line
(and a checkpoint can fall back to the one before it) instead of failing deep inside torch or
safetensors, or worse, loading.

Hand-written: safetensors and torch check a file's structure, not its content, and DVC's hashes
cover only the files DVC tracks (checkpoints and the registry's cached copies are not among them).
"""

from __future__ import annotations

import hashlib
from pathlib import Path


class CorruptError(ValueError):
    """A file differs from the digest written with it; the message names the folder and the files."""


def digest(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def digests(folder: Path, skip: tuple[str, ...] = ()) -> dict[str, str]:
    """``{relative path: sha256}`` for every file under ``folder``, but the names in ``skip``."""
    folder = Path(folder)
    return {
        p.relative_to(folder).as_posix(): digest(p)
        for p in sorted(folder.rglob("*"))
        if p.is_file() and p.relative_to(folder).as_posix() not in skip
    }


def problems(folder: Path, expected: dict[str, str]) -> list[str]:
    """What differs from ``expected``: ``"NAME (missing)"`` or ``"NAME (changed)"``, in order."""
    out = []
    for name, want in expected.items():
        path = Path(folder) / name
        if not path.is_file():
            out.append(f"{name} (missing)")
        elif digest(path) != want:
            out.append(f"{name} (changed)")
    return out


def verify(folder: Path, expected: dict[str, str], what: str) -> None:
    """Raise :class:`CorruptError` naming ``what`` (e.g. "checkpoint") and its bad files, if any."""
    bad = problems(folder, expected)
    if bad:
        more = f" and {len(bad) - 3} more" if len(bad) > 3 else ""
        raise CorruptError(
            f"{folder}: {what} is corrupt: {', '.join(bad[:3])}{more} (sha256 differs from when it was written)"
        )
