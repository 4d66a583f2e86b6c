"""Optimizer, schedule and one optimizer step, shared by every recipe.

One step accumulates gradients over its micro-batches (and processes) and normalizes the
objective by the step's **units** counted over all of them (completion tokens for SFT, pairs for
the reward model), so every unit weighs the same whichever micro-batch or process it fell in; a
mean of per-micro-batch means would weigh the units of sparse micro-batches more.

``max_tokens`` bounds the activations a step holds: a micro-batch of more padded tokens runs as
row chunks, forward and backward one after the other, their gradients summed before the step,
which is the same objective (the units are counted on the whole micro-batch) at a lower peak.
No library splits a collated batch this way under a fixed accumulation count, hence by hand.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
from transformers import get_scheduler

from peftflow.config import TrainParams
from peftflow.methods import Method

# a recipe's objective for one micro-batch: the sum of its per-unit losses, a scalar tensor
Objective = Callable[[torch.nn.Module, dict[str, torch.Tensor]], torch.Tensor]


def cpu_has_bf16() -> bool:
    """Whether this CPU runs bf16 matmuls natively (AVX512-BF16 or AMX): there oneDNN's bf16 GEMM
    has about twice the fp32 throughput; elsewhere bf16 is emulated and slower than fp32."""
    probes = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    return any(getattr(torch.cpu, probe, lambda: False)() for probe in probes)


def mixed_precision(setting: str) -> str:
    """``train.mixed_precision`` resolved: ``auto`` is bf16 autocast on a CUDA GPU or a CPU that
    supports bf16 (fp32 master weights either way), else fp32 (``no``)."""
    if setting != "auto":
        return setting
    if torch.cuda.is_available():
        return "bf16" if torch.cuda.is_bf16_supported() else "no"
    return "bf16" if cpu_has_bf16() else "no"


def autocast(setting: str, device: torch.device):
    """The autocast context of ``setting`` (``train.mixed_precision``) on ``device``, for passes
    outside the Accelerator (evaluation): bf16 or fp16 autocast, or nothing for fp32."""
    precision = mixed_precision(setting)
    if precision == "no" or device.type not in ("cuda", "cpu") or (precision == "fp16" and device.type == "cpu"):
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=torch.bfloat16 if precision == "bf16" else torch.float16)


def frozen_linears_to_bf16(model: torch.nn.Module) -> int:
    """Store the frozen weights of linear layers in bf16, for training under bf16 autocast; returns
    how many values changed dtype. Autocast would cast each of them to bf16 on every forward pass
    (and keep that copy for the backward pass), so the matmuls see the same values; what is saved
    is a copy per layer per step and half the weights' memory. Trained tensors stay fp32 (the
    master weights), and so do the embeddings and any head tied to them (the residual stream)."""
    tied = {id(m.weight) for m in model.modules() if isinstance(m, torch.nn.Embedding)}
    n = 0
    for module in model.modules():
        if not isinstance(module, torch.nn.Linear):
            continue
        for p in module.parameters(recurse=False):
            if not p.requires_grad and p.dtype == torch.float32 and id(p) not in tied:
                p.data = p.data.to(torch.bfloat16)
                n += p.numel()
    return n


def make_optimizer(
    model: torch.nn.Module, cfg: TrainParams, method: Method | None = None, method_params=None
) -> torch.optim.Optimizer:
    """The method's optimizer (AdamW unless it says otherwise) over the trainable parameters."""
    trainable = [p for p in model.parameters() if p.requires_grad]
    if method is None:
        return torch.optim.AdamW(trainable, lr=cfg.lr, weight_decay=cfg.weight_decay)
    return method.optimizer(trainable, cfg.lr, cfg.weight_decay, method_params)


def scheduler_name(cfg: TrainParams) -> str:
    """transformers' name for ``cfg.scheduler`` after warmup: its "constant" would skip the warmup."""
    return "constant_with_warmup" if cfg.scheduler == "constant" else cfg.scheduler


def make_scheduler(cfg: TrainParams, optimizer: torch.optim.Optimizer, total_steps: int | None = None):
    """``cfg.scheduler`` after ``cfg.warmup_steps`` of linear warmup, over ``total_steps`` (default max_steps)."""
    return get_scheduler(
        scheduler_name(cfg),
        optimizer,
        num_warmup_steps=cfg.warmup_steps,
        num_training_steps=total_steps or cfg.max_steps,
    )


def row_chunks(batch: dict[str, torch.Tensor], max_tokens: int | None) -> Iterator[dict[str, torch.Tensor]]:
    """``batch`` as chunks of whole rows of at most ``max_tokens`` padded tokens (one row at least),
    each without the left-padding columns none of its rows needs; the batch itself if it fits."""
    rows, width = batch["input_ids"].shape
    per = rows if not max_tokens else max(1, max_tokens // width)
    if per >= rows:
        yield batch
        return
    for start in range(0, rows, per):
        part = {key: t[start : start + per] for key, t in batch.items()}
        used = part["attention_mask"].any(dim=0).nonzero()
        first = int(used[0]) if len(used) else 0
        yield {key: t[:, first:] if t.dim() == 2 else t for key, t in part.items()}  # (B,) labels: no columns


def release_free_memory() -> None:
    """Hand the C allocator's free pages back to the system (glibc's ``malloc_trim``; nothing
    elsewhere). Batches of changing widths leave freed blocks glibc keeps, about 0.3 GB of the
    demo's RSS; once a step, it costs a few milliseconds."""
    if _LIBC is not None:
        _LIBC.malloc_trim(0)


def _glibc():
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name) if name else None
    except OSError:
        return None
    return libc if hasattr(libc, "malloc_trim") else None


_LIBC = _glibc()


@dataclass(frozen=True)
class StepResult:
    loss: float  # the objective per unit over the whole step (all micro-batches and processes)
    units: int  # units the loss was normalized by (all processes)


def optimizer_step(
    model,
    micro_batches: list[dict],
    units: Callable[[dict], int],
    objective: Objective,
    optimizer,
    scheduler,
    accelerator,
    max_grad_norm: float | None,
    method: Method | None = None,
    step: int = 0,
    method_model: Callable[[], torch.nn.Module] | None = None,
    max_tokens: int | None = None,
) -> StepResult:
    """One optimizer step over gradient-accumulated micro-batches.

    ``units(batch)``: how many units a micro-batch holds (known before the forward pass);
    ``objective(model, batch)``: the sum of its per-unit losses. ``method``: its hooks run here
    (``extra_loss`` added once per step, ``after_step``), on ``method_model()`` (default: the
    unwrapped model). ``max_tokens``: padded tokens per forward pass at most (see the module's
    docstring); one process or DDP only.
    """
    hooked = method_model or (lambda: accelerator.unwrap_model(model))
    world = accelerator.num_processes
    gas = accelerator.gradient_accumulation_steps
    if gas not in (1, len(micro_batches)):
        raise ValueError(
            f"the Accelerator accumulates {gas} micro-batches per step; this step has {len(micro_batches)}"
        )
    local = sum(units(b) for b in micro_batches)
    total = int(accelerator.reduce(torch.tensor(local, device=accelerator.device), "sum")) if world > 1 else local
    loss_sum = torch.zeros((), device=accelerator.device)
    for batch in micro_batches:
        batch = {key: t.to(accelerator.device) for key, t in batch.items()}
        # accumulate(): no gradient all-reduce before the step's last micro-batch (DDP's no_sync,
        # FSDP's and DeepSpeed's accumulation boundary)
        with accelerator.accumulate(model):
            chunks = list(row_chunks(batch, max_tokens))
            for i, chunk in enumerate(chunks):
                # a micro-batch's chunks but its last add to the gradients without an all-reduce
                last = i == len(chunks) - 1
                with accelerator.autocast(), contextlib.nullcontext() if last else accelerator.no_sync(model):
                    summed = objective(model, chunk)
                    extra = method.extra_loss(hooked()) if method is not None and i == 0 else None
                    # DDP averages gradients over processes: times world makes it the sum over all, /
                    # total the mean; times gas undoes accelerate's (and DeepSpeed's) division by the
                    # micro-batch count
                    scaled = summed * (world * gas) / max(total, 1)  # one process: exactly the mean
                    if extra is not None:
                        scaled = scaled + extra * gas / len(micro_batches)
                    accelerator.backward(scaled)
                loss_sum += summed.detach().float()
    if max_grad_norm:
        accelerator.clip_grad_norm_(model.parameters(), max_grad_norm)
    optimizer.step()
    if method is not None:
        method.after_step(hooked(), step)
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    if world > 1:
        loss_sum = accelerator.reduce(loss_sum, "sum")
    return StepResult(loss=float(loss_sum) / max(total, 1), units=total)
