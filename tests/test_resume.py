"""Checkpoints resume exactly: an interrupted run continues along the uninterrupted trajectory."""

from __future__ import annotations

import json

import pytest
import torch

from peftflow.training.checkpoint import latest as latest_checkpoint
from peftflow.training.sft import train

CASES = {
    # LoRA with dropout (RNG), gradient accumulation and evals between checkpoints
    "lora": ("train.max_steps=6", "train.grad_accum=2", "train.eval_every=2", "method.dropout=0.1"),
    # AdaLoRA interrupted in its final phase: the rank pattern and importance scores must survive
    "adalora": ("train.max_steps=10", "train.eval_every=4"),
}


@pytest.mark.parametrize("method", sorted(CASES))
def test_resume_reproduces_the_uninterrupted_loss_trajectory(method, tiny_params):
    common = (*CASES[method], "train.save_every=2", "train.lr=5.0e-3")
    straight = train(tiny_params(method, *common, "train.run_name=straight"), progress=False)

    params = tiny_params(method, *common, "train.run_name=interrupted")
    stop = params.train.max_steps - 2
    first = train(params, stop_after=stop, progress=False)
    assert not first.finished and first.steps == stop
    ckpt = latest_checkpoint(params.run_dir / "checkpoints")
    assert ckpt is not None and ckpt.name == f"step-{stop:07d}"
    assert not (params.run_dir / "model").exists(), "an unfinished run must not leave a trained artifact"

    resumed = train(params, progress=False)
    assert resumed.finished
    assert [h["loss"] for h in resumed.history] == [h["loss"] for h in straight.history]
    assert [h["lr"] for h in resumed.history] == [h["lr"] for h in straight.history]
    assert resumed.evals == straight.evals
    assert json.loads((params.run_dir / "train_summary.json").read_text())["steps"] == params.train.max_steps
    assert not (params.run_dir / "checkpoints").exists()


def test_resume_with_other_params_is_refused(tiny_params):
    params = tiny_params("lora", "train.max_steps=4", "train.save_every=2", "train.run_name=changed")
    train(params, stop_after=2, progress=False)
    with pytest.raises(
        ValueError, match=r"step-0000002: this checkpoint was made with other params \(method.r changed\)"
    ):
        train(tiny_params("lora", "train.max_steps=4", "train.save_every=2", "train.run_name=changed", "method.r=4"))


def test_no_resume_starts_over(tiny_params):
    params = tiny_params("lora", "train.max_steps=4", "train.save_every=2", "train.run_name=again")
    train(params, stop_after=2, progress=False)
    fresh = train(params, resume=False, progress=False)
    assert [h["step"] for h in fresh.history] == [1, 2, 3, 4]


def test_peak_memory_is_per_run_not_per_process():
    from peftflow.training.meters import peak_memory_bytes, reset_peak_memory

    reset_peak_memory()
    big = torch.ones(2**27)  # 512 MiB, touched
    big += 1
    del big
    before = peak_memory_bytes()
    reset_peak_memory()
    after = peak_memory_bytes()
    assert before - after > 400 * 2**20, (before, after)


def test_a_corrupt_newest_checkpoint_is_named_and_the_previous_one_resumed(tiny_params, caplog):
    params = tiny_params("lora", "train.max_steps=6", "train.save_every=2", "train.run_name=corrupt")
    first = train(params, stop_after=4, progress=False)
    newest = params.run_dir / "checkpoints" / "step-0000004"
    optimizer = newest / "optimizer.pt"
    optimizer.write_bytes(optimizer.read_bytes()[:100])  # truncated, as by a full disk

    resumed = train(params, progress=False)
    warned = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert any(
        "step-0000004: checkpoint is corrupt: optimizer.pt (changed)" in w and "resuming from step-0000002" in w
        for w in warned
    ), warned
    assert resumed.finished and [h["step"] for h in resumed.history] == [1, 2, 3, 4, 5, 6]
    # steps 3-4 trained again from step 2 retrace the interrupted run exactly
    assert [h["loss"] for h in resumed.history[:4]] == [h["loss"] for h in first.history]


def test_a_crafted_checkpoint_file_is_not_unpickled(tiny_params, tmp_path):
    from peftflow import checksums
    from peftflow.training.checkpoint import SHA256

    params = tiny_params("lora", "train.max_steps=4", "train.save_every=2", "train.run_name=crafted")
    train(params, stop_after=2, progress=False)
    ckpt = params.run_dir / "checkpoints" / "step-0000002"
    marker = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):
            return (exec, (f"open({str(marker)!r}, 'w').write('ran')",))

    torch.save(Payload(), ckpt / "rng.pt")
    (ckpt / SHA256).write_text(json.dumps(checksums.digests(ckpt, skip=(SHA256,))))  # digests do not stop this
    with pytest.raises(ValueError, match=r"step-0000002/rng.pt: unreadable \(.*--no-resume") as err:
        train(params, progress=False)
    assert "\n" not in str(err.value)
    assert not marker.exists(), "loading a checkpoint ran code from it"


def test_resume_over_other_base_weights_or_changed_data_is_refused(tiny_params, tiny_model_dir, tmp_path):
    import shutil

    from transformers import AutoModelForCausalLM

    from peftflow.data import DataError

    model_dir = tmp_path / "base"
    shutil.copytree(tiny_model_dir, model_dir)
    steps = ("train.max_steps=4", "train.save_every=2", "train.run_name=rebased", f"model.name_or_path={model_dir}")
    params = tiny_params("lora", *steps)
    train(params, stop_after=2, progress=False)

    other = AutoModelForCausalLM.from_pretrained(model_dir)
    with torch.no_grad():
        other.model.norm.weight.mul_(2)  # the same architecture and file names, other weights
    other.save_pretrained(model_dir)
    with pytest.raises(ValueError, match=r"made with other params \(model.weights changed\)"):
        train(tiny_params("lora", *steps), progress=False)

    train_file = params.data.out_dir / "train.jsonl"
    train_file.write_text(train_file.read_text().replace("great", "awful"))
    with pytest.raises(DataError, match=rf"{train_file}: changed since data version \w+ was prepared"):
        train(tiny_params("lora", *steps), progress=False)
