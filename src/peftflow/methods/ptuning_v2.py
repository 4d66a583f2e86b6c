"""P-tuning v2: deep prompts, trained virtual tokens at every layer (Liu et al., 2022,
arXiv:2110.07602), via peft's prefix tuning.

How it differs from ``prefix``: the mechanism is the same (virtual keys and values in every
layer's attention), but P-tuning v2 trains the per-layer prompts directly, with no MLP
reparameterization by default (the paper found it unnecessary or harmful on some tasks), and was
proposed for understanding tasks at every model scale. Set ``prefix_projection: true`` to compare.
"""

from __future__ import annotations

from typing import Literal

from peft import get_peft_model
from pydantic import Field
from torch import nn

from peftflow.methods import MethodParams
from peftflow.methods.prefix import prefix_config


class Params(MethodParams):
    name: Literal["ptuning_v2"] = "ptuning_v2"
    num_virtual_tokens: int = Field(20, ge=1)  # prompt length, per layer
    prefix_projection: bool = False  # the difference from `prefix`: no MLP by default
    encoder_hidden_size: int = Field(512, ge=1)  # used only with prefix_projection


def apply(model: nn.Module, params: Params) -> nn.Module:
    config = prefix_config(params.num_virtual_tokens, params.prefix_projection, params.encoder_hidden_size)
    return get_peft_model(model, config)
