"""The comparison's pure parts: the efficient frontier, the leaderboard built from runs (mean and
spread over seeds, zero-shot row 0, failures last), the token budget -> steps count, and the report
files (CSV read back, Markdown, self-contained HTML, three PNG plots)."""

from __future__ import annotations

import csv
import io
import json
import re

import pytest

from peftflow import compare, leaderboard
from peftflow.config import PromoteParams
from peftflow.training.sampler import Sampler

GiB = 2**30


def _run(method, seed, acc, params, mem, loss=0.2, tok_s=100.0, **extra):
    metrics = {
        "test_accuracy": acc,
        "test_loss": loss,
        "trainable_params": params,
        "trainable_pct": params / 1e6,
        "peak_memory_bytes": mem,
        "tokens_per_s": tok_s,
        "artifact_bytes": params * 4,
        "wall_seconds": 60.0,
        "zeroshot_test_accuracy": 0.7,
        "zeroshot_test_loss": 1.7,
        **extra,
    }
    return {"method": method, "seed": seed, "run_id": f"{method}-{seed}", "metrics": metrics, "error": None}


def _records():
    return [
        _run("lora", 1, 0.80, 5_000_000, 5 * GiB, tok_s=150),
        _run("lora", 2, 0.90, 5_000_000, 6 * GiB, tok_s=170),
        _run("ia3", 1, 0.82, 60_000, 3 * GiB, tok_s=260),
        _run("full", 1, 0.84, 135_000_000, 5 * GiB, tok_s=120),  # dominated on memory by lora (5-6 GiB, 0.85)
        _run("bitfit", 1, 0.65, 150_000, 2.8 * GiB),  # below zero-shot, cheapest on memory
        {"method": "prompt", "seed": 1, "run_id": None, "metrics": {}, "error": "boom: out of memory"},
    ]


def test_frontier_is_the_pareto_front():
    points = {"a": (1, 0.5), "b": (2, 0.7), "c": (3, 0.6), "d": (2, 0.7), "e": (10, 0.9), "f": (1, 0.4)}
    assert leaderboard.frontier(points) == {"a", "b", "d", "e"}  # c: b is cheaper and better; f: a dominates
    losses = {"a": (1, 0.5), "b": (2, 0.3), "c": (3, 0.4)}
    assert leaderboard.frontier(losses, higher_is_better=False) == {"a", "b"}
    assert leaderboard.frontier({}) == set()


def test_rows_aggregate_seeds_rank_and_mark_the_frontiers():
    table = leaderboard.rows(_records(), PromoteParams())
    assert [r["method"] for r in table] == ["base (zero-shot)", "lora", "full", "ia3", "bitfit", "prompt"]
    base, lora, full, ia3, bitfit, prompt = table
    assert base["rank"] == 0 and base["test_accuracy_mean"] == 0.7 and base["trainable_params"] == 0
    assert lora["runs"] == 2 and lora["seeds"] == "1 2" and lora["test_accuracy_mean"] == pytest.approx(0.85)
    assert lora["test_accuracy_std"] == pytest.approx(0.0707107, abs=1e-6)
    assert (lora["test_accuracy_min"], lora["test_accuracy_max"]) == (0.80, 0.90)
    assert lora["peak_memory_bytes"] == 6 * GiB and lora["tokens_per_s"] == pytest.approx(160)
    assert ia3["test_accuracy_std"] is None  # one seed: no spread
    assert [r["rank"] for r in table[1:5]] == [1, 2, 3, 4] and prompt["rank"] is None
    # params: ia3 (60k, 0.82) < bitfit? no: bitfit is dearer and worse; lora beats ia3 for more params;
    # full is dearer than lora and worse
    assert leaderboard.frontier_methods(table, "params") == ["ia3", "lora"]
    # memory: bitfit is the cheapest, ia3 better for a little more, lora best; full (5 GiB, 0.84) is not
    # dominated by lora (6 GiB peak) and so stays
    assert leaderboard.frontier_methods(table, "memory") == ["bitfit", "ia3", "full", "lora"]
    assert bitfit["beats_zeroshot"] is False and lora["beats_zeroshot"] is True
    assert prompt["failed"] == 1 and prompt["error"] == "boom: out of memory" and prompt["runs"] == 0


def test_rows_follow_the_policy_direction_and_name_a_run_without_the_metric():
    by_loss = leaderboard.rows(
        [_run("a", 1, 0.9, 10, GiB, loss=0.5), _run("b", 1, 0.8, 10, GiB, loss=0.3)],
        PromoteParams(metric="val_loss", higher_is_better=False, guards={}),  # ranked by its test figure
    )
    assert [r["method"] for r in by_loss] == ["base (zero-shot)", "b", "a"]
    assert by_loss[0]["test_loss_mean"] == 1.7
    bad = _run("ia3", 3, 0.8, 10, GiB)
    del bad["metrics"]["test_accuracy"]
    with pytest.raises(KeyError, match="run ia3-3 \\(ia3\\): no 'test_accuracy'"):
        leaderboard.rows([bad], PromoteParams())


def test_steps_for_budget_counts_the_sampler_tokens_exactly():
    assert compare.steps_for_budget([10] * 64, 4, 1, 0, 100) == 3  # 40 tokens a step
    assert compare.steps_for_budget([10] * 64, 4, 2, 0, 100) == 2  # 80 a step
    lengths = [5 + (i * 7) % 23 for i in range(200)]
    for seed in (0, 1):
        steps = compare.steps_for_budget(lengths, 8, 1, seed, 1000)
        sampler = Sampler(lengths, 8, seed)
        seen = [sum(lengths[i] for i in sampler.indices(k)) for k in range(steps)]
        assert sum(seen) >= 1000 > sum(seen[:-1])


def test_report_files_are_complete_and_self_contained(tmp_path):
    records = _records()
    table = leaderboard.rows(records, PromoteParams())
    out = tmp_path / "reports" / "compare"
    out.mkdir(parents=True)
    (out / "stale.txt").write_text("from an earlier comparison")
    compare.write_report(out, table, records, "test_accuracy", "a title", ["note one", "note <two>"])
    names = {p.name for p in out.iterdir()}
    assert names == {"leaderboard.csv", "leaderboard.md", "leaderboard.html", "leaderboard.json", "runs.csv",
                     "quality_vs_params.png", "quality_vs_memory.png", "tokens_per_s.png"}  # fmt: skip
    assert not (tmp_path / "reports" / "compare.partial").exists()
    for png in ("quality_vs_params.png", "quality_vs_memory.png", "tokens_per_s.png"):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and (out / png).stat().st_size > 10_000

    rows = list(csv.DictReader(io.StringIO((out / "leaderboard.csv").read_text())))
    assert [r["method"] for r in rows] == ["base (zero-shot)", "lora", "full", "ia3", "bitfit", "prompt"]
    assert float(rows[1]["test_accuracy_mean"]) == pytest.approx(0.85) and rows[1]["frontier_params"] == "True"
    assert rows[5]["error"] == "boom: out of memory"
    md = (out / "leaderboard.md").read_text()
    assert "| 0 | base (zero-shot) | 0 | 70.0% |" in md
    assert "| 1 | lora | 2 | 85.0% ± 7.1 | - | 0.2000 | 5,000,000 |" in md and "params, memory" in md
    assert "| memory, below zero-shot |" in md  # bitfit: the least memory, and worse than the base model
    assert "| - | prompt | 0 | failed: boom: out of memory |" in md
    page = (out / "leaderboard.html").read_text()
    assert page.count("data:image/png;base64,") == 3 and "note &lt;two&gt;" in page
    assert not re.search(r"(src|href)=\"(?!data:)", page), "the page must not load anything from elsewhere"
    per_run = list(csv.DictReader(io.StringIO((out / "runs.csv").read_text())))
    assert len(per_run) == 6 and per_run[1]["seed"] == "2" and per_run[1]["test_accuracy"] == "0.9"
    assert json.loads((out / "leaderboard.json").read_text())[1]["method"] == "lora"


def test_more_than_two_classes_show_macro_f1_and_each_class(tmp_path):
    def per_label(neg, neu, pos, f1):
        return {"test_per_label_accuracy.negative": neg, "test_per_label_accuracy.neutral": neu,
                "test_per_label_accuracy.positive": pos, "test_macro_f1": f1, "zeroshot_test_macro_f1": 0.2,
                "zeroshot_test_per_label_accuracy.neutral": 1.0}  # fmt: skip

    records = [
        _run("lora", 1, 0.80, 5_000_000, 5 * GiB, **per_label(0.9, 0.5, 0.9, 0.76)),
        _run("lora", 2, 0.90, 5_000_000, 5 * GiB, **per_label(1.0, 0.7, 0.9, 0.86)),
        _run("ia3", 1, 0.82, 60_000, 3 * GiB, **per_label(0.95, 0.2, 0.95, 0.70)),
    ]
    table = leaderboard.rows(records, PromoteParams())
    md = leaderboard.to_markdown(table, "test_accuracy")
    assert "| macro-F1 | accuracy per class, % (negative / neutral / positive) |" in md
    assert "| 1 | lora | 2 | 85.0% ± 7.1 | 81.0% | 95 / 60 / 90 |" in md  # means over the seeds
    assert "| 2 | ia3 | 1 | 82.0% | 70.0% | 95 / 20 / 95 |" in md  # accuracy hides the weak class; F1 does not
    assert "| 0 | base (zero-shot) | 0 | 70.0% | 20.0% | - / 100 / - |" in md
    rows = list(csv.DictReader(io.StringIO(leaderboard.to_csv(table, "test_accuracy"))))
    assert float(rows[1]["test_macro_f1"]) == pytest.approx(0.81)
    assert float(rows[1]["test_per_label_accuracy.neutral"]) == pytest.approx(0.6)


def test_records_from_metrics_files_name_a_bad_file(tmp_path):
    good = tmp_path / "lora.json"
    good.write_text(json.dumps({"method": "lora", "test_accuracy": 0.88, "zeroshot": {"test_accuracy": 0.75}}))
    (record,) = compare.from_metrics_files([good])
    assert record["metrics"]["zeroshot_test_accuracy"] == 0.75 and record["method"] == "lora"
    bad = tmp_path / "x.json"
    bad.write_text("{")
    with pytest.raises(ValueError, match="x.json: not a metrics file"):
        compare.from_metrics_files([bad])


def test_leaderboard_command_builds_the_report_from_metrics_files(tmp_path, monkeypatch):
    from typer.testing import CliRunner

    from peftflow.cli import app

    monkeypatch.chdir(tmp_path)
    (tmp_path / "params").mkdir()
    for name in ("base.yaml", "data.yaml"):
        (tmp_path / "params" / name).write_text("{}\n")
    metrics = tmp_path / "metrics"
    metrics.mkdir()
    zs = {"test_accuracy": 0.75, "test_loss": 1.7}
    for method, acc, params in (("lora", 0.88, 4_884_480), ("ia3", 0.87, 57_600)):
        result = {"method": method, "test_accuracy": acc, "test_loss": 0.15, "zeroshot": zs,
                  "trainable_params": params, "peak_memory_bytes": 3 * GiB, "tokens_per_s": 200.0}  # fmt: skip
        (metrics / f"{method}.json").write_text(json.dumps(result))
    out = CliRunner().invoke(app, ["leaderboard"])
    assert out.exit_code == 0, out.output
    assert "efficient frontier, test_accuracy vs trainable parameters: ia3, lora" in out.output
    md = (tmp_path / "reports" / "leaderboard" / "leaderboard.md").read_text()
    assert md.index("| lora |") < md.index("| ia3 |") and (tmp_path / "reports/leaderboard/tokens_per_s.png").is_file()
    empty = CliRunner().invoke(app, ["leaderboard", "--metrics-dir", "nothing"])
    assert empty.exit_code == 2 and "nothing: no metrics files" in empty.output
