"""What each RLHF stage trains and measures, given resolved params (paths absolute), a run folder
and its inputs' artifact folders. Each writes ``run_dir/model`` and returns a flat summary whose
numbers become the run's metrics (the evaluation figures prefixed ``test_``)."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path

import torch

from peftflow import artifacts
from peftflow.atomic import atomic_dir
from peftflow.config import Params, read_resolved
from peftflow.methods import get_method
from peftflow.model import load_tokenizer
from peftflow.rlhf import data, dpo, ppo, reward
from peftflow.rlhf.policy import ScalarHead, device, evaluate, merged_sft, with_adapter

Callbacks = tuple[Callable[[dict[str, float], int], None], ...]
VALUE_HEAD = "value_head.safetensors"


def sft(params: Params, run_dir: Path, inputs: dict[str, Path], callbacks: Callbacks, progress: bool) -> dict:
    """The training core on prompt -> continuation examples; test loss beside the base model's."""
    from peftflow.evaluate import evaluate_run
    from peftflow.training.sft import train

    params.data.out_dir = params.rlhf.data.out_dir / "sft"
    summary = train(params, resume=False, callbacks=callbacks, progress=progress).model_dump()
    metrics = evaluate_run(run_dir, params)
    keep = (
        "steps",
        "final_train_loss",
        "first_train_loss",
        "trainable_params",
        "trainable_pct",
        "tokens_per_s",
        "train_seconds",
        "peak_memory_bytes",
        "artifact_bytes",
    )
    return {
        **{k: summary[k] for k in keep if summary.get(k) is not None},
        "test_loss": metrics.test_loss,
        "test_perplexity": metrics.test_perplexity,
        "zeroshot_test_loss": metrics.zeroshot.test_loss,
    }


def _reward_model(inputs: dict[str, Path], root_params: Params, stage: str = "reward"):
    """A reward function over texts: the reward model of ``inputs[stage]`` ("reward", or the held-out "judge")."""
    rm_params = read_resolved(inputs[stage] / "params.yaml")
    rm_params.model = root_params.model  # the same base, at this machine's path
    rm, tokenizer = reward.load(rm_params, inputs[stage])

    def reward_fn(prompts: list[str], responses: list[str], ids: list[list[int]] | None = None) -> torch.Tensor:
        texts = [p + r for p, r in zip(prompts, responses, strict=True)]
        return reward.score(rm, tokenizer, texts, rm_params.eval.batch_size, rm_params.data.max_length)

    return reward_fn


def _training_pairs(params: Params) -> list[dict[str, str]]:
    """The training pairs this stage learns from: all, or its half (``rlhf.pairs``)."""
    return data.pairs_for(data.read(params.rlhf.data.out_dir, "pairs/train"), params.rlhf.pairs)


def reward_stage(params: Params, run_dir: Path, inputs: dict[str, Path], callbacks: Callbacks, progress: bool) -> dict:
    """The reward model, or the held-out judge: the same recipe on the other half of the pairs."""
    pairs, heldout = _training_pairs(params), data.read(params.rlhf.data.out_dir, "pairs/test")
    summary = reward.train(params, pairs, heldout, run_dir / "model", callbacks, progress)
    summary["train_pairs"] = len(pairs)
    return {k: v for k, v in summary.items() if k not in ("history", "evals")}


def _save_policy(policy, params: Params, sft_dir: Path, out_dir: Path, value_head: ScalarHead | None = None) -> int:
    """The policy adapter, its SFT artifact in ``sft/`` (so it loads alone) and the value head."""
    from safetensors.torch import save_file

    with atomic_dir(out_dir) as tmp:
        artifacts.save(policy, get_method(params.method.name), tmp, params.method)  # fills tmp in one rename
        shutil.copytree(sft_dir, tmp / "sft")
        (tmp / "rlhf.json").write_text(json.dumps({"policy_over": "sft/"}) + "\n")
        if value_head is not None:
            save_file({k: v.detach().cpu().contiguous() for k, v in value_head.state_dict().items()}, tmp / VALUE_HEAD)
    return artifacts.size_bytes(out_dir) - artifacts.size_bytes(out_dir / "sft")


def _policy(params: Params, inputs: dict[str, Path], stage: str):
    from transformers import set_seed

    set_seed(params.seed)  # the fresh adapter's initialization is part of the run, not of what ran before it
    policy = with_adapter(merged_sft(params, inputs["sft"]), params, stage).to(device())
    return policy, load_tokenizer(params.model)


def _evaluated(summary: dict, policy, tokenizer, reward_fn, inputs: dict[str, Path], params: Params, run_dir: Path):
    """The held-out figures under the reward model and under the judge (which neither PPO nor DPO trained against)."""
    prompts = [r["prompt"] for r in data.read(params.rlhf.data.out_dir, "prompts/test")]
    judge = _reward_model(inputs, params, "judge")
    result = evaluate(policy, tokenizer, reward_fn, prompts, params, judges={"judge": judge})
    (run_dir / "examples.json").parent.mkdir(parents=True, exist_ok=True)
    (run_dir / "examples.json").write_text(json.dumps(result.pop("examples"), indent=2) + "\n")
    return {**{k: v for k, v in summary.items() if k != "history"}, **{f"test_{k}": v for k, v in result.items()}}


def ppo_stage(params: Params, run_dir: Path, inputs: dict[str, Path], callbacks: Callbacks, progress: bool) -> dict:
    from peftflow.training.meters import count_parameters, peak_memory_bytes, reset_peak_memory

    reset_peak_memory()
    reward_fn = _reward_model(inputs, params)
    policy, tokenizer = _policy(params, inputs, "ppo")
    value_head = ScalarHead(policy.config.hidden_size)
    prompts = [r["prompt"] for r in data.read(params.rlhf.data.out_dir, "prompts/train")]
    summary = ppo.train(policy, value_head, reward_fn, tokenizer, prompts, params, callbacks, progress)
    history = summary["history"]
    first, last = history[: max(1, len(history) // 5)], history[-max(1, len(history) // 5) :]
    summary.update(
        first_reward_mean=sum(h["reward_mean"] for h in first) / len(first),  # the first and last fifth of training
        last_reward_mean=sum(h["reward_mean"] for h in last) / len(last),
        last_kl=sum(h["kl"] for h in last) / len(last),
        max_kl=max(h["kl"] for h in history),
        trainable_params=count_parameters(policy)[0],
    )
    summary["artifact_bytes"] = _save_policy(policy, params, inputs["sft"], run_dir / "model", value_head)
    out = _evaluated(summary, policy, tokenizer, reward_fn, inputs, params, run_dir)
    out["peak_memory_bytes"] = peak_memory_bytes()
    (run_dir / "history.json").write_text(json.dumps(history, indent=2) + "\n")
    return out


def dpo_stage(params: Params, run_dir: Path, inputs: dict[str, Path], callbacks: Callbacks, progress: bool) -> dict:
    from peftflow.training.meters import count_parameters, peak_memory_bytes, reset_peak_memory

    reset_peak_memory()
    policy, tokenizer = _policy(params, inputs, "dpo")
    pairs = _training_pairs(params)
    summary = dpo.train(policy, tokenizer, pairs, params, callbacks, progress)
    summary.update(trainable_params=count_parameters(policy)[0], train_pairs=len(pairs))
    summary["artifact_bytes"] = _save_policy(policy, params, inputs["sft"], run_dir / "model")
    reward_fn = _reward_model(inputs, params)
    out = _evaluated(summary, policy, tokenizer, reward_fn, inputs, params, run_dir)
    out["peak_memory_bytes"] = peak_memory_bytes()
    return out


TRAINERS = {"sft": sft, "reward": reward_stage, "judge": reward_stage, "ppo": ppo_stage, "dpo": dpo_stage}
