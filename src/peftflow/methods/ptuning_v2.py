"""P-tuning v2: deep prompts, trained virtual tokens at every layer (Liu et al., 2022,
arXiv:2110.07602), via peft's prefix tuning.

How it differs from ``prefix``: the mechanism is the same (virtual keys and values in every
layer's attention), but P-tuning v2 trains the per-layer prompts directly, with no MLP
reparameterization by default (the paper found it unnecessary or harmful on some tasks), and was
proposed for understanding tasks at every model scale. Set ``prefix_projection: true`` to compare.

``init: text`` (default) starts the prompts from the keys and values of ``init_text`` (see
:func:`peftflow.methods._deep_prompts.init_from_text`); ``random`` keeps peft's N(0, 1) draw.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator
from torch import nn

from peftflow.methods import MethodParams, register
from peftflow.methods._deep_prompts import DEFAULT_INIT_TEXT, DeepPrompts, init_from_text


class Params(MethodParams):
    name: Literal["ptuning_v2"] = "ptuning_v2"
    num_virtual_tokens: int = Field(20, ge=1)  # prompt length, per layer
    prefix_projection: bool = False  # the difference from `prefix`: no MLP by default
    encoder_hidden_size: int = Field(512, ge=1)  # used only with prefix_projection
    init: Literal["text", "random"] = "text"  # text: the model's own keys/values for init_text
    init_text: str = DEFAULT_INIT_TEXT

    @model_validator(mode="after")
    def _init_needs_direct_prompts(self) -> Params:
        if self.init == "text" and self.prefix_projection:
            raise ValueError("init: text sets the prompts directly; with prefix_projection: true use init: random")
        return self


@register
class PTuningV2(DeepPrompts):
    Params = Params

    def apply(self, model: nn.Module, params: Params) -> nn.Module:
        peft_model = super().apply(model, params)
        if params.init == "text":
            init_from_text(peft_model, params.init_text)
        return peft_model
