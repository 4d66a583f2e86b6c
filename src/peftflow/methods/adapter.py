"""Bottleneck adapters: down-projection, nonlinearity, zero-initialized up-projection and a residual,
inserted after a block's sublayers (Houlsby et al., 2019, arXiv:1902.00751: after attention and the
feed-forward network; Pfeiffer et al., 2021, arXiv:2005.00247: after the feed-forward network only).

Written by hand: the ``adapters`` library pins transformers 4.57 and peft has no bottleneck adapter.
Each adapter is a child module of the sublayer it follows (so it lives in the state dict), applied
by a forward hook; the up-projection starts at zero, so training starts at the base model.

Where a sublayer's output joins the residual stream depends on the architecture (:data:`LAYOUTS`):
a Llama block adds ``self_attn``'s and ``mlp``'s outputs to it; a BERT layer adds the output
projections ``attention.output.dense`` and ``output.dense`` inside its post-norm (as in Houlsby's
BERT experiments: adapter, then residual and LayerNorm); DistilBERT's ``attention`` and ``ffn``. On a
sequence classifier the new classification head trains (and is saved) with the adapters.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Literal

import torch
from pydantic import Field
from safetensors.torch import load_file, save_file
from torch import nn

from peftflow.methods import Method, MethodParams, register
from peftflow.methods._shared import decoder_blocks, dims, train_head

_ACTIVATIONS = {"relu": nn.ReLU, "gelu": nn.GELU, "silu": nn.SiLU}
WEIGHTS = "adapter_model.safetensors"
# (after attention, after the feed-forward network): the block's sublayers whose outputs join the residual stream
LAYOUTS = (
    ("self_attn", "mlp"),  # Llama, Qwen2, Mistral, ...
    ("attn", "mlp"),  # GPT-2
    ("attention.output.dense", "output.dense"),  # BERT, RoBERTa, ELECTRA
    ("attention", "ffn"),  # DistilBERT
)


class Params(MethodParams):
    name: Literal["adapter"] = "adapter"
    placement: Literal["houlsby", "pfeiffer"] = "houlsby"  # houlsby: after attention and FFN; pfeiffer: FFN only
    reduction_factor: int = Field(16, ge=1)  # bottleneck width = hidden size / reduction_factor
    activation: Literal["relu", "gelu", "silu"] = "relu"


class Bottleneck(nn.Module):
    def __init__(self, hidden: int, width: int, activation: str):
        super().__init__()
        self.down = nn.Linear(hidden, width)
        self.act = _ACTIVATIONS[activation]()
        self.up = nn.Linear(width, hidden)
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)

    def forward(self, h: torch.Tensor) -> torch.Tensor:  # (B, T, H) -> (B, T, H)
        return h + self.up(self.act(self.down(h)))


def _after(module: nn.Module, _inputs, output):
    if isinstance(output, tuple):  # attention returns (hidden, weights)
        return (module.adapter(output[0]), *output[1:])
    return module.adapter(output)


def _sublayers(block: nn.Module, placement: str) -> list[nn.Module]:
    names = set(dict(block.named_modules()))
    for attention, ffn in LAYOUTS:
        if attention in names and ffn in names:
            return [block.get_submodule(n) for n in ((attention, ffn) if placement == "houlsby" else (ffn,))]
    offered = ", ".join(n for n, _ in block.named_children())
    known = "; ".join(" + ".join(layout) for layout in LAYOUTS)
    raise ValueError(
        f"method adapter: {type(block).__name__} blocks have none of the known sublayer layouts ({known}); they have: "
        f"{offered}"
    )


@register
class Adapter(Method):
    Params = Params
    trains = "added weights"

    def apply(self, model: nn.Module, params: Params) -> nn.Module:
        model.requires_grad_(False)
        hidden = model.config.hidden_size
        width = max(1, hidden // params.reduction_factor)
        for block in decoder_blocks(model):
            for sub in _sublayers(block, params.placement):
                ref = next(sub.parameters())
                sub.adapter = Bottleneck(hidden, width, params.activation).to(device=ref.device, dtype=ref.dtype)
                sub.register_forward_hook(_after)
        train_head(model)
        return model

    def save(self, model: nn.Module, out_dir: Path) -> None:
        out_dir.mkdir(parents=True, exist_ok=True)
        weights = {n: p.detach().cpu().contiguous() for n, p in model.named_parameters() if p.requires_grad}
        save_file(weights, out_dir / WEIGHTS)
        (out_dir / "adapter_shapes.json").write_text(json.dumps({n: list(t.shape) for n, t in weights.items()}))

    def load(self, base: nn.Module, out_dir: Path, params: Params) -> nn.Module:
        model = self.apply(base, params)
        weights = load_file(out_dir / WEIGHTS)
        expected = {n for n, p in model.named_parameters() if p.requires_grad}  # adapters (and a classifier's head)
        if set(weights) != expected:
            raise ValueError(
                f"{out_dir}: adapter weights do not fit this base model "
                f"({len(weights)} saved, {len(expected)} expected)"
            )
        model.load_state_dict(weights, strict=False)
        return model

    def expected_trainable(self, base: nn.Module, params: Params) -> int | None:
        d = dims(base.config)
        w = d["h"] // params.reduction_factor
        per = (d["h"] * w + w) + (w * d["h"] + d["h"])
        return per * d["layers"] * (2 if params.placement == "houlsby" else 1)
