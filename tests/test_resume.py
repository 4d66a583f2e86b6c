"""Checkpoints resume exactly: an interrupted run continues along the uninterrupted trajectory."""

from __future__ import annotations

import json

import pytest
import torch

from peftflow.training.checkpoint import latest as latest_checkpoint
from peftflow.training.sft import train

CASES = {
    # LoRA with dropout (RNG), gradient accumulation and evals between checkpoints
    "lora": ("train.max_steps=6", "train.grad_accum=2", "train.eval_every=2", "method.dropout=0.1"),
    # AdaLoRA interrupted in its final phase: the rank pattern and importance scores must survive
    "adalora": ("train.max_steps=10", "train.eval_every=4"),
}


@pytest.mark.parametrize("method", sorted(CASES))
def test_resume_reproduces_the_uninterrupted_loss_trajectory(method, tiny_params):
    common = (*CASES[method], "train.save_every=2", "train.lr=5.0e-3")
    straight = train(tiny_params(method, *common, "train.run_name=straight"), progress=False)

    params = tiny_params(method, *common, "train.run_name=interrupted")
    stop = params.train.max_steps - 2
    first = train(params, stop_after=stop, progress=False)
    assert not first.finished and first.steps == stop
    ckpt = latest_checkpoint(params.run_dir / "checkpoints")
    assert ckpt is not None and ckpt.name == f"step-{stop:07d}"
    assert not (params.run_dir / "model").exists(), "an unfinished run must not leave a trained artifact"

    resumed = train(params, progress=False)
    assert resumed.finished
    assert [h["loss"] for h in resumed.history] == [h["loss"] for h in straight.history]
    assert [h["lr"] for h in resumed.history] == [h["lr"] for h in straight.history]
    assert resumed.evals == straight.evals
    assert json.loads((params.run_dir / "train_summary.json").read_text())["steps"] == params.train.max_steps
    assert not (params.run_dir / "checkpoints").exists()


def test_resume_with_other_params_is_refused(tiny_params):
    params = tiny_params("lora", "train.max_steps=4", "train.save_every=2", "train.run_name=changed")
    train(params, stop_after=2, progress=False)
    with pytest.raises(
        ValueError, match=r"step-0000002: this checkpoint was made with other params \(method.r changed\)"
    ):
        train(tiny_params("lora", "train.max_steps=4", "train.save_every=2", "train.run_name=changed", "method.r=4"))


def test_no_resume_starts_over(tiny_params):
    params = tiny_params("lora", "train.max_steps=4", "train.save_every=2", "train.run_name=again")
    train(params, stop_after=2, progress=False)
    fresh = train(params, resume=False, progress=False)
    assert [h["step"] for h in fresh.history] == [1, 2, 3, 4]


def test_peak_memory_is_per_run_not_per_process():
    from peftflow.training.meters import peak_memory_bytes, reset_peak_memory

    reset_peak_memory()
    big = torch.ones(2**27)  # 512 MiB, touched
    big += 1
    del big
    before = peak_memory_bytes()
    reset_peak_memory()
    after = peak_memory_bytes()
    assert before - after > 400 * 2**20, (before, after)
