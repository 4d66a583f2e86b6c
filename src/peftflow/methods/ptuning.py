"""P-tuning (v1): virtual tokens produced by a trained prompt encoder, an MLP or a bidirectional
LSTM, and inserted at the input (Liu et al., 2021, "GPT Understands, Too", arXiv:2103.10385),
via peft.
"""

from __future__ import annotations

from typing import Literal

from peft import PromptEncoderConfig, get_peft_model
from pydantic import Field
from torch import nn

from peftflow.methods import Method, MethodParams, register
from peftflow.methods._shared import dims, peft_task


class Params(MethodParams):
    name: Literal["ptuning"] = "ptuning"
    num_virtual_tokens: int = Field(20, ge=1)
    encoder: Literal["mlp", "lstm"] = "mlp"  # the prompt encoder
    encoder_hidden_size: int = Field(128, ge=1)
    encoder_num_layers: int = Field(2, ge=1)  # LSTM layers (the MLP always has two)
    encoder_dropout: float = Field(0.0, ge=0, lt=1)


@register
class PTuning(Method):
    Params = Params
    trains = "prompts"

    def apply(self, model: nn.Module, params: Params) -> nn.Module:
        config = PromptEncoderConfig(
            **peft_task(model),
            num_virtual_tokens=params.num_virtual_tokens,
            encoder_reparameterization_type=params.encoder.upper(),
            encoder_hidden_size=params.encoder_hidden_size,
            encoder_num_layers=params.encoder_num_layers,
            encoder_dropout=params.encoder_dropout,
        )
        return get_peft_model(model, config)

    def input_virtual_tokens(self, params: Params) -> int:
        return params.num_virtual_tokens

    def expected_trainable(self, base: nn.Module, params: Params) -> int | None:
        if params.encoder != "mlp":
            return None
        h, e = dims(base.config)["h"], params.encoder_hidden_size  # embedding + Linear(h,e) + Linear(e,e) + Linear(e,h)
        return params.num_virtual_tokens * h + (h * e + e) + (e * e + e) + (e * h + h)
