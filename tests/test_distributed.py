"""One run on two processes (gloo on CPU, launched by peftflow itself) trains what one process does.

Every strategy is checked against one process with the same global batch: 2 processes x batch 4 vs
1 x batch 8, gradient accumulation 2, no dropout (each process draws its own masks, seeded by rank). The two-process
run is interrupted after a checkpoint and resumed, so one run checks the loss trajectory, the saved
artifact and exact resume at once.
"""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from mlflow import MlflowClient
from safetensors.torch import load_file

from peftflow.config import ParamsError, load_params
from peftflow.distributed import strategy
from peftflow.distributed.launch import LaunchError
from peftflow.distributed.params import DistributedParams
from peftflow.training.checkpoint import latest
from peftflow.training.sampler import Sampler
from peftflow.training.sft import train
from tests.conftest import PARAMS_DIR

ZERO2, ZERO3 = PARAMS_DIR / "deepspeed" / "zero2.json", PARAMS_DIR / "deepspeed" / "zero3.json"
COMMON = ("train.max_steps=6", "train.grad_accum=2", "train.lr=5.0e-3", "train.eval_every=3")
NO_DROPOUT = {"lora": ("method.dropout=0.0",), "prompt": ()}
CASES = {  # id: (method, strategy overrides)
    "ddp-lora": ("lora", ("distributed.strategy=ddp",)),
    # prompt tuning reads its virtual-token count from params, not off the DDP wrapper
    "ddp-prompt": ("prompt", ("distributed.strategy=ddp",)),
    # FSDP2 reduce-scatters gradients too (see ZeRO-3 below): on an Intel Xeon the adapter differed by
    # 1.04e-5 at lr 5e-3 (under 1e-5 on an AMD EPYC), so it is held to 1e-5 at the shipped lr
    "fsdp2-lora": ("lora", ("distributed.strategy=fsdp", "train.lr=5.0e-4")),
    # each process checkpoints its own shard (torch.distributed.checkpoint), nothing gathered
    "fsdp2-sharded-lora": (
        "lora",
        ("distributed.strategy=fsdp", "distributed.fsdp.state_dict=sharded", "train.lr=5.0e-4"),
    ),
    "zero2-lora": (
        "lora",
        ("distributed.strategy=deepspeed", f"distributed.deepspeed={ZERO3.with_name('zero2.json')}"),
    ),
    # ZeRO-3 reduce-scatters every micro-batch's gradients (summed in another order than DDP's):
    # at lr 5e-3 Adam amplifies that float noise in near-zero gradients to 2.9e-5 in the adapter
    # (the losses still agree to 1e-5), so it is held to 1e-5 at the shipped LoRA lr, 5e-4
    "zero3-lora": ("lora", ("distributed.strategy=deepspeed", f"distributed.deepspeed={ZERO3}", "train.lr=5.0e-4")),
}

# the two processes' micro-batches run as row chunks (no all-reduce between a micro-batch's chunks);
# the one-process run's do not
TWO_ONLY = {"ddp-lora": ("train.max_batch_tokens=24",)}


def _weights(run_dir: Path) -> dict[str, torch.Tensor]:
    files = sorted((run_dir / "model").glob("*.safetensors"))
    assert files, f"no weights in {run_dir / 'model'}"
    return {k: v for f in files for k, v in load_file(f).items()}


@pytest.mark.parametrize("case", sorted(CASES))
def test_two_processes_train_what_one_does_and_resume_exactly(case, tiny_params):
    method, dist = CASES[case]
    common = (*COMMON, *NO_DROPOUT[method], *(o for o in dist if o.startswith("train.")))
    one = train(tiny_params(method, *common, "train.batch_size=8", "train.run_name=one"), progress=False)

    params = tiny_params(
        method, *common, *dist, *TWO_ONLY.get(case, ()), "distributed.num_processes=2", "train.batch_size=4",
        "train.save_every=2", "train.run_name=two",
    )  # fmt: skip
    cut = train(params, stop_after=4, progress=False)
    assert not cut.finished and cut.steps == 4 and cut.num_processes == 2
    ckpts = params.run_dir / "checkpoints"
    assert sorted(p.name for p in ckpts.iterdir()) == ["step-0000002", "step-0000004"]  # nothing half-written
    assert len(torch.load(latest(ckpts) / "rng.pt", weights_only=False)) == 2  # each process's RNG
    assert not (params.run_dir / "model").exists()

    two = train(params, progress=False)
    assert two.finished and two.steps == 6
    # the global loss (every token of both processes), the same trajectory as one process
    assert [h["loss"] for h in two.history] == pytest.approx([h["loss"] for h in one.history], abs=1e-5)
    assert [e["val_loss"] for e in two.evals] == pytest.approx([e["val_loss"] for e in one.evals], abs=1e-5)
    assert two.train_tokens == one.train_tokens  # counted over both processes, not rank 0's x 2
    # a complete artifact (gathered from the shards), equal to one process's
    a, b = _weights(params.run_dir.parent / "one"), _weights(params.run_dir)
    assert a.keys() == b.keys()
    assert max((a[k] - b[k]).abs().max().item() for k in a) <= 1e-5
    summary = json.loads((params.run_dir / "train_summary.json").read_text())
    assert summary["num_processes"] == 2 and summary["artifact_bytes"] > 0 and summary["steps"] == 6
    assert not ckpts.exists()
    assert sorted(p.name for p in params.run_dir.iterdir()) == ["model", "params.yaml", "train_summary.json"]


def test_each_process_takes_its_own_rows_of_the_global_batch():
    lengths = list(range(5, 69))
    whole = Sampler(lengths, 8, seed=3)
    ranks = [Sampler(lengths, 4, seed=3, rank=r, world=2) for r in range(2)]
    for micro in range(12):
        rows = [s.indices(micro) for s in ranks]
        assert not set(rows[0]) & set(rows[1])
        assert sorted(rows[0] + rows[1]) == sorted(whole.indices(micro))


def test_one_training_is_one_mlflow_run_whatever_the_process_count(tiny_params, tmp_path):
    from peftflow.runs import train_tracked

    uri = f"sqlite:///{tmp_path / 'fresh.db'}"  # a fresh store: created once, by this process
    params = tiny_params(
        "lora", "train.max_steps=4", "train.log_every=1", "distributed.strategy=ddp", "distributed.num_processes=2",
        f"tracking.uri={uri}",
    )  # fmt: skip
    run_id = train_tracked(params, tmp_path, None)

    client = MlflowClient(uri)
    runs = client.search_runs([client.get_experiment_by_name("peftflow").experiment_id])
    assert [r.info.run_id for r in runs] == [run_id] and runs[0].info.status == "FINISHED"
    summary = json.loads((params.train.output_dir / run_id / "train_summary.json").read_text())
    logged = sorted(client.get_metric_history(run_id, "train_loss"), key=lambda m: m.step)
    assert [m.step for m in logged] == [1, 2, 3, 4]  # once per step: only the main process logs
    assert [m.value for m in logged] == pytest.approx([h["loss"] for h in summary["history"]])
    assert {f.path for f in client.list_artifacts(run_id, "model")} >= {"model/adapter_model.safetensors"}


@pytest.mark.parametrize(
    ("method", "dist", "why"),
    [
        ("adalora", ("distributed.strategy=fsdp",), "its rank allocator reads whole gradients"),
        ("qlora", ("distributed.strategy=deepspeed", f"distributed.deepspeed={ZERO3}"), "sharding 4-bit"),
    ],
)
def test_a_method_that_cannot_train_under_a_strategy_fails_before_launch(method, dist, why, tiny_params):
    params = tiny_params(method, *dist, "distributed.num_processes=2")
    with pytest.raises(ValueError, match=f"method {method} with distributed.strategy") as err:
        train(params, progress=False)
    assert why in str(err.value) and "\n" not in str(err.value)
    assert not params.run_dir.exists()  # nothing started


def test_a_failing_worker_is_one_line_naming_its_rank(tiny_params):
    params = tiny_params("lora", "train.batch_size=400", "distributed.strategy=ddp", "distributed.num_processes=2")
    with pytest.raises(LaunchError, match=r"worker rank \d failed: ValueError: train.batch_size: 400 x 2 process"):
        train(params, progress=False)


def test_a_worker_that_trains_alone_in_a_launch_stops(monkeypatch):
    from accelerate.utils import DistributedType

    monkeypatch.setenv("WORLD_SIZE", "2")
    alone = SimpleNamespace(num_processes=1, distributed_type=DistributedType.NO)
    with pytest.raises(RuntimeError, match=r"launched as one of 2 .* accelerate sees 1 process"):
        strategy._check_world(alone, DistributedParams())


def test_distributed_params_are_checked_in_one_line(tiny_model_dir, tiny_data_file, tmp_path):
    from tests.conftest import tiny_overrides

    base = tiny_overrides(tiny_model_dir, tiny_data_file, tmp_path)
    with pytest.raises(ParamsError, match=r"distributed: strategy none trains in one process; with num_processes 2"):
        load_params("lora", PARAMS_DIR, [*base, "distributed.num_processes=2"])
    with pytest.raises(ParamsError, match=r"strategy deepspeed needs distributed.deepspeed"):
        load_params("lora", PARAMS_DIR, [*base, "distributed.strategy=deepspeed"])

    params = load_params(
        "lora", PARAMS_DIR, [*base, "distributed.strategy=deepspeed", f"distributed.deepspeed={ZERO3}",
                             "distributed.num_processes=2", "train.grad_accum=3", "train.max_grad_norm=0.5"]
    )  # fmt: skip
    config = strategy.deepspeed_config(params)
    assert config["train_micro_batch_size_per_gpu"] == 8 and config["gradient_accumulation_steps"] == 3
    assert config["train_batch_size"] == 48 and config["gradient_clipping"] == 0.5
    assert config["zero_optimization"]["stage"] == 3 and config["bf16"]["enabled"] is False

    fixed = tmp_path / "fixed.json"
    fixed.write_text(json.dumps({**json.loads(ZERO3.read_text()), "gradient_accumulation_steps": 4}))
    params.distributed.deepspeed = fixed
    with pytest.raises(ValueError, match=r"gradient_accumulation_steps is 4, but train.\* make it 3"):
        strategy.deepspeed_config(params)


def test_an_accelerate_config_file_sets_the_strategy(tiny_model_dir, tiny_data_file, tmp_path):
    from tests.conftest import tiny_overrides

    config = tmp_path / "fsdp.yaml"
    config.write_text(
        "compute_environment: LOCAL_MACHINE\ndistributed_type: FSDP\nnum_processes: 4\nmixed_precision: 'no'\n"
        "fsdp_config:\n  fsdp_version: 2\n  fsdp_auto_wrap_policy: TRANSFORMER_BASED_WRAP\n"
        "  fsdp_state_dict_type: SHARDED_STATE_DICT\n  fsdp_offload_params: true\n"
    )
    base = tiny_overrides(tiny_model_dir, tiny_data_file, tmp_path)
    dist = load_params("lora", PARAMS_DIR, [*base, f"distributed.accelerate_config={config}"]).distributed
    assert (dist.strategy, dist.num_processes) == ("fsdp", 4)
    assert dist.fsdp.state_dict == "sharded" and dist.fsdp.cpu_offload and dist.fsdp.auto_wrap == "transformer_layer"

    config.write_text("distributed_type: MEGATRON_LM\n")
    with pytest.raises(ParamsError, match=r"distributed_type: 'MEGATRON_LM' is not supported"):
        load_params("lora", PARAMS_DIR, [*base, f"distributed.accelerate_config={config}"])


def test_the_train_command_launches_its_processes(tiny_params, tiny_model_dir, tiny_data_file, tmp_path):
    from typer.testing import CliRunner

    from peftflow.cli import app
    from tests.conftest import tiny_overrides

    tiny_params("lora")  # prepares the data
    sets = [
        a for o in (*tiny_overrides(tiny_model_dir, tiny_data_file, tmp_path), "train.max_steps=2") for a in ("-s", o)
    ]
    common = ["train", "--method", "lora", "--params-dir", str(PARAMS_DIR), *sets]
    result = CliRunner().invoke(app, [*common, "--nproc", "2"])
    assert result.exit_code == 0, result.output
    assert "lora on 2 processes (ddp): 2 steps" in result.output
    summary = json.loads((tmp_path / "runs" / "lora" / "train_summary.json").read_text())
    assert (summary["num_processes"], summary["strategy"]) == (2, "ddp")

    result = CliRunner().invoke(app, [*common, "-m", "adalora", "-s", "distributed.strategy=fsdp", "--nproc", "2"])
    assert result.exit_code == 2
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and "method adalora with distributed.strategy fsdp" in lines[0]
