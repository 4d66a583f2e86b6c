"""The ``distributed:`` params section: how many processes train one run, and how they split it."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, model_validator

from peftflow.schema import Strict, operational

Strategy = Literal["none", "ddp", "fsdp", "deepspeed"]


class FsdpParams(Strict):
    """PyTorch FSDP2 (``fully_shard``), as accelerate and axolotl name its options."""

    version: Literal[2] = 2  # FSDP1 is deprecated in torch and not offered
    # transformer_layer: shard each decoder block on its own (the model's _no_split_modules), then the
    # rest; none: one shard group for the whole model (less overlap of communication and compute)
    auto_wrap: Literal["transformer_layer", "none"] = "transformer_layer"
    # checkpoints: full (gathered onto the main process, loadable by any strategy and process count)
    # or sharded (each process writes its own shard with torch.distributed.checkpoint: no gather)
    state_dict: Literal["full", "sharded"] = "full"
    cpu_offload: bool = False  # parameters, gradients and optimizer state live in CPU memory between uses
    reshard_after_forward: bool = True  # free the gathered weights after forward (ZeRO-3); false: keep (ZeRO-2)


class DistributedParams(Strict):
    """One run on several processes (devices). ``train.batch_size`` is per process, so the global
    batch is ``num_processes x batch_size x grad_accum``."""

    strategy: Strategy = "none"  # none: one process; ddp: replicas; fsdp / deepspeed: sharded
    num_processes: int = Field(1, ge=1)  # processes on this machine (one per GPU; gloo on CPU)
    fsdp: FsdpParams = operational(FsdpParams())  # how FSDP shards and saves; not what it computes
    # a DeepSpeed JSON config (params/deepspeed/zero2.json, zero3.json); its "auto" values are filled
    # from train.* (batch size, accumulation, clipping, precision)
    deepspeed: Path | None = None
    # an accelerate config YAML (`accelerate config`) to take strategy, process count and FSDP /
    # DeepSpeed settings from, instead of the keys above
    accelerate_config: Path | None = None
    port: int = operational(0, ge=0, le=65535)  # rendezvous port on 127.0.0.1; 0: any free one

    @model_validator(mode="after")
    def _consistent(self) -> DistributedParams:
        if self.strategy == "none" and self.num_processes > 1:
            raise ValueError(
                f"strategy none trains in one process; with num_processes {self.num_processes} "
                f"set distributed.strategy to ddp, fsdp or deepspeed"
            )
        if self.strategy == "deepspeed" and self.deepspeed is None:
            raise ValueError(
                "strategy deepspeed needs distributed.deepspeed: a DeepSpeed JSON config, "
                "e.g. params/deepspeed/zero3.json"
            )
        if self.deepspeed is not None and self.strategy != "deepspeed":
            raise ValueError(f"distributed.deepspeed is set but the strategy is {self.strategy}, not deepspeed")
        return self

    @property
    def launches(self) -> bool:
        """Whether the run needs worker processes (and a process group), even a single one."""
        return self.strategy != "none"
