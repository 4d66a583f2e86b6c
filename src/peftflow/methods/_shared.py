"""Helpers several methods share: finding layers, checking targets, a sequence classifier's head,
and the closed-form geometry of a Llama block that the methods' ``expected_trainable`` counts use.

A sequence classifier (``model.task: sequence_classification``) is a backbone under a new
classification head. Every method trains that head beside what it trains of its own: peft's
through its ``SEQ_CLS`` task type (the head as ``modules_to_save``, saved with the adapter), the
hand-written methods by marking it trainable, so their artifacts hold it too.
"""

from __future__ import annotations

from typing import Any

from torch import nn
from transformers.models.auto.modeling_auto import MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES

from peftflow.methods import Method

_CLASSIFIERS = frozenset(MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES.values())


def is_classifier(model: nn.Module) -> bool:
    """Whether ``model`` is one of transformers' sequence classifiers (``...ForSequenceClassification``)."""
    return type(model).__name__ in _CLASSIFIERS


def head_modules(model: nn.Module) -> list[str]:
    """The modules a sequence classifier adds to its backbone (``classifier`` on BERT, ``pre_classifier``
    and ``classifier`` on DistilBERT, ``score`` on Llama): its children with weights, other than the
    backbone (``base_model_prefix``). Empty for any other model."""
    if not is_classifier(model):
        return []
    backbone = getattr(model, "base_model_prefix", "")
    return [n for n, m in model.named_children() if n != backbone and any(True for _ in m.parameters())]


def train_head(model: nn.Module) -> None:
    """Make a sequence classifier's head trainable (a no-op for other models)."""
    for name in head_modules(model):
        model.get_submodule(name).requires_grad_(True)


def peft_task(model: nn.Module) -> dict[str, Any]:
    """The task arguments of a peft config for ``model``: a causal LM's, or a classifier's with its
    head trained and saved beside the adapter."""
    head = head_modules(model)
    return {"task_type": "SEQ_CLS", "modules_to_save": head} if head else {"task_type": "CAUSAL_LM"}


def linear_names(model: nn.Module) -> list[str]:
    """Leaf names of the model's linear layers (what target_modules may name)."""
    return sorted({name.rsplit(".", 1)[-1] for name, m in model.named_modules() if isinstance(m, nn.Linear)})


def check_targets(model: nn.Module, method: str, field: str, targets: str | list[str]) -> None:
    """Fail before training, naming what the model offers, if a target module is not in the model
    (a target is a module's name or the end of its dotted path, e.g. ``output.dense``, as in peft)."""
    if targets in ("all-linear", "auto"):
        return
    offered = linear_names(model)
    names = [name for name, m in model.named_modules() if isinstance(m, nn.Linear)]
    missing = [t for t in targets if not any(n == t or n.endswith("." + t) for n in names)]
    if missing:
        raise ValueError(
            f"method {method}: {field}: {', '.join(missing)} not in the model; "
            f"its linear layers are: {', '.join(offered)}"
        )


def decoder_blocks(model: nn.Module) -> nn.ModuleList:
    """The model's stack of transformer blocks (the ModuleList as long as num_hidden_layers)."""
    n = getattr(model.config, "num_hidden_layers", None)
    for module in model.modules():
        if isinstance(module, nn.ModuleList) and len(module) == n:
            return module
    raise ValueError(f"could not find the {n} transformer blocks of {type(model).__name__}")


def dims(config) -> dict[str, int]:
    """Hidden (h), FFN (i), query (q) and key/value (kv) widths and the layer count of a Llama config."""
    head_dim = config.hidden_size // config.num_attention_heads
    return {
        "h": config.hidden_size,
        "i": config.intermediate_size,
        "q": config.num_attention_heads * head_dim,
        "kv": config.num_key_value_heads * head_dim,
        "layers": config.num_hidden_layers,
    }


def linear_shapes(config) -> list[tuple[int, int]]:
    """(fan_in, fan_out) of every linear layer in one Llama block: q k v o gate up down."""
    d = dims(config)
    h, i, q, kv = d["h"], d["i"], d["q"], d["kv"]
    return [(h, q), (h, kv), (h, kv), (q, h), (h, i), (h, i), (i, h)]


def all_params(model: nn.Module) -> int:
    """Parameters of a model, tied weights counted once."""
    return sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())


class PeftWeightAdapter(Method):
    """A peft adapter over the base's weights (LoRA and its kin, IA3): added tensors that switch
    off to give the base model, and fold into it with peft's ``merge_and_unload``."""

    trains = "added weights"
    weight_adapter = True

    def merge(self, model) -> nn.Module:
        return model.merge_and_unload()
