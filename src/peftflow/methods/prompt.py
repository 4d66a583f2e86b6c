"""Prompt tuning: a trained soft prompt prepended at the input only (Lester et al., 2021,
arXiv:2104.08691), via peft.

The soft prompt is initialized from the embeddings of a text (Lester et al. found text or class
label initialization better than random) or at random.
"""

from __future__ import annotations

from typing import Literal

from peft import PromptTuningConfig, PromptTuningInit, get_peft_model
from pydantic import Field
from torch import nn

from peftflow.methods import Method, MethodParams, register
from peftflow.methods._shared import dims, peft_task


class Params(MethodParams):
    name: Literal["prompt"] = "prompt"
    num_virtual_tokens: int = Field(20, ge=1)  # soft prompt length
    init: Literal["text", "random"] = "text"
    init_text: str = "Classify the sentiment of this movie review as positive or negative."


@register
class PromptTuning(Method):
    Params = Params
    trains = "prompts"

    def apply(self, model: nn.Module, params: Params) -> nn.Module:
        text = params.init == "text"
        config = PromptTuningConfig(
            **peft_task(model),
            num_virtual_tokens=params.num_virtual_tokens,
            prompt_tuning_init=PromptTuningInit.TEXT if text else PromptTuningInit.RANDOM,
            prompt_tuning_init_text=params.init_text if text else None,
            # the tokenizer saved beside the base checkpoint; read from disk, never downloaded
            tokenizer_name_or_path=model.name_or_path if text else None,
        )
        return get_peft_model(model, config)

    def input_virtual_tokens(self, params: Params) -> int:
        return params.num_virtual_tokens

    def expected_trainable(self, base: nn.Module, params: Params) -> int | None:
        return params.num_virtual_tokens * dims(base.config)["h"]
