"""Full fine-tuning: every weight of the base model is trained (the baseline PEFT methods are measured against)."""

from __future__ import annotations

from typing import Literal

from torch import nn

from peftflow.methods import MethodParams


class Params(MethodParams):
    name: Literal["full"] = "full"


def apply(model: nn.Module, params: Params) -> nn.Module:
    for p in model.parameters():
        p.requires_grad_(True)
    return model
