"""The ``distributed:`` params section: how many processes train one run, and how they split it."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import yaml
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
    # an accelerate config YAML (`accelerate config`): its distributed_type, num_processes, fsdp_config
    # and deepspeed_config.deepspeed_config_file replace the keys above
    accelerate_config: Path | None = None
    port: int = operational(0, ge=0, le=65535)  # rendezvous port on 127.0.0.1; 0: any free one

    @model_validator(mode="before")
    @classmethod
    def _from_accelerate_config(cls, data: Any) -> Any:
        if isinstance(data, dict) and data.get("accelerate_config"):
            data = {**data, **from_accelerate_config(Path(data["accelerate_config"]))}
        return data

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


_STRATEGIES = {"NO": "none", "MULTI_CPU": "ddp", "MULTI_GPU": "ddp", "FSDP": "fsdp", "DEEPSPEED": "deepspeed"}
_WRAP = {"TRANSFORMER_BASED_WRAP": "transformer_layer", "NO_WRAP": "none"}
_STATE_DICT = {"FULL_STATE_DICT": "full", "SHARDED_STATE_DICT": "sharded"}


def from_accelerate_config(path: Path) -> dict[str, Any]:
    """The ``distributed`` keys an accelerate config file (``accelerate config``) sets: its
    distributed_type, num_processes, fsdp_config and deepspeed_config.deepspeed_config_file. Keys
    the file sets replace the params' own."""
    try:
        raw = yaml.safe_load(Path(path).read_text()) or {}
    except FileNotFoundError:
        raise ValueError(f"accelerate_config: {path}: no such file") from None
    except yaml.YAMLError as e:
        raise ValueError(f"accelerate_config: {path}: not valid YAML ({getattr(e, 'problem', e)})") from None

    def pick(table: dict[str, str], key: str, value: Any) -> str:
        if value not in table:
            raise ValueError(f"{path}: {key}: {value!r} is not supported; expected one of {', '.join(table)}")
        return table[value]

    out: dict[str, Any] = {"strategy": pick(_STRATEGIES, "distributed_type", raw.get("distributed_type", "NO"))}
    if "num_processes" in raw:
        out["num_processes"] = raw["num_processes"]
    fsdp = raw.get("fsdp_config") or {}
    if out["strategy"] == "fsdp":
        section: dict[str, Any] = {}
        if "fsdp_version" in fsdp:
            section["version"] = fsdp["fsdp_version"]
        if "fsdp_auto_wrap_policy" in fsdp:
            section["auto_wrap"] = pick(_WRAP, "fsdp_config.fsdp_auto_wrap_policy", fsdp["fsdp_auto_wrap_policy"])
        if "fsdp_state_dict_type" in fsdp:
            section["state_dict"] = pick(_STATE_DICT, "fsdp_config.fsdp_state_dict_type", fsdp["fsdp_state_dict_type"])
        for theirs, ours in (
            ("fsdp_offload_params", "cpu_offload"),
            ("fsdp_reshard_after_forward", "reshard_after_forward"),
        ):
            if theirs in fsdp:
                section[ours] = fsdp[theirs]
        out["fsdp"] = section
    if out["strategy"] == "deepspeed":
        file = (raw.get("deepspeed_config") or {}).get("deepspeed_config_file")
        if not file:
            raise ValueError(
                f"{path}: deepspeed_config.deepspeed_config_file: required (peftflow reads DeepSpeed settings "
                f"from its JSON, e.g. params/deepspeed/zero3.json)"
            )
        out["deepspeed"] = file
    return out
