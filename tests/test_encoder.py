"""Sequence classifiers: every method on a tiny BERT through the same method modules, the new head
trained and saved with it; what cannot apply fails before training in one line; many classes."""

from __future__ import annotations

import json
import re

import pytest
import torch
from transformers import set_seed

from peftflow import artifacts, data
from peftflow.classifier import Labeled, collate, encode, log_probs
from peftflow.methods import get_method
from peftflow.methods._shared import head_modules, is_classifier
from peftflow.model import load_base_for, load_base_model, load_tokenizer, task_of
from peftflow.tokens import model_inputs
from peftflow.training.sft import build_model, train
from tests.conftest import METHODS


def _train_split(params, tokenizer, labels) -> list[Labeled]:
    return [encode(tokenizer, ex, params.data, labels) for ex in data.read_split(params.data.out_dir, "train")[:64]]


def _loss(model, encoded: list[Labeled], tokenizer, virtual: int) -> float:
    """Mean cross-entropy per example, in eval mode (the train split: what the objective fell on)."""
    logp = log_probs(model, encoded, tokenizer.pad_token_id, False, 32, torch.device("cpu"), "no", virtual)
    return float(-logp[torch.arange(len(encoded)), torch.tensor([e.label for e in encoded])].mean())


@pytest.mark.parametrize("method", METHODS)
def test_every_method_trains_a_classifier_and_reloads_it(method, tiny_classifier_params):
    # the method's own learning rate, ten times over (capped): a tiny random model in 40 steps
    lr = min(10 * tiny_classifier_params(method).train.lr, 3.0e-2)
    params = tiny_classifier_params(method, f"train.lr={lr}", "train.scheduler=constant", "train.max_steps=40")
    m = get_method(method)
    assert task_of(params.model) == "sequence_classification"  # auto: a bare encoder is not a causal LM
    tokenizer = load_tokenizer(params.model)
    labels = data.read_manifest(params.data.out_dir)["labels"]
    encoded = _train_split(params, tokenizer, labels)
    virtual = m.input_virtual_tokens(params.method)
    set_seed(params.seed)
    model = build_model(params)
    base = model.get_base_model() if artifacts.is_adapter(model) else model
    assert is_classifier(base) and base.config.id2label == dict(enumerate(labels))
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    loss_before = _loss(model, encoded, tokenizer, virtual)

    summary = train(params, model=model, progress=False)
    loss_after = _loss(model, encoded, tokenizer, virtual)
    assert summary.finished and summary.steps == 40
    assert loss_after < loss_before - 0.1, f"{method}: loss {loss_before:.3f} -> {loss_after:.3f} nats per example"

    # only what the method trains changes, and that is its own tensors and the new head: a method
    # that adds tensors leaves every weight matrix of the backbone as it was
    fresh = load_base_model(params.model, labels)
    backbone = {n for n, _ in fresh.named_parameters() if n.split(".")[0] not in head_modules(fresh)}
    for name, p in model.named_parameters():
        if p.requires_grad:
            assert not torch.equal(p, before[name]), f"{method}: trainable {name} did not change"
        else:
            assert torch.equal(p, before[name]), f"{method}: frozen {name} changed"
    trained = [n for n, p in model.named_parameters() if p.requires_grad]
    assert any("classifier" in n for n in trained), f"{method}: the new head does not train"
    if m.trains in ("added weights", "prompts"):
        own = [n for n in trained if n in backbone and not n.endswith(".bias")]
        assert not own, f"{method}: trains the backbone's {own[:3]}"

    # the artifact holds what was trained, the head and the labels; base + artifact gives the same logits
    out = params.run_dir / "model"
    assert artifacts.labels(out) == labels
    reloaded = artifacts.load(load_base_for(params, artifacts.labels(out)), out).eval()
    model.eval()
    inputs = model_inputs(collate(encoded[:8], tokenizer.pad_token_id, False), virtual)
    with torch.no_grad():
        trained_logits = model(**inputs).logits
        torch.testing.assert_close(reloaded(**inputs).logits, trained_logits, rtol=0, atol=1e-5)
        if m.mergeable:
            merged = m.merge(reloaded).eval()
            assert is_classifier(merged)
            torch.testing.assert_close(merged(**inputs).logits, trained_logits, rtol=0, atol=1e-4)
    if m.trains not in ("all weights", "some weights"):
        assert summary.artifact_bytes < 4 * summary.trainable_params + 64 * 1024, f"{method}: stores more than trained"


def test_a_decoder_classifier_reads_each_texts_last_token_whatever_the_padding(tiny_params):
    """model.task sequence_classification on the tiny Llama: its `score` head reads the last token,
    so rows pad on the left (with their position ids); a row's logits are its own in any batch."""
    from peftflow.classifier import pads_left

    params = tiny_params("lora", "model.task=sequence_classification", "data.prompt_template='{text}'",
                         "train.lr=5.0e-3", "train.max_steps=20")  # fmt: skip
    assert train(params, progress=False).finished
    out = params.run_dir / "model"
    model = artifacts.load(load_base_for(params, artifacts.labels(out)), out).eval()
    tokenizer = load_tokenizer(params.model)
    assert head_modules(model.get_base_model()) == ["score"] and pads_left(tokenizer)
    labels = artifacts.labels(out)
    encoded = [encode(tokenizer, ex, params.data, labels) for ex in data.read_split(params.data.out_dir, "val")[:8]]
    assert len({len(e) for e in encoded}) > 1  # rows of several lengths: some are padded
    with torch.no_grad():
        together = model(**model_inputs(collate(encoded, tokenizer.pad_token_id, True))).logits
        alone = torch.cat([model(**model_inputs(collate([e], tokenizer.pad_token_id, True))).logits for e in encoded])
    torch.testing.assert_close(together, alone, rtol=0, atol=1e-5)


def test_the_head_is_drawn_from_the_seed_and_an_existing_head_is_kept(tiny_classifier_params, tmp_path):
    params = tiny_classifier_params("lora")
    labels = ["negative", "positive"]
    first, again = (load_base_model(params.model, labels, seed=1) for _ in range(2))
    other = load_base_model(params.model, labels, seed=2)
    assert head_modules(first) == ["classifier"]
    assert torch.equal(first.classifier.weight, again.classifier.weight)
    assert not torch.equal(first.classifier.weight, other.classifier.weight)
    first.save_pretrained(tmp_path / "classifier")  # a saved classifier: auto keeps it one, with its head
    load_tokenizer(params.model).save_pretrained(tmp_path / "classifier")
    saved = params.model.model_copy(update={"name_or_path": str(tmp_path / "classifier")})
    assert task_of(saved) == "sequence_classification"
    assert torch.equal(load_base_model(saved, labels, seed=7).classifier.weight, first.classifier.weight)


def test_inapplicable_pairs_fail_in_one_line_before_training(tiny_classifier_params, tiny_bert_dir, tmp_path):
    from transformers import AutoTokenizer, DistilBertConfig, DistilBertModel, XLNetConfig, XLNetModel

    def saved(model, name):
        model.save_pretrained(tmp_path / name)
        AutoTokenizer.from_pretrained(tiny_bert_dir).save_pretrained(tmp_path / name)
        return f"model.name_or_path={tmp_path / name}"

    config = DistilBertConfig(vocab_size=30522, dim=32, hidden_dim=64, n_layers=1, n_heads=2)
    distilbert = saved(DistilBertModel(config), "distilbert")
    for method in ("prefix", "ptuning_v2"):
        with pytest.raises(ValueError, match=rf"^method {method}: DistilBertForSequenceClassification's attention "
                           r"takes no past keys and values, so there is no place for a per-layer prefix"):  # fmt: skip
            build_model(tiny_classifier_params(method, distilbert))
    with pytest.raises(ValueError, match=r"^method ia3: target_modules: auto: peft has no default for distilbert"):
        build_model(tiny_classifier_params("ia3", distilbert))
    assert build_model(tiny_classifier_params("adapter", distilbert))  # its attention + ffn layout is known
    xlnet = saved(XLNetModel(XLNetConfig(vocab_size=30522, d_model=32, n_layer=1, n_head=2, d_inner=64)), "xlnet")
    with pytest.raises(ValueError, match=r"^method adapter: XLNetLayer blocks have none of the known sublayer layouts"):
        build_model(tiny_classifier_params("adapter", xlnet))

    # a classifier needs labels to classify into; a causal LM task on an encoder is still refused
    with pytest.raises(ValueError, match=r"^model.task: sequence_classification \(auto: .* is not a causal LM\) "
                       r"classifies text_label data; data.format is 'instruction'"):  # fmt: skip
        load_base_for(tiny_classifier_params("lora", "data.format=instruction"))
    with pytest.raises(ValueError, match=r"not a causal LM checkpoint: .*model.task: sequence_classification trains"):
        build_model(tiny_classifier_params("lora", "model.task=causal_lm"))


@pytest.mark.parametrize("task", ["causal_lm", "sequence_classification"])
def test_five_classes_and_long_texts_through_params_only(task, tiny_model_dir, tiny_bert_dir, tmp_path):
    """A user's 5-class file with multi-word labels, some texts over data.max_length: prepare ->
    train -> evaluate on the command line, macro-F1 and per-class accuracy in the metrics, the cut
    examples counted by prepare and by the run. A causal LM scores the labels as it was trained to
    write them (several tokens each); a classifier's head picks one."""
    from typer.testing import CliRunner

    from peftflow.cli import app
    from tests.conftest import PARAMS_DIR, tiny_overrides

    path = _five_class_file(tmp_path)
    # beside the shipped labels ("1": positive, "-1": negative; overrides merge into them)
    extra = {"-2": "very negative", "0": "neutral", "2": "very positive"}
    words = ["very negative", "negative", "neutral", "positive", "very positive"]
    model = tiny_model_dir if task == "causal_lm" else tiny_bert_dir
    sets = [*tiny_overrides(model, path, tmp_path), f"data.labels={json.dumps(extra)}", "data.max_length=20",
            "data.prompt_template='{text}'", "train.lr=1.0e-2", "train.max_steps=60", "data.split.test=40",
            "data.split.val=20"]  # fmt: skip
    common = ["--params-dir", str(PARAMS_DIR), *(arg for s in sets for arg in ("-s", s))]
    runner = CliRunner()

    prepared = runner.invoke(app, ["prepare", *common])
    assert prepared.exit_code == 0, prepared.output
    cut = re.search(r"cut to fit: (\d+) of 140 train", " ".join(prepared.output.split()))
    assert cut and 0 < int(cut[1]) < 140, prepared.output  # the long texts only
    trained = runner.invoke(app, ["train", "-m", "lora", *common])
    assert trained.exit_code == 0, trained.output
    run = tmp_path / "runs" / "lora"
    summary = json.loads((run / "train_summary.json").read_text())
    assert summary["cut_examples"] == int(cut[1]) and summary["final_train_loss"] < summary["first_train_loss"]
    evaluated = runner.invoke(app, ["evaluate", "-m", "lora", *common])
    assert evaluated.exit_code == 0, evaluated.output
    metrics = json.loads((run / "metrics.json").read_text())
    assert json.loads((tmp_path / "prepared" / "manifest.json").read_text())["labels"] == sorted(words)
    assert metrics["task"] == task and set(metrics["test_per_label_accuracy"]) == set(words)
    assert 0 < metrics["test_macro_f1"] <= 1 and "macro-F1" in evaluated.output and "very positive" in evaluated.output
    assert metrics["test_loss"] < metrics["zeroshot"]["test_loss"]


def test_macro_f1_and_per_label_accuracy_from_the_confusion():
    from peftflow.evaluate import _accuracy

    gold = torch.tensor([0, 0, 0, 1, 1, 2])
    picked = torch.tensor([0, 0, 1, 1, 2, 2])  # "d" is neither true nor picked: not in the mean
    out = _accuracy(torch.nn.functional.one_hot(picked, 4).float(), gold, ["a", "b", "c", "d"])
    # F1 = 2 TP / (2 TP + FP + FN): a 4/5, b 2/4, c 2/3
    assert out["macro_f1"] == pytest.approx((4 / 5 + 2 / 4 + 2 / 3) / 3)
    assert out["per_label_accuracy"] == pytest.approx({"a": 2 / 3, "b": 1 / 2, "c": 1.0})
    assert out["accuracy"] == pytest.approx(4 / 6)


def _five_class_file(tmp_path):
    """Rows whose label is given away by one of five word groups; every 7th text is long."""
    import random

    rng = random.Random(0)
    groups = [["awful", "dreadful"], ["dull", "bland"], ["okay", "average"], ["good", "nice"], ["superb", "brilliant"]]
    filler = "the film a story actor plot scene and with its this movie".split()
    rows = []
    for i in range(200):  # 40 test, 20 val, 140 train
        label = i % 5
        words = rng.sample(filler, 4) + [rng.choice(groups[label])]
        rng.shuffle(words)
        if i % 7 == 0:  # over data.max_length: cut
            words = filler[:6] + words + filler[6:] * 2
        rows.append({"text": " ".join(words), "label": str(label - 2)})
    path = tmp_path / "five.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path
