"""Examples -> token ids -> padded batches, with the loss on the completion only.

With ``data.chat_template`` on and a tokenizer that has one, the prompt is a user turn after an
optional system prompt and the completion is the assistant's answer. Otherwise the model sees
``prompt + data.answer_cue`` followed by ``" " + completion``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from transformers import PreTrainedTokenizerBase

from peftflow.config import DataParams

IGNORE = -100  # label value the loss skips: prompt and padding


@dataclass(frozen=True)
class Encoded:
    prompt: list[int]
    completion: list[int]
    cut: bool = False  # longer than data.max_length: the prompt's start was cut

    def __len__(self) -> int:
        return len(self.prompt) + len(self.completion)


def by_length(lengths: list[int], batch_size: int) -> Iterator[list[int]]:
    """Index chunks of similar length, so little of each batch is padding (for scoring)."""
    order = sorted(range(len(lengths)), key=lengths.__getitem__)
    for i in range(0, len(order), batch_size):
        yield order[i : i + batch_size]


def uses_chat(tokenizer: PreTrainedTokenizerBase, params: DataParams) -> bool:
    return bool(params.chat_template and tokenizer.chat_template)


def render_prompt(tokenizer: PreTrainedTokenizerBase, prompt: str, params: DataParams) -> str:
    if uses_chat(tokenizer, params):
        messages = [{"role": "system", "content": params.system_prompt}] if params.system_prompt else []
        messages.append({"role": "user", "content": prompt})
        return tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    return prompt + params.answer_cue


def encode_prompt(tokenizer: PreTrainedTokenizerBase, prompt: str, params: DataParams) -> list[int]:
    chat = uses_chat(tokenizer, params)  # a chat template writes its own special tokens
    return tokenizer.encode(render_prompt(tokenizer, prompt, params), add_special_tokens=not chat)


def encode_answer(tokenizer: PreTrainedTokenizerBase, answer: str, params: DataParams, eos: bool) -> list[int]:
    """Token ids of an answer as the model sees it after the prompt (eos: add the stop token)."""
    text = answer if uses_chat(tokenizer, params) else " " + answer
    ids = tokenizer.encode(text, add_special_tokens=False)
    if eos and tokenizer.eos_token_id is not None:
        ids.append(tokenizer.eos_token_id)
    return ids


def encode(tokenizer: PreTrainedTokenizerBase, example: dict[str, str], params: DataParams) -> Encoded:
    prompt = encode_prompt(tokenizer, example["prompt"], params)
    completion = encode_answer(tokenizer, example["completion"], params, eos=params.append_eos)
    overflow = len(prompt) + len(completion) - params.max_length
    if overflow > 0:
        if overflow >= len(prompt):
            raise ValueError(
                f"data.max_length: {params.max_length} tokens leave no room for a prompt before a "
                f"{len(completion)}-token completion ({example['completion'][:40]!r}...)"
            )
        return Encoded(prompt[overflow:], completion, cut=True)  # the end of the prompt kept, next to the answer
    return Encoded(prompt, completion)


def collate(batch: list[Encoded], pad_id: int) -> dict[str, torch.Tensor]:
    """Left-padded input_ids, attention_mask, position_ids and labels, each (B, T).

    Left padding puts every completion at the end of its row, so the logits needed for the loss
    are the last ``max completion length + 1`` columns (see :func:`answer_logits`).
    """
    out = left_pad([e.prompt + e.completion for e in batch], pad_id)
    labels = torch.full_like(out["input_ids"], IGNORE)
    for i, e in enumerate(batch):
        labels[i, labels.shape[1] - len(e.completion) :] = torch.tensor(e.completion)
    out["labels"] = labels
    return out


def left_pad(seqs: list[list[int]], pad_id: int) -> dict[str, torch.Tensor]:
    """Left-padded batch whose last column is every row's last token, with matching position ids."""
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, width - len(s) :] = torch.tensor(s)
        mask[i, width - len(s) :] = 1
    positions = (mask.cumsum(dim=1) - 1).clamp(min=0)
    return {"input_ids": ids, "attention_mask": mask, "position_ids": positions}


def model_inputs(batch: dict[str, torch.Tensor], virtual: int = 0) -> dict[str, torch.Tensor]:
    """The batch minus labels (and minus position ids where peft would drop them with a warning:
    ``virtual`` > 0, soft tokens before the input)."""
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    if virtual:
        inputs.pop("position_ids", None)
    return inputs


def _output_head(model) -> torch.nn.Module | None:
    """The output projection of a (possibly DDP/DeepSpeed-wrapped, peft-wrapped) causal LM."""
    while hasattr(model, "module") and isinstance(model.module, torch.nn.Module):
        model = model.module
    get = getattr(model, "get_output_embeddings", None)
    return get() if get is not None else None


@contextmanager
def head_input(model, select: Callable[[torch.Tensor], torch.Tensor]) -> Iterator[None]:
    """Within the block, the output head projects ``select(hidden)`` instead of the hidden states
    it is given: the rows that need logits, gathered into one contiguous (B, A, H) tensor. A
    strided slice (what ``logits_to_keep`` passes) makes the head a batched matmul against a
    broadcast weight, several times slower on CPU than one plain matmul over the gathered rows."""
    head = _output_head(model)
    if head is None:  # no separate head module: the model's own logits, selected after
        yield
        return
    handle = head.register_forward_pre_hook(lambda _module, args: (select(args[0]), *args[1:]))
    try:
        yield
    finally:
        handle.remove()


def answer_logits(model, batch: dict[str, torch.Tensor], virtual: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """(logits, targets) for the trailing answer columns of a :func:`collate` batch: (B, A, V), (B, A).

    ``virtual``: soft tokens the model puts before the input (the method's
    ``input_virtual_tokens``; 0 with its adapter switched off). Only the positions that predict
    answer tokens go through the output head (:func:`head_input`): with a 49k vocabulary,
    full-sequence logits cost more than the rest of a small model's step.
    """
    labels = batch["labels"]
    answer = int((labels != IGNORE).any(dim=0).flip(0).cumprod(0).sum())  # trailing label columns
    target = labels[:, -answer:]
    if not virtual:
        with head_input(model, lambda h: h[:, -(answer + 1) :].contiguous()):
            logits = model(**model_inputs(batch), logits_to_keep=answer + 1).logits
        return logits[:, -(answer + 1) : -1], target
    # peft puts an input-level soft prompt before the padding and ignores position ids, so left
    # padding would leave a batch-dependent gap between prompt and text. Move the padding to the
    # right for these methods and pick each row's answer-predicting positions out before the head.
    pad = (batch["attention_mask"] == 0).sum(dim=1)  # (B,) left padding of each row
    rows = range(labels.shape[0])
    right = {k: torch.stack([batch[k][i].roll(-int(pad[i])) for i in rows]) for k in ("input_ids", "attention_mask")}
    width = labels.shape[1]
    cols = torch.arange(width - answer, width, device=labels.device)  # answer columns, left-padded coordinates
    # (B, A): the position (after the soft tokens) whose output predicts each answer token
    source = virtual + (cols[None, :] - pad[:, None] - 1).clamp(min=0)
    row_index = torch.arange(len(rows), device=labels.device)[:, None]

    def pick(hidden: torch.Tensor) -> torch.Tensor:
        return hidden[row_index.to(hidden.device), source.to(hidden.device)]

    with head_input(model, pick):
        logits = model(**right).logits
    if logits.shape[1] != answer:  # no head module to select before: select from the full logits
        logits = pick(logits)
    return logits, target


def completion_tokens(batch: dict[str, torch.Tensor]) -> int:
    """Completion tokens of a :func:`collate` batch (the units its loss is counted in)."""
    return int((batch["labels"] != IGNORE).sum())


def completion_loss_sum(model, batch: dict[str, torch.Tensor], virtual: int = 0) -> torch.Tensor:
    """Summed cross-entropy over the completion tokens of a :func:`collate` batch (nats)."""
    logits, target = answer_logits(model, batch, virtual)
    return torch.nn.functional.cross_entropy(
        logits.float().reshape(-1, logits.shape[-1]), target.reshape(-1), ignore_index=IGNORE, reduction="sum"
    )
