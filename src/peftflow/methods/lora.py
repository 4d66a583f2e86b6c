"""LoRA: frozen W plus a trained low-rank update B·A (Hu et al., 2021, arXiv:2106.09685), via peft.

A is Gaussian-initialized and B zero-initialized, so training starts exactly at the base model.
The update is scaled by alpha / r (alpha / sqrt(r) with ``use_rslora``). After training, ``merge``
folds B·A into W: the merged model has no added latency.
"""

from __future__ import annotations

from typing import Literal

from peft import LoraConfig, get_peft_model
from pydantic import Field
from torch import nn

from peftflow.methods import MethodParams


class Params(MethodParams):
    name: Literal["lora"] = "lora"
    r: int = Field(16, ge=1)  # rank: higher means more capacity and memory
    alpha: float = Field(32, gt=0)  # scale of the update is alpha / r
    dropout: float = Field(0.05, ge=0, lt=1)  # on the LoRA branch's input
    # "all-linear": every linear layer but the output head; or module names, e.g. [q_proj, v_proj]
    target_modules: Literal["all-linear"] | list[str] = "all-linear"
    init: Literal["gaussian", "kaiming"] = "gaussian"  # how A is drawn; B is always zero
    use_rslora: bool = False


def linear_names(model: nn.Module) -> list[str]:
    """Leaf names of the model's linear layers (what target_modules may name)."""
    return sorted({name.rsplit(".", 1)[-1] for name, m in model.named_modules() if isinstance(m, nn.Linear)})


def check_targets(model: nn.Module, method: str, field: str, targets: str | list[str]) -> None:
    """Fail before training, naming what the model offers, if a target module is not in the model."""
    if targets == "all-linear":
        return
    offered = linear_names(model)
    missing = [t for t in targets if t not in offered]
    if missing:
        raise ValueError(
            f"method {method}: {field}: {', '.join(missing)} not in the model; "
            f"its linear layers are: {', '.join(offered)}"
        )


def lora_config(params: Params, **extra) -> LoraConfig:
    return LoraConfig(
        task_type="CAUSAL_LM",
        r=params.r,
        lora_alpha=params.alpha,
        lora_dropout=params.dropout,
        target_modules=params.target_modules,
        init_lora_weights="gaussian" if params.init == "gaussian" else True,
        use_rslora=params.use_rslora,
        **extra,
    )


def apply(model: nn.Module, params: Params) -> nn.Module:
    check_targets(model, params.name, "target_modules", params.target_modules)
    return get_peft_model(model, lora_config(params))


def merge(model) -> nn.Module:
    return model.merge_and_unload()
