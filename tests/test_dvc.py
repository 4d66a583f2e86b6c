"""The real `dvc repro` of this repository's dvc.yaml in a temporary git repository: every stage
runs once, nothing runs again unchanged, `dvc exp run -S` re-runs only what a param feeds, and the
prepared data round-trips through the local DVC remote."""

from __future__ import annotations

import json
import shutil

import yaml

from tests.project import BIN, commit, make_project, run


def test_dvc_repro_exp_run_and_push_pull(tmp_path, tiny_model_dir):
    root = make_project(tmp_path / "proj", tiny_model_dir)
    dvc = f"{BIN}/dvc"

    out = run([dvc, "repro"], root).stdout
    for stage in ("base_model", "prepare", "rlhf_prepare", "train@lora", "evaluate@lora", "leaderboard", "compare"):
        assert f"Running stage '{stage}'" in out, out[-2000:]
    metrics = json.loads((root / "metrics" / "lora.json").read_text())
    assert metrics["test_loss"] < metrics["zeroshot"]["test_loss"]
    assert "| lora |" in (root / "reports" / "leaderboard" / "leaderboard.md").read_text()
    board = (root / "reports" / "compare" / "leaderboard.md").read_text()  # the compare flow, run by DVC
    assert "| lora | 1 |" in board and "| ia3 | 1 |" in board
    assert (root / "reports" / "compare" / "quality_vs_params.png").is_file()
    assert "Data and pipelines are up to date" in run([dvc, "status"], root).stdout
    assert "Running stage" not in run([dvc, "repro"], root).stdout

    commit(root, "pipeline outputs locked")
    # up to evaluate@lora (leaderboard and compare, downstream of it, ran above: a second compare flow
    # would check nothing new at a minute and a half of the suite)
    out = run([dvc, "exp", "run", "-S", "params/methods/lora.yaml:method.r=4", "evaluate@lora"], root).stdout
    assert "Stage 'prepare' didn't change, skipping" in out and "Stage 'base_model' didn't change" in out
    assert "Running stage 'train@lora'" in out and "Running stage 'evaluate@lora'" in out
    assert "Running stage 'compare'" not in out
    assert yaml.safe_load((root / "runs" / "lora" / "params.yaml").read_text())["method"]["r"] == 4

    manifest = (root / "data" / "prepared" / "manifest.json").read_text()
    run([dvc, "push"], root)
    shutil.rmtree(root / "data" / "prepared")
    shutil.rmtree(root / ".dvc" / "cache")
    run([dvc, "pull", "prepare"], root)
    assert (root / "data" / "prepared" / "manifest.json").read_text() == manifest
