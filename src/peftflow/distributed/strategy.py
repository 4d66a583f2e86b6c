"""What each strategy needs in a worker: its Accelerator, and complete tensors from sharded ones.

accelerate does the work (DDP wrapping, FSDP2's ``fully_shard``, the DeepSpeed engine, gradient
accumulation without all-reduce on non-final micro-batches); torch.distributed.checkpoint gathers
sharded FSDP2 tensors and optimizer state, and DeepSpeed its ZeRO-3 partitions. What is written
here by hand: choosing the plugin from params, filling a DeepSpeed file's "auto" values from
``train.*``, and, on CPU, switching accelerate's FSDP on (accelerate enables FSDP on accelerators
only; FSDP2 itself runs over gloo, which is how the CPU tests exercise the GPU code path).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator, PartialState
from accelerate.utils import DistributedType

from peftflow.distributed.launch import WORKER_ENV, launched_externally
from peftflow.distributed.params import DistributedParams
from peftflow.training.optim import mixed_precision

log = logging.getLogger(__name__)


def check_method(method, params) -> None:
    """One line, before anything starts, if the run's method cannot train under its strategy."""
    strategy = params.distributed.strategy
    why = method.unsupported(strategy, params.method)
    if why:
        raise ValueError(f"method {method.name} with distributed.strategy {strategy}: {why}")
    if strategy == "deepspeed":
        deepspeed_config(params)  # a missing or broken config file: named here, not by each launched worker


def deepspeed_config(params, path: Path | str | None = None) -> dict[str, Any]:
    """The run's DeepSpeed JSON (``path``, default ``distributed.deepspeed``) with its "auto" values
    filled from ``train.*``."""
    path = Path(path or params.distributed.deepspeed)
    try:
        config = json.loads(path.read_text())
    except FileNotFoundError:
        raise FileNotFoundError(f"distributed.deepspeed: {path}: no such DeepSpeed config file") from None
    except json.JSONDecodeError as e:
        raise ValueError(f"distributed.deepspeed: {path}: not valid JSON ({e.msg}, line {e.lineno})") from None
    cfg, world = params.train, params.distributed.num_processes
    precision = mixed_precision(cfg.mixed_precision)
    auto = {
        "train_micro_batch_size_per_gpu": cfg.batch_size,
        "gradient_accumulation_steps": cfg.grad_accum,
        "train_batch_size": cfg.batch_size * cfg.grad_accum * world,
        "gradient_clipping": cfg.max_grad_norm or 0.0,
    }
    for key, value in auto.items():
        if config.get(key, "auto") == "auto":
            config[key] = value
        elif config[key] != value:
            raise ValueError(f'{path}: {key} is {config[key]}, but train.* make it {value}; set it to "auto"')
    for section, on in (("bf16", precision == "bf16"), ("fp16", precision == "fp16")):
        if config.get(section, {}).get("enabled", "auto") == "auto":
            config.setdefault(section, {})["enabled"] = on
    zero = config.setdefault("zero_optimization", {})
    if zero.get("stage") == 3:  # the saved artifact must be the whole model, gathered
        zero.setdefault("stage3_gather_16bit_weights_on_model_save", True)
    for key, value in list(zero.items()):
        if value == "auto":  # the bucket sizes accelerate would derive from the model: DeepSpeed's defaults
            del zero[key]
    return config


def _fsdp_plugin(dist: DistributedParams, layer_classes: list[str]):
    from accelerate import FullyShardedDataParallelPlugin

    fsdp = dist.fsdp
    return FullyShardedDataParallelPlugin(
        fsdp_version=fsdp.version,
        auto_wrap_policy="transformer_based_wrap" if fsdp.auto_wrap == "transformer_layer" else "no_wrap",
        transformer_cls_names_to_wrap=layer_classes if fsdp.auto_wrap == "transformer_layer" else None,
        reshard_after_forward=fsdp.reshard_after_forward,
        cpu_offload=fsdp.cpu_offload,
        state_dict_type="FULL_STATE_DICT" if fsdp.state_dict == "full" else "SHARDED_STATE_DICT",
    )


def make_accelerator(params, grad_accum: int, layer_classes: list[str] | None = None) -> Accelerator:
    """The Accelerator of this process for the run's strategy; in a launch, checked to see all its
    processes. ``layer_classes``: the decoder block classes FSDP shards one by one."""
    from accelerate.utils import InitProcessGroupKwargs

    dist, cfg = params.distributed, params.train
    cpu = not torch.cuda.is_available()
    kwargs: dict[str, Any] = dict(
        mixed_precision=mixed_precision(cfg.mixed_precision),
        # max_steps counts global steps: the schedule steps once per optimizer step, not per process
        step_scheduler_with_optimizer=False,
        gradient_accumulation_steps=grad_accum,
    )
    external = _set_up_by_accelerate_launch()  # its FSDP / DeepSpeed settings apply, not the params'
    ds_file = os.environ.get("ACCELERATE_DEEPSPEED_CONFIG_FILE") if external else None
    if (dist.strategy == "deepspeed" and not external) or ds_file:
        from accelerate.utils import DeepSpeedPlugin

        kwargs["deepspeed_plugin"] = DeepSpeedPlugin(hf_ds_config=deepspeed_config(params, ds_file))
        if cpu:  # accelerate would pick no backend for DeepSpeed without a GPU
            kwargs["kwargs_handlers"] = [InitProcessGroupKwargs(backend="gloo")]
    elif dist.strategy == "fsdp" and not external:
        kwargs.update(cpu=cpu, fsdp_plugin=_fsdp_plugin(dist, layer_classes or []))
    else:
        kwargs["cpu"] = cpu
    forget_other_precision(kwargs["mixed_precision"])
    accelerator = Accelerator(**kwargs)
    if dist.strategy == "fsdp" and not external and accelerator.distributed_type == DistributedType.MULTI_CPU:
        # in both shared states: every later AcceleratorState() copies PartialState's over its own
        PartialState._shared_state["distributed_type"] = DistributedType.FSDP
        accelerator.state.distributed_type = DistributedType.FSDP
        accelerator.state.fsdp_plugin = kwargs["fsdp_plugin"]
    _check_world(accelerator, dist)
    return accelerator


def forget_other_precision(precision: str) -> None:
    """accelerate keeps one process-wide AcceleratorState and refuses a second Accelerator with
    another mixed precision; a process that trains several runs (a test session, a notebook, a
    flow on the in-process runner) may hold one from a run at another precision. Drop it (the
    process-wide PartialState, the process group, stays)."""
    from accelerate.state import AcceleratorState

    held = AcceleratorState._shared_state.get("_mixed_precision")
    if held is not None and str(held) != precision:
        AcceleratorState._reset_state()


def _set_up_by_accelerate_launch() -> bool:
    """Whether ``accelerate launch`` started this process with FSDP or DeepSpeed from its own
    config (under ``torchrun``, which sets neither, the params' strategy applies)."""
    flags = ("ACCELERATE_USE_FSDP", "ACCELERATE_USE_DEEPSPEED")
    return launched_externally() and any(os.environ.get(k, "").lower() == "true" for k in flags)


def _check_world(accelerator: Accelerator, dist: DistributedParams) -> None:
    """Stop, in one line, a worker that was launched as one of several but trains alone."""
    expected = int(os.environ.get("WORLD_SIZE", "1"))
    if WORKER_ENV in os.environ:
        expected = max(expected, dist.num_processes)
    if accelerator.num_processes != expected:
        raise RuntimeError(
            f"this process was launched as one of {expected} (WORLD_SIZE={os.environ.get('WORLD_SIZE')}), but "
            f"accelerate sees {accelerator.num_processes} process(es) ({accelerator.distributed_type.value}): "
            f"on a machine without GPUs launch with `peftflow train --nproc N` or `accelerate launch --cpu`"
        )


def strategy_of(accelerator: Accelerator) -> str:
    """The strategy this process trains under, as ``distributed.strategy`` names it (also under
    torchrun or accelerate launch, whose environment decides)."""
    kind = accelerator.distributed_type
    if kind == DistributedType.FSDP:
        return "fsdp"
    if kind == DistributedType.DEEPSPEED:
        return "deepspeed"
    return "ddp" if accelerator.num_processes > 1 else "none"


def sharded(accelerator: Accelerator) -> bool:
    """Whether parameters are split across processes (FSDP, DeepSpeed ZeRO-3)."""
    if accelerator.distributed_type == DistributedType.FSDP:
        return True
    if accelerator.distributed_type == DistributedType.DEEPSPEED:
        return accelerator.state.deepspeed_plugin.zero_stage == 3
    return False


@contextlib.contextmanager
def unsharded_init(accelerator: Accelerator) -> Iterator[None]:
    """A context in which a model is built whole in this process alone: under DeepSpeed ZeRO-3,
    transformers would partition a new model across the processes (a collective) while the
    run's DeepSpeed config is registered with it (a module-level weak reference, restored after)."""
    if accelerator.distributed_type != DistributedType.DEEPSPEED:
        yield
        return
    from transformers.integrations import deepspeed as hf_deepspeed

    saved = hf_deepspeed._hf_deepspeed_config_weak_ref
    hf_deepspeed.unset_hf_deepspeed_config()
    try:
        yield
    finally:
        hf_deepspeed._hf_deepspeed_config_weak_ref = saved


def trainable_state(model, accelerator: Accelerator) -> dict[str, torch.Tensor]:
    """The trained tensors by name, complete and on CPU, on the main process (a collective under
    FSDP and DeepSpeed: every process must call it; the others get ``{}``)."""
    if accelerator.distributed_type == DistributedType.DEEPSPEED:
        import deepspeed

        state = {}
        for name, param in accelerator.unwrap_model(model).named_parameters():
            if param.requires_grad:  # one at a time: no process ever holds every gathered tensor at once
                with deepspeed.zero.GatheredParameters([param], modifier_rank=None):
                    if accelerator.is_main_process:
                        state[name] = param.detach().cpu().clone()
        return state
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    options = StateDictOptions(full_state_dict=True, cpu_offload=True, ignore_frozen_params=True)
    state = get_model_state_dict(model, options=options)
    trained = {n for n, p in accelerator.unwrap_model(model).named_parameters() if p.requires_grad}
    return {n: t.clone() for n, t in state.items() if n in trained} if accelerator.is_main_process else {}


def load_trainable_state(model, accelerator: Accelerator, state: dict[str, torch.Tensor]) -> None:
    """Put complete trained tensors (from :func:`trainable_state`) back into a prepared model."""
    if accelerator.distributed_type == DistributedType.DEEPSPEED:
        import deepspeed

        named = dict(accelerator.unwrap_model(model).named_parameters())
        params = [named[n] for n in state]
        with deepspeed.zero.GatheredParameters(params, modifier_rank=0), torch.no_grad():
            if accelerator.is_main_process:
                for name, tensor in state.items():
                    named[name].copy_(tensor)
        return
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

    set_model_state_dict(model, state, options=StateDictOptions(full_state_dict=True, strict=False))


SHARDS = "shards"  # inside a checkpoint: what each process wrote of its own (DeepSpeed, FSDP sharded)


def writes_shards(accelerator: Accelerator, params) -> bool:
    """Whether checkpoints are written by every process (DeepSpeed's partitioned optimizer, FSDP's
    ``state_dict: sharded``) rather than gathered onto the main process."""
    if accelerator.distributed_type == DistributedType.DEEPSPEED:
        return True
    return accelerator.distributed_type == DistributedType.FSDP and params.distributed.fsdp.state_dict == "sharded"


def training_state(model, optimizer, accelerator: Accelerator, params, shards: Path) -> dict | None:
    """What resuming needs of the model and optimizer (a collective: every process calls it).
    Gathered: ``{"trainable": ..., "optimizer": ...}``, complete and keyed by parameter name, on the
    main process (``{}`` elsewhere). Sharded (:func:`writes_shards`): every process writes its part
    into ``shards`` (the DeepSpeed engine's checkpoint, trained weights only; or
    torch.distributed.checkpoint's) and this returns None."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

    inner = getattr(optimizer, "optimizer", optimizer)  # accelerate's wrapper
    if not writes_shards(accelerator, params):
        trainable = trainable_state(model, accelerator)
        full = StateDictOptions(full_state_dict=True, cpu_offload=True)
        optim = get_optimizer_state_dict(model, inner, options=full)
        return {"trainable": trainable, "optimizer": optim} if accelerator.is_main_process else {}
    if accelerator.is_main_process:
        shutil.rmtree(shards, ignore_errors=True)
        shards.mkdir(parents=True)
    accelerator.wait_for_everyone()
    if accelerator.distributed_type == DistributedType.DEEPSPEED:
        model.save_checkpoint(shards, tag=SHARDS, save_latest=False, exclude_frozen_parameters=True)
    else:
        import torch.distributed.checkpoint as dcp

        dcp.save(_sharded_state(model, inner), checkpoint_id=shards)
    accelerator.wait_for_everyone()
    return None


def _sharded_state(model, optimizer) -> dict:
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

    options = StateDictOptions(ignore_frozen_params=True)
    model_state, optim_state = get_state_dict(model, optimizer, options=options)
    return {"model": model_state, "optimizer": optim_state}


def load_training_state(model, optimizer, accelerator: Accelerator, ckpt: Path) -> None:
    """Restore what :func:`training_state` saved in checkpoint ``ckpt`` (a collective)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    inner = getattr(optimizer, "optimizer", optimizer)
    if (ckpt / SHARDS).is_dir() and accelerator.distributed_type == DistributedType.DEEPSPEED:
        model.load_checkpoint(
            ckpt / SHARDS, tag=SHARDS, load_module_strict=False, load_optimizer_states=True,
            load_lr_scheduler_states=False,
        )  # fmt: skip
    elif (ckpt / SHARDS).is_dir():
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import set_state_dict

        state = _sharded_state(model, inner)
        dcp.load(state, checkpoint_id=ckpt / SHARDS)
        set_state_dict(
            model, inner, model_state_dict=state["model"], optim_state_dict=state["optimizer"],
            options=StateDictOptions(strict=False),
        )  # fmt: skip
    else:
        from peftflow.training.state_files import read

        load_trainable_state(model, accelerator, read(ckpt / "trainable.pt"))
        optim = read(ckpt / "optimizer.pt")
        set_optimizer_state_dict(model, inner, optim, options=StateDictOptions(full_state_dict=True))
