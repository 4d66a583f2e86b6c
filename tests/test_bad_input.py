"""Bad input, as a user gives it, through the command line: one red line naming the file (and line)
or the key, exit code 2, no traceback, and nothing half-written (no prepared data, no trained artifact)."""

from __future__ import annotations

import re
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
from typer.testing import CliRunner

from peftflow.cli import app
from tests.conftest import PARAMS_DIR, make_rows, tiny_overrides

runner = CliRunner()


def _edit(path: Path, old: str, new: str) -> None:
    text = path.read_text()
    assert old in text, f"{path} lacks {old!r}"
    path.write_text(text.replace(old, new, 1))


def _data(path: Path, body: bytes) -> None:
    path.write_bytes(body)


ONE_LABEL = "".join(f'{{"text": "a fine film {i}", "label": "1"}}\n' for i in range(60)).encode()
DUPLICATED = b"".join(
    f'{{"text": "{r["text"]}", "label": "{r["label"]}"}}\n'.encode() * 3 for r in make_rows(60)
)  # every row three times: copies must not straddle train and test

# (what is wrong, how to make it so, the command, what the one line must say)
Case = tuple[Callable[[Path], None], list[str], str]
CASES: dict[str, Case] = {
    "a key given twice in a params file": (
        lambda p: _edit(p / "params" / "base.yaml", "train:\n", "train:\n  lr: 1.0e-3\ntrain:\n"),
        ["train", "-m", "lora"],
        r"base.yaml: line \d+: not valid YAML \(key 'train' given twice \(first on line \d+\)\)",
    ),
    "a split size that is neither a fraction nor a count": (
        lambda p: None,
        ["prepare", "-s", "data.split.test=1.5"],
        r"data.split.test: 1.5 is neither a fraction in \(0, 1\) nor a whole number of examples",
    ),
    "a bad value in base.yaml that the method file overrides": (
        lambda p: _edit(p / "params" / "base.yaml", "  lr: 5.0e-4", "  lr: fast"),
        ["train", "-m", "lora"],
        r"base.yaml: train.lr: Input should be a valid number",
    ),
    "a prompt template with an unknown field": (
        lambda p: _edit(p / "params" / "data.yaml", "Review: {text}", "Review: {review}"),
        ["prepare"],
        r"data.yaml: data.prompt_template: unknown field \{review\}; a template may use",
    ),
    "a promotion metric no run logs": (
        lambda p: None,
        ["train", "-m", "lora", "-s", "promote.metric=test_acuracy"],
        r"promote.metric: 'test_acuracy' is not a metric a run logs; did you mean 'test_accuracy'\?",
    ),
    "a bad cron given as an override": (
        lambda p: None,
        ["prepare", "-s", "nightly.cron=0 2 * *"],
        r"override 'nightly.cron=0 2 \* \*': nightly.cron: cron '0 2 \* \*': expected 5 fields",
    ),
    "an empty data file": (
        lambda p: _data(p / "reviews.jsonl", b""),
        ["prepare"],
        r"reviews.jsonl: no examples \(an empty file, or a header without rows\)",
    ),
    "a CSV with a header and no rows": (
        lambda p: _data(p / "reviews.csv", b"text,label\n"),
        ["prepare", "-s", "data.source={tmp}/reviews.csv"],
        r"reviews.csv: no examples",
    ),
    "a data file that is not UTF-8": (
        lambda p: _data(p / "reviews.jsonl", b'{"text": "fine", "label": "1"}\n{"text": "caf\xe9", "label": "-1"}\n'),
        ["prepare"],
        r"reviews.jsonl:2: not UTF-8 \(byte 0xe9 at offset \d+\)",
    ),
    "data with a single label": (
        lambda p: _data(p / "reviews.jsonl", ONE_LABEL),
        ["prepare"],
        r"reviews.jsonl: every example has the label 'positive'; a classification task needs at least two",
    ),
    "a truncated base model weights file": (
        lambda p: _data(p / "model" / "model.safetensors", (p / "model" / "model.safetensors").read_bytes()[:1000]),
        ["train", "-m", "lora"],
        r"model.name_or_path: .*model: its weights cannot be read \(.*\); a truncated or damaged .safetensors",
    ),
}


@pytest.fixture
def project(tmp_path, tiny_model_dir, tiny_data_file):
    """A params folder of its own (cases edit it), the tiny model and data copied (cases damage them)."""
    shutil.copytree(PARAMS_DIR, tmp_path / "params")
    shutil.copytree(tiny_model_dir, tmp_path / "model")
    shutil.copy(tiny_data_file, tmp_path / "reviews.jsonl")
    return tmp_path


@pytest.mark.parametrize("case", sorted(CASES))
def test_bad_input_is_one_line_naming_where(case, project):
    damage, command, expected = CASES[case]
    sets = [*tiny_overrides(project / "model", project / "reviews.jsonl", project)]
    if command[0] == "train":  # data prepared before the damage, so training is what meets it
        result = runner.invoke(app, ["prepare", "--params-dir", str(project / "params"), *_flags(sets)])
        assert result.exit_code == 0, result.output
    damage(project)
    name, *args = [a.replace("{tmp}", str(project)) for a in command]  # its own -s after the tiny ones
    result = runner.invoke(app, [name, "--params-dir", str(project / "params"), *_flags(sets), *args])
    lines = result.output.strip().splitlines()
    assert result.exit_code == 2, result.output
    assert len(lines) == 1 and lines[0].startswith("error: "), result.output
    assert re.search(expected, lines[0]), lines[0]
    if command[0] == "prepare":
        assert not (project / "prepared").exists(), "bad data must leave no prepared folder"
    assert not list((project / "runs").glob("*/model")), "bad input must leave no trained artifact"


def _flags(overrides: list[str]) -> list[str]:
    return [arg for o in overrides for arg in ("-s", o)]


def test_repeated_examples_never_straddle_the_splits(project):
    from peftflow.data import read_manifest, read_split

    _data(project / "reviews.jsonl", DUPLICATED)
    sets = tiny_overrides(project / "model", project / "reviews.jsonl", project)
    result = runner.invoke(app, ["prepare", "--params-dir", str(project / "params"), *_flags(sets)])
    assert result.exit_code == 0, result.output
    splits = {
        name: {ex["prompt"] for ex in read_split(project / "prepared", name)} for name in ("train", "val", "test")
    }
    assert not splits["test"] & splits["train"] and not splits["val"] & splits["train"]
    distinct = {(r["text"], r["label"]) for r in make_rows(60)}
    assert read_manifest(project / "prepared")["checks"] == {
        "examples_read": 180, "duplicates_removed": 180 - len(distinct), "prompts_with_several_answers": 0
    }  # fmt: skip


FLOW_CASES = {
    "a tracking URI nothing answers at": (
        ["experiment", "-m", "lora", "-s", "tracking.uri=http://127.0.0.1:9"],
        r"MLflow tracking URI http://127.0.0.1:9: unreachable or unusable",
    ),
    "a run id the store does not have": (["reproduce", "0123abc"], r"no MLflow run '0123abc' in sqlite:///"),
}


@pytest.mark.parametrize("case", sorted(FLOW_CASES))
def test_bad_input_to_a_flow_is_one_line_before_it_starts(case, project):
    from flows.cli import flows_app

    command, expected = FLOW_CASES[case]
    result = runner.invoke(flows_app, [*command, "--root", str(project)])
    lines = result.output.strip().splitlines()
    assert result.exit_code == 2, result.output
    assert len(lines) == 1 and re.search(expected, lines[0]), result.output
    assert not (project / "runs").exists()
