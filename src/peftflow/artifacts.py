"""Saving and loading what a method trained.

A peft method saves only its adapter (weights + config, through peft's save_pretrained), a method
that trains the base's own weights saves the whole model, and hand-written methods override the
contract's ``save``/``load``. Every artifact carries ``peftflow.json`` (method name and params,
the SHA-256 of every file the method wrote, checked before loading, and a classifier's labels in
its head's order), so it describes itself.
Saves are atomic: the folder appears under its name only once every file is written.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, PreTrainedModel

from peftflow import checksums
from peftflow.atomic import atomic_dir
from peftflow.methods import Method, MethodParams, get_method, mergeable_names
from peftflow.methods._deep_prompts import prefix_through_kwargs
from peftflow.methods._fused_lora import fuse
from peftflow.methods._shared import is_classifier

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt")
MANIFEST = "peftflow.json"


def save(model, method: Method, out_dir: Path, params: MethodParams) -> Path:
    with atomic_dir(out_dir) as tmp:
        method.save(model, tmp)
        manifest = {"method": method.name, "params": params.model_dump(mode="json"), "sha256": checksums.digests(tmp)}
        classes = model_labels(model)
        if classes is not None:  # what a classifier's outputs mean, for every later load of it
            manifest["labels"] = classes
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2))
    return Path(out_dir)


def model_labels(model) -> list[str] | None:
    """A sequence classifier's labels, in its head's order (``config.id2label``); None for other models."""
    while hasattr(model, "module") and isinstance(model.module, torch.nn.Module):  # DDP / DeepSpeed wrappers
        model = model.module
    base = model.get_base_model() if isinstance(model, PeftModel) else model
    if not is_classifier(base):
        return None
    return [base.config.id2label[i] for i in range(base.config.num_labels)]


def labels(out_dir: Path) -> list[str] | None:
    """The labels a classifier artifact was trained on (None: not a classifier)."""
    path = Path(out_dir) / MANIFEST
    if not path.is_file():
        raise FileNotFoundError(f"{out_dir}: no trained artifact (a finished run writes model/ with {MANIFEST})")
    try:
        return json.loads(path.read_text()).get("labels")
    except ValueError as e:
        raise checksums.CorruptError(f"{path}: not a peftflow artifact manifest ({e})") from None


def read_manifest(out_dir: Path) -> tuple[Method, MethodParams]:
    method, params, _ = _manifest(Path(out_dir))
    return method, params


def _manifest(out_dir: Path) -> tuple[Method, MethodParams, dict[str, str]]:
    path = out_dir / MANIFEST
    if not path.is_file():
        raise FileNotFoundError(f"{out_dir}: no trained artifact (a finished run writes model/ with {MANIFEST})")
    try:
        info = json.loads(path.read_text())
        method = get_method(info["method"])
        return method, method.Params.model_validate(info["params"]), info.get("sha256", {})
    except (ValueError, KeyError, TypeError) as e:
        raise checksums.CorruptError(
            f"{path}: not a peftflow artifact manifest ({' '.join(str(e).split())[:200]})"
        ) from None


def trained_files(out_dir: Path) -> list[str]:
    """The files the method wrote (those its manifest has digests of), with the manifest itself."""
    return [*_manifest(Path(out_dir))[2], MANIFEST]


def verify(out_dir: Path) -> None:
    """Raise :class:`peftflow.checksums.CorruptError` naming the files that differ from when the
    artifact was saved (artifacts saved before digests were recorded pass)."""
    checksums.verify(Path(out_dir), _manifest(Path(out_dir))[2], "trained artifact")


def load(
    base: PreTrainedModel, out_dir: Path, adapter_name: str = "default", verified: bool = False
) -> PreTrainedModel:
    """The trained model: base + the saved artifact (a whole saved model replaces ``base``).
    ``verified``: the caller has just checked its files against their digests (:func:`verify`)."""
    out_dir = Path(out_dir)
    method, params, expected = _manifest(out_dir)
    if not verified:
        checksums.verify(out_dir, expected, "trained artifact")
    own = method.load(base, out_dir, params)
    if own is not None:
        return own
    if (out_dir / "adapter_config.json").is_file():
        if isinstance(base, PeftModel):  # another adapter on the same base, selectable by name
            base.load_adapter(out_dir, adapter_name=adapter_name)
            fuse(base)
            return base
        model = PeftModel.from_pretrained(base, out_dir, adapter_name=adapter_name)
        fuse(model)  # LoRA layers scored with the fused forward training used (methods._fused_lora)
        prefix_through_kwargs(model)  # a classifier's prefix passed as training passed it
        return model
    whole = AutoModelForSequenceClassification if is_classifier(base) else AutoModelForCausalLM
    return whole.from_pretrained(out_dir, dtype=base.dtype, local_files_only=True)


def check_mergeable(method: Method, where: str) -> None:
    """One line naming the mergeable methods, if ``method`` is not one (``where``: a prefix, e.g. "sft: ")."""
    if not method.mergeable:
        raise ValueError(
            f"{where}method {method.name} cannot be merged into the base weights; "
            f"mergeable: {', '.join(mergeable_names())}"
        )


def load_many(base: PreTrainedModel, adapters: dict[str, Path]) -> PeftModel:
    """Several peft adapters on one base model; pick one with ``model.set_adapter(name)``."""
    model = base
    for name, out_dir in adapters.items():
        if not (Path(out_dir) / "adapter_config.json").is_file():
            raise ValueError(f"{out_dir}: only peft adapters can share a base model ({name!r} is not one)")
        model = load(model, out_dir, adapter_name=name)
    return model


def size_bytes(out_dir: Path) -> int:
    """Bytes of weight files in the artifact (what a user stores or ships per trained model)."""
    return sum(p.stat().st_size for p in Path(out_dir).rglob("*") if p.suffix in WEIGHT_SUFFIXES)


def is_adapter(model) -> bool:
    return isinstance(model, PeftModel)


def merge_and_save(params, run_dir: Path, out_dir: Path) -> Path:
    """Fold a finished run's trained update into the base weights; save a plain checkpoint
    (with the base tokenizer) that loads without peft and runs with no added latency."""
    from peftflow.model import load_base_for, load_tokenizer

    method, _ = read_manifest(Path(run_dir) / "model")
    check_mergeable(method, "")
    base = load_base_for(params, labels(Path(run_dir) / "model"))
    merged = method.merge(load(base, Path(run_dir) / "model"))
    with atomic_dir(out_dir) as tmp:
        merged.save_pretrained(tmp)
        load_tokenizer(params.model).save_pretrained(tmp)
    return Path(out_dir)
