"""Evaluation shortcuts (left padding, last-position logits) agree with the plain computation."""

from __future__ import annotations

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
        fast = label_scores(model, tok.pad_token_id, prompts, label_ids, 4, torch.device("cpu"))
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
    assert abs(heldout_loss(model, encoded, tok.pad_token_id, 2, torch.device("cpu")) - nll / n) < 1e-4
    batch = collate(encoded, tok.pad_token_id)
    assert int((batch["labels"] != IGNORE).sum()) == sum(len(e.completion) for e in encoded)


def test_one_pass_scoring_agrees_with_the_separate_label_pass(tiny_params):
    """score() reads label scores off the loss pass; label_accuracy() runs its own pass."""
    from peftflow.evaluate import label_accuracy, score

    params = tiny_params("lora")
    model = load_base_model(params.model).eval()
    tok = load_tokenizer(params.model)
    examples = data.read_split(params.data.out_dir, "test")
    labels = ["negative", "positive"]
    fast = score(model, tok, params, examples, labels, torch.device("cpu"))
    slow = label_accuracy(model, tok, examples, labels, params, torch.device("cpu"))
    assert fast["test_accuracy"] == slow["accuracy"]
    assert fast["test_per_label_accuracy"] == slow["per_label_accuracy"]
