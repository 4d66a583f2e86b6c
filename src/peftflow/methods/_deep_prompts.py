"""Deep prompts (virtual keys and values at every layer), shared by ``prefix`` and ``ptuning_v2``:
peft's prefix-tuning config, the text initialization and the closed-form trainable count.

:func:`init_from_text` is written here because peft offers text initialization for input-level
prompts only: the keys and values the frozen model computes for ``init_text`` at positions
0..n-1, which is where peft's prefix sits (the input tokens follow at positions n, n+1, ...).

:func:`prefix_through_kwargs` is written here because peft 0.21 hands a sequence classifier its
prefix only if the classifier's ``forward`` names a ``past_key_values`` parameter: transformers 5's
encoders (BERT, RoBERTa) take it through ``**kwargs`` (renamed ``cache``, the old name still
accepted), which peft does not see, and it raises "Model does not support past key values".
"""

from __future__ import annotations

import inspect
import types

import torch
from peft import PeftModelForSequenceClassification, PrefixTuningConfig, get_peft_model
from torch import nn
from transformers import AutoTokenizer, DynamicCache

from peftflow.methods import Method
from peftflow.methods._shared import dims, peft_task

DEFAULT_INIT_TEXT = "Classify the sentiment of this movie review as positive or negative."


def prefix_config(model: nn.Module, num_virtual_tokens: int, projection: bool, encoder_hidden_size: int):
    return PrefixTuningConfig(
        **peft_task(model),
        num_virtual_tokens=num_virtual_tokens,
        prefix_projection=projection,
        encoder_hidden_size=encoder_hidden_size,
    )


def _takes_cache(model: nn.Module) -> bool:
    """Whether the model's transformer (its backbone) takes past keys and values, where a prefix goes."""
    parameters = inspect.signature(model.base_model.forward).parameters
    return "past_key_values" in parameters or "cache" in parameters


def prefix_through_kwargs(peft_model: nn.Module) -> None:
    """For a classifier whose ``forward`` takes the prefix through ``**kwargs`` only (see the module's
    docstring), give this peft model a prefix forward that passes it so; a no-op for other models."""
    if not isinstance(peft_model, PeftModelForSequenceClassification):
        return
    parameters = inspect.signature(peft_model.base_model.forward).parameters
    if "past_key_values" in parameters or not any(p.kind is p.VAR_KEYWORD for p in parameters.values()):
        return

    def forward(self, input_ids=None, attention_mask=None, inputs_embeds=None, labels=None, **kwargs):
        batch = (input_ids if input_ids is not None else inputs_embeds).shape[0]
        given = {k: v for k, v in kwargs.items() if v is not None}
        return self.base_model(input_ids=input_ids, attention_mask=attention_mask, inputs_embeds=inputs_embeds,
                               labels=labels, past_key_values=self.get_prompt(batch), **given)  # fmt: skip

    peft_model._prefix_tuning_forward = types.MethodType(forward, peft_model)


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
        if not _takes_cache(model):
            raise ValueError(
                f"method {self.name}: {type(model).__name__}'s attention takes no past keys and values, so there is no "
                f"place for a per-layer prefix; use prompt or ptuning (input-level soft prompts) or a weight method"
            )
        config = prefix_config(model, params.num_virtual_tokens, params.prefix_projection, params.encoder_hidden_size)
        peft_model = get_peft_model(model, config)
        prefix_through_kwargs(peft_model)
        return peft_model

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
    cache = DynamicCache(config=base.config)  # filled by the forward pass, encoders' too
    base(input_ids=torch.tensor([ids], device=embedding.device), past_key_values=cache, use_cache=True)
    base.train(was_training)
    # peft reads row t as [layer 0 keys, layer 0 values, layer 1 keys, ...], each heads x head_dim
    rows = [torch.cat([layer.keys[0], layer.values[0]], dim=0) for layer in cache.layers]  # (2*heads, n, d)
    flat = torch.cat(rows, dim=0).permute(1, 0, 2).reshape(n, -1)
    if flat.shape != embedding.shape:
        raise ValueError(f"init_from_text: computed keys/values {tuple(flat.shape)}, prefix {tuple(embedding.shape)}")
    embedding.copy_(flat.to(embedding.dtype))
