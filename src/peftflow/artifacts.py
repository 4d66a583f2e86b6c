"""Saving and loading what a method trained.

PEFT methods save only the adapter (weights + config, through peft's save_pretrained); ``full``
saves the whole model. A method module may override both with its own ``save`` / ``load``.
Saves are atomic: the folder appears under its name only once every file is written.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from peft import PeftModel
from transformers import AutoModelForCausalLM, PreTrainedModel

from peftflow.methods import Method

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt")


def save(model, method: Method, out_dir: Path) -> Path:
    out_dir = Path(out_dir)
    tmp = out_dir.with_name(out_dir.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    if method.save is not None:
        method.save(model, tmp)
    else:
        model.save_pretrained(tmp)  # a PeftModel writes the adapter only
    (tmp / "METHOD").write_text(method.name + "\n")
    shutil.rmtree(out_dir, ignore_errors=True)
    os.replace(tmp, out_dir)
    return out_dir


def load(base: PreTrainedModel, method: Method, out_dir: Path) -> PreTrainedModel:
    """The trained model: base + the saved artifact (for `full`, the saved model replaces base)."""
    out_dir = Path(out_dir)
    if not (out_dir / "METHOD").is_file():
        raise FileNotFoundError(f"{out_dir}: no trained artifact (a finished run writes model/ with a METHOD file)")
    saved = (out_dir / "METHOD").read_text().strip()
    if saved != method.name:
        raise ValueError(f"{out_dir}: artifact was trained with method {saved!r}, not {method.name!r}")
    if method.load is not None:
        return method.load(base, out_dir)
    if (out_dir / "adapter_config.json").is_file():
        return PeftModel.from_pretrained(base, out_dir)
    return AutoModelForCausalLM.from_pretrained(out_dir, dtype=base.dtype, local_files_only=True)


def size_bytes(out_dir: Path) -> int:
    """Bytes of weight files in the artifact (what a user stores or ships per trained model)."""
    return sum(p.stat().st_size for p in Path(out_dir).rglob("*") if p.suffix in WEIGHT_SUFFIXES)


def is_adapter(model) -> bool:
    return isinstance(model, PeftModel)
