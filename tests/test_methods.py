"""Every params/methods/*.yaml, trained on a tiny model: the foundation's contract for a method.

Adding a method adds a YAML file, and with it a row here; nothing in this file lists methods.
"""

from __future__ import annotations

import pytest
import torch

from peftflow import artifacts
from peftflow.evaluate import heldout_loss
from peftflow.methods import get_method
from peftflow.model import load_base_model, load_tokenizer
from peftflow.tokens import collate, encode
from peftflow.train import build_model, count_parameters, train
from peftflow import data
from tests.conftest import METHODS


def _lora_closed_form(config, r: int) -> int:
    """r * (fan_in + fan_out) summed over every linear layer of every block (all-linear)."""
    h, i, hd = config.hidden_size, config.intermediate_size, config.hidden_size // config.num_attention_heads
    q, kv = config.num_attention_heads * hd, config.num_key_value_heads * hd
    per_block = (h + q) + 2 * (h + kv) + (q + h) + 2 * (h + i) + (i + h)
    return r * per_block * config.num_hidden_layers


def expected_trainable(method: str, params, base) -> int | None:
    if method == "full":
        return count_parameters(base)[1]
    if method == "lora" and params.method.target_modules == "all-linear":
        return _lora_closed_form(base.config, params.method.r)
    return None


@pytest.mark.parametrize("method", METHODS)
def test_method_trains_only_its_parameters(method, tiny_params):
    params = tiny_params(method, "train.lr=2.0e-2", "train.scheduler=constant", "train.max_steps=30")
    tokenizer = load_tokenizer(params.model)
    val = [encode(tokenizer, ex, params.data) for ex in data.read_split(params.data.out_dir, "val")]
    model = build_model(params)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    loss_before = heldout_loss(model, val, tokenizer.pad_token_id, 16, torch.device("cpu"))

    expected = expected_trainable(method, params, load_base_model(params.model))
    if expected is not None:
        assert count_parameters(model)[0] == expected

    summary = train(params, model=model, progress=False)
    loss_after = heldout_loss(model, val, tokenizer.pad_token_id, 16, torch.device("cpu"))
    assert summary["finished"] and summary["steps"] == 30
    assert loss_after < loss_before - 1.0, f"{method}: held-out loss {loss_before:.3f} -> {loss_after:.3f} nats"

    for name, p in model.named_parameters():
        if p.requires_grad:
            assert not torch.equal(p, before[name]), f"{method}: trainable {name} did not change"
        else:
            assert torch.equal(p, before[name]), f"{method}: frozen {name} changed"

    # The artifact holds what was trained, and base + artifact reproduces the trained logits.
    out = params.run_dir / "model"
    reloaded = artifacts.load(load_base_model(params.model), get_method(method), out).eval()
    model.eval()
    batch = collate(val[:8], tokenizer.pad_token_id)
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    with torch.no_grad():
        torch.testing.assert_close(reloaded(**inputs).logits, model(**inputs).logits, rtol=0, atol=1e-6)
    if method != "full":
        stored = summary["artifact_bytes"]
        assert stored < 4 * summary["trainable_params"] + 64 * 1024, f"{method}: artifact stores more than it trained"


def test_method_files_name_their_method():
    from tests.conftest import PARAMS_DIR

    from peftflow.config import load_params

    for method in METHODS:
        assert load_params(method, PARAMS_DIR).method.name == method
    assert set(METHODS) == set(__import__("peftflow.methods", fromlist=["x"]).method_names())


def test_lora_starts_at_the_base_model(tiny_params):
    """B is zero-initialized: before training, LoRA's logits are the base model's."""
    params = tiny_params("lora")
    model = build_model(params).eval()
    base = load_base_model(params.model).eval()
    ids = torch.tensor([[1, 2, 3, 4, 5]])
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids).logits, base(input_ids=ids).logits)
    a = [p for n, p in model.named_parameters() if "lora_A" in n]
    b = [p for n, p in model.named_parameters() if "lora_B" in n]
    assert a and all(bool(t.abs().sum() > 0) for t in a)
    assert b and all(bool(t.abs().sum() == 0) for t in b)


def test_lora_bad_target_module_names_what_the_model_offers(tiny_params):
    params = tiny_params("lora", "method.target_modules=[q_proj, qkv]")
    with pytest.raises(ValueError, match=r"method lora: target_modules: qkv not in the model; .*q_proj"):
        build_model(params)
