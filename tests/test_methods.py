"""Every params/methods/*.yaml, trained on a tiny model: the foundation's contract for a method.

Adding a method adds a YAML file, and with it a row here; nothing in this file lists methods: what
a method is (its capabilities) and its closed-form trainable count come from the method itself.
"""

from __future__ import annotations

import pytest
import torch
from transformers import set_seed

from peftflow import artifacts, data
from peftflow.evaluate import heldout_loss
from peftflow.methods import get_method
from peftflow.model import load_base_for, load_base_model, load_tokenizer
from peftflow.tokens import collate, encode, model_inputs
from peftflow.training.meters import count_parameters
from peftflow.training.sft import build_model, train
from tests.conftest import METHODS


@pytest.mark.parametrize("method", METHODS)
def test_method_trains_only_its_parameters(method, tiny_params):
    params = tiny_params(method, "train.lr=2.0e-2", "train.scheduler=constant", "train.max_steps=30")
    m = get_method(method)
    tokenizer = load_tokenizer(params.model)
    val = [encode(tokenizer, ex, params.data) for ex in data.read_split(params.data.out_dir, "val")]
    set_seed(params.seed)  # the adapter's initialization as `peftflow train` seeds it, not left to the tests before
    model = build_model(params)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    loss_before = heldout_loss(
        model, val, tokenizer.pad_token_id, 16, torch.device("cpu"), m.input_virtual_tokens(params.method)
    )

    base = load_base_model(params.model)
    expected = m.expected_trainable(base, params.method)
    assert expected is not None, f"{method}: give its Method an expected_trainable() for the shipped params"
    trainable, total = count_parameters(model)
    assert trainable == expected, f"{method}: {trainable} trainable, the closed form says {expected}"
    if artifacts.is_adapter(model):  # peft adds the trained tensors beside the base
        ranknum = sum(p.numel() for n, p in model.named_parameters() if "ranknum" in n)  # AdaLoRA's frozen counters
        assert total == count_parameters(base)[1] + trainable + ranknum, f"{method}: total counts the base wrongly"

    summary = train(params, model=model, progress=False)
    loss_after = heldout_loss(
        model, val, tokenizer.pad_token_id, 16, torch.device("cpu"), m.input_virtual_tokens(params.method)
    )
    assert summary.finished and summary.steps == 30
    assert loss_after < loss_before - 1.0, f"{method}: held-out loss {loss_before:.3f} -> {loss_after:.3f} nats"

    for name, p in model.named_parameters():
        if p.requires_grad:
            assert not torch.equal(p, before[name]), f"{method}: trainable {name} did not change"
        else:
            assert torch.equal(p, before[name]), f"{method}: frozen {name} changed"

    # The artifact holds what was trained, and base + artifact reproduces the trained logits.
    out = params.run_dir / "model"
    reloaded = artifacts.load(load_base_for(params), out).eval()
    model.eval()
    inputs = model_inputs(collate(val[:8], tokenizer.pad_token_id), m.input_virtual_tokens(params.method))
    with torch.no_grad():
        trained_logits = model(**inputs).logits
        torch.testing.assert_close(reloaded(**inputs).logits, trained_logits, rtol=0, atol=1e-4)
        if m.mergeable:  # folding the update into W changes nothing but the latency
            # in float64 where the base allows it, so the check is of the merge, not of fp32 rounding
            exact = not m.quantizes_base
            unmerged = reloaded.double() if exact else reloaded
            want = unmerged(**inputs).logits
            merged = m.merge(unmerged).eval()
            assert not any("lora" in n or "ia3" in n for n, _ in merged.named_parameters())
            got = merged(**inputs).logits.to(want.dtype)
            torch.testing.assert_close(got, want, rtol=0, atol=1e-8 if exact else 1e-4)
    if m.trains not in ("all weights", "some weights"):  # the others store only what they trained
        stored = summary.artifact_bytes
        assert stored < 4 * summary.trainable_params + 64 * 1024, f"{method}: artifact stores more than it trained"


def test_method_files_name_their_method():
    from peftflow.config import load_params
    from tests.conftest import PARAMS_DIR

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


def test_adapters_share_one_base_and_are_selected_by_name(tiny_params):
    runs = {}
    for name, seed in (("first", 1), ("second", 2)):
        params = tiny_params("lora", f"seed={seed}", f"train.run_name={name}", "train.lr=2.0e-2", "train.max_steps=5")
        train(params, progress=False)
        runs[name] = params.run_dir / "model"
    tokenizer = load_tokenizer(params.model)
    ids = torch.tensor([tokenizer.encode("a moving and funny film")])
    single = {}
    with torch.no_grad():
        for name, out in runs.items():
            single[name] = artifacts.load(load_base_model(params.model), out).eval()(input_ids=ids).logits
        both = artifacts.load_many(load_base_model(params.model), runs).eval()
        for name in runs:
            both.set_adapter(name)
            torch.testing.assert_close(both(input_ids=ids).logits, single[name], rtol=0, atol=1e-6)
    assert not torch.allclose(single["first"], single["second"])


def test_freeze_refuses_more_blocks_than_the_model_has(tiny_params):
    with pytest.raises(ValueError, match=r"method freeze: last_n_blocks: 5 exceeds the model's 2 blocks"):
        build_model(tiny_params("freeze", "method.last_n_blocks=5"))


def test_bitfit_on_a_biasless_model_adds_biases_and_says_so(tiny_params, caplog):
    with caplog.at_level("WARNING"):
        model = build_model(tiny_params("bitfit"))
    assert "has no bias terms; added zero-initialized biases to 14 linear layers" in caplog.text
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all(n.endswith(".bias") for n in trainable)
    with pytest.raises(ValueError, match=r"method bitfit: add_missing: the model has no bias terms"):
        build_model(tiny_params("bitfit", "method.add_missing=false"))


def test_ia3_feedforward_modules_must_be_targeted(tiny_params):
    from peftflow.config import ParamsError

    with pytest.raises(
        ParamsError, match=r"ia3.yaml: method: feedforward_modules must be among target_modules; not targeted: up_proj$"
    ):
        tiny_params("ia3", "method.target_modules=[k_proj, v_proj, down_proj]", "method.feedforward_modules=[up_proj]")
    with pytest.raises(ParamsError, match=r"ia3.yaml: method: target_modules and feedforward_modules: set both"):
        tiny_params("ia3", "method.feedforward_modules=[down_proj]")


def test_adalora_takes_its_schedule_from_the_run(tiny_params):
    params = tiny_params("adalora", "train.max_steps=40")
    assert params.method.total_step == 40
    with pytest.raises(ValueError, match=r"method adalora: tinit_fraction \+ tfinal_fraction: leave no pruning phase"):
        build_model(tiny_params("adalora", "method.tinit_fraction=0.5", "method.tfinal_fraction=0.5"))


def test_ptuning_v2_text_init_is_the_text_as_a_prefix(tiny_params):
    """Initialized from a text, the deep prompt is exactly that text's keys and values: the model
    continues an input as the base model continues text + input (and random init does not)."""
    text = "Classify the sentiment of this review."
    params = tiny_params("ptuning_v2", f"method.init_text={text}")
    tokenizer = load_tokenizer(params.model)
    text_ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    params = tiny_params("ptuning_v2", f"method.init_text={text}", f"method.num_virtual_tokens={len(text_ids)}")
    x = tokenizer(" a gorgeous, moving film", add_special_tokens=False)["input_ids"]
    base = load_base_model(params.model).eval()
    with torch.no_grad():
        expected = base(input_ids=torch.tensor([text_ids + x])).logits[0, len(text_ids) :]
        model = build_model(params).eval()
        got = model(input_ids=torch.tensor([x]), attention_mask=torch.ones(1, len(x), dtype=torch.long)).logits[0]
        torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)
        random = build_model(tiny_params("ptuning_v2", "method.init=random")).eval()
        noise = random(input_ids=torch.tensor([x]), attention_mask=torch.ones(1, len(x), dtype=torch.long)).logits[0]
    assert (noise - expected).abs().max() > 0.1
