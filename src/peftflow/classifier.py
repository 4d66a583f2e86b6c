"""Sequence classification (``model.task: sequence_classification``): examples -> token ids ->
batches, and the loss of the model's own classification head.

The data is the prepared ``text_label`` data the causal LM trains on: the input is each example's
prompt as prepared (the template with the instruction and the text; no answer cue and no chat
template: the head reads the text, it does not continue it), the class is the answer's index among
the classifier's labels (the prepared data's answers, sorted; the model's ``id2label``). A prompt
longer than ``data.max_length`` tokens loses its end (the tokenizer's truncation, which keeps the
closing special token).

Padding follows where the head reads: an encoder pools its first token (``[CLS]``), so rows are
padded on the right; a decoder's head reads the last token that is not padding, so rows are padded
on the left, which puts every row's last token in the last column (also when soft prompts replace
the input ids by embeddings, where transformers cannot find the padding). Which one: whether the
tokenizer has a CLS token.

The objective is the head's cross-entropy summed over examples (its units are examples, as a causal
LM's are answer tokens); scoring reads the log-probability of every label from one pass.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers import PreTrainedTokenizerBase

from peftflow.config import DataParams
from peftflow.tokens import by_length, left_pad, model_inputs
from peftflow.training.optim import autocast


@dataclass(frozen=True)
class Labeled:
    """One example as the classifier reads it: token ids and the index of its label."""

    ids: list[int]
    label: int
    cut: bool = False  # longer than data.max_length: its end was cut

    def __len__(self) -> int:
        return len(self.ids)


def pads_left(tokenizer: PreTrainedTokenizerBase) -> bool:
    """Whether batches pad on the left: a tokenizer without a CLS token is a decoder's, whose head
    reads the last token (see the module's docstring)."""
    return tokenizer.cls_token is None


def label_index(labels: list[str], answer: str) -> int:
    try:
        return labels.index(answer)
    except ValueError:
        raise ValueError(
            f"label {answer!r} is not one the classifier has a class for ({', '.join(labels)}); it was trained on "
            f"other labels"
        ) from None


def encode(
    tokenizer: PreTrainedTokenizerBase, example: dict[str, str], params: DataParams, labels: list[str]
) -> Labeled:
    ids = tokenizer(example["prompt"])["input_ids"]
    label = label_index(labels, example["completion"])
    if len(ids) <= params.max_length:
        return Labeled(ids, label)
    return Labeled(
        tokenizer(example["prompt"], truncation=True, max_length=params.max_length)["input_ids"], label, True
    )


def collate(batch: list[Labeled], pad_id: int, left: bool) -> dict[str, torch.Tensor]:
    """input_ids and attention_mask (B, T), padded on the left (with position ids) or the right, and
    labels (B,)."""
    seqs = [e.ids for e in batch]
    if left:
        out = left_pad(seqs, pad_id)
    else:
        width = max(len(s) for s in seqs)
        ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
        mask = torch.zeros((len(seqs), width), dtype=torch.long)
        for i, s in enumerate(seqs):
            ids[i, : len(s)] = torch.tensor(s)
            mask[i, : len(s)] = 1
        out = {"input_ids": ids, "attention_mask": mask}
    out["labels"] = torch.tensor([e.label for e in batch])
    return out


def examples(batch: dict[str, torch.Tensor]) -> int:
    """A batch's units: its examples."""
    return len(batch["labels"])


def label_logits(model, batch: dict[str, torch.Tensor], virtual: int = 0) -> torch.Tensor:
    """(B, L) the head's logits (``virtual``: soft tokens the method puts before the input)."""
    return model(**model_inputs(batch, virtual)).logits


def loss_sum(model, batch: dict[str, torch.Tensor], virtual: int = 0) -> torch.Tensor:
    """The head's cross-entropy summed over the batch's examples (nats)."""
    logits = label_logits(model, batch, virtual)
    return torch.nn.functional.cross_entropy(logits.float(), batch["labels"], reduction="sum")


@torch.no_grad()
def log_probs(
    model, encoded: list[Labeled], pad_id: int, left: bool, batch_size: int, device, precision: str = "auto",
    virtual: int = 0, bar=None,
) -> torch.Tensor:  # fmt: skip
    """(N, L) each example's log-probability of every label, in eval mode, at ``precision``
    (``train.mixed_precision``); ``bar``: a progress bar advanced per example."""
    was_training = model.training
    model.eval()
    out = torch.zeros(len(encoded), len(_labels_of(model)))
    for idx in by_length([len(e) for e in encoded], batch_size):
        batch = {k: v.to(device) for k, v in collate([encoded[i] for i in idx], pad_id, left).items()}
        with autocast(precision, device):
            logits = label_logits(model, batch, virtual)
        out[idx] = torch.log_softmax(logits.float(), -1).cpu()
        if bar is not None:
            bar.update(len(idx))
    model.train(was_training)
    return out


def _labels_of(model) -> dict:
    while hasattr(model, "module") and isinstance(model.module, torch.nn.Module):  # DDP / DeepSpeed wrappers
        model = model.module
    return model.config.id2label
