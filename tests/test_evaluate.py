"""Evaluation shortcuts (left padding, last-position logits) agree with the plain computation."""

from __future__ import annotations

import pytest
import torch

from peftflow import data
from peftflow.evaluate import heldout_loss, label_scores
from peftflow.model import load_base_model, load_tokenizer
from peftflow.tokens import IGNORE, collate, encode


def _brute_scores(model, prompts, label_ids):
    """Unpadded, one sequence at a time, full logits: sum of log p(answer tokens | prompt)."""
    out = torch.zeros(len(prompts), len(label_ids))
    with torch.no_grad():
        for i, p in enumerate(prompts):
            for j, ids in enumerate(label_ids):
                seq = torch.tensor([p + ids])
                logp = torch.log_softmax(model(input_ids=seq).logits[0].float(), -1)
                out[i, j] = sum(logp[len(p) - 1 + k, t] for k, t in enumerate(ids))
    return out


def test_label_scores_match_unpadded_full_logits(tiny_params):
    params = tiny_params("lora")
    model = load_base_model(params.model).eval()
    tok = load_tokenizer(params.model)
    examples = data.read_split(params.data.out_dir, "test")[:6]
    prompts = [encode(tok, ex, params.data).prompt for ex in examples]
    prompts[0] = prompts[0][5:]  # unequal lengths, so left padding matters
    single = [tok.encode("positive", add_special_tokens=False), tok.encode("negative", add_special_tokens=False)]
    multi = [tok.encode("very good indeed", add_special_tokens=False), tok.encode("bad", add_special_tokens=False)]
    assert all(len(ids) == 1 for ids in single) and len(multi[0]) > 1
    for label_ids in (single, multi):
        fast = label_scores(model, tok.pad_token_id, prompts, label_ids, 4, torch.device("cpu"), precision="no")
        torch.testing.assert_close(fast, _brute_scores(model, prompts, label_ids), rtol=1e-4, atol=1e-4)


def test_heldout_loss_is_mean_nll_of_completion_tokens(tiny_params):
    params = tiny_params("lora")
    model = load_base_model(params.model).eval()
    tok = load_tokenizer(params.model)
    encoded = [encode(tok, ex, params.data) for ex in data.read_split(params.data.out_dir, "val")[:5]]
    nll, n = 0.0, 0
    with torch.no_grad():
        for e in encoded:
            logp = torch.log_softmax(model(input_ids=torch.tensor([e.prompt + e.completion])).logits[0], -1)
            for k, t in enumerate(e.completion):
                nll -= logp[len(e.prompt) - 1 + k, t].item()
                n += 1
    assert abs(heldout_loss(model, encoded, tok.pad_token_id, 2, torch.device("cpu"), precision="no") - nll / n) < 1e-4
    batch = collate(encoded, tok.pad_token_id)
    assert int((batch["labels"] != IGNORE).sum()) == sum(len(e.completion) for e in encoded)


def test_one_pass_scoring_agrees_with_the_separate_label_pass(tiny_params, monkeypatch):
    """score() reads label scores off the loss pass; label_accuracy() runs its own pass."""
    from peftflow import evaluate

    params = tiny_params("lora")
    model = load_base_model(params.model).eval()
    tok = load_tokenizer(params.model)
    examples = data.read_split(params.data.out_dir, "test")
    labels = ["negative", "positive"]
    slow = evaluate.label_accuracy(model, tok, examples, labels, params, torch.device("cpu"))
    monkeypatch.setattr(evaluate, "label_accuracy", lambda *a, **k: pytest.fail("score() took the two-pass path"))
    fast = evaluate.score(model, tok, params, examples, labels, torch.device("cpu"))
    assert fast["test_accuracy"] == slow["accuracy"]
    assert fast["test_per_label_accuracy"] == slow["per_label_accuracy"]


@pytest.mark.parametrize("method", ["prompt", "ptuning", "prefix", "lora"])
def test_answer_logits_do_not_depend_on_batch_padding(method, tiny_params):
    """A row scores the same alone or beside a longer row (input soft prompts are right-aligned)."""
    from peftflow.methods import get_method
    from peftflow.tokens import answer_logits
    from peftflow.training.sft import build_model

    params = tiny_params(method)
    virtual = get_method(method).input_virtual_tokens(params.method)
    model = build_model(params).eval()
    tok = load_tokenizer(params.model)
    short, long = (encode(tok, ex, params.data) for ex in data.read_split(params.data.out_dir, "val")[:2])
    long = type(long)(long.prompt * 3, long.completion)  # much longer than `short`
    with torch.no_grad():
        alone, _ = answer_logits(model, collate([short], tok.pad_token_id), virtual)
        padded, _ = answer_logits(model, collate([short, long], tok.pad_token_id), virtual)
    width = len(short.completion)
    torch.testing.assert_close(padded[0, -width:], alone[0, -width:], rtol=0, atol=1e-4)
