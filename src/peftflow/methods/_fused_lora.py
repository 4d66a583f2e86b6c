"""A fused forward for peft's LoRA linear layers: the same adapter, fewer passes over the activations.

peft's ``lora.Linear`` computes ``result + lora_B(lora_A(dropout(x))) * scaling`` and, under
autocast, first casts ``x`` to the adapter's fp32 dtype (which autocast then casts back for the
matmul). On a CPU, where a small model's step is bound by memory traffic rather than FLOPs, each
of those is a full pass over an (tokens x width) tensor, seven times per decoder block: the cast,
the ``* scaling``, the ``+``, and their backward. Here the update is one ``addmm``:
``addmm(result, lora_A(dropout(x)), B^T, alpha=scaling)``, with no cast under autocast (the values
it would compute are the same: bf16 -> fp32 -> bf16 is exact).

Hand-written because peft has no fused path for this (its ``lora.Linear`` is the general one:
several adapters, mixed batches, variants such as DoRA). What changes is only the class of each
plain LoRA linear (:class:`FusedLinear` subclasses peft's), so the adapter's parameters, names,
saved files, ``merge_and_unload`` and ``disable_adapter`` are peft's own; anything else (DoRA,
several active adapters, merged weights, an adapter switched off, a ``lora_bias``) takes peft's
forward unchanged. Dropout is peft's module, called as peft calls it, so the random masks match too.
"""

from __future__ import annotations

import torch
from peft.tuners.lora import layer as lora_layer
from torch import nn


class FusedLinear(lora_layer.Linear):
    """peft's LoRA ``Linear`` with the single-adapter, unmerged case computed as one ``addmm``."""

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        name = self._plain_adapter(x, args, kwargs)
        if name is None:
            return super().forward(x, *args, **kwargs)
        result = self.base_layer(x)
        a, b = self.lora_A[name], self.lora_B[name]
        update_in = a(self.lora_dropout[name](x))  # (..., r)
        out = torch.addmm(
            result.reshape(-1, result.shape[-1]),
            update_in.reshape(-1, update_in.shape[-1]),
            b.weight.t(),
            alpha=self.scaling[name],
        )
        return out.view(result.shape)

    def _plain_adapter(self, x: torch.Tensor, args, kwargs) -> str | None:
        """The one active adapter when the fused path computes what peft's would, else None."""
        if args or kwargs or self.disable_adapters or self.merged or len(self.active_adapters) != 1:
            return None
        name = self.active_adapters[0]
        if name not in self.lora_A or name in self.lora_variant or self.lora_B[name].bias is not None:
            return None
        # without autocast, addmm needs one dtype for the base output, the input and the adapter
        if not torch.is_autocast_enabled(x.device.type):
            dtype = self.lora_A[name].weight.dtype
            if x.dtype != dtype or self.base_layer.weight.dtype != dtype:
                return None
        return name


def fuse(model: nn.Module) -> int:
    """Give every plain peft LoRA ``Linear`` in ``model`` the fused forward; returns how many."""
    n = 0
    for module in model.modules():
        if type(module) is lora_layer.Linear and isinstance(module.get_base_layer(), nn.Linear):
            module.__class__ = FusedLinear
            n += 1
    return n
