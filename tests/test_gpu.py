"""CUDA-only checks; skipped on machines without a GPU (CI has none)."""

from __future__ import annotations

import math

import pytest
import torch

from peftflow.training.sft import train

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


@pytest.mark.gpu
@pytest.mark.parametrize("method", ["lora", "qlora"])
def test_bf16_training_on_cuda(method, tiny_params):
    summary = train(tiny_params(method, "train.max_steps=4", "train.lr=2.0e-2"), progress=False)
    assert summary.mixed_precision == "bf16" and summary.device.startswith("cuda")
    assert all(math.isfinite(h["loss"]) for h in summary.history)
    assert summary.peak_memory_bytes > 0
