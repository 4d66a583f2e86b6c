"""(IA)³: learned vectors that rescale attention keys, values and the FFN's inner activations
(Liu et al., 2022, "Few-Shot Parameter-Efficient Fine-Tuning is Better and Cheaper than In-Context
Learning", arXiv:2205.05638), via peft.

Scaling vectors start at one (the base model). On k and v the vector scales the layer's outputs;
on a feed-forward module (``feedforward_modules``) it scales the inputs. Mergeable.
"""

from __future__ import annotations

from typing import Literal

from peft import IA3Config, get_peft_model
from pydantic import model_validator
from torch import nn

from peftflow.methods import MethodParams, register
from peftflow.methods._shared import PeftWeightAdapter, check_targets, dims


class Params(MethodParams):
    name: Literal["ia3"] = "ia3"
    target_modules: list[str] = ["k_proj", "v_proj", "down_proj"]
    feedforward_modules: list[str] = ["down_proj"]  # of target_modules: scaled on their input

    @model_validator(mode="after")
    def _ff_subset(self) -> Params:
        stray = [m for m in self.feedforward_modules if m not in self.target_modules]
        if stray:
            raise ValueError(f"feedforward_modules must be among target_modules; not targeted: {', '.join(stray)}")
        return self


@register
class IA3(PeftWeightAdapter):
    Params = Params

    def apply(self, model: nn.Module, params: Params) -> nn.Module:
        check_targets(model, params.name, "target_modules", params.target_modules)
        config = IA3Config(
            task_type="CAUSAL_LM",
            target_modules=params.target_modules,
            feedforward_modules=params.feedforward_modules,
        )
        return get_peft_model(model, config)

    def expected_trainable(self, base: nn.Module, params: Params) -> int | None:
        if params.target_modules != ["k_proj", "v_proj", "down_proj"]:
            return None
        d = dims(base.config)
        return (d["kv"] + d["kv"] + d["i"]) * d["layers"]  # k, v outputs; down_proj's input
