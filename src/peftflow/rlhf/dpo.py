"""DPO (Rafailov et al., 2023, arXiv:2305.18290) on the preference pairs, with trl's DPOTrainer.

The policy is the SFT model (merged into the base) with a fresh adapter; trl's reference is that
model with the adapter disabled, i.e. the SFT policy, as in PPO. ``train.*`` maps onto trl's
config (steps, batch size, lr, schedule, clipping); ``rlhf.dpo`` holds beta and the loss type.
"""

from __future__ import annotations

import logging
import tempfile
import time
from collections.abc import Callable

import torch
from transformers import TrainerCallback

from peftflow.config import Params
from peftflow.training.optim import scheduler_name

log = logging.getLogger(__name__)


class _Relay(TrainerCallback):
    """trl's logged metrics -> peftflow callbacks (e.g. MLflow), as ``dpo_<name>``."""

    def __init__(self, callbacks: tuple[Callable[[dict[str, float], int], None], ...]):
        self.callbacks, self.history = callbacks, []

    def on_log(self, args, state, control, logs=None, **kwargs):
        numbers = {k.replace("/", "_"): float(v) for k, v in (logs or {}).items() if isinstance(v, int | float)}
        if "loss" not in numbers:  # the end-of-training summary line
            return
        self.history.append({"step": state.global_step, **numbers})
        for cb in self.callbacks:
            cb({f"dpo_{k}": v for k, v in numbers.items()}, state.global_step)


def train(
    policy,
    tokenizer,
    pairs: list[dict],
    params: Params,
    callbacks: tuple[Callable[[dict[str, float], int], None], ...] = (),
    progress: bool = True,
) -> dict:
    """Train ``policy`` (a PeftModel over the merged SFT model) with DPO on ``pairs``, in place."""
    from datasets import Dataset
    from trl import DPOConfig, DPOTrainer

    cfg = params.train
    cuda = torch.cuda.is_available()
    relay = _Relay(callbacks)
    with tempfile.TemporaryDirectory(prefix="peftflow-dpo-") as tmp:  # trl wants an output_dir; nothing is saved there
        args = DPOConfig(
            output_dir=tmp,
            max_steps=cfg.max_steps,
            per_device_train_batch_size=cfg.batch_size,
            gradient_accumulation_steps=cfg.grad_accum,
            learning_rate=cfg.lr,
            lr_scheduler_type=scheduler_name(cfg),
            warmup_steps=cfg.warmup_steps,
            max_grad_norm=cfg.max_grad_norm or 0.0,
            weight_decay=cfg.weight_decay,
            logging_steps=cfg.log_every,
            save_strategy="no",
            report_to=[],
            seed=params.seed,
            beta=params.rlhf.dpo.beta,
            loss_type=[params.rlhf.dpo.loss_type],
            max_length=params.data.max_length,
            bf16=cuda and torch.cuda.is_bf16_supported(),
            use_cpu=not cuda,
            disable_tqdm=not progress,
            dataloader_num_workers=0,
        )
        rows = [{k: p[k] for k in ("prompt", "chosen", "rejected")} for p in pairs]
        trainer = DPOTrainer(
            model=policy,
            ref_model=None,  # a PeftModel: the reference is the adapter switched off (the SFT policy)
            args=args,
            train_dataset=Dataset.from_list(rows),
            processing_class=tokenizer,
            callbacks=[relay],
        )
        started = time.perf_counter()
        trainer.train()
        seconds = time.perf_counter() - started
    history = relay.history
    return {
        "steps": cfg.max_steps,
        "history": history,
        "first_train_loss": history[0]["loss"] if history else None,
        "final_train_loss": history[-1]["loss"] if history else None,
        "train_seconds": seconds,
    }
