"""The leaderboard ranks by the promotion metric and names a file that lacks it."""

from __future__ import annotations

import json

import pytest

from peftflow.compare import leaderboard, markdown
from peftflow.config import PromoteParams


def _write(tmp_path, name, **metrics):
    path = tmp_path / f"{name}.json"
    path.write_text(json.dumps({"method": name, **metrics}))
    return path


def test_ranked_by_the_promotion_metric(tmp_path):
    zs = {"test_accuracy": 0.7, "test_loss": 1.7}
    files = [
        _write(tmp_path, "ia3", test_accuracy=0.82, test_loss=0.2, zeroshot=zs, artifact_bytes=2**20),
        _write(tmp_path, "lora", test_accuracy=0.88, test_loss=0.1, zeroshot=zs, artifact_bytes=3 * 2**20),
    ]
    rows = leaderboard(files, PromoteParams())
    assert [r["method"] for r in rows] == ["lora", "ia3"]
    table = markdown(rows).splitlines()
    assert table[2].startswith("| base, zero-shot | 70.0% | 1.7000")
    assert table[3].startswith("| lora | 88.0% | 0.1000 | - | 3.0 |")
    by_loss = leaderboard(files, PromoteParams(metric="test_loss", higher_is_better=False))
    assert [r["method"] for r in by_loss] == ["lora", "ia3"]


def test_a_file_without_the_metric_is_named(tmp_path):
    bad = _write(tmp_path, "prompt", test_loss=0.3)
    with pytest.raises(KeyError, match="prompt.json: no 'test_accuracy'"):
        leaderboard([bad], PromoteParams())
