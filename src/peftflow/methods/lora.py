"""LoRA: frozen W plus a trained low-rank update B·A (Hu et al., 2021, arXiv:2106.09685), via peft.

A is Gaussian-initialized and B zero-initialized, so training starts exactly at the base model.
The update is scaled by alpha / r (alpha / sqrt(r) with ``use_rslora``). After training, ``merge``
folds B·A into W: the merged model has no added latency. Training and evaluation run peft's
layers with a fused forward (:mod:`peftflow.methods._fused_lora`); the adapter is peft's.
"""

from __future__ import annotations

from typing import Literal

from peft import LoraConfig, get_peft_model
from pydantic import Field
from torch import nn

from peftflow.methods import MethodParams, register
from peftflow.methods._fused_lora import fuse
from peftflow.methods._shared import PeftWeightAdapter, check_targets, dims, linear_shapes, peft_task


class Params(MethodParams):
    name: Literal["lora"] = "lora"
    r: int = Field(16, ge=1)  # rank: higher means more capacity and memory
    alpha: float = Field(32, gt=0)  # scale of the update is alpha / r
    # on the LoRA branch's input; 0 (peft's default) here: on a CPU the random masks cost more than
    # a third of a step, and the demo's accuracy does not need them (README, "Benchmarks")
    dropout: float = Field(0.0, ge=0, lt=1)
    # "all-linear": every linear layer but the output head; or module names, e.g. [q_proj, v_proj]
    target_modules: Literal["all-linear"] | list[str] = "all-linear"
    init: Literal["gaussian", "kaiming"] = "gaussian"  # how A is drawn; B is always zero
    use_rslora: bool = False


def lora_config(params: Params, model: nn.Module, **extra) -> LoraConfig:
    """peft's config for ``params`` on ``model`` (a classifier's head trained and saved beside it)."""
    return LoraConfig(
        **peft_task(model),
        r=params.r,
        lora_alpha=params.alpha,
        lora_dropout=params.dropout,
        target_modules=params.target_modules,
        init_lora_weights="gaussian" if params.init == "gaussian" else True,
        use_rslora=params.use_rslora,
        **extra,
    )


@register
class LoRA(PeftWeightAdapter):
    Params = Params

    def apply(self, model: nn.Module, params: Params) -> nn.Module:
        check_targets(model, params.name, "target_modules", params.target_modules)
        model = get_peft_model(model, lora_config(params, model))
        fuse(model)  # the same adapter, its update computed in one pass (see _fused_lora)
        return model

    def expected_trainable(self, base: nn.Module, params: Params) -> int | None:
        if params.target_modules != "all-linear":
            return None
        return params.r * sum(fi + fo for fi, fo in linear_shapes(base.config)) * dims(base.config)["layers"]
