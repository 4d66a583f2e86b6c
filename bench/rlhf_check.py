"""Runs the RLHF stages' code on one device and times them: reward model (Bradley-Terry), PPO
against it, DPO, and the policy evaluation, on a randomly initialized Llama of a chosen shape with
the real SmolLM2 tokenizer. A code-path and speed check (CUDA: bf16 autocast), not a quality
benchmark: the default model's figures come from `python -m flows rlhf`.

    .venv/bin/python bench/rlhf_check.py                          # CPU, tiny shape
    SIZE=smol135m python bench/rlhf_check.py --tokenizer DIR      # on a GPU machine

Environment: SIZE (tiny | smol135m | 360m), STEPS (PPO and DPO steps, default 10), BATCH (PPO
prompts per rollout batch, default 32). Prints one JSON summary.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import tempfile
import time
from pathlib import Path

import torch
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

SIZES = {  # hidden, layers, heads, kv heads, intermediate
    "tiny": (64, 2, 4, 2, 128),
    "smol135m": (576, 30, 9, 3, 1536),
    "360m": (960, 32, 15, 5, 2560),
}
GOOD = "great wonderful moving funny brilliant charming superb delightful".split()
BAD = "dull boring awful tedious clumsy bland lifeless dreadful".split()


def main() -> None:
    from peftflow.config import validate
    from peftflow.model import load_base_for
    from peftflow.rlhf import dpo, ppo, reward
    from peftflow.rlhf.policy import ScalarHead, evaluate, with_adapter

    parser = argparse.ArgumentParser()
    parser.add_argument("--tokenizer", default="models/smollm2-135m-instruct", help="folder with the tokenizer files")
    args = parser.parse_args()
    size, steps, batch = (
        os.environ.get("SIZE", "tiny"),
        int(os.environ.get("STEPS", 10)),
        int(os.environ.get("BATCH", 32)),
    )
    tokenizer = AutoTokenizer.from_pretrained(args.tokenizer)
    h, layers, heads, kv, inter = SIZES[size]
    tmp = Path(tempfile.mkdtemp(prefix="rlhf-check-"))
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=h,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv,
        intermediate_size=inter,
        tie_word_embeddings=True,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(tmp / "model")
    tokenizer.save_pretrained(tmp / "model")
    rng = random.Random(0)
    pairs = [
        {
            "prompt": f"review {i}: the film was",
            "chosen": f" {rng.choice(GOOD)} and {rng.choice(GOOD)}",
            "rejected": f" {rng.choice(BAD)} and {rng.choice(BAD)}",
        }
        for i in range(400)
    ]
    common = {
        "model": {"name_or_path": str(tmp / "model")},
        "data": {"answer_cue": "", "max_length": 64},
        "train": {"save_every": 0, "eval_every": 0, "log_every": 1, "warmup_steps": 0, "output_dir": str(tmp)},
        "rlhf": {"generation": {"max_new_tokens": 20}, "eval": {"prompts": 64, "batch_size": 32}},
    }
    out: dict = {
        "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
        "torch": torch.__version__,
        "size": size,
        "steps": steps,
        "batch": batch,
    }

    def params(**over):
        raw = json.loads(json.dumps(common))
        for key, value in over.items():
            raw.setdefault(key, {}).update(value)
        return validate(raw)

    rm_params = params(method={"name": "lora", "r": 8}, train={"max_steps": 30, "batch_size": 16, "lr": 1.0e-3})
    started = time.perf_counter()
    summary = reward.train(rm_params, pairs[:320], pairs[320:], tmp / "reward", progress=False)
    out["reward"] = {
        k: summary[k] for k in ("test_pairwise_accuracy", "first_train_loss", "final_train_loss", "device")
    }
    out["reward"]["seconds_per_step"] = summary["train_seconds"] / 30
    out["reward"]["wall_seconds"] = time.perf_counter() - started
    rm, rm_tok = reward.load(rm_params, tmp / "reward")

    def reward_fn(prompts, responses, ids=None):
        return reward.score(rm, rm_tok, [p + r for p, r in zip(prompts, responses, strict=True)], 64, 64)

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    pp = params(
        method={"name": "lora", "r": 8, "dropout": 0.0},
        train={"max_steps": steps, "batch_size": batch, "lr": 1.0e-4, "scheduler": "constant"},
    )
    policy = with_adapter(load_base_for(pp), pp, "ppo").to(device)
    prompts = [p["prompt"] for p in pairs]
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    started = time.perf_counter()
    result = ppo.train(policy, ScalarHead(policy.config.hidden_size), reward_fn, tokenizer, prompts, pp, progress=False)
    out["ppo"] = {
        "seconds_per_step": (time.perf_counter() - started) / steps,
        "reward_mean": [round(r["reward_mean"], 4) for r in result["history"]],
        "kl": [round(r["kl"], 4) for r in result["history"]],
        "peak_memory_gib": torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else None,
    }
    started = time.perf_counter()
    out["evaluate"] = {
        k: v for k, v in evaluate(policy, tokenizer, reward_fn, prompts[-64:], pp).items() if k != "examples"
    }
    out["evaluate"]["wall_seconds"] = time.perf_counter() - started
    dp = params(
        method={"name": "lora", "r": 8, "dropout": 0.0}, train={"max_steps": steps, "batch_size": 8, "lr": 1.0e-4}
    )
    policy = with_adapter(load_base_for(dp), dp, "dpo").to(device)
    started = time.perf_counter()
    result = dpo.train(policy, tokenizer, pairs[:320], dp, progress=False)
    out["dpo"] = {
        "seconds_per_step": (time.perf_counter() - started) / steps,
        "first_loss": result["first_train_loss"],
        "final_loss": result["final_train_loss"],
    }
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
