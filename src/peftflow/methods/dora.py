"""DoRA: weight-decomposed LoRA (Liu et al., 2024, arXiv:2402.09353), via peft.

W is split into a magnitude vector m and a direction V; LoRA's B·A updates the direction and m
is trained too: W' = m · (V + B·A) / ||V + B·A||. Same knobs as LoRA; mergeable like LoRA.
"""

from __future__ import annotations

from typing import Literal

from peft import get_peft_model
from torch import nn

from peftflow.methods import lora


class Params(lora.Params):
    name: Literal["dora"] = "dora"


def apply(model: nn.Module, params: Params) -> nn.Module:
    lora.check_targets(model, params.name, "target_modules", params.target_modules)
    return get_peft_model(model, lora.lora_config(params, use_dora=True))


merge = lora.merge
