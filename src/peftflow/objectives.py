"""What a run learns from its examples, by ``model.task``: how an example becomes token ids, how
encoded examples batch, the loss a step sums and the units it is normalized by.

- :class:`CausalLM` (:mod:`peftflow.tokens`): the answer's tokens after the prompt; cross-entropy
  over the answer tokens, whose count is a step's units;
- :class:`Classifier` (:mod:`peftflow.classifier`): the prompt's tokens and the label's index; the
  head's cross-entropy, one unit per example.

The training recipe and the compare budget take one of these (:func:`for_run`) and never ask which.
"""

from __future__ import annotations

from typing import Any

import torch
from transformers import PreTrainedTokenizerBase

from peftflow import classifier, tokens
from peftflow.config import DataParams, Params


class CausalLM:
    task = "causal_lm"

    def __init__(self, tokenizer: PreTrainedTokenizerBase, data: DataParams):
        self.tokenizer, self.data = tokenizer, data

    def encode(self, example: dict[str, str]) -> tokens.Encoded:
        return tokens.encode(self.tokenizer, example, self.data)

    def collate(self, batch: list[tokens.Encoded]) -> dict[str, torch.Tensor]:
        return tokens.collate(batch, self.tokenizer.pad_token_id)

    @staticmethod
    def units(batch: dict[str, torch.Tensor]) -> int:
        return tokens.completion_tokens(batch)

    @staticmethod
    def loss_sum(model, batch: dict[str, torch.Tensor], virtual: int = 0) -> torch.Tensor:
        return tokens.completion_loss_sum(model, batch, virtual)


class Classifier:
    task = "sequence_classification"

    def __init__(self, tokenizer: PreTrainedTokenizerBase, data: DataParams, labels: list[str]):
        self.tokenizer, self.data, self.labels = tokenizer, data, labels
        self.left = classifier.pads_left(tokenizer)

    def encode(self, example: dict[str, str]) -> classifier.Labeled:
        return classifier.encode(self.tokenizer, example, self.data, self.labels)

    def collate(self, batch: list[classifier.Labeled]) -> dict[str, torch.Tensor]:
        return classifier.collate(batch, self.tokenizer.pad_token_id, self.left)

    @staticmethod
    def units(batch: dict[str, torch.Tensor]) -> int:
        return classifier.examples(batch)

    @staticmethod
    def loss_sum(model, batch: dict[str, torch.Tensor], virtual: int = 0) -> torch.Tensor:
        return classifier.loss_sum(model, batch, virtual)


def for_run(
    params: Params, tokenizer: PreTrainedTokenizerBase, labels: list[str] | None = None
) -> CausalLM | Classifier:
    """The objective of ``params``'s model task; a classifier's ``labels`` default to the prepared data's."""
    from peftflow.model import CLASSIFIER, classes, task_of

    if task_of(params.model) == CLASSIFIER:
        return Classifier(tokenizer, params.data, labels if labels is not None else classes(params))
    return CausalLM(tokenizer, params.data)


def cut(encoded: list[Any]) -> int:
    """How many encoded examples ``data.max_length`` cut."""
    return sum(1 for e in encoded if e.cut)


def cut_counts(params: Params) -> dict[str, tuple[int, int]]:
    """Per prepared split, (examples longer than ``data.max_length`` tokens of the configured model,
    examples): what a run on this data and model cuts."""
    from peftflow import data
    from peftflow.model import load_tokenizer

    objective = for_run(params, load_tokenizer(params.model))
    counts = {}
    for split in data.SPLITS:
        encoded = [objective.encode(ex) for ex in data.read_split(params.data.out_dir, split)]
        counts[split] = (cut(encoded), len(encoded))
    return counts
