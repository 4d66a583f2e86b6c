"""Prefix tuning: trained virtual keys and values prepended at every layer (Li & Liang, 2021,
arXiv:2101.00190), via peft.

Li & Liang train the prefix through an MLP reparameterization (a small embedding expanded by a
two-layer MLP into every layer's keys and values), which they found more stable; after training
only the resulting prefix is kept. ``ptuning_v2`` is the same mechanism without the MLP.

Initialization matters for deep prompts. peft draws the directly trained prefix (no MLP) from
N(0, 1): on SmolLM2-135M that puts random keys and values in all 30 layers and the untrained model's
test loss goes from 1.8 to 12.3, from which 40 steps did not recover (54.8% accuracy). Li & Liang
initialize the prefix with the activations of real words instead, as ``ptuning_v2`` does (see
:func:`peftflow.methods._deep_prompts.init_from_text`).
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from peftflow.methods import MethodParams, register
from peftflow.methods._deep_prompts import DeepPrompts


class Params(MethodParams):
    name: Literal["prefix"] = "prefix"
    num_virtual_tokens: int = Field(20, ge=1)  # prefix length, per layer
    prefix_projection: bool = True  # train through an MLP (Li & Liang's reparameterization)
    encoder_hidden_size: int = Field(512, ge=1)  # the MLP's inner width


@register
class PrefixTuning(DeepPrompts):
    Params = Params
