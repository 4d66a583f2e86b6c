"""BitFit: train only the bias terms (Ben Zaken et al., 2022, arXiv:2106.10199).

Llama-family models have no biases. For them, zero-initialized biases are added to the targeted
linear layers (so training starts at the base model) and only those train; the run's log says so.
Encoders (BERT) have them: every bias term trains, LayerNorm's included, and nothing is added. On a
sequence classifier the new classification head trains too, as in the paper.
A model left with nothing to train is an error, never a silent no-op. Written by hand: peft has
no BitFit.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Literal

import torch
from pydantic import Field
from safetensors.torch import load_file, save_file
from torch import nn

from peftflow.methods import Method, MethodParams, register
from peftflow.methods._shared import check_targets, dims, head_modules, linear_shapes, train_head

log = logging.getLogger(__name__)
WEIGHTS = "bias_model.safetensors"


class Params(MethodParams):
    name: Literal["bitfit"] = "bitfit"
    # models without biases: which linear layers get new zero-initialized ones (never the output head)
    target_modules: Literal["all-linear"] | list[str] = "all-linear"
    add_missing: bool = Field(True)  # False: a bias-less model is an error


def _targets(model: nn.Module, params: Params) -> list[tuple[str, nn.Linear]]:
    head = model.get_output_embeddings()
    classifier = tuple(f"{n}." for n in head_modules(model))
    return [
        (name, m)
        for name, m in model.named_modules()
        if isinstance(m, nn.Linear)
        and m is not head
        and not f"{name}.".startswith(classifier)
        and (params.target_modules == "all-linear" or name.rsplit(".", 1)[-1] in params.target_modules)
    ]


@register
class BitFit(Method):
    Params = Params
    trains = "added weights"  # the base's own biases where it has them, else new zero-initialized ones

    def apply(self, model: nn.Module, params: Params) -> nn.Module:
        model.requires_grad_(False)
        classifier = tuple(f"{n}." for n in head_modules(model))
        existing = [p for n, p in model.named_parameters() if n.endswith(".bias") and not n.startswith(classifier)]
        train_head(model)
        if existing:
            for p in existing:
                p.requires_grad_(True)
            return model
        if not params.add_missing:
            raise ValueError("method bitfit: add_missing: the model has no bias terms, so nothing would train")
        check_targets(model, params.name, "target_modules", params.target_modules)
        targets = _targets(model, params)
        for _, linear in targets:
            w = linear.weight
            linear.bias = nn.Parameter(torch.zeros(linear.out_features, device=w.device, dtype=w.dtype))
        kinds = sorted({name.rsplit(".", 1)[-1] for name, _ in targets})
        log.warning(
            "bitfit: %s has no bias terms; added zero-initialized biases to %d linear layers (%s) "
            "and trains only those",
            type(model).__name__,
            len(targets),
            ", ".join(kinds),
        )
        return model

    def save(self, model: nn.Module, out_dir: Path) -> None:
        out_dir.mkdir(parents=True, exist_ok=True)
        save_file(
            {n: p.detach().cpu().contiguous() for n, p in model.named_parameters() if p.requires_grad},
            out_dir / WEIGHTS,
        )

    def load(self, base: nn.Module, out_dir: Path, params: Params) -> nn.Module:
        model = self.apply(base, params)
        weights = load_file(out_dir / WEIGHTS)
        expected = {n for n, p in model.named_parameters() if p.requires_grad}
        if set(weights) != expected:
            raise ValueError(
                f"{out_dir}: bias weights do not fit this base model ({len(weights)} saved, {len(expected)} expected)"
            )
        model.load_state_dict(weights, strict=False)
        return model

    def expected_trainable(self, base: nn.Module, params: Params) -> int | None:
        if params.target_modules != "all-linear":
            return None
        return sum(fo for _, fo in linear_shapes(base.config)) * dims(base.config)["layers"]
