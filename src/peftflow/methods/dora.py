"""DoRA: weight-decomposed LoRA (Liu et al., 2024, arXiv:2402.09353), via peft.

W is split into a magnitude vector m and a direction V; LoRA's B·A updates the direction and m
is trained too: W' = m · (V + B·A) / ||V + B·A||. Same knobs as LoRA; mergeable like LoRA.
"""

from __future__ import annotations

from typing import Literal

from peft import get_peft_model
from torch import nn

from peftflow.methods import lora, register
from peftflow.methods._shared import check_targets, dims, linear_shapes


class Params(lora.Params):
    name: Literal["dora"] = "dora"


@register
class DoRA(lora.LoRA):
    Params = Params

    def apply(self, model: nn.Module, params: Params) -> nn.Module:
        check_targets(model, params.name, "target_modules", params.target_modules)
        return get_peft_model(model, lora.lora_config(params, model, use_dora=True))

    def expected_trainable(self, base: nn.Module, params: Params) -> int | None:
        if params.target_modules != "all-linear":
            return None
        per_block = sum(params.r * (fi + fo) + fo for fi, fo in linear_shapes(base.config))  # + a magnitude per output
        return per_block * dims(base.config)["layers"]
