"""Helpers several methods share: finding layers, checking targets, and the closed-form geometry of
a Llama block that the methods' ``expected_trainable`` counts use."""

from __future__ import annotations

from torch import nn

from peftflow.methods import Method


def linear_names(model: nn.Module) -> list[str]:
    """Leaf names of the model's linear layers (what target_modules may name)."""
    return sorted({name.rsplit(".", 1)[-1] for name, m in model.named_modules() if isinstance(m, nn.Linear)})


def check_targets(model: nn.Module, method: str, field: str, targets: str | list[str]) -> None:
    """Fail before training, naming what the model offers, if a target module is not in the model."""
    if targets == "all-linear":
        return
    offered = linear_names(model)
    missing = [t for t in targets if t not in offered]
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
