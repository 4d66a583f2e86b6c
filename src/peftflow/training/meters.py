"""What a run measures about itself: parameter counts and peak memory."""

from __future__ import annotations

import contextlib
import ctypes
import gc
import logging
import resource
from pathlib import Path

import torch

log = logging.getLogger(__name__)


def count_parameters(model: torch.nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts; tied weights counted once. A quantized parameter (one
    that carries a quantization state, e.g. bitsandbytes' 4-bit weights) stores two values per byte
    of its storage dtype, and is counted as peft counts it: by the values, not the bytes."""
    seen, trainable, total = set(), 0, 0
    for p in model.parameters():
        if id(p) in seen:
            continue
        seen.add(id(p))
        n = p.numel()
        if getattr(p, "quant_state", None) is not None or hasattr(p, "quant_storage"):
            n *= 2 * getattr(getattr(p, "quant_storage", None), "itemsize", 1)
        total += n
        trainable += n if p.requires_grad else 0
    return trainable, total


def reset_peak_memory() -> None:
    """Start a new peak-memory window, so a run's figure is its own and not the process's
    (a flow trains several methods in one process). On Linux, writing 5 to clear_refs resets
    the process's peak resident set size (VmHWM) to the current one, after freed memory has been
    returned to the OS (gc, then glibc's malloc_trim); what the process still holds (the
    libraries, Python objects) stays in every run's figure."""
    gc.collect()  # what an earlier run in this process left must not count as this run's
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        return
    with contextlib.suppress(OSError, AttributeError):  # glibc: hand freed heap pages back to the OS
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:  # not Linux, or not allowed: the figure stays the process's lifetime peak
        log.debug("cannot reset the peak RSS; peak memory is the process's since it started")


def peak_memory_bytes() -> int:
    """Peak CUDA memory allocated, or on CPU the peak resident set size since the last reset."""
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated()
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024  # kB
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux, the lifetime peak
