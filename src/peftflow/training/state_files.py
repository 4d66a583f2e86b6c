"""Reading a checkpoint's files: tensors and plain values only (``torch.load(weights_only=True)``),
so a crafted file cannot run code on resume, and an unreadable one is one line naming it."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch


class CheckpointError(ValueError):
    """A checkpoint that cannot be resumed; the message names it and what to do."""


def read(path: Path) -> Any:
    """A checkpoint file's tensors and plain values; never unpickles code."""
    try:
        return torch.load(path, weights_only=True)
    except Exception as e:
        first = " ".join(str(e).split())[:200]
        raise CheckpointError(
            f"{path}: unreadable ({first}); delete its checkpoint, or start over with --no-resume"
        ) from None
