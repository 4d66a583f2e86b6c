"""(IA)³: learned vectors that rescale attention keys, values and the FFN's inner activations
(Liu et al., 2022, "Few-Shot Parameter-Efficient Fine-Tuning is Better and Cheaper than In-Context
Learning", arXiv:2205.05638), via peft.

Scaling vectors start at one (the base model). On k and v the vector scales the layer's outputs;
on a feed-forward module (``feedforward_modules``) it scales the inputs. Mergeable. ``auto`` targets
are peft's defaults for the model's architecture (Llama: k_proj, v_proj and down_proj, scaled on
its input; BERT: key, value and output.dense).
"""

from __future__ import annotations

from typing import Literal

from peft import IA3Config, get_peft_model
from peft.utils.constants import (
    TRANSFORMERS_MODELS_TO_IA3_FEEDFORWARD_MODULES_MAPPING as FEEDFORWARD,
)
from peft.utils.constants import (
    TRANSFORMERS_MODELS_TO_IA3_TARGET_MODULES_MAPPING as TARGETS,
)
from pydantic import model_validator
from torch import nn

from peftflow.methods import MethodParams, register
from peftflow.methods._shared import PeftWeightAdapter, check_targets, dims, peft_task


class Params(MethodParams):
    name: Literal["ia3"] = "ia3"
    # auto: peft's defaults for the architecture; or module names (or dotted ends of their paths)
    target_modules: Literal["auto"] | list[str] = "auto"
    feedforward_modules: Literal["auto"] | list[str] = "auto"  # of target_modules: scaled on their input

    @model_validator(mode="after")
    def _ff_subset(self) -> Params:
        if (self.target_modules == "auto") != (self.feedforward_modules == "auto"):
            raise ValueError("target_modules and feedforward_modules: set both to auto or list both")
        if self.target_modules == "auto":
            return self
        stray = [m for m in self.feedforward_modules if m not in self.target_modules]
        if stray:
            raise ValueError(f"feedforward_modules must be among target_modules; not targeted: {', '.join(stray)}")
        return self


@register
class IA3(PeftWeightAdapter):
    Params = Params

    def apply(self, model: nn.Module, params: Params) -> nn.Module:
        targets, feedforward = _targets(model, params)
        check_targets(model, params.name, "target_modules", targets)
        config = IA3Config(**peft_task(model), target_modules=targets, feedforward_modules=feedforward)
        return get_peft_model(model, config)

    def expected_trainable(self, base: nn.Module, params: Params) -> int | None:
        if _targets(base, params) != (["k_proj", "v_proj", "down_proj"], ["down_proj"]):
            return None
        d = dims(base.config)
        return (d["kv"] + d["kv"] + d["i"]) * d["layers"]  # k, v outputs; down_proj's input


def _targets(model: nn.Module, params: Params) -> tuple[list[str], list[str]]:
    """(target_modules, feedforward_modules), ``auto`` read from peft's table for the model's type."""
    if params.target_modules != "auto":
        return params.target_modules, params.feedforward_modules
    kind = model.config.model_type
    if kind not in TARGETS:
        raise ValueError(
            f"method ia3: target_modules: auto: peft has no default for {kind} models; list target_modules and "
            f"feedforward_modules (the key and value projections and the FFN's output projection)"
        )
    return list(TARGETS[kind]), list(FEEDFORWARD[kind])
