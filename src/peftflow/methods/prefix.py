"""Prefix tuning: trained virtual keys and values prepended at every layer (Li & Liang, 2021,
arXiv:2101.00190), via peft.

Li & Liang train the prefix through an MLP reparameterization (a small embedding expanded by a
two-layer MLP into every layer's keys and values), which they found more stable; after training
only the resulting prefix is kept. ``ptuning_v2`` is the same mechanism without the MLP.

Initialization matters for deep prompts. peft draws the directly trained prefix (no MLP) from
N(0, 1): on SmolLM2-135M that puts random keys and values in all 30 layers and the untrained model's
test loss goes from 1.8 to 12.3, from which 40 steps did not recover (54.8% accuracy). Li & Liang
initialize the prefix with the activations of real words instead; :func:`init_from_text` does that
(written here because peft offers text initialization for input-level prompts only): the keys and
values the frozen model computes for ``init_text`` at positions 0..n-1, which is where peft's
prefix sits (the input tokens follow at positions n, n+1, ...).
"""

from __future__ import annotations

from typing import Literal

import torch
from peft import PrefixTuningConfig, get_peft_model
from pydantic import Field
from torch import nn
from transformers import AutoTokenizer

from peftflow.methods import MethodParams

DEFAULT_INIT_TEXT = "Classify the sentiment of this movie review as positive or negative."


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


@torch.no_grad()
def init_from_text(peft_model, text: str) -> None:
    """Set a directly trained prefix (no MLP) to the keys and values the frozen model computes for
    ``text``, repeated or cut to the prefix length. The tokenizer is the one saved beside the base
    checkpoint (read from disk, as prompt tuning's text init does)."""
    config = peft_model.peft_config["default"]
    if config.prefix_projection:
        raise ValueError("init_from_text: the prefix is trained through an MLP; only a direct prefix can be set")
    n = config.num_virtual_tokens
    tokenizer = AutoTokenizer.from_pretrained(peft_model.base_model.name_or_path)
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    if not ids:
        raise ValueError("init_text: empty after tokenization")
    ids = (ids * (n // len(ids) + 1))[:n]
    embedding = peft_model.prompt_encoder["default"].embedding.weight
    base = peft_model.get_base_model()
    was_training = base.training
    base.eval()
    cache = base(input_ids=torch.tensor([ids], device=embedding.device), use_cache=True).past_key_values
    base.train(was_training)
    # peft reads row t as [layer 0 keys, layer 0 values, layer 1 keys, ...], each heads x head_dim
    rows = [torch.cat([layer.keys[0], layer.values[0]], dim=0) for layer in cache.layers]  # (2*heads, n, d)
    flat = torch.cat(rows, dim=0).permute(1, 0, 2).reshape(n, -1)
    if flat.shape != embedding.shape:
        raise ValueError(f"init_from_text: computed keys/values {tuple(flat.shape)}, prefix {tuple(embedding.shape)}")
    embedding.copy_(flat.to(embedding.dtype))
