"""Supervised fine-tuning, the recipe every method trains with, read top to bottom.

For a causal LM the loss is cross-entropy on the completion tokens only, normalized by the step's
completion tokens over all micro-batches and processes; for a sequence classifier it is the
head's cross-entropy, normalized by the step's examples (:mod:`peftflow.objectives`). The loop
does gradient accumulation, warmup + decay, gradient clipping, bf16 autocast where the device has it (CUDA, CPUs with
AVX512-BF16 or AMX), periodic validation, and checkpoints that resume exactly: trained weights,
optimizer, scheduler and RNG states are saved, and the data order is a pure function of (seed,
step), so a resumed run sees the same batches and reproduces the uninterrupted loss trajectory.
``accelerate launch`` runs the same loop on several GPUs: each process takes its own slice of
every global batch.

Why a hand-written loop rather than transformers' Trainer: it is short, its per-step cost is
measured against a plain loop in ``bench/step_bench.py``, and exact resume of a data position
is simpler to guarantee when the loop owns the sampler.
"""

from __future__ import annotations

import logging
import math
import shutil
import time
from collections.abc import Callable

import torch
from tqdm.auto import tqdm
from transformers import set_seed

from peftflow import artifacts, data, objectives
from peftflow.config import Params, fingerprint, save_params
from peftflow.distributed import launch, strategy
from peftflow.evaluate import validation
from peftflow.methods import get_method
from peftflow.model import load_base_for, load_tokenizer, weights_identity
from peftflow.results import TrainSummary
from peftflow.training import checkpoint
from peftflow.training.meters import count_parameters, peak_memory_bytes, reset_peak_memory
from peftflow.training.optim import (
    frozen_linears_to_bf16,
    make_optimizer,
    make_scheduler,
    mixed_precision,
    optimizer_step,
    release_free_memory,
)
from peftflow.training.sampler import Sampler

log = logging.getLogger(__name__)

Callback = Callable[[dict[str, float], int], None]  # (metrics, step), e.g. to log to MLflow


def resume_fingerprint(params: Params, data_version: str) -> dict:
    """What a checkpoint must have been made with to be resumed: the params that change the
    trained model (declared in the schema), the data version it trained on and the base model's
    files (the same ``model.name_or_path`` may hold other weights since)."""
    return {**fingerprint(params), "data.version": data_version, "model.weights": weights_identity(params.model)}


def build_model(params: Params) -> torch.nn.Module:
    """The base model with params.method applied: only what the method trains requires grad."""
    method = get_method(params.method.name)
    model = method.apply(load_base_for(params), params.method)
    trainable, total = count_parameters(model)
    if trainable == 0:
        raise ValueError(f"method {method.name}: no parameter is trainable; check its params")
    if bf16_frozen_base(method, mixed_precision(params.train.mixed_precision), params.distributed.strategy):
        log.info("%s frozen base weights stored in bf16 (bf16 autocast)", f"{frozen_linears_to_bf16(model):,}")
    log.info(
        "%s: %s of %s parameters trainable (%.3f%%)",
        method.name,
        f"{trainable:,}",
        f"{total:,}",
        100 * trainable / total,
    )
    return model


def bf16_frozen_base(method, precision: str, strategy: str = "none") -> bool:
    """Whether the frozen base's linear weights are kept in bf16 (:func:`frozen_linears_to_bf16`):
    under bf16 autocast, for methods whose artifact holds only added tensors (the base is never
    saved from this copy), on one process or DDP (FSDP and DeepSpeed flatten parameters into one
    dtype), and not for a base loaded quantized. ``precision``: resolved (``bf16``, ``no``...)."""
    return (
        precision == "bf16"
        and method.trains in ("added weights", "prompts")
        and not method.quantizes_base
        and strategy in ("none", "ddp")
    )


def train(
    params: Params,
    *,
    resume: bool = True,
    stop_after: int | None = None,
    callbacks: tuple[Callback, ...] = (),
    progress: bool = True,
    model: torch.nn.Module | None = None,
) -> TrainSummary:
    """Fine-tune with params.method; write the trained artifact and a summary to params.run_dir.

    resume: continue from the newest complete checkpoint in the run folder, if any.
    stop_after: stop (after checkpointing) once this step is done, as if interrupted.
    model: a model from :func:`build_model` to train in place (default: build one; one process only).
    callbacks: called on the main process only; with ``distributed.num_processes`` > 1 they travel
    to the workers, so they must pickle (e.g. :class:`peftflow.tracking.MetricsLogger`).
    Returns the summary also written to ``train_summary.json``. With a ``distributed`` strategy the
    run's processes are launched here (unless this process already is one of them).
    """
    method = get_method(params.method.name)
    strategy.check_method(method, params)
    if params.distributed.launches and not launch.in_worker():
        if model is not None:
            raise ValueError("train(model=...) trains in this process; it cannot be sent to distributed workers")
        return launch.launch(params.distributed, _train, params, resume, stop_after, callbacks, progress, None)
    return _train(params, resume, stop_after, callbacks, progress, model)


def _train(
    params: Params,
    resume: bool,
    stop_after: int | None,
    callbacks: tuple[Callback, ...],
    progress: bool,
    model: torch.nn.Module | None,
) -> TrainSummary:
    """The loop, in this process (one of the run's processes, if there are several)."""
    started_at = time.perf_counter()
    reset_peak_memory()
    cfg, method = params.train, get_method(params.method.name)
    run_dir = params.run_dir
    ckpt_root = run_dir / "checkpoints"
    set_seed(params.seed)

    # the data first: missing or damaged, it is named before minutes go into loading the weights
    tokenizer = load_tokenizer(params.model)
    manifest = data.read_manifest(params.data.out_dir)
    objective = objectives.for_run(params, tokenizer, manifest.get("labels"))
    train_set = [objective.encode(ex) for ex in data.read_split(params.data.out_dir, "train")]
    val_rows = data.read_split(params.data.out_dir, "val")[: cfg.eval_examples]
    val_set = [objective.encode(ex) for ex in val_rows]
    cut = objectives.cut(train_set)
    if cut:
        log.warning("%d of %d training examples are longer than data.max_length=%d tokens: cut to fit",
                    cut, len(train_set), params.data.max_length)  # fmt: skip

    # the model, and the processes that train it
    model = build_model(params) if model is None else model
    trainable, total = count_parameters(model)
    accelerator = strategy.make_accelerator(params, cfg.grad_accum, getattr(model, "_no_split_modules", None))
    main = accelerator.is_main_process
    if cfg.max_batch_tokens and (running := strategy.strategy_of(accelerator)) not in ("none", "ddp"):
        raise ValueError(
            f"train.max_batch_tokens: splits micro-batches in one process or under ddp, not under {running}; "
            f"lower train.batch_size and raise train.grad_accum instead"
        )
    if accelerator.num_processes > 1:  # the same weights everywhere (built above), each its own dropout masks
        set_seed(params.seed + accelerator.process_index)
    if main and not resume:
        shutil.rmtree(ckpt_root, ignore_errors=True)
    accelerator.wait_for_everyone()

    # each process takes its own rows of every global batch
    sampler = Sampler(
        [len(e) for e in train_set], cfg.batch_size, params.seed, accelerator.process_index, accelerator.num_processes
    )

    # what trains it, and where it resumes from
    virtual = method.input_virtual_tokens(params.method)
    optimizer = make_optimizer(model, cfg, method, params.method)
    scheduler = make_scheduler(cfg, optimizer)
    model, optimizer, scheduler = accelerator.prepare(model, optimizer, scheduler)

    def loss_sum(model, batch):
        return objective.loss_sum(model, batch, virtual)

    fp = resume_fingerprint(params, manifest["version"])
    state = {"step": 0, "history": [], "evals": [], "tokens": 0, "train_seconds": 0.0, "params": fp}
    ckpt = checkpoint.latest(ckpt_root) if resume else None
    if ckpt is not None:
        state = checkpoint.load(ckpt, model, optimizer, scheduler, method, fp, accelerator=accelerator)
        log.info("resumed from %s (step %d)", ckpt, state["step"])
    elif main:  # a fresh start: nothing of an earlier run may sit beside the new one
        shutil.rmtree(run_dir / "model", ignore_errors=True)
        for stale in ("train_summary.json", "metrics.json"):
            (run_dir / stale).unlink(missing_ok=True)
    if main:
        save_params(params, run_dir / "params.yaml")
    accelerator.wait_for_everyone()

    def report(metrics: dict[str, float], step: int) -> None:
        if main:
            for cb in callbacks:
                cb(metrics, step)

    def evaluate_now(step: int) -> None:
        # every process runs the whole validation set (sharded weights are gathered collectively)
        found = validation(
            model, tokenizer, params, val_set, val_rows, manifest.get("labels"), cfg.batch_size, accelerator.device,
            virtual,
        )  # fmt: skip
        state["evals"].append({"step": step, **found})
        report({**found, "val_ppl": math.exp(min(found["val_loss"], 50))}, step)

    # the loop
    last = min(cfg.max_steps, stop_after or cfg.max_steps)
    bar = tqdm(
        total=cfg.max_steps,
        initial=state["step"],
        desc=f"train {method.name}" + (f" x{accelerator.num_processes}" if accelerator.num_processes > 1 else ""),
        disable=not (progress and main),
        unit="step",
    )
    model.train()
    while state["step"] < last:
        step = state["step"] + 1
        started = time.perf_counter()
        micro = [objective.collate([train_set[i] for i in rows]) for rows in sampler.step_indices(step, cfg.grad_accum)]
        result = optimizer_step(
            model, micro, objective.units, loss_sum, optimizer, scheduler, accelerator, cfg.max_grad_norm,
            method, step, max_tokens=cfg.max_batch_tokens,
        )  # fmt: skip
        if cfg.max_batch_tokens:  # a memory bound: what the allocator keeps of wider steps goes back too
            release_free_memory()
        state["train_seconds"] += time.perf_counter() - started
        state["tokens"] += global_sum(accelerator, sum(int(b["attention_mask"].sum()) for b in micro))
        state["step"] = step
        state["history"].append({"step": step, "loss": result.loss, "lr": scheduler.get_last_lr()[0]})
        tok_s = state["tokens"] / max(state["train_seconds"], 1e-9)
        bar.set_postfix(loss=f"{result.loss:.4f}", tok_s=f"{tok_s:,.0f}")
        bar.update(1)
        if step % cfg.log_every == 0 or step == cfg.max_steps:
            report({"train_loss": result.loss, "lr": scheduler.get_last_lr()[0], "tokens_per_s": tok_s}, step)
        if cfg.eval_every and (step % cfg.eval_every == 0 or step == cfg.max_steps):
            evaluate_now(step)
            model.train()
            if main:
                bar.write(f"step {step}: train loss {result.loss:.4f}, val loss {state['evals'][-1]['val_loss']:.4f}")
        if cfg.save_every and (step % cfg.save_every == 0 or step == last) and step < cfg.max_steps:
            checkpoint.save(
                ckpt_root, step, model, optimizer, scheduler, state, cfg.keep_checkpoints, method,
                accelerator=accelerator, params=params,
            )  # fmt: skip
    bar.close()

    # the artifact and the summary
    history = state["history"]
    summary = TrainSummary(
        method=method.name,
        steps=state["step"],
        finished=state["step"] >= cfg.max_steps,
        final_train_loss=history[-1]["loss"] if history else None,
        first_train_loss=history[0]["loss"] if history else None,
        history=history,
        evals=state["evals"],
        trainable_params=trainable,
        total_params=total,
        trainable_pct=100 * trainable / total,
        train_tokens=state["tokens"],
        train_seconds=state["train_seconds"],
        tokens_per_s=state["tokens"] / max(state["train_seconds"], 1e-9),
        peak_memory_bytes=global_max(accelerator, peak_memory_bytes()),  # the most any process needed
        cut_examples=cut,
        wall_seconds=time.perf_counter() - started_at,  # this call: loading, training, evals, saving
        device=str(accelerator.device),
        mixed_precision=accelerator.mixed_precision,
        num_processes=accelerator.num_processes,
        strategy=strategy.strategy_of(accelerator),
    )
    if summary.finished:
        out = save_artifact(model, accelerator, params, run_dir / "model")
        if main:
            summary.artifact_bytes = artifacts.size_bytes(out)
            shutil.rmtree(ckpt_root, ignore_errors=True)  # the run is complete; its artifact supersedes them
    if main:
        (run_dir / "train_summary.json").write_text(summary.model_dump_json(indent=2) + "\n")
        for cb in callbacks:  # a callback that holds something back (metrics kept through a tracking outage)
            if hasattr(cb, "close"):
                cb.close()
    accelerator.wait_for_everyone()
    return summary


def global_sum(accelerator, value: int) -> int:
    """``value`` summed over the run's processes."""
    if accelerator.num_processes == 1:
        return value
    return int(accelerator.reduce(torch.tensor(value, device=accelerator.device), "sum"))


def global_max(accelerator, value: int) -> int:
    if accelerator.num_processes == 1:
        return value
    return int(accelerator.gather(torch.tensor([value], device=accelerator.device)).max())


def save_artifact(model, accelerator, params: Params, out_dir):
    """Write the trained artifact from the main process (a collective under sharding: the trained
    tensors are gathered complete first, into a fresh unsharded copy of the model that the method
    saves as it would in one process)."""
    method = get_method(params.method.name)
    if not strategy.sharded(accelerator):
        if accelerator.is_main_process:
            artifacts.save(accelerator.unwrap_model(model), method, out_dir, params.method)
        return out_dir
    trained = strategy.trainable_state(model, accelerator)
    if accelerator.is_main_process:
        with strategy.unsharded_init(accelerator):
            whole = build_model(params)
        missing = {n for n, p in whole.named_parameters() if p.requires_grad} - set(trained)
        if missing:
            raise RuntimeError(f"gathering the trained tensors missed {sorted(missing)[:3]}")
        whole.load_state_dict(trained, strict=False)
        artifacts.save(whole, method, out_dir, params.method)
    return out_dir
