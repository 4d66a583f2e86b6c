"""P-tuning (v1): virtual tokens produced by a trained prompt encoder, an MLP or a bidirectional
LSTM, and inserted at the input (Liu et al., 2021, "GPT Understands, Too", arXiv:2103.10385),
via peft.
"""

from __future__ import annotations

from typing import Literal

from peft import PromptEncoderConfig, get_peft_model
from pydantic import Field
from torch import nn

from peftflow.methods import MethodParams


class Params(MethodParams):
    name: Literal["ptuning"] = "ptuning"
    num_virtual_tokens: int = Field(20, ge=1)
    encoder: Literal["mlp", "lstm"] = "mlp"  # the prompt encoder
    encoder_hidden_size: int = Field(128, ge=1)
    encoder_num_layers: int = Field(2, ge=1)  # LSTM layers (the MLP always has two)
    encoder_dropout: float = Field(0.0, ge=0, lt=1)


def apply(model: nn.Module, params: Params) -> nn.Module:
    config = PromptEncoderConfig(
        task_type="CAUSAL_LM",
        num_virtual_tokens=params.num_virtual_tokens,
        encoder_reparameterization_type=params.encoder.upper(),
        encoder_hidden_size=params.encoder_hidden_size,
        encoder_num_layers=params.encoder_num_layers,
        encoder_dropout=params.encoder_dropout,
    )
    return get_peft_model(model, config)
