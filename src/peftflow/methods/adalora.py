"""AdaLoRA: LoRA whose rank budget is reallocated by importance during training
(Zhang et al., 2023, arXiv:2303.10512), via peft.

Each update is parameterized as an SVD, P·Λ·Q. After ``tinit`` warm-up steps the least important
singular values are pruned every ``delta_t`` steps until the average rank falls from ``init_r`` to
``target_r``; the last ``tfinal`` steps train at the final budget. An orthogonality penalty keeps
P and Q near orthogonal (peft adds it only when the model computes the loss itself, so it is added
here as an extra loss).
"""

from __future__ import annotations

from typing import Literal

import torch
from peft import AdaLoraConfig, get_peft_model
from pydantic import Field, model_validator
from torch import nn

from peftflow.methods import MethodParams, register
from peftflow.methods._shared import PeftWeightAdapter, check_targets, dims, linear_shapes, peft_task


class Params(MethodParams):
    name: Literal["adalora"] = "adalora"
    init_r: int = Field(12, ge=1)  # starting rank of every update
    target_r: int = Field(8, ge=1)  # average rank after pruning
    alpha: float = Field(32, gt=0)
    dropout: float = Field(0.05, ge=0, lt=1)
    target_modules: Literal["all-linear"] | list[str] = "all-linear"
    tinit_fraction: float = Field(0.1, ge=0, lt=1)  # share of steps before pruning starts
    tfinal_fraction: float = Field(0.3, ge=0, lt=1)  # share of steps at the final budget
    delta_t: int = Field(1, ge=1)  # steps between budget updates
    orth_reg_weight: float = Field(0.5, ge=0)
    total_step: int | None = None  # None: train.max_steps

    @model_validator(mode="after")
    def _budget_shrinks(self) -> Params:
        if self.target_r > self.init_r:
            raise ValueError(f"target_r {self.target_r} exceeds init_r {self.init_r}: the budget can only shrink")
        return self


@register
class AdaLoRA(PeftWeightAdapter):  # P·Λ·Q folds into W like B·A
    Params = Params

    def bind(self, params: Params, run) -> Params:
        return params if params.total_step else params.model_copy(update={"total_step": run.train.max_steps})

    def apply(self, model: nn.Module, params: Params) -> nn.Module:
        check_targets(model, params.name, "target_modules", params.target_modules)
        total = params.total_step
        if total is None:
            raise ValueError("method adalora: total_step: not set (bind() fills it from train.max_steps)")
        tinit, tfinal = int(params.tinit_fraction * total), int(params.tfinal_fraction * total)
        if tinit + tfinal >= total:
            raise ValueError(
                f"method adalora: tinit_fraction + tfinal_fraction: leave no pruning phase in {total} steps"
            )
        config = AdaLoraConfig(
            **peft_task(model),
            init_r=params.init_r,
            target_r=params.target_r,
            lora_alpha=params.alpha,
            lora_dropout=params.dropout,
            target_modules=params.target_modules,
            tinit=tinit,
            tfinal=tfinal,
            deltaT=params.delta_t,
            orth_reg_weight=params.orth_reg_weight,
            total_step=total,
        )
        return get_peft_model(model, config)

    def unsupported(self, strategy: str, params: Params) -> str | None:
        if strategy in ("fsdp", "deepspeed"):
            return (
                "its rank allocator reads whole gradients and masks whole parameters after each step, which "
                "sharded parameters (and DeepSpeed's fused step) do not offer; use ddp"
            )
        return None

    def extra_loss(self, model) -> torch.Tensor:
        """peft's orthogonality penalty: mean ||A·Aᵀ - I||_F and ||Bᵀ·B - I||_F, times orth_reg_weight."""
        weight = model.peft_config[model.active_adapter].orth_reg_weight
        terms = []
        for name, p in model.named_parameters():
            if p.requires_grad and ("lora_A" in name or "lora_B" in name):
                cov = p @ p.T if "lora_A" in name else p.T @ p
                terms.append(torch.linalg.matrix_norm(cov - torch.eye(cov.shape[0], device=cov.device), "fro"))
        return weight * torch.stack(terms).mean()

    def after_step(self, model, step: int) -> None:
        """Update importance scores and prune the rank budget (needs the gradients, so before zero_grad)."""
        model.base_model.update_and_allocate(step)

    def state(self, model) -> dict:
        """What exact resume needs beyond weights and optimizer: importance scores and the rank pattern."""
        alloc = model.base_model.rankallocator
        return {
            "ipt": alloc.ipt,
            "exp_avg_ipt": alloc.exp_avg_ipt,
            "exp_avg_unc": alloc.exp_avg_unc,
            "rank_pattern": model.peft_config[model.active_adapter].rank_pattern,
        }

    def load_state(self, model, saved: dict) -> None:
        alloc = model.base_model.rankallocator
        alloc.ipt, alloc.exp_avg_ipt, alloc.exp_avg_unc = saved["ipt"], saved["exp_avg_ipt"], saved["exp_avg_unc"]
        model.peft_config[model.active_adapter].rank_pattern = saved["rank_pattern"]

    def expected_trainable(self, base: nn.Module, params: Params) -> int | None:
        if params.target_modules != "all-linear":
            return None
        shapes = linear_shapes(base.config)  # P (r x in), Q (out x r), Λ (r)
        return sum(params.init_r * (fi + fo + 1) for fi, fo in shapes) * dims(base.config)["layers"]
