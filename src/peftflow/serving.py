"""A trained artifact as an MLflow model: MLflow's pyfunc interface over base model + trained files.

Every run's ``model/`` artifact is an MLflow model. Beside the trained files (the method's weights,
``peftflow.json``, ``params.yaml``) it holds ``MLmodel`` (the python_function flavor, with this
loader :mod:`peftflow.pyfunc`), a signature (``text`` in; ``label`` and ``score``, or ``generated_text``
out), an input example and the pinned requirements. So ``mlflow.pyfunc.load_model(
"models:/NAME@champion")`` and ``mlflow models serve -m models:/NAME@champion`` work, and
``peftflow load`` predicts through the same :class:`Predictor`.

The base model is not stored: ``MLmodel``'s metadata names it (``peftflow.base_model``) and the
digest of its weights, and the loader finds it where peftflow does: the embedded package (converted
once into a cache when the project has not converted it), a local folder relative to the project
(``$PEFTFLOW_ROOT``, else the working directory), a GGUF file, the hub cache. A base whose weights
are not those the artifact was trained on is refused in one line.

Why pyfunc and not MLflow's transformers flavor: that flavor stores a peft adapter with the base's
hub repository id and downloads the base when loading; peftflow's bases are a GGUF in a package
and local folders, nothing may be downloaded, and several methods are not peft adapters
(hand-written bottleneck adapters, BitFit, a classifier's head). The loader is hand-written: no
library maps a peftflow artifact onto pyfunc.
"""

from __future__ import annotations

import importlib.metadata
import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import yaml

from peftflow.config import Params, read_resolved

log = logging.getLogger(__name__)

LOADER = "peftflow.pyfunc"  # the loader module MLmodel names
MLMODEL = "MLmodel"
EXAMPLE = "An example text to label."
MAX_NEW_TOKENS = 64  # what a generation request gets unless it asks (params: max_new_tokens)
# what the loader imports, pinned to this environment's versions (MLflow writes requirements.txt)
REQUIREMENTS = ("torch", "transformers", "peft", "accelerate", "safetensors", "mlflow", "pandas", "peftflow")


def generates(params: Params) -> bool:
    """Whether the model answers with text (instruction / prompt-completion data), not a label."""
    return params.data.format != "text_label"


def signature(params: Params, routed: bool = False):
    """``text`` (and, ``routed``: ``adapter``) in; ``label`` + ``score``, or ``generated_text``, out."""
    from mlflow.models import ModelSignature
    from mlflow.types import ColSpec, ParamSchema, ParamSpec, Schema

    inputs = [ColSpec("string", "text")] + ([ColSpec("string", "adapter")] if routed else [])
    if generates(params):
        outputs = Schema([ColSpec("string", "generated_text")])
        extra = ParamSchema([ParamSpec("max_new_tokens", "long", MAX_NEW_TOKENS)])
        return ModelSignature(Schema(inputs), outputs, extra)
    return ModelSignature(Schema(inputs), Schema([ColSpec("string", "label"), ColSpec("double", "score")]))


def requirements(quantized: bool = False) -> list[str]:
    names = [*REQUIREMENTS, *(["bitsandbytes"] if quantized else [])]
    return [f"{name}=={importlib.metadata.version(name)}" for name in names]


def write_mlflow_model(out_dir: Path, params: Params, local: Params, routed: list[str] | None = None) -> Path:
    """The MLflow model files for a trained artifact into ``out_dir`` (created; the trained files go
    beside them). ``params``: as the user wrote them; ``local``: rebased to this machine (to digest
    the base's weights). ``routed``: the adapter names of a multi-adapter model."""
    import mlflow
    import pandas as pd

    from peftflow.methods import get_method
    from peftflow.model import base_model_id, task_of, weights_identity

    example = pd.DataFrame({"text": [EXAMPLE]} | ({"adapter": [routed[0]]} if routed else {}))
    metadata = {
        "peftflow.base_model": base_model_id(local.model),
        "peftflow.name_or_path": str(params.model.name_or_path),
        "peftflow.base_digest": weights_identity(local.model),
        "peftflow.task": task_of(local.model),
    }
    if routed:
        metadata["peftflow.adapters"] = list(routed)
    else:
        metadata["peftflow.method"] = params.method.name
    with tempfile.TemporaryDirectory(prefix="peftflow-mlmodel-") as tmp:
        # without data_path the loader gets the model's own folder: the trained files lie beside MLmodel
        mlflow.pyfunc.save_model(
            Path(tmp) / "m", loader_module=LOADER, signature=signature(params, bool(routed)),
            input_example=example, pip_requirements=requirements(get_method(params.method.name).quantizes_base),
            metadata=metadata,
        )  # fmt: skip
        Path(out_dir).mkdir(parents=True, exist_ok=True)
        for item in (Path(tmp) / "m").iterdir():
            shutil.move(item, Path(out_dir) / item.name)
    return Path(out_dir)


def metadata(folder: Path) -> dict[str, Any]:
    """``MLmodel``'s peftflow metadata ({} for an artifact from before artifacts were MLflow models)."""
    path = Path(folder) / MLMODEL
    if not path.is_file():
        return {}
    return (yaml.safe_load(path.read_text()) or {}).get("metadata") or {}


def project_root() -> Path:
    """Where relative base-model paths are found: ``$PEFTFLOW_ROOT``, else the working directory."""
    return Path(os.environ.get("PEFTFLOW_ROOT", "."))


def cache_dir() -> Path:
    return Path(os.environ.get("PEFTFLOW_CACHE", Path.home() / ".cache" / "peftflow"))


def base_params(folder: Path, root: Path) -> Params:
    """The artifact's own params, rebased to ``root``, with its base found: the embedded model, when
    the project has not converted it, is converted once into the cache; weights other than those
    trained on are refused in one line."""
    from peftflow.model import convert_embedded, weights_identity

    params = read_resolved(Path(folder) / "params.yaml").rebased(root)
    if params.model.name_or_path == "embedded" and not (params.model.embedded_dir / "config.json").is_file():
        cached = cache_dir() / "smollm2-135m-instruct"
        if not (cached / "config.json").is_file():
            log.info("converting the embedded base model into %s (once)", cached)
            convert_embedded(cached)
        params.model.embedded_dir = cached
    want = metadata(folder).get("peftflow.base_digest")
    have = weights_identity(params.model) if want else None
    if want and have != want:
        raise ValueError(
            f"{folder}: the base model {params.model.name_or_path} (from {root.resolve()}) is not the one this "
            f"model was trained on (weights digest {have}, expected {want}); set "
            f"PEFTFLOW_ROOT to the project it was trained in"
        )
    return params


def texts_of(model_input: Any, column: str = "text") -> list[str]:
    """The texts of a pyfunc input: a DataFrame's column, a dict of columns, a list, a string."""
    import pandas as pd

    if isinstance(model_input, pd.DataFrame):
        if column not in model_input.columns:
            raise ValueError(f"input: no {column!r} column; columns: {', '.join(map(str, model_input.columns))}")
        cells = list(model_input[column])
        if not all(isinstance(t, str) for t in cells):
            # MLflow reads {"text": [a, b]} as ONE row holding a list: say so, rather than label the list's repr
            raise ValueError(
                f"input: column {column!r} must hold one string per row; send a DataFrame, a list of rows "
                f"({{'dataframe_records': [{{'{column}': ...}}]}}) or a list of texts"
            )
        return cells
    if isinstance(model_input, dict):
        value = model_input.get(column)
        if value is None:
            raise ValueError(f"input: no {column!r} field; fields: {', '.join(model_input)}")
        return [value] if isinstance(value, str) else [str(t) for t in value]
    if isinstance(model_input, str):
        return [model_input]
    return [str(t) for t in model_input]


class Predictor:
    """Base + trained artifact, ready for inference; ``predict`` is pyfunc's."""

    def __init__(self, folder: Path, root: Path | None = None, verified: bool = False):
        from peftflow import artifacts
        from peftflow.model import load_base_for, load_tokenizer

        self.folder = Path(folder)
        self.params = base_params(self.folder, Path(root) if root is not None else project_root())
        base = load_base_for(self.params, artifacts.labels(self.folder))
        self.model = artifacts.load(base, self.folder, verified=verified).eval()
        self.tokenizer = load_tokenizer(self.params.model)

    def predict(self, model_input: Any, params: dict[str, Any] | None = None):
        import pandas as pd

        return pd.DataFrame(answer(self.model, self.tokenizer, self.params, texts_of(model_input), params))


def answer(model, tokenizer, params: Params, texts: list[str], options: dict[str, Any] | None = None) -> list[dict]:
    """Each text's label and its probability (``label``, ``score``), or its generated continuation."""
    from peftflow.evaluate import classify

    if not texts:
        return []
    if generates(params):
        new = int((options or {}).get("max_new_tokens") or MAX_NEW_TOKENS)
        return [{"generated_text": t} for t in generate(model, tokenizer, params, texts, new)]
    return [{"label": r["label"], "score": r["probability"]} for r in classify(model, tokenizer, params, texts)]


def generate(model, tokenizer, params: Params, prompts: list[str], max_new_tokens: int) -> list[str]:
    """Greedy continuations of ``prompts``, each rendered as training rendered its prompts."""
    import torch

    from peftflow.methods import get_method
    from peftflow.tokens import encode_prompt, left_pad

    if get_method(params.method.name).input_virtual_tokens(params.method):
        raise ValueError(f"generation with {params.method.name} (soft prompts before the input) is not supported")
    device = next(model.parameters()).device
    out = []
    size = params.eval.batch_size
    for i in range(0, len(prompts), size):
        ids = [encode_prompt(tokenizer, p, params.data)[-params.data.max_length :] for p in prompts[i : i + size]]
        batch = {k: v.to(device) for k, v in left_pad(ids, tokenizer.pad_token_id).items()}
        with torch.inference_mode():
            gen = model.generate(
                input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], max_new_tokens=max_new_tokens,
                do_sample=False, pad_token_id=tokenizer.pad_token_id,
            )  # fmt: skip
        out += tokenizer.batch_decode(gen[:, batch["input_ids"].shape[1] :], skip_special_tokens=True)
    return [t.strip() for t in out]
