"""The fast path: the fused LoRA forward, answer-only logits, bf16 on CPUs that support it.

Each is checked against what it replaces: peft's own LoRA layers (same logits and gradients), the
full-vocabulary logits picked afterwards (same answer logits), and the CPU's reported features.
"""

from __future__ import annotations

import gc
import json
from pathlib import Path

import pytest
import torch
from peft import PeftModel, get_peft_model
from peft.tuners.lora import layer as lora_layer

from peftflow import data
from peftflow.evaluate import evaluate_run
from peftflow.methods import get_method
from peftflow.methods._fused_lora import FusedLinear
from peftflow.methods.lora import lora_config
from peftflow.model import load_base_model, load_tokenizer
from peftflow.tokens import answer_logits, collate, encode, model_inputs
from peftflow.training import optim
from peftflow.training.sft import build_model, train


def _lora_pair(params):
    """peftflow's LoRA (fused) and peft's own LoRA over the same base, with the same non-zero B."""
    torch.manual_seed(0)
    fused = build_model(params)
    base = load_base_model(params.model)
    plain = get_peft_model(base, lora_config(params.method, base))
    with torch.no_grad():
        for name, p in fused.named_parameters():
            if "lora_B" in name:
                p.normal_(std=0.1)
        plain.load_state_dict(fused.state_dict())
    return fused, plain


def _batch(params, n: int = 6):
    tokenizer = load_tokenizer(params.model)
    rows = data.read_split(params.data.out_dir, "train")[:n]
    return collate([encode(tokenizer, ex, params.data) for ex in rows], tokenizer.pad_token_id)


@pytest.mark.parametrize("dropout", [0.0, 0.1])
def test_fused_lora_gives_peft_lora_logits_and_gradients(tiny_params, dropout):
    """Tolerance: fp32 rounding of a different summation order (atol 1e-5 on logits, 1e-4 relative
    on gradients). With dropout, peft's dropout modules are called in peft's order, so the same
    seed draws the same masks."""
    params = tiny_params("lora", f"method.dropout={dropout}")
    fused, plain = _lora_pair(params)
    assert sum(type(m) is FusedLinear for m in fused.modules()) == 7 * 2  # every linear of both blocks
    assert not any(isinstance(m, FusedLinear) for m in plain.modules())
    batch = _batch(params)
    out = {}
    for name, model in (("fused", fused), ("plain", plain)):
        model.train()
        torch.manual_seed(1)
        logits = model(**model_inputs(batch)).logits
        logits.float().pow(2).mean().backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
        out[name] = (logits.detach(), grads)
    torch.testing.assert_close(out["fused"][0], out["plain"][0], rtol=1e-5, atol=1e-5)
    assert out["fused"][1].keys() == out["plain"][1].keys() and len(out["fused"][1]) == 2 * 7 * 2
    for n, g in out["plain"][1].items():
        torch.testing.assert_close(out["fused"][1][n], g, rtol=1e-4, atol=1e-6, msg=n)


def test_fused_lora_under_bf16_autocast_is_as_close_to_fp32_as_peft(tiny_params):
    """bf16 autocast: the fused update is rounded once (peft's after the product, the scaling and
    the sum), so against the fp32 logits its mean error is no larger than peft's own bf16 error
    (10% slack for rounding noise)."""
    params = tiny_params("lora")
    fused, plain = _lora_pair(params)
    batch = _batch(params)
    with torch.no_grad():
        exact = plain.eval()(**model_inputs(batch)).logits
        with torch.autocast("cpu", dtype=torch.bfloat16):
            error = {name: (m.eval()(**model_inputs(batch)).logits.float() - exact).abs().mean()
                     for name, m in (("fused", fused), ("plain", plain))}  # fmt: skip
    assert 0 < error["fused"] <= 1.1 * error["plain"]


def test_fused_lora_keeps_peft_adapter_switch_merge_and_format(tiny_params, tmp_path):
    params = tiny_params("lora")
    fused, plain = _lora_pair(params)
    ids = torch.tensor([[1, 2, 3, 4, 5]])
    base = load_base_model(params.model).eval()
    with torch.no_grad():
        want = plain.eval()(input_ids=ids).logits
        torch.testing.assert_close(fused.eval()(input_ids=ids).logits, want, rtol=1e-5, atol=1e-5)
        with fused.disable_adapter():  # switched off: the base model exactly
            assert torch.equal(fused(input_ids=ids).logits, base(input_ids=ids).logits)
        fused.save_pretrained(tmp_path / "adapter")  # plain peft loads what the fused model saved
        reloaded = PeftModel.from_pretrained(load_base_model(params.model), tmp_path / "adapter").eval()
        assert not any(isinstance(m, FusedLinear) for m in reloaded.modules())
        torch.testing.assert_close(reloaded(input_ids=ids).logits, want, rtol=1e-5, atol=1e-5)
        merged = fused.merge_and_unload()
        assert not any(isinstance(m, lora_layer.LoraLayer) for m in merged.modules())
        torch.testing.assert_close(merged(input_ids=ids).logits, want, rtol=1e-4, atol=1e-4)


def test_dora_keeps_peft_forward(tiny_params):
    """A LoRA variant (DoRA) is not plain LoRA: its layers take peft's forward unchanged."""
    model = get_method("dora").apply(load_base_model(tiny_params("dora").model), tiny_params("dora").method)
    assert any(isinstance(m, lora_layer.Linear) for m in model.modules())
    assert not any(isinstance(m, FusedLinear) for m in model.modules())


@pytest.mark.parametrize("method", ["prompt", "ptuning"])
def test_soft_prompt_answer_logits_are_the_full_logits_answer_columns(tiny_params, method):
    """Input-level soft prompts: the head projects only the answer-predicting positions, and they
    are the ones the full-sequence logits hold at those positions."""
    params = tiny_params(method)
    model = build_model(params).eval()
    virtual = get_method(method).input_virtual_tokens(params.method)
    batch = _batch(params)
    head_rows = []
    handle = model.get_output_embeddings().register_forward_hook(lambda m, a, out: head_rows.append(a[0].shape))
    with torch.no_grad():
        logits, target = answer_logits(model, batch, virtual)
    handle.remove()
    assert head_rows == [torch.Size([len(target), target.shape[1], model.config.hidden_size])]
    # the same positions from the full logits, right-padded as peft needs for these methods
    pad = (batch["attention_mask"] == 0).sum(1)
    with torch.no_grad():
        for i in range(len(target)):
            ids, mask = (batch[k][i].roll(-int(pad[i]))[None] for k in ("input_ids", "attention_mask"))
            full = model(input_ids=ids, attention_mask=mask).logits[0, virtual:]
            length = int(mask.sum())
            answer = int((target[i] != -100).sum())
            want = full[length - answer - 1 : length - 1]
            torch.testing.assert_close(logits[i, -answer:], want, rtol=1e-4, atol=1e-4)


def test_auto_precision_is_bf16_on_a_cpu_only_where_it_has_bf16(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(optim, "cpu_has_bf16", lambda: True)
    assert optim.mixed_precision("auto") == "bf16"
    assert optim.mixed_precision("no") == "no"  # fp32 stays one flag away
    monkeypatch.setattr(optim, "cpu_has_bf16", lambda: False)
    assert optim.mixed_precision("auto") == "no"
    assert optim.mixed_precision("bf16") == "bf16"  # asked for, it is what the user gets
    assert isinstance(optim.autocast("no", torch.device("cpu")), type(optim.autocast("auto", torch.device("cpu"))))


def test_cpu_bf16_detection_reads_the_cpu_features(monkeypatch):
    flags = {"_is_avx512_bf16_supported": False, "_is_amx_tile_supported": False}
    for name in flags:
        monkeypatch.setattr(torch.cpu, name, lambda name=name: flags[name], raising=False)
    assert optim.cpu_has_bf16() is False
    flags["_is_avx512_bf16_supported"] = True
    assert optim.cpu_has_bf16() is True
    flags.update(_is_avx512_bf16_supported=False, _is_amx_tile_supported=True)
    assert optim.cpu_has_bf16() is True


@pytest.mark.skipif(not optim.cpu_has_bf16() or torch.cuda.is_available(), reason="needs a CPU with bf16")
def test_bf16_on_cpu_trains_and_evaluates(tiny_params):
    params = tiny_params("lora", "train.mixed_precision=auto", "train.lr=2.0e-2", "train.max_steps=12")
    summary = train(params, progress=False)
    assert summary.mixed_precision == "bf16"
    assert summary.final_train_loss < summary.first_train_loss
    result = evaluate_run(params.run_dir, params, progress=False)
    fp32 = tiny_params("lora", "train.lr=2.0e-2", "train.max_steps=12", "train.run_name=fp32")
    train(fp32, progress=False)
    reference = evaluate_run(fp32.run_dir, fp32, progress=False)
    assert abs(result.test_loss - reference.test_loss) < 0.05 * reference.test_loss
    # the zero-shot figures are cached per precision: two files, one per precision
    assert len(list((params.train.output_dir / "zeroshot").glob("*.json"))) == 2


def test_evaluation_shows_one_bar_over_every_pass_the_zero_shot_one_included(tiny_params, capsys):
    params = tiny_params("lora")
    train(params, progress=False)
    n_test, n_val = (len(data.read_split(params.data.out_dir, s)) for s in ("test", "val"))
    evaluate_run(params.run_dir, params)  # the zero-shot pass runs (nothing cached yet)
    first = capsys.readouterr().err
    assert "evaluate lora: 100%" in first and f"{2 * n_test + n_val}/{2 * n_test + n_val}" in first
    evaluate_run(params.run_dir, params)  # the zero-shot figures come from the cache
    second = capsys.readouterr().err
    assert f"{n_test + n_val}/{n_test + n_val}" in second
    assert json.loads((params.run_dir / "metrics.json").read_text())["zeroshot"]


def test_row_chunks_keep_every_row_within_the_token_bound(tiny_params):
    batch = _batch(tiny_params("lora"))
    rows, width = batch["input_ids"].shape
    chunks = list(optim.row_chunks(batch, max_tokens=2 * width))
    assert len(chunks) == -(-rows // 2)
    assert all(c["input_ids"].numel() <= 2 * width for c in chunks)
    # the columns of left padding no row of a chunk needs are cut, and nothing else
    assert all(bool(c["attention_mask"][:, 0].any()) for c in chunks)
    assert sum(int(c["attention_mask"].sum()) for c in chunks) == int(batch["attention_mask"].sum())
    assert torch.equal(torch.cat([c["labels"][:, -1] for c in chunks]), batch["labels"][:, -1])
    assert list(optim.row_chunks(batch, None)) == [batch]
    assert list(optim.row_chunks(batch, 10 * rows * width)) == [batch]


def _one_step(params, batch, max_tokens):
    """One SGD step (lr 1) of a fresh model (AdaLoRA's step also updates its rank allocator):
    the step's result, the weights before and the trained ones after."""
    from accelerate import Accelerator

    from peftflow.tokens import completion_loss_sum, completion_tokens

    torch.manual_seed(0)
    model = build_model(params)
    start = {n: p.detach().clone() for n, p in model.named_parameters()}
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1.0)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _: 1.0)
    result = optim.optimizer_step(
        model, [batch], completion_tokens, completion_loss_sum, optimizer, scheduler, Accelerator(cpu=True),
        None, get_method(params.method.name), 1, max_tokens=max_tokens,
    )  # fmt: skip
    return result, start, {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize(
    ("method", "overrides"), [("lora", []), ("adalora", ["method.tinit_fraction=0.5", "method.dropout=0.0"])]
)
def test_a_step_split_by_max_batch_tokens_is_the_same_step(tiny_params, method, overrides):
    """The same update as the whole micro-batch (fp32; atol 1e-6 on the updated weights), for a
    method with an extra loss term too (AdaLoRA's orthogonality, added once per micro-batch; without
    dropout, whose masks are drawn per forward pass, and a step before its first pruning)."""
    params = tiny_params(method, *overrides)
    batch = _batch(params)
    whole, start, whole_w = _one_step(params, batch, None)
    split, _, split_w = _one_step(params, batch, 2 * batch["input_ids"].shape[1])
    assert split.units == whole.units and split.loss == pytest.approx(whole.loss, abs=1e-6)
    assert any(not torch.equal(w, start[n]) for n, w in whole_w.items()), "the step changed no weight"
    for name, w in whole_w.items():
        torch.testing.assert_close(split_w[name], w, atol=1e-6, rtol=1e-5)


def test_max_batch_tokens_trains_as_the_unsplit_run(tiny_params):
    whole = train(tiny_params("lora", "train.max_steps=4"), progress=False)
    split_params = tiny_params("lora", "train.max_steps=4", "train.max_batch_tokens=16", "train.run_name=split")
    split = train(split_params, progress=False)
    assert [h["loss"] for h in split.history] == pytest.approx([h["loss"] for h in whole.history], abs=1e-5)


@pytest.mark.skipif(not Path("/proc/self/maps").is_file(), reason="reads Linux's /proc/self/maps")
def test_a_loaded_base_keeps_no_view_of_the_checkpoint_file(tiny_params):
    """Bug: the embeddings viewed the memory-mapped safetensors file, whose pages loading had read
    stayed in the RSS (0.4 GB of the demo's) beside the run's own copies."""
    params = tiny_params("lora")
    model = load_base_model(params.model)
    gc.collect()
    weights = sorted(Path(params.model.name_or_path).glob("*.safetensors"))
    assert weights
    mapped = Path("/proc/self/maps").read_text()
    assert not [w for w in weights if str(w.resolve()) in mapped]
    assert model(input_ids=torch.tensor([[1, 2, 3]])).logits.isfinite().all()
