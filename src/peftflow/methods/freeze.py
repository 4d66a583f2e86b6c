"""Freeze: train only the last N transformer blocks (and optionally the output head), the cheap
baseline of layer-wise fine-tuning (e.g. Lee et al., 2019, "What Would Elsa Do? Freezing Layers
During Transformer Fine-Tuning", arXiv:1911.03090).

On models whose output head is tied to the input embeddings (SmolLM2 is), ``train_head`` trains the
shared embedding matrix too. A sequence classifier's head is new, so it always trains. The
artifact is the whole model, as for ``full``.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field
from torch import nn

from peftflow.methods import Method, MethodParams, register
from peftflow.methods._shared import decoder_blocks, dims, linear_shapes, train_head


class Params(MethodParams):
    name: Literal["freeze"] = "freeze"
    last_n_blocks: int = Field(2, ge=1)
    train_head: bool = False  # the output head and final norm (tied heads: the embeddings too)


@register
class Freeze(Method):
    Params = Params
    trains = "some weights"

    def apply(self, model: nn.Module, params: Params) -> nn.Module:
        blocks = decoder_blocks(model)
        if params.last_n_blocks > len(blocks):
            raise ValueError(
                f"method freeze: last_n_blocks: {params.last_n_blocks} exceeds the model's {len(blocks)} blocks"
            )
        model.requires_grad_(False)
        for block in blocks[-params.last_n_blocks :]:
            block.requires_grad_(True)
        train_head(model)  # a classifier's (new) head
        if params.train_head and model.get_output_embeddings() is not None:
            model.get_output_embeddings().requires_grad_(True)
            norm = getattr(getattr(model, "model", model), "norm", None)
            if norm is not None:
                norm.requires_grad_(True)
        return model

    def expected_trainable(self, base: nn.Module, params: Params) -> int | None:
        if params.train_head:
            return None
        per_block = sum(fi * fo for fi, fo in linear_shapes(base.config)) + 2 * dims(base.config)["h"]  # + 2 RMSNorms
        return per_block * params.last_n_blocks
