"""Prefix tuning: trained virtual keys and values prepended at every layer (Li & Liang, 2021,
arXiv:2101.00190), via peft.

Li & Liang train the prefix through an MLP reparameterization (a small embedding expanded by a
two-layer MLP into every layer's keys and values), which they found more stable; after training
only the resulting prefix is kept. ``ptuning_v2`` is the same mechanism without the MLP.
"""

from __future__ import annotations

from typing import Literal

from peft import PrefixTuningConfig, get_peft_model
from pydantic import Field
from torch import nn

from peftflow.methods import MethodParams


class Params(MethodParams):
    name: Literal["prefix"] = "prefix"
    num_virtual_tokens: int = Field(20, ge=1)  # prefix length, per layer
    prefix_projection: bool = True  # train through an MLP (Li & Liang's reparameterization)
    encoder_hidden_size: int = Field(512, ge=1)  # the MLP's inner width


def prefix_config(num_virtual_tokens: int, projection: bool, encoder_hidden_size: int) -> PrefixTuningConfig:
    return PrefixTuningConfig(
        task_type="CAUSAL_LM",
        num_virtual_tokens=num_virtual_tokens,
        prefix_projection=projection,
        encoder_hidden_size=encoder_hidden_size,
    )


def apply(model: nn.Module, params: Params) -> nn.Module:
    config = prefix_config(params.num_virtual_tokens, params.prefix_projection, params.encoder_hidden_size)
    return get_peft_model(model, config)
