"""The one training core every method uses: a plain loop over accelerate.

Loss is causal-LM cross-entropy on the completion tokens only. The loop does gradient
accumulation, warmup + decay, gradient clipping, bf16 autocast on CUDA (fp32 on CPU), periodic
validation, and checkpoints that resume exactly: trained weights, optimizer, scheduler and RNG
states are saved, and the data order is a pure function of (seed, step), so a resumed run sees the
same batches and reproduces the uninterrupted loss trajectory. ``accelerate launch`` runs the same
loop on several GPUs: each process takes its own slice of every global batch.

Why a hand-written loop rather than transformers' Trainer: it is ~200 lines, its per-step cost is
measured against a plain loop in ``bench/step_bench.py``, and exact resume of a data position
is simpler to guarantee when the loop owns the sampler.
"""

from __future__ import annotations

import contextlib
import ctypes
import gc
import json
import logging
import math
import random
import resource
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from accelerate import Accelerator
from tqdm.auto import tqdm
from transformers import get_scheduler, set_seed

from peftflow import artifacts, data
from peftflow.atomic import atomic_dir
from peftflow.config import Params, flatten, save_params
from peftflow.evaluate import heldout_loss
from peftflow.methods import get_method
from peftflow.model import load_base_for, load_tokenizer
from peftflow.tokens import collate, completion_loss, encode

log = logging.getLogger(__name__)

Callback = Callable[[dict[str, float], int], None]  # (metrics, step), e.g. to log to MLflow


def mixed_precision(setting: str) -> str:
    if setting != "auto":
        return setting
    return "bf16" if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else "no"


def count_parameters(model: torch.nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts; tied weights counted once."""
    seen, trainable, total = set(), 0, 0
    for p in model.parameters():
        if id(p) in seen:
            continue
        seen.add(id(p))
        n = p.numel()
        if type(p).__name__ == "Params4bit":  # two 4-bit weights per stored byte (as peft counts them)
            n *= 2 * getattr(getattr(p, "quant_storage", None), "itemsize", 1)
        total += n
        trainable += n if p.requires_grad else 0
    return trainable, total


class Sampler:
    """Micro-batch k of the run is a pure function of (seed, k): resume needs only the step.

    Each epoch is a seeded shuffle; within windows of 32 batches, examples are grouped by length
    (and the batches shuffled again), so batches carry little padding but stay random.
    """

    WINDOW = 32  # batches per length-grouping window

    def __init__(self, lengths: list[int], batch_size: int, seed: int, rank: int = 0, world: int = 1):
        self.lengths, self.bs, self.seed, self.rank, self.world = lengths, batch_size, seed, rank, world
        self.per_epoch = len(lengths) // (batch_size * world)  # global batches per epoch; the rest is dropped
        if self.per_epoch == 0:
            raise ValueError(
                f"train.batch_size: {batch_size} x {world} process(es) exceeds the {len(lengths)} training examples"
            )
        self._epoch, self._batches = -1, []

    def _plan(self, epoch: int) -> list[list[int]]:
        g = torch.Generator().manual_seed(self.seed * 100_003 + epoch)
        perm = torch.randperm(len(self.lengths), generator=g).tolist()
        size = self.bs * self.world
        perm = perm[: self.per_epoch * size]
        batches = []
        for w in range(0, len(perm), size * self.WINDOW):
            window = sorted(perm[w : w + size * self.WINDOW], key=self.lengths.__getitem__)
            chunk = [window[i : i + size] for i in range(0, len(window), size)]
            order = torch.randperm(len(chunk), generator=g).tolist()
            batches += [chunk[i] for i in order]
        return batches

    def step_indices(self, step: int, grad_accum: int) -> list[list[int]]:
        """The micro-batches of optimizer step ``step`` (1-based), ``grad_accum`` of them."""
        return [self.indices((step - 1) * grad_accum + k) for k in range(grad_accum)]

    def indices(self, micro: int) -> list[int]:
        epoch, pos = divmod(micro, self.per_epoch)
        if epoch != self._epoch:
            self._epoch, self._batches = epoch, self._plan(epoch)
        return self._batches[pos][self.rank :: self.world]


def _rng_state() -> dict[str, Any]:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _trainable_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().cpu().clone() for n, p in model.named_parameters() if p.requires_grad}


def save_checkpoint(
    ckpt_root: Path, step: int, model, optimizer, scheduler, state: dict, keep: int, method=None
) -> Path:
    """Write checkpoint step-N atomically (a .partial folder renamed when complete); prune old ones."""
    final = ckpt_root / f"step-{step:07d}"
    with atomic_dir(final) as tmp:
        torch.save(_trainable_state(model), tmp / "trainable.pt")
        torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
        torch.save(scheduler.state_dict(), tmp / "scheduler.pt")
        torch.save(_rng_state(), tmp / "rng.pt")
        if method is not None and method.hook("state") is not None:
            torch.save(method.hook("state")(model), tmp / "method_state.pt")
        (tmp / "state.json").write_text(json.dumps(state))
    for old in sorted(ckpt_root.glob("step-???????"))[:-keep]:
        shutil.rmtree(old)
    return final


def latest_checkpoint(ckpt_root: Path) -> Path | None:
    done = sorted(p for p in ckpt_root.glob("step-???????") if (p / "state.json").is_file())
    return done[-1] if done else None


def load_checkpoint(ckpt: Path, model, optimizer, scheduler, method=None, params: dict | None = None) -> dict:
    """Restore a checkpoint into model, optimizer, scheduler and RNGs; refuse it, before touching
    anything, if it was made with other trajectory params than ``params`` (see trajectory_params)."""
    state = json.loads((ckpt / "state.json").read_text())
    changed = _changed_keys(state.get("params", {}), params) if params is not None else []
    if changed:
        raise ValueError(
            f"{ckpt}: this checkpoint was made with other params ({', '.join(changed[:5])} changed); "
            f"resume with the same params, or start over with --no-resume"
        )
    weights = torch.load(ckpt / "trainable.pt", weights_only=True)
    params = dict(model.named_parameters())
    missing = [n for n, p in params.items() if p.requires_grad and n not in weights]
    if missing:
        raise ValueError(f"{ckpt}: checkpoint lacks trained tensors {missing[:3]}...; was it made by another method?")
    with torch.no_grad():
        for name, tensor in weights.items():
            params[name].copy_(tensor)
    optimizer.load_state_dict(torch.load(ckpt / "optimizer.pt", weights_only=True))
    scheduler.load_state_dict(torch.load(ckpt / "scheduler.pt", weights_only=True))
    _set_rng_state(torch.load(ckpt / "rng.pt", weights_only=False))
    if method is not None and method.hook("load_state") is not None:
        method.hook("load_state")(model, torch.load(ckpt / "method_state.pt", weights_only=False))
    return state


# settings that change what is computed, not only when it is logged, evaluated or saved
_NOT_TRAJECTORY = {
    "eval",
    "compare",
    "tracking",
    "promote",
    "train.eval_every",
    "train.eval_examples",
    "train.save_every",
    "train.keep_checkpoints",
    "train.log_every",
    "train.output_dir",
    "train.run_name",
}


def trajectory_params(params: Params) -> dict[str, Any]:
    """The flattened params that determine the training trajectory (what resume must match)."""
    flat = flatten(params.to_dict())
    return {k: v for k, v in flat.items() if k not in _NOT_TRAJECTORY and k.split(".")[0] not in _NOT_TRAJECTORY}


def _changed_keys(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    return sorted(k for k in old.keys() | new.keys() if old.get(k) != new.get(k))


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


def optimizer_step(
    model, micro_batches: list[dict], optimizer, scheduler, accelerator, max_grad_norm, method=None, step: int = 0
) -> tuple[float, int]:
    """One optimizer step over gradient-accumulated micro-batches: (mean loss, tokens seen).

    method: its optional hooks run here (``extra_loss`` added to the loss, ``after_step``).
    """
    extra_loss = method.hook("extra_loss") if method else None
    after_step = method.hook("after_step") if method else None
    total_loss, tokens = 0.0, 0
    for batch in micro_batches:
        batch = {key: t.to(accelerator.device) for key, t in batch.items()}
        with accelerator.autocast():
            loss, _ = completion_loss(model, batch)
            objective = loss + extra_loss(accelerator.unwrap_model(model)) if extra_loss else loss
        accelerator.backward(objective / len(micro_batches))
        total_loss += loss.item() / len(micro_batches)
        tokens += int(batch["attention_mask"].sum())
    if max_grad_norm:
        accelerator.clip_grad_norm_(model.parameters(), max_grad_norm)
    optimizer.step()
    if after_step:
        after_step(accelerator.unwrap_model(model), step)
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    return total_loss, tokens


def build_model(params: Params) -> torch.nn.Module:
    """The base model with params.method applied: only what the method trains requires grad."""
    method = get_method(params.method.name)
    model = method.apply(load_base_for(params), params.method)
    trainable, total = count_parameters(model)
    if trainable == 0:
        raise ValueError(f"method {method.name}: no parameter is trainable; check its params")
    log.info(
        "%s: %s of %s parameters trainable (%.3f%%)",
        method.name,
        f"{trainable:,}",
        f"{total:,}",
        100 * trainable / total,
    )
    return model


def make_optimizer(model: torch.nn.Module, params: Params) -> torch.optim.Optimizer:
    trainable = [p for p in model.parameters() if p.requires_grad]
    custom = get_method(params.method.name).hook("optimizer")
    if custom is not None:
        return custom(trainable, params.train.lr, params.train.weight_decay, params.method)
    return torch.optim.AdamW(trainable, lr=params.train.lr, weight_decay=params.train.weight_decay)


def train(
    params: Params,
    *,
    resume: bool = True,
    stop_after: int | None = None,
    callbacks: tuple[Callback, ...] = (),
    progress: bool = True,
    model: torch.nn.Module | None = None,
) -> dict[str, Any]:
    """Fine-tune with params.method; write the trained artifact and a summary to params.run_dir.

    resume: continue from the newest complete checkpoint in the run folder, if any.
    stop_after: stop (after checkpointing) once this step is done, as if interrupted.
    model: a model from :func:`build_model` to train in place (default: build one).
    Returns the summary also written to ``train_summary.json``.
    """
    started_at = time.perf_counter()
    reset_peak_memory()
    cfg = params.train
    run_dir = params.run_dir
    ckpt_root = run_dir / "checkpoints"
    if not resume:
        shutil.rmtree(ckpt_root, ignore_errors=True)
    set_seed(params.seed)
    # step_scheduler_with_optimizer=False: max_steps counts global steps, so the schedule steps once
    # per optimizer step, not once per process
    accelerator = Accelerator(mixed_precision=mixed_precision(cfg.mixed_precision), step_scheduler_with_optimizer=False)

    tokenizer = load_tokenizer(params.model)
    method = get_method(params.method.name)
    model = build_model(params) if model is None else model
    trainable, total = count_parameters(model)

    train_set = [encode(tokenizer, ex, params.data) for ex in data.read_split(params.data.out_dir, "train")]
    val_set = [encode(tokenizer, ex, params.data) for ex in data.read_split(params.data.out_dir, "val")][
        : cfg.eval_examples
    ]
    sampler = Sampler(
        [len(e) for e in train_set], cfg.batch_size, params.seed, accelerator.process_index, accelerator.num_processes
    )

    optimizer = make_optimizer(model, params)
    scheduler = get_scheduler(
        cfg.scheduler, optimizer, num_warmup_steps=cfg.warmup_steps, num_training_steps=cfg.max_steps
    )
    model, optimizer, scheduler = accelerator.prepare(model, optimizer, scheduler)

    fingerprint = trajectory_params(params)
    state: dict[str, Any] = {
        "step": 0,
        "history": [],
        "evals": [],
        "tokens": 0,
        "train_seconds": 0.0,
        "params": fingerprint,
    }
    ckpt = latest_checkpoint(ckpt_root) if resume else None
    if ckpt is not None:
        state = load_checkpoint(ckpt, accelerator.unwrap_model(model), optimizer, scheduler, method, fingerprint)
        log.info("resumed from %s (step %d)", ckpt, state["step"])
    else:  # a fresh start: nothing of an earlier run may sit beside the new one
        shutil.rmtree(run_dir / "model", ignore_errors=True)
        for stale in ("train_summary.json", "metrics.json"):
            (run_dir / stale).unlink(missing_ok=True)
    save_params(params, run_dir / "params.yaml")

    def evaluate_now(step: int) -> None:
        loss = heldout_loss(model, val_set, tokenizer.pad_token_id, cfg.batch_size, accelerator.device)
        state["evals"].append({"step": step, "val_loss": loss})
        for cb in callbacks:
            cb({"val_loss": loss, "val_ppl": math.exp(min(loss, 50))}, step)

    last = min(cfg.max_steps, stop_after or cfg.max_steps)
    bar = tqdm(
        total=cfg.max_steps, initial=state["step"], desc=f"train {method.name}", disable=not progress, unit="step"
    )
    model.train()
    while state["step"] < last:
        step = state["step"] + 1
        started = time.perf_counter()
        micro = [
            collate([train_set[i] for i in rows], tokenizer.pad_token_id)
            for rows in sampler.step_indices(step, cfg.grad_accum)
        ]
        step_loss, step_tokens = optimizer_step(
            model, micro, optimizer, scheduler, accelerator, cfg.max_grad_norm, method, step
        )
        state["train_seconds"] += time.perf_counter() - started
        state["tokens"] += step_tokens * accelerator.num_processes
        state["step"] = step
        state["history"].append({"step": step, "loss": step_loss, "lr": scheduler.get_last_lr()[0]})
        tok_s = state["tokens"] / max(state["train_seconds"], 1e-9)
        bar.set_postfix(loss=f"{step_loss:.4f}", tok_s=f"{tok_s:,.0f}")
        bar.update(1)
        if step % cfg.log_every == 0 or step == cfg.max_steps:
            for cb in callbacks:
                cb({"train_loss": step_loss, "lr": scheduler.get_last_lr()[0], "tokens_per_s": tok_s}, step)
        if cfg.eval_every and (step % cfg.eval_every == 0 or step == cfg.max_steps):
            evaluate_now(step)
            model.train()
            bar.write(f"step {step}: train loss {step_loss:.4f}, val loss {state['evals'][-1]['val_loss']:.4f}")
        if cfg.save_every and (step % cfg.save_every == 0 or step == last) and step < cfg.max_steps:
            if accelerator.is_main_process:
                save_checkpoint(
                    ckpt_root,
                    step,
                    accelerator.unwrap_model(model),
                    optimizer,
                    scheduler,
                    state,
                    cfg.keep_checkpoints,
                    method,
                )
    bar.close()

    summary = {
        "method": method.name,
        "steps": state["step"],
        "finished": state["step"] >= cfg.max_steps,
        "final_train_loss": state["history"][-1]["loss"] if state["history"] else None,
        "first_train_loss": state["history"][0]["loss"] if state["history"] else None,
        "history": state["history"],
        "evals": state["evals"],
        "trainable_params": trainable,
        "total_params": total,
        "trainable_pct": 100 * trainable / total,
        "train_tokens": state["tokens"],
        "train_seconds": state["train_seconds"],
        "tokens_per_s": state["tokens"] / max(state["train_seconds"], 1e-9),
        "peak_memory_bytes": peak_memory_bytes(),
        "wall_seconds": time.perf_counter() - started_at,  # this call: loading, training, evals, saving
        "device": str(accelerator.device),
        "mixed_precision": accelerator.mixed_precision,
    }
    if summary["finished"] and accelerator.is_main_process:
        out = artifacts.save(accelerator.unwrap_model(model), method, run_dir / "model", params.method)
        summary["artifact_bytes"] = artifacts.size_bytes(out)
        shutil.rmtree(ckpt_root, ignore_errors=True)  # the run is complete; its artifact supersedes them
    (run_dir / "train_summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary
