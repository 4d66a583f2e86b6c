"""Checkpoints that resume exactly: trained tensors, optimizer, scheduler, RNG states, the method's
own training state and the recipe's ``state`` dict, written atomically (a ``.partial`` folder
renamed when complete), the oldest pruned. A checkpoint records the fingerprint of the params that
shape the trajectory (:func:`peftflow.config.fingerprint`) and is refused under other ones.

Given the run's ``accelerator``, saving and loading are collective (every process calls them): the
trained tensors and the optimizer state are gathered complete (FSDP shards, DDP replicas alike,
keyed by parameter name) and written once by the main process, with every process's RNG state, so
a checkpoint is whole whatever the strategy and resumes exactly under it.

Every file is listed with its SHA-256 in ``sha256.json``; :func:`latest` skips a checkpoint whose
files no longer match (named in one warning) for the one before it. Nothing is unpickled on load:
RNG states are stored as tensors and plain lists, and every file is read with ``weights_only=True``,
so a crafted checkpoint cannot run code."""

from __future__ import annotations

import json
import logging
import random
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch

from peftflow import checksums
from peftflow.atomic import atomic_dir
from peftflow.methods import Method
from peftflow.training.state_files import CheckpointError, read

log = logging.getLogger(__name__)

SHA256 = "sha256.json"


def _rng_state() -> dict[str, Any]:
    """Every generator's state as tensors, numbers and lists: loadable with ``weights_only=True``."""
    version, internal, gauss = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state = {
        "python": [version, list(internal), gauss],
        "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(cached)],
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _trainable_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().cpu().clone() for n, p in model.named_parameters() if p.requires_grad}


def save(
    ckpt_root: Path,
    step: int,
    model,
    optimizer,
    scheduler,
    state: dict,
    keep: int,
    method: Method | None = None,
    method_model=None,
    accelerator=None,
    params=None,
) -> Path:
    """Write checkpoint step-N atomically; prune all but the newest ``keep``. ``method_model``: the
    module the method's hooks act on, if not ``model`` (e.g. a reward model's backbone).
    ``accelerator``: the run's; every process must call (``model``, ``optimizer``: the prepared ones),
    and ``params`` say how its strategy checkpoints."""
    final = ckpt_root / f"step-{step:07d}"
    shards = final.with_name(f".{final.name}.shards")  # where every process writes its part, if it does
    if accelerator is None:
        payload, rngs, main = {"trainable": _trainable_state(model), "optimizer": optimizer.state_dict()}, None, True
    else:
        from accelerate.utils import gather_object

        from peftflow.distributed import strategy

        payload = strategy.training_state(model, optimizer, accelerator, params, shards)
        rngs = gather_object([_rng_state()]) if accelerator.num_processes > 1 else None
        main = accelerator.is_main_process
        method_model = method_model if method_model is not None else accelerator.unwrap_model(model)
    if main:
        with atomic_dir(final) as tmp:
            if payload is None:
                from peftflow.distributed.strategy import SHARDS

                shutil.move(shards, tmp / SHARDS)
            else:
                torch.save(payload["trainable"], tmp / "trainable.pt")
                torch.save(payload["optimizer"], tmp / "optimizer.pt")
            torch.save(scheduler.state_dict(), tmp / "scheduler.pt")
            torch.save(rngs or [_rng_state()], tmp / "rng.pt")  # one per process, by rank
            extra = method.state(method_model if method_model is not None else model) if method else None
            if extra is not None:
                torch.save(extra, tmp / "method_state.pt")
            (tmp / "state.json").write_text(json.dumps(state))
            (tmp / SHA256).write_text(json.dumps(checksums.digests(tmp), indent=1))
        for old in sorted(ckpt_root.glob("step-???????"))[:-keep]:
            shutil.rmtree(old)
    if accelerator is not None:
        accelerator.wait_for_everyone()  # no process goes on (or resumes) before the checkpoint is whole
    return final


def latest(ckpt_root: Path) -> Path | None:
    """The newest checkpoint whose files match their digests; a corrupt one is named in a warning
    and the one before it used. (Checkpoints from before digests were written are taken as they are.)"""
    done = sorted(p for p in ckpt_root.glob("step-???????") if (p / "state.json").is_file())
    for ckpt in reversed(done):
        try:
            if (ckpt / SHA256).is_file():
                checksums.verify(ckpt, json.loads((ckpt / SHA256).read_text()), "checkpoint")
            return ckpt
        except ValueError as e:  # CorruptError, or an unreadable sha256.json
            before = [p.name for p in done if p < ckpt]
            log.warning("%s; %s", e, f"resuming from {before[-1]} instead" if before else "no earlier checkpoint")
    return None


def load(
    ckpt: Path,
    model,
    optimizer,
    scheduler,
    method: Method | None = None,
    params: dict | None = None,
    method_model=None,
    accelerator=None,
) -> dict:
    """Restore a checkpoint into model, optimizer, scheduler and RNGs; refuse it, before touching
    anything, if it was made with other trajectory params than ``params`` (flattened).
    ``accelerator``: the run's; every process must call, with the prepared model and optimizer."""
    state = json.loads((ckpt / "state.json").read_text())
    saved = state.get("params", {})
    changed = sorted(k for k in saved.keys() | (params or {}).keys() if saved.get(k) != params.get(k)) if params else []
    if changed:
        raise CheckpointError(
            f"{ckpt}: this checkpoint was made with other params ({', '.join(changed[:5])} changed); "
            f"resume with the same params, or start over with --no-resume"
        )
    unwrapped = accelerator.unwrap_model(model) if accelerator is not None else model
    if (ckpt / "trainable.pt").is_file():
        weights = read(ckpt / "trainable.pt")
        trained = [n for n, p in unwrapped.named_parameters() if p.requires_grad]
        missing = [n for n in trained if n not in weights]
        if missing:
            raise CheckpointError(
                f"{ckpt}: checkpoint lacks trained tensors {missing[:3]}...; was it made by another method?"
            )
    if accelerator is None:
        if not (ckpt / "trainable.pt").is_file():
            raise CheckpointError(
                f"{ckpt}: a sharded checkpoint (written by several processes); resume it with its strategy"
            )
        named = dict(unwrapped.named_parameters())
        with torch.no_grad():
            for name, tensor in weights.items():
                named[name].copy_(tensor)
        optimizer.load_state_dict(read(ckpt / "optimizer.pt"))
    else:
        from peftflow.distributed import strategy

        strategy.load_training_state(model, optimizer, accelerator, ckpt)
    scheduler.load_state_dict(read(ckpt / "scheduler.pt"))
    rngs = read(ckpt / "rng.pt")
    rank = accelerator.process_index if accelerator is not None else 0
    _set_rng_state(rngs[rank] if isinstance(rngs, list) else rngs)
    method_model = method_model if method_model is not None else unwrapped
    if method is not None and (ckpt / "method_state.pt").is_file():
        method.load_state(
            method_model if method_model is not None else model,
            read(ckpt / "method_state.pt"),
        )
    return state
