"""A throwaway peftflow project for integration tests: a git repository with this repository's
dvc.yaml and params (pointed at the tiny model and data), DVC initialized with a local remote."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import yaml

from tests.conftest import NEGATIVE, POSITIVE, ROOT, make_rows

BIN = str(Path(sys.executable).parent)  # dvc stages call `peftflow`; flows call `dvc` through its API


def run(cmd: list[str], cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}"}
    out = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True)
    assert out.returncode == 0, f"{' '.join(cmd)} failed:\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}"
    return out


def set_keys(path: Path, updates: dict[str, object]) -> None:
    """Set dotted keys in a YAML params file."""
    doc = yaml.safe_load(path.read_text())
    for dotted, value in updates.items():
        node = doc
        *parents, last = dotted.split(".")
        for p in parents:
            node = node.setdefault(p, {})
        node[last] = value
    path.write_text(yaml.safe_dump(doc, sort_keys=False))


def commit(root: Path, message: str) -> str:
    run(["git", "add", "-A"], root)
    run(["git", "-c", "user.name=test", "-c", "user.email=test@example.com", "commit", "-qm", message], root)
    return run(["git", "rev-parse", "HEAD"], root).stdout.strip()


def make_project(root: Path, model_dir: Path | None, n_rows: int = 160) -> Path:
    """model_dir None: keep the embedded base model (the base_model stage converts it)."""
    root.mkdir(parents=True)
    shutil.copy(ROOT / "dvc.yaml", root)
    shutil.copy(ROOT / ".gitignore", root)
    shutil.copytree(ROOT / "params", root / "params")
    # the stages list the core's source files as deps (the installed package is what runs)
    shutil.copytree(ROOT / "src", root / "src", ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    (root / "data" / "raw").mkdir(parents=True)
    (root / "data" / "raw" / "reviews.jsonl").write_text("".join(json.dumps(r) + "\n" for r in make_rows(n_rows)))
    base = {
        "train.max_steps": 8,
        "train.batch_size": 8,
        "train.lr": 5.0e-3,
        "train.warmup_steps": 0,
        "train.eval_every": 4,
        "train.eval_examples": 16,
        "train.save_every": 0,
        "train.log_every": 2,
        "eval.batch_size": 16,
        "compare.methods": ["lora", "ia3"],  # the compare stage of a full `dvc repro`
        "compare.token_budget": 1500,
        # fp32, as the tiny-model tests: the promotion tests' margins on 16 examples are those of
        # fp32 figures (bf16, what `auto` picks on a CPU with AVX512-BF16, is tested in test_fast_path)
        "train.mixed_precision": "no",
    }
    if model_dir is not None:
        base["model.name_or_path"] = str(model_dir)
    set_keys(root / "params" / "base.yaml", base)
    set_keys(
        root / "params" / "data.yaml",
        {"data.source": "data/raw/reviews.jsonl", "data.split.test": 32, "data.split.val": 16},
    )
    set_keys(root / "params" / "methods" / "lora.yaml", {"train.lr": 5.0e-3})  # tiny model, few steps
    # RLHF data: learnable preferences (positive words beat negative ones), for the rlhf_prepare stage
    pairs = [
        {"prompt": f"review {i}: the film was", "chosen": f"{POSITIVE[i % 8]} and {POSITIVE[(i + 3) % 8]}",
         "rejected": f"{NEGATIVE[i % 8]} and {NEGATIVE[(i + 5) % 8]}"}
        for i in range(48)
    ]  # fmt: skip
    (root / "data" / "raw" / "pairs.jsonl").write_text("".join(json.dumps(p) + "\n" for p in pairs))
    set_keys(
        root / "params" / "rlhf" / "base.yaml",
        {"rlhf.data.source": "data/raw/pairs.jsonl", "rlhf.data.test": 8, "rlhf.data.val": 8,
         "rlhf.generation.max_new_tokens": 6, "rlhf.eval.prompts": 8, "rlhf.eval.batch_size": 8},
    )  # fmt: skip
    run(["git", "init", "-q"], root)
    run([f"{BIN}/dvc", "init", "-q"], root)
    shutil.copy(ROOT / ".dvc" / "config", root / ".dvc" / "config")  # the local remote ../dvcstore
    commit(root, "a test project")
    return root
