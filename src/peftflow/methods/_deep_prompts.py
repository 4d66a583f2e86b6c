"""Deep prompts (virtual keys and values at every layer), shared by ``prefix`` and ``ptuning_v2``:
peft's prefix-tuning config, the text initialization and the closed-form trainable count.

:func:`init_from_text` is written here because peft offers text initialization for input-level
prompts only: the keys and values the frozen model computes for ``init_text`` at positions
0..n-1, which is where peft's prefix sits (the input tokens follow at positions n, n+1, ...).
"""

from __future__ import annotations

import torch
from peft import PrefixTuningConfig, get_peft_model
from torch import nn
from transformers import AutoTokenizer

from peftflow.methods import Method
from peftflow.methods._shared import dims

DEFAULT_INIT_TEXT = "Classify the sentiment of this movie review as positive or negative."


def prefix_config(num_virtual_tokens: int, projection: bool, encoder_hidden_size: int) -> PrefixTuningConfig:
    return PrefixTuningConfig(
        task_type="CAUSAL_LM",
        num_virtual_tokens=num_virtual_tokens,
        prefix_projection=projection,
        encoder_hidden_size=encoder_hidden_size,
    )


class DeepPrompts(Method):
    """Virtual keys and values at every layer, through peft's prefix tuning (``prefix``, ``ptuning_v2``)."""

    trains = "prompts"

    def apply(self, model: nn.Module, params) -> nn.Module:
        heads = ("num_attention_heads", "n_head", "num_heads")  # where peft looks for them
        if not any(getattr(model.config, key, None) for key in heads):
            raise ValueError(
                f"method {self.name}: the model ({model.config.model_type}) has no attention heads, so no keys and "
                f"values to prefix; use a method that trains weights (lora, ia3, ...) or prompt embeddings (prompt)"
            )
        config = prefix_config(params.num_virtual_tokens, params.prefix_projection, params.encoder_hidden_size)
        return get_peft_model(model, config)

    def expected_trainable(self, base: nn.Module, params) -> int | None:
        d = dims(base.config)
        width = d["layers"] * 2 * d["kv"]  # keys and values for every layer (GQA: kv heads only)
        if not params.prefix_projection:
            return params.num_virtual_tokens * width
        e = params.encoder_hidden_size  # embedding (n, kv) -> Linear(kv, e) -> tanh -> Linear(e, width)
        return params.num_virtual_tokens * d["kv"] + (d["kv"] * e + e) + (e * width + width)


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
