"""The CLI end to end on the tiny model: prepare -> train -> evaluate, and one-line errors."""

from __future__ import annotations

import json

from typer.testing import CliRunner

from peftflow.cli import app
from tests.conftest import PARAMS_DIR, tiny_overrides

runner = CliRunner()


def _overrides(tiny_model_dir, tiny_data_file, tmp_path):
    pairs = [
        *tiny_overrides(tiny_model_dir, tiny_data_file, tmp_path),
        "train.max_steps=10",
        "train.lr=5.0e-3",
        "train.eval_every=5",
    ]
    return [arg for p in pairs for arg in ("-s", p)]


def test_help_lists_the_commands():
    result = runner.invoke(app, ["--help"])
    assert result.exit_code == 0
    for command in ("convert-base", "prepare", "train", "evaluate", "methods"):
        assert command in result.output


def test_prepare_train_evaluate(tiny_model_dir, tiny_data_file, tmp_path):
    sets = _overrides(tiny_model_dir, tiny_data_file, tmp_path)
    common = ["--params-dir", str(PARAMS_DIR), *sets]
    result = runner.invoke(app, ["prepare", *common])
    assert result.exit_code == 0, result.output
    assert "data version" in result.output

    result = runner.invoke(app, ["train", "--method", "lora", *common])
    assert result.exit_code == 0, result.output
    run = tmp_path / "runs" / "lora"
    summary = json.loads((run / "train_summary.json").read_text())
    assert summary["final_train_loss"] < summary["first_train_loss"]
    assert [e["step"] for e in summary["evals"]] == [5, 10]
    assert (run / "model" / "adapter_model.safetensors").is_file()

    result = runner.invoke(app, ["evaluate", "--run", str(run)])
    assert result.exit_code == 0, result.output
    metrics = json.loads((run / "metrics.json").read_text())
    assert 0.0 <= metrics["test_accuracy"] <= 1.0 and "test_accuracy" in metrics["zeroshot"]
    assert metrics["test_loss"] < metrics["zeroshot"]["test_loss"]
    for acc in (metrics["test_accuracy"], metrics["zeroshot"]["test_accuracy"]):  # both rows of the table
        assert f"{100 * acc:.1f}%" in result.output


def test_bad_param_is_one_red_line_and_exit_2():
    result = runner.invoke(app, ["train", "--method", "lora", "--params-dir", str(PARAMS_DIR), "-s", "train.lr=-1"])
    assert result.exit_code == 2
    assert "override 'train.lr=-1': train.lr: Input should be greater than 0" in result.output
    assert "Traceback" not in result.output


def test_missing_prepared_data_says_what_to_run(tmp_path):
    result = runner.invoke(
        app, ["evaluate", "--method", "lora", "--params-dir", str(PARAMS_DIR), "-s", f"data.out_dir={tmp_path}/none"]
    )
    assert result.exit_code == 2
    assert "none/manifest.json: no prepared data; run `peftflow prepare`" in result.output.replace("\n", "")


def test_merge_writes_a_plain_checkpoint_with_equal_logits(tiny_params, tmp_path):
    import torch
    from transformers import AutoModelForCausalLM

    from peftflow import artifacts
    from peftflow.model import load_base_model
    from peftflow.training.sft import train

    params = tiny_params("lora", "train.lr=2.0e-2", "train.max_steps=4")
    train(params, progress=False)
    result = runner.invoke(app, ["merge", "--run", str(params.run_dir), "--out", str(tmp_path / "merged")])
    assert result.exit_code == 0, result.output
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
    adapted = artifacts.load(load_base_model(params.model), params.run_dir / "model").eval()
    ids = torch.tensor([[5, 6, 7, 8, 9]])
    with torch.no_grad():
        torch.testing.assert_close(merged(input_ids=ids).logits, adapted(input_ids=ids).logits, rtol=0, atol=1e-4)
    assert not (tmp_path / "merged" / "adapter_config.json").exists()


def test_merge_refuses_methods_that_cannot_merge(tiny_params, tmp_path):
    from peftflow.training.sft import train

    params = tiny_params("prompt", "train.max_steps=2")
    train(params, progress=False)
    result = runner.invoke(app, ["merge", "--run", str(params.run_dir), "--out", str(tmp_path / "m")])
    assert result.exit_code == 2
    assert (
        "method prompt cannot be merged into the base weights; mergeable: adalora, dora, ia3, lora, qlora"
        in result.output
    )
    assert not (tmp_path / "m").exists()


def test_load_and_reproduce_name_what_is_missing(tmp_path):
    store = ["--params-dir", str(PARAMS_DIR), "-s", f"tracking.uri=sqlite:///{tmp_path / 'mlflow.db'}"]
    result = runner.invoke(app, ["load", "models:/nope@champion", *store])
    assert result.exit_code == 2
    assert "error: no registered model 'nope'; registered: none" in result.output
    result = runner.invoke(app, ["load", "nope", *store])
    assert result.exit_code == 2 and "expected models:/NAME@ALIAS or models:/NAME/VERSION" in result.output
    result = runner.invoke(app, ["reproduce", "0" * 32, *store])
    assert result.exit_code == 2 and f"no MLflow run '{'0' * 32}'" in result.output


def test_the_peftflow_script_is_one_cli_the_core_commands_and_the_prefect_backed_ones():
    """`peftflow` (pyproject's [project.scripts]) is the shells' app: the core's commands, and compare,
    sweep, serve, experiment, nightly, predict beside them; the core's own app has no Prefect-backed command."""
    import subprocess
    import sys
    import tomllib
    from pathlib import Path

    import typer

    from flows.cli import app as script_app
    from tests.conftest import ROOT

    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    assert scripts["peftflow"] == "flows.cli:main"
    core = set(typer.main.get_command(app).commands)
    assert {"convert-base", "prepare", "train", "evaluate", "leaderboard", "load", "reproduce", "rlhf"} <= core
    flows = {"compare", "sweep", "serve", "experiment", "nightly", "predict"}
    assert not core & flows
    assert set(typer.main.get_command(script_app).commands) == core | flows

    # as a user types it: the installed script, each command's own options
    peftflow = str(Path(sys.executable).parent / "peftflow")
    for args, option in ((["compare"], "--token-budget"), (["serve"], "--work-pool"), (["sweep"], "--train-best"),
                         (["rlhf"], "generate")):  # fmt: skip
        out = subprocess.run([peftflow, *args, "--help"], capture_output=True, text=True, cwd=ROOT)
        assert out.returncode == 0 and option in out.stdout, out.stdout + out.stderr


def test_the_peftflow_script_starts_without_importing_prefect_mlflow_or_torch():
    """Every `peftflow` command imports flows.cli first: the core's commands must not wait for Prefect."""
    import subprocess
    import sys

    from tests.conftest import ROOT

    code = "import sys, flows.cli; print(sorted(m for m in ('prefect', 'mlflow', 'torch') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT)
    assert out.stdout.strip() == "[]"
