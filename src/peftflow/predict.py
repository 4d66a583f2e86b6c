"""Batch scoring: a registered model (or alias) over a JSONL or CSV file, predictions next to it.

:func:`predict_file` reads the file with the model's own column names, predicts through the same
:class:`peftflow.serving.Predictor` that ``mlflow.pyfunc.load_model`` and ``peftflow load`` use,
and writes ``<name>.predictions.jsonl`` beside the input (atomically: a partial file never bears
the name), each input row with ``prediction`` and ``score`` (or ``generated_text``). In a DVC
project the output is ``dvc add``-ed (its ``.dvc`` file beside it, for git) and pushed to the
default DVC remote, so its version is recorded and can be pulled back. One MLflow run per scoring: the
model version used, the rows, the predictions as an artifact and, when every row has a label,
accuracy, macro-F1 and per-label accuracy.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

from pydantic import BaseModel

from peftflow import data, registry, tracking, versioning
from peftflow.config import Params

log = logging.getLogger(__name__)

CHUNK = 256  # rows predicted per call: progress in the log, memory bounded by the model's own batching


class Prediction(BaseModel):
    """What a scoring produced, for the CLI and the flow."""

    output: Path
    rows: int
    model: str  # "NAME version N"
    run_id: str
    metrics: dict[str, float] = {}
    dvc_md5: str | None = None


def output_for(source: Path) -> Path:
    return Path(source).with_name(f"{Path(source).stem}.predictions.jsonl")


def _text_column(params: Params) -> str:
    cols = params.data.columns
    return {"text_label": cols.text, "instruction": cols.instruction}.get(params.data.format, cols.prompt)


def _gold(rows: list[dict], params: Params) -> list[str] | None:
    """The rows' labels as the model names them, when every row has one (text_label models only)."""
    column = params.data.columns.label
    if params.data.format != "text_label" or not all(str(r.get(column) or "").strip() for r in rows):
        return None
    return [params.data.labels.get(str(r[column]).strip(), str(r[column]).strip()) for r in rows]


def predict_file(uri: str, source: Path, root: Path, params: Params, out: Path | None = None) -> Prediction:
    """Score ``source`` with the model at ``uri`` (``models:/NAME@ALIAS`` or ``models:/NAME/N``)."""
    source, root = Path(source), Path(root)
    out = Path(out) if out is not None else output_for(source)
    rows = data.read_rows(source)
    if not rows:
        raise data.DataError(f"{source}: no rows to score")
    predictor, version = registry.load(uri, root, params)
    model_params = predictor.params
    column = _text_column(model_params)
    texts = [data.field(row, column, f"{source} row {n}") for n, row in enumerate(rows, 1)]
    gold = _gold(rows, model_params)
    name = f"{version.name} version {version.version}"
    tags = {"peftflow.kind": "predict", "peftflow.model_uri": uri, "peftflow.model_version": name,
            "peftflow.model_run_id": version.run_id}  # fmt: skip
    logged = {"model_uri": uri, "model_version": name, "input": str(source), "output": str(out), "rows": len(rows)}
    run = tracking.start_run(params, root, f"predict {source.name}", tags, logged)
    with tracking.running(run.client, run.run_id):
        answers: list[dict] = []
        for i in range(0, len(texts), CHUNK):
            answers += predictor.predict(texts[i : i + CHUNK]).to_dict("records")
            log.info("%s: %d/%d rows scored with %s", source.name, len(answers), len(texts), name)
        metrics = {}
        if gold is not None and "label" in answers[0]:
            from peftflow.evaluate import label_metrics

            labels = sorted({*gold, *(a["label"] for a in answers)})
            scored = label_metrics([a["label"] for a in answers], gold, labels)
            metrics = {"accuracy": scored["accuracy"], "macro_f1": scored["macro_f1"]}
            metrics |= {f"per_label_accuracy.{k}": v for k, v in scored["per_label_accuracy"].items()}
            run.log_metrics(metrics)
        _write(out, rows, answers)
        run.log_artifact(out, "predictions")
        md5 = None
        if (root / ".dvc").is_dir() and out.resolve().is_relative_to(root.resolve()):
            md5 = versioning.track(root, out)
            run.set_tag("dvc.predictions_md5", md5)
            versioning.push(root, [str(out.resolve().relative_to(root.resolve())) + ".dvc"])
            log.info("%s: DVC-tracked (md5 %s); `git add %s.dvc` records this version", out.name, md5, out)
    return Prediction(output=out, rows=len(rows), model=name, run_id=run.run_id, metrics=metrics, dvc_md5=md5)


def _write(out: Path, rows: list[dict], answers: list[dict]) -> None:
    """Each row with its answer (``label`` as ``prediction``), written under a temporary name first."""
    tmp = out.with_name(f".{out.name}.partial")
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            for row, a in zip(rows, answers, strict=True):
                answer = {"prediction": a["label"], "score": a["score"]} if "label" in a else a
                f.write(json.dumps({**row, **answer}, ensure_ascii=False) + "\n")
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)
