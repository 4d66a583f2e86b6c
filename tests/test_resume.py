"""Checkpoints resume exactly: an interrupted run continues along the uninterrupted trajectory."""

from __future__ import annotations

import json

from peftflow.train import latest_checkpoint, train


def test_resume_reproduces_the_uninterrupted_loss_trajectory(tiny_params):
    common = ("train.max_steps=6", "train.save_every=2", "train.lr=5.0e-3", "method.dropout=0.1")
    straight = train(tiny_params("lora", *common, "train.run_name=straight"), progress=False)

    params = tiny_params("lora", *common, "train.run_name=interrupted")
    first = train(params, stop_after=3, progress=False)
    assert not first["finished"] and first["steps"] == 3
    ckpt = latest_checkpoint(params.run_dir / "checkpoints")
    assert ckpt is not None and ckpt.name == "step-0000003"
    assert not (params.run_dir / "model").exists(), "an unfinished run must not leave a trained artifact"

    resumed = train(params, progress=False)
    assert resumed["finished"]
    assert [h["loss"] for h in resumed["history"]] == [h["loss"] for h in straight["history"]]
    assert [h["lr"] for h in resumed["history"]] == [h["lr"] for h in straight["history"]]
    assert json.loads((params.run_dir / "train_summary.json").read_text())["steps"] == 6
    assert not (params.run_dir / "checkpoints").exists()


def test_no_resume_starts_over(tiny_params):
    params = tiny_params("lora", "train.max_steps=4", "train.save_every=2", "train.run_name=again")
    train(params, stop_after=2, progress=False)
    fresh = train(params, resume=False, progress=False)
    assert [h["step"] for h in fresh["history"]] == [1, 2, 3, 4]
