"""QLoRA: LoRA on a 4-bit NF4 base with double quantization and a paged optimizer
(Dettmers et al., 2023, arXiv:2305.14314), via bitsandbytes and peft.

The base model is loaded quantized (NormalFloat4, with its quantization constants quantized
again), LoRA adapters train in higher precision on top, and the optimizer's states are paged to
CPU memory under GPU memory pressure. bitsandbytes runs 4-bit on CPU too; paging needs CUDA, so on
CPU the optimizer is plain AdamW. ``merge`` de-quantizes the base and folds the adapters in,
giving a plain model (hand-written: peft's merge re-quantizes the merged weights to 4 bits).
"""

from __future__ import annotations

import logging
from typing import Literal

import torch
from peft import get_peft_model, prepare_model_for_kbit_training
from peft.tuners.lora import LoraLayer
from torch import nn
from transformers import BitsAndBytesConfig

from peftflow.methods import lora, register
from peftflow.methods._shared import check_targets

log = logging.getLogger(__name__)
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class Params(lora.Params):
    name: Literal["qlora"] = "qlora"
    quant_type: Literal["nf4", "fp4"] = "nf4"
    double_quant: bool = True  # quantize the quantization constants too (~0.4 bit/param saved)
    compute_dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"  # auto: bf16 on CUDA, fp32 on CPU
    paged_optimizer: bool = True  # paged AdamW on CUDA


def _compute_dtype(params: Params) -> torch.dtype:
    if params.compute_dtype == "auto":
        return torch.bfloat16 if torch.cuda.is_available() else torch.float32
    return _DTYPES[params.compute_dtype]


def _dense_weight(layer: nn.Module) -> torch.Tensor:
    import bitsandbytes as bnb

    weight = layer.weight
    if isinstance(layer, bnb.nn.Linear4bit):
        return bnb.functional.dequantize_4bit(weight.data, weight.quant_state).float()
    return weight.data.float()


def _dense(weight: torch.Tensor, bias: torch.Tensor | None) -> nn.Linear:
    dense = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None, device=weight.device)
    dense.weight.copy_(weight)
    if bias is not None:
        dense.bias.copy_(bias.float())
    return dense


@register
class QLoRA(lora.LoRA):
    Params = Params
    quantizes_base = True

    def load_kwargs(self, params: Params) -> dict:
        return {
            "quantization_config": BitsAndBytesConfig(
                load_in_4bit=True,
                bnb_4bit_quant_type=params.quant_type,
                bnb_4bit_use_double_quant=params.double_quant,
                bnb_4bit_compute_dtype=_compute_dtype(params),
            )
        }

    def apply(self, model: nn.Module, params: Params) -> nn.Module:
        check_targets(model, params.name, "target_modules", params.target_modules)
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
        return get_peft_model(model, lora.lora_config(params, model))

    def unsupported(self, strategy: str, params: Params) -> str | None:
        if strategy in ("fsdp", "deepspeed"):
            return (
                "sharding 4-bit bitsandbytes weights needs their quant_storage dtype to equal the compute dtype, "
                "which peftflow does not configure; use ddp (each process holds the 4-bit base) or lora with fsdp"
            )
        return None

    def optimizer(self, trainable, lr: float, weight_decay: float, params: Params) -> torch.optim.Optimizer:
        if params.paged_optimizer and torch.cuda.is_available():
            import bitsandbytes as bnb

            return bnb.optim.PagedAdamW(trainable, lr=lr, weight_decay=weight_decay)
        if params.paged_optimizer:
            log.info("qlora: paged optimizers need CUDA; using AdamW on CPU")
        return torch.optim.AdamW(trainable, lr=lr, weight_decay=weight_decay)

    @torch.no_grad()
    def merge(self, model) -> nn.Module:
        """De-quantize every 4-bit layer, add the LoRA updates where there are any, return a plain fp32 model."""
        import bitsandbytes as bnb

        base = model.get_base_model()
        for name, module in list(base.named_modules()):
            if isinstance(module, LoraLayer):
                inner = module.get_base_layer()
                weight = _dense_weight(inner)
                for adapter in module.active_adapters:
                    weight += module.get_delta_weight(adapter).float()
            elif isinstance(module, bnb.nn.Linear4bit) and not name.endswith("base_layer"):
                inner, weight = module, _dense_weight(module)  # not adapted, but quantized all the same
            else:
                continue
            parent, _, child = name.rpartition(".")
            setattr(base.get_submodule(parent), child, _dense(weight, inner.bias))
        for attr in ("is_loaded_in_4bit", "is_quantized"):
            if hasattr(base, attr):
                setattr(base, attr, False)
        base.hf_quantizer = None
        if hasattr(base.config, "quantization_config"):
            del base.config.quantization_config
        return base.float()
