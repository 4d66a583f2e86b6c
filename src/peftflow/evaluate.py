"""Evaluation: held-out loss and perplexity, label accuracy, macro-F1 and per-label accuracy, and
the base model's zero-shot figures.

A causal LM's label accuracy scores each candidate answer by its log-likelihood after the prompt
and picks the most likely. Prompts are left-padded so every row ends in the last column; for
single-token answers (the default task) one forward pass with ``logits_to_keep=1`` scores all of
them, so the 49k-entry vocabulary projection runs for one position per row, not the whole sequence.
A sequence classifier's head gives every label's log-probability in one pass
(:mod:`peftflow.classifier`); its loss is per example, and its zero-shot figures are the backbone
with the new head untrained (drawn from the run's seed): chance level, the floor to clear.

A run is scored on two splits: **test**, reported (``metrics.json``, beside the base model
zero-shot), and **val**, what promotion decides on (``val_loss``, ``val_accuracy``, and
``selection.json``: each example's summed loss, answer tokens and whether its label was right, so
:mod:`peftflow.promote` can pair a candidate with the champion example by example).
"""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path
from typing import Any, NamedTuple

import torch
from tqdm.auto import tqdm

from peftflow import artifacts, atomic, classifier, data
from peftflow.config import Params, read_resolved
from peftflow.methods import get_method
from peftflow.model import CLASSIFIER, base_model_id, load_base_for, load_base_model, load_tokenizer, task_of
from peftflow.results import EFFICIENCY, EvalResult, Scores
from peftflow.tokens import (
    IGNORE,
    Encoded,
    answer_logits,
    by_length,
    collate,
    encode,
    encode_answer,
    encode_prompt,
)
from peftflow.training.optim import autocast, mixed_precision

SELECTION_SPLIT = "val"  # what promotion decides on; the test split is reported, never used to decide
SELECTION_FILE = "selection.json"  # a run's per-example values on it, beside metrics.json


class Heldout(NamedTuple):
    """One pass over held-out examples: the mean cross-entropy per completion token (nats), each
    example's summed cross-entropy and completion-token count (for paired tests; see
    :mod:`peftflow.promote`), and with single-token labels each label's log-probability."""

    loss: float
    nll: torch.Tensor  # (N,) summed over each example's completion tokens
    tokens: torch.Tensor  # (N,) completion tokens per example
    scores: torch.Tensor | None  # (N, L) or None


@torch.no_grad()
def heldout_pass(
    model,
    encoded: list[Encoded],
    pad_id: int,
    batch_size: int,
    device,
    label_ids: list[int] | None = None,
    virtual: int = 0,
    precision: str = "auto",
    bar=None,
) -> Heldout:
    """The loss of every example, and with single-token ``label_ids`` the (N, L) log-probabilities
    of each label at every answer's first position, from the same pass. ``virtual``: soft tokens
    the model puts before the input (see :func:`peftflow.tokens.answer_logits`); ``precision``:
    ``train.mixed_precision``, as in training; ``bar``: a progress bar advanced per example."""
    was_training = model.training
    model.eval()
    nll, tokens = torch.zeros(len(encoded), dtype=torch.float64), torch.zeros(len(encoded), dtype=torch.long)
    scores = torch.zeros(len(encoded), len(label_ids)) if label_ids else None
    for idx in by_length([len(e) for e in encoded], batch_size):
        batch = {k: v.to(device) for k, v in collate([encoded[i] for i in idx], pad_id).items()}
        with autocast(precision, device):
            logits, target = answer_logits(model, batch, virtual)
        logits = logits.float()
        per_token = torch.nn.functional.cross_entropy(
            logits.transpose(1, 2), target, ignore_index=IGNORE, reduction="none"
        )  # (B, T), 0 where ignored
        nll[idx] = per_token.sum(1).double().cpu()
        tokens[idx] = (target != IGNORE).sum(1).cpu()
        if scores is not None:
            first = target.shape[1] - (target != IGNORE).sum(1)  # (B,) column of each answer's first token
            row = logits[torch.arange(len(idx), device=logits.device), first]  # (B, V)
            scores[idx] = torch.log_softmax(row, -1)[:, label_ids].cpu()
        _advance(bar, len(idx))
    model.train(was_training)
    return Heldout(float(nll.sum()) / max(int(tokens.sum()), 1), nll, tokens, scores)


def _advance(bar, n: int) -> None:
    if bar is not None:
        bar.update(n)


def heldout_loss(
    model, encoded: list[Encoded], pad_id: int, batch_size: int, device, virtual: int = 0, precision: str = "auto"
) -> float:
    """Mean cross-entropy per completion token (nats)."""
    return heldout_pass(model, encoded, pad_id, batch_size, device, virtual=virtual, precision=precision).loss


@torch.no_grad()
def label_scores(
    model, pad_id: int, prompts: list[list[int]], label_ids: list[list[int]], batch_size: int, device, virtual: int = 0,
    precision: str = "auto", bar=None,
) -> torch.Tensor:  # fmt: skip
    """(N, L) log-likelihood of each candidate answer (token ids) after each encoded prompt."""
    model.eval()
    scores = torch.zeros(len(prompts), len(label_ids))
    single = all(len(ids) == 1 for ids in label_ids) and len({ids[0] for ids in label_ids}) == len(label_ids)
    for idx in by_length([len(p) for p in prompts], batch_size):
        # single-token answers: one pass; its one answer column holds the whole next-token distribution
        candidates = [label_ids[0]] if single else label_ids
        for j, ids in enumerate(candidates):
            batch = {k: v.to(device) for k, v in collate([Encoded(prompts[i], ids) for i in idx], pad_id).items()}
            with autocast(precision, device):
                logits, target = answer_logits(model, batch, virtual)  # (B, len(ids), V), (B, len(ids))
            logp = torch.log_softmax(logits.float(), -1)
            if single:
                scores[idx] = logp[:, 0, [ids[0] for ids in label_ids]].cpu()
            else:
                scores[idx, j] = logp.gather(-1, target[..., None]).squeeze(-1).sum(-1).cpu()
        _advance(bar, len(idx))
    return scores


def _label_ids(tokenizer, labels: list[str], params: Params) -> list[list[int]]:
    """Each candidate answer's token ids as it is scored. Single distinct tokens: the token alone
    (one pass decides; no label can be a prefix of another). Otherwise the answer as trained, with
    the end-of-sequence token when ``data.append_eos``: without it, a label that is a prefix of
    another ("good" / "good enough") could never score lower, and shorter labels would be favoured."""
    bare = [encode_answer(tokenizer, label, params.data, eos=False) for label in labels]
    if all(len(ids) == 1 for ids in bare) and len({ids[0] for ids in bare}) == len(bare):
        return bare
    return [encode_answer(tokenizer, label, params.data, eos=params.data.append_eos) for label in labels]


def _encode_for_labels(tokenizer, examples: list[dict], labels: list[str], params: Params):
    """(prompt ids cut to leave room for the longest answer, answer ids per label)."""
    label_ids = _label_ids(tokenizer, labels, params)
    room = params.data.max_length - max(len(ids) for ids in label_ids)
    return [encode_prompt(tokenizer, ex["prompt"], params.data)[-room:] for ex in examples], label_ids


def label_accuracy(
    model, tokenizer, examples: list[dict], labels: list[str], params: Params, device, virtual: int = 0, bar=None
) -> dict:
    """Accuracy of picking the most likely answer among ``labels``, overall and per true label,
    and ``correct``: whether each example's pick was right."""
    prompts, label_ids = _encode_for_labels(tokenizer, examples, labels, params)
    gold = torch.tensor([labels.index(ex["completion"]) for ex in examples])
    scores = label_scores(
        model, tokenizer.pad_token_id, prompts, label_ids, params.eval.batch_size, device, virtual,
        params.train.mixed_precision, bar,
    )  # fmt: skip
    return _accuracy(scores, gold, labels)


def _accuracy(scores: torch.Tensor, gold: torch.Tensor, labels: list[str]) -> dict:
    """Accuracy, each true label's accuracy (its recall), macro-F1 (the mean of each label's F1 over
    the labels that are true or predicted at least once, as scikit-learn's ``f1_score(average="macro")``)
    and whether each example was right."""
    picked = scores.argmax(-1)
    correct = picked == gold
    per_label = {label: float(correct[gold == j].float().mean()) for j, label in enumerate(labels) if (gold == j).any()}
    f1 = []
    for j in range(len(labels)):
        true, chosen = gold == j, picked == j
        if true.any() or chosen.any():
            f1.append(2 * float((true & chosen).sum()) / float(true.sum() + chosen.sum()))
    return {"accuracy": float(correct.float().mean()), "per_label_accuracy": per_label, "examples": len(gold),
            "macro_f1": sum(f1) / len(f1), "correct": correct}  # fmt: skip


def label_metrics(picked: list[str], gold: list[str], labels: list[str]) -> dict:
    """Accuracy, macro-F1 and per-label accuracy of predicted labels against the true ones."""
    index = {label: j for j, label in enumerate(labels)}
    scores = torch.nn.functional.one_hot(torch.tensor([index[p] for p in picked]), len(labels))
    out = _accuracy(scores, torch.tensor([index[g] for g in gold]), labels)
    del out["correct"]
    return out


def _classifier_pass(model, tokenizer, params: Params, examples: list[dict], device, virtual: int = 0, bar=None):
    """A sequence classifier on ``examples``: (Heldout with every label's log-probability, its labels)."""
    labels = artifacts.model_labels(model)
    encoded = [classifier.encode(tokenizer, ex, params.data, labels) for ex in examples]
    logp = classifier.log_probs(
        model, encoded, tokenizer.pad_token_id, classifier.pads_left(tokenizer), params.eval.batch_size, device,
        params.train.mixed_precision, virtual, bar,
    )  # fmt: skip
    return _classifier_heldout(logp, encoded), labels


def _classifier_heldout(logp: torch.Tensor, encoded: list) -> Heldout:
    gold = torch.tensor([e.label for e in encoded])
    nll = -logp.gather(1, gold[:, None]).squeeze(1).double()
    return Heldout(float(nll.mean()) if len(nll) else 0.0, nll, torch.ones(len(encoded), dtype=torch.long), logp)


def first_token_labels(
    tokenizer, params: Params, encoded: list[Encoded], examples: list[dict], labels: list[str] | None
) -> list[int] | None:
    """Each label's one token, when the labels are distinct single tokens that start every
    completion: then one pass gives the loss and the label scores. Else None."""
    if not labels:
        return None
    label_ids = [encode_answer(tokenizer, label, params.data, eos=False) for label in labels]
    if not (all(len(ids) == 1 for ids in label_ids) and len({i[0] for i in label_ids}) == len(labels)):
        return None
    gold = [labels.index(ex["completion"]) for ex in examples]
    if not all(e.completion[:1] == label_ids[g] for e, g in zip(encoded, gold, strict=True)):
        return None
    return [ids[0] for ids in label_ids]


def validation(
    model, tokenizer, params: Params, encoded: list[Encoded], examples: list[dict], labels: list[str] | None,
    batch_size: int, device, virtual: int = 0,
) -> dict[str, float]:  # fmt: skip
    """Training's periodic validation: ``val_loss``, and ``val_accuracy`` from the same pass when the
    labels are single tokens (:func:`first_token_labels`; other answers: the loss only) or the model
    is a classifier (``encoded`` are :class:`peftflow.classifier.Labeled`)."""
    if encoded and isinstance(encoded[0], classifier.Labeled):
        logp = classifier.log_probs(
            model, encoded, tokenizer.pad_token_id, classifier.pads_left(tokenizer), batch_size, device,
            params.train.mixed_precision, virtual,
        )  # fmt: skip
        held = _classifier_heldout(logp, encoded)
        gold = torch.tensor([e.label for e in encoded])
        return {"val_loss": held.loss, "val_accuracy": float((logp.argmax(-1) == gold).float().mean())}
    first = first_token_labels(tokenizer, params, encoded, examples, labels)
    held = heldout_pass(
        model, encoded, tokenizer.pad_token_id, batch_size, device, first, virtual, params.train.mixed_precision
    )
    out = {"val_loss": held.loss}
    if held.scores is not None:
        gold = torch.tensor([labels.index(ex["completion"]) for ex in examples])
        out["val_accuracy"] = float((held.scores.argmax(-1) == gold).float().mean())
    return out


def example_ids(examples: list[dict]) -> list[str]:
    """A short content hash per example (prompt and answer), so two sets of per-example scores can
    be checked to be about the same examples, in the same order, before they are paired."""
    return [hashlib.sha256(f"{ex['prompt']}\0{ex['completion']}".encode()).hexdigest()[:16] for ex in examples]


def score_split(
    model, tokenizer, params: Params, examples: list[dict], labels: list[str] | None, device, virtual: int = 0,
    prefix: str = "test_", bar=None,
) -> tuple[dict[str, Any], dict[str, list]]:  # fmt: skip
    """A split's loss and perplexity, and label accuracy when the answers form a closed set (keys
    ``{prefix}loss`` ...), and the per-example values they are made of: ``nll`` (summed over the
    answer's tokens), ``tokens`` and ``correct`` (closed label sets), with the examples' ``ids``.
    ``virtual``: soft tokens the model puts before the input (0 for a base model, or an adapter
    switched off). ``bar``: a progress bar advanced per example scored. A sequence classifier is
    scored over its own labels (its head's), the loss per example."""
    if artifacts.model_labels(model) is not None:
        held, labels = _classifier_pass(model, tokenizer, params, examples, device, virtual, bar)
    else:
        encoded = [encode(tokenizer, ex, params.data) for ex in examples]
        first = first_token_labels(tokenizer, params, encoded, examples, labels)
        held = heldout_pass(
            model, encoded, tokenizer.pad_token_id, params.eval.batch_size, device, first, virtual,
            params.train.mixed_precision, bar,
        )  # fmt: skip
    out: dict[str, Any] = {f"{prefix}loss": held.loss, f"{prefix}perplexity": math.exp(min(held.loss, 50))}
    per = {"ids": example_ids(examples), "nll": held.nll.tolist(), "tokens": held.tokens.tolist()}
    if labels:
        gold = torch.tensor([classifier.label_index(labels, ex["completion"]) for ex in examples])
        if held.scores is None:
            if bar is not None:  # a second pass: candidate answers scored one by one
                bar.total += len(examples)
                bar.refresh()
            acc = label_accuracy(model, tokenizer, examples, labels, params, device, virtual, bar)
        else:
            acc = _accuracy(held.scores, gold, labels)
        out[f"{prefix}accuracy"] = acc["accuracy"]
        out[f"{prefix}macro_f1"] = acc["macro_f1"]
        out[f"{prefix}per_label_accuracy"] = acc["per_label_accuracy"]
        per["correct"] = [int(c) for c in acc["correct"]]
    return out, per


def score(
    model, tokenizer, params: Params, examples: list[dict], labels: list[str] | None, device, virtual: int = 0,
    bar=None,
) -> dict[str, Any]:  # fmt: skip
    """Test loss and perplexity, and label accuracy when the answers form a closed set (see
    :func:`score_split`)."""
    return score_split(model, tokenizer, params, examples, labels, device, virtual, bar=bar)[0]


def _to(model, device: torch.device):
    """Move a model only if it is elsewhere (4-bit models refuse .to())."""
    return model if next(model.parameters()).device == device else model.to(device)


def _zeroshot_key(params: Params, version: str) -> str:
    what = {
        "model": base_model_id(params.model),
        "task": task_of(params.model),
        # a classifier's untrained head is drawn from the run's seed
        **({"seed": params.seed} if task_of(params.model) == CLASSIFIER else {}),
        "dtype": params.model.dtype,
        "device": "cuda" if torch.cuda.is_available() else "cpu",
        "precision": mixed_precision(params.train.mixed_precision),  # bf16 autocast changes the figures
        "data": params.data.model_dump(mode="json"),
        "eval": params.eval.model_dump(),
    }
    return f"{version}-{hashlib.sha256(json.dumps(what, sort_keys=True).encode()).hexdigest()[:12]}"


def evaluate_run(run_dir: Path, params: Params, progress: bool = True) -> EvalResult:
    """Score a finished run and the base model zero-shot on the test split, and the run on the
    selection split; write metrics.json and selection.json (per-example values, for promotion).
    ``progress``: one bar over every example scored (test, selection split, zero-shot)."""
    run_dir = Path(run_dir)
    manifest = data.read_manifest(params.data.out_dir)
    examples = data.read_split(params.data.out_dir, "test")[: params.eval.max_examples]
    selection_examples = data.read_split(params.data.out_dir, SELECTION_SPLIT)
    method = get_method(params.method.name)
    cache = params.train.output_dir / "zeroshot" / f"{_zeroshot_key(params, manifest['version'])}.json"
    model, tokenizer, device, virtual = _trained(run_dir, params)
    total = len(examples) * (1 if cache.is_file() else 2) + len(selection_examples)
    with tqdm(total=total, desc=f"evaluate {method.name}", unit="ex", disable=not progress) as bar:
        metrics = score(model, tokenizer, params, examples, manifest["labels"], device, virtual, bar)
        selected, per_example = selection(model, tokenizer, params, manifest, device, virtual, selection_examples, bar)
        atomic.write_text(run_dir / SELECTION_FILE, json.dumps(per_example) + "\n")
        # the adapter switched off gives the base model (no soft tokens), unless the method loads the
        # base changed (quantized) or the model is a classifier (whose untrained head peft's switch
        # does not restore for soft prompts); else the trained model goes before the base model loads
        if not (artifacts.is_adapter(model) and not method.quantizes_base and artifacts.model_labels(model) is None):
            model = None
        zeroshot = _zeroshot(model, tokenizer, params, examples, manifest, device, cache, bar)
    summary_path = run_dir / "train_summary.json"
    summary = json.loads(summary_path.read_text()) if summary_path.is_file() else {}
    result = EvalResult(
        method=method.name,
        data_version=manifest["version"],
        base_model=base_model_id(params.model),
        task=task_of(params.model),
        **metrics,
        **{k: v for k, v in selected.items() if k in ("val_loss", "val_accuracy", "val_macro_f1")},
        zeroshot=Scores(**zeroshot),
        **{k: summary[k] for k in EFFICIENCY if summary.get(k) is not None},
    )
    (run_dir / "metrics.json").write_text(result.model_dump_json(indent=2, exclude_none=True) + "\n")
    return result


def _zeroshot(adapted, tokenizer, params: Params, examples: list[dict], manifest: dict, device, cache: Path, bar):
    """The base model's test figures, from ``cache`` when this data, model and precision were scored
    before; else scored and cached: with ``adapted``'s adapter switched off, or (None) the base loaded."""
    if cache.is_file():
        return json.loads(cache.read_text())
    if adapted is not None:
        with adapted.disable_adapter():
            zeroshot = score(adapted, tokenizer, params, examples, manifest["labels"], device, 0, bar)
    else:
        labels = manifest["labels"] if task_of(params.model) == CLASSIFIER else None
        base = _to(load_base_model(params.model, labels, params.seed), device)
        zeroshot = score(base, tokenizer, params, examples, manifest["labels"], device, 0, bar)
        del base
    cache.parent.mkdir(parents=True, exist_ok=True)
    atomic.write_text(cache, json.dumps(zeroshot, indent=2) + "\n")  # a reader never sees half a cache file
    return zeroshot


def selection(
    model, tokenizer, params: Params, manifest: dict, device, virtual: int = 0, examples: list[dict] | None = None,
    bar=None,
) -> tuple[dict, dict]:  # fmt: skip
    """The model on the selection split (:data:`SELECTION_SPLIT`, all of it; ``examples`` if read
    already): its figures (``val_loss``, ``val_accuracy``) and the per-example values promotion
    pairs (see :mod:`peftflow.promote`), tagged with the split and the data version."""
    if examples is None:
        examples = data.read_split(params.data.out_dir, SELECTION_SPLIT)
    figures, per = score_split(
        model, tokenizer, params, examples, manifest["labels"], device, virtual, prefix="val_", bar=bar
    )
    return figures, {"split": SELECTION_SPLIT, "data_version": manifest["version"], **per}


def _trained(run_dir: Path, params: Params) -> tuple[Any, Any, torch.device, int]:
    """The run's ``model/`` on the base, on this machine's device: (model, tokenizer, device, the
    method's input-level soft tokens). The artifact is checked before the base model loads, so a
    missing or damaged run is named at once."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    tokenizer = load_tokenizer(params.model)
    artifacts.verify(Path(run_dir) / "model")
    base = load_base_for(params, artifacts.labels(Path(run_dir) / "model"))
    model = _to(artifacts.load(base, Path(run_dir) / "model", verified=True), device)
    return model, tokenizer, device, get_method(params.method.name).input_virtual_tokens(params.method)


def _artifact_params(run_dir: Path, root: Path, params: Params) -> Params:
    """A downloaded artifact's own params (``run_dir/model/params.yaml``), reading ``params``'s data."""
    artifact_params = read_resolved(Path(run_dir) / "model" / "params.yaml").rebased(root)
    artifact_params.data.out_dir = params.rebased(root).data.out_dir
    return artifact_params


def select_artifact(run_dir: Path, root: Path, params: Params) -> dict:
    """The per-example selection-split values of a downloaded ``run_dir/model`` on ``params``'s
    data folder (a champion re-scored on a candidate's data); nothing else is computed."""
    artifact_params = _artifact_params(run_dir, root, params)
    manifest = data.read_manifest(artifact_params.data.out_dir)
    model, tokenizer, device, virtual = _trained(run_dir, artifact_params)
    return selection(model, tokenizer, artifact_params, manifest, device, virtual)[1]


def score_artifact(run_dir: Path, root: Path, params: Params) -> EvalResult:
    """Evaluate a downloaded ``run_dir/model`` (with its params.yaml) on the test split of ``params``'s
    data folder; writes and returns metrics.json."""
    return evaluate_run(run_dir, _artifact_params(run_dir, root, params))


def classify(model, tokenizer, params: Params, texts: list[str]) -> list[dict[str, Any]]:
    """Label raw texts with a model trained on ``text_label`` data: the answer and its probability
    among the labels. Prompts are built exactly as in training (template, instruction, cue); a
    sequence classifier reads them with its head, over its own labels."""
    classes = artifacts.model_labels(model)
    if params.data.format != "text_label" or not (params.data.labels or classes):
        raise ValueError("classify needs a model trained on data.format text_label with data.labels")
    labels = classes or sorted(set(params.data.labels.values()))
    placeholder = next(iter(params.data.labels)) if params.data.labels else labels[0]  # a label the rows parse with
    rows = [{params.data.columns.text: t, params.data.columns.label: placeholder} for t in texts]
    examples = data.to_examples(rows, params.data, "input")
    device = next(model.parameters()).device
    virtual = get_method(params.method.name).input_virtual_tokens(params.method) if params.method else 0
    if classes is not None:
        encoded = [classifier.encode(tokenizer, ex, params.data, labels) for ex in examples]
        scores = classifier.log_probs(
            model, encoded, tokenizer.pad_token_id, classifier.pads_left(tokenizer), params.eval.batch_size, device,
            params.train.mixed_precision, virtual,
        )  # fmt: skip
    else:
        prompts, label_ids = _encode_for_labels(tokenizer, examples, labels, params)
        scores = label_scores(
            model, tokenizer.pad_token_id, prompts, label_ids, params.eval.batch_size, device, virtual,
            params.train.mixed_precision,
        )  # fmt: skip
    probs = scores.softmax(-1)
    return [
        {"text": t, "label": labels[int(p.argmax())], "probability": float(p.max())}
        for t, p in zip(texts, probs, strict=True)
    ]
