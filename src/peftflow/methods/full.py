"""Full fine-tuning: every weight of the base model is trained (the baseline PEFT methods are measured against)."""

from __future__ import annotations

from typing import Literal

from torch import nn

from peftflow.methods import Method, MethodParams, register
from peftflow.methods._shared import all_params


class Params(MethodParams):
    name: Literal["full"] = "full"


@register
class Full(Method):
    Params = Params
    trains = "all weights"

    def apply(self, model: nn.Module, params: Params) -> nn.Module:
        for p in model.parameters():
            p.requires_grad_(True)
        return model

    def expected_trainable(self, base: nn.Module, params: Params) -> int | None:
        return all_params(base)
