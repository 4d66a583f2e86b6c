"""GGUF files as base models: de-quantized once into a plain safetensors checkpoint.

transformers can load GGUF but refuses to ``save_pretrained`` such a model, so :func:`convert_gguf`
copies the de-quantized state dict into a fresh model built from the same config and saves that
(with the tokenizer) as a checkpoint folder, atomically; :func:`gguf_checkpoint` does it once per
file content, under a file lock, into a folder named by the content hash.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import logging
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from peftflow.atomic import atomic_dir

log = logging.getLogger(__name__)


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


def _examples(names: list[str], shown: int = 3) -> str:
    more = f" and {len(names) - shown} more" if len(names) > shown else ""
    return ", ".join(names[:shown]) + more
