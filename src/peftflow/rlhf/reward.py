"""The reward model: the base causal LM with a PEFT method applied, plus a scalar head on the last
token's hidden state, trained on preference pairs with the pairwise (Bradley-Terry) loss
``-log sigmoid(r(chosen) - r(rejected))``.

Written here rather than with trl's RewardTrainer: that trainer needs a sequence-classification
model with a SEQ_CLS peft config, while every peftflow method adapts a causal LM through its one
``apply``. A head on the causal LM's trunk keeps every method usable for the reward model, and the
loop is the training toolbox's (same sampler, optimizer, schedule, accumulation, clipping and
checkpoints as SFT), so it is seeded, normalized and resumed the same way.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
import time
from collections.abc import Callable
from pathlib import Path

import torch
from accelerate import Accelerator
from safetensors.torch import load_file, save_file
from torch import nn
from tqdm.auto import tqdm
from transformers import set_seed

from peftflow import artifacts
from peftflow.atomic import atomic_dir
from peftflow.config import Params
from peftflow.distributed import strategy
from peftflow.methods import get_method
from peftflow.model import load_base_for, load_tokenizer
from peftflow.rlhf import policy
from peftflow.rlhf.policy import ScalarHead
from peftflow.tokens import left_pad
from peftflow.training import checkpoint
from peftflow.training.meters import count_parameters, peak_memory_bytes, reset_peak_memory
from peftflow.training.optim import make_optimizer, make_scheduler, mixed_precision, optimizer_step
from peftflow.training.sampler import Sampler
from peftflow.training.sft import build_model, resume_fingerprint

log = logging.getLogger(__name__)
HEAD_FILE = "score_head.safetensors"


class RewardModel(nn.Module):
    def __init__(self, backbone: nn.Module):
        super().__init__()
        self.backbone = backbone
        self.head = ScalarHead(backbone.config.hidden_size)

    def forward(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """(B,) scores of a left-padded batch: the last column is every row's last token."""
        out = self.backbone(**batch, logits_to_keep=1, output_hidden_states=True)
        return self.head(out.hidden_states[-1][:, -1])


def _encode(tokenizer, texts: list[str], max_length: int) -> list[list[int]]:
    return [tokenizer.encode(t, add_special_tokens=False)[-max_length:] for t in texts]


@torch.no_grad()
def score(model: RewardModel, tokenizer, texts: list[str], batch_size: int = 32, max_length: int = 256) -> torch.Tensor:
    """Rewards of whole texts (prompt + response), (N,) on the CPU."""
    model.eval()
    device = next(model.parameters()).device
    ids = _encode(tokenizer, texts, max_length)
    out = []
    for i in range(0, len(ids), batch_size):
        batch = {k: v.to(device) for k, v in left_pad(ids[i : i + batch_size], tokenizer.pad_token_id).items()}
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            out.append(model(batch).float().cpu())
    return torch.cat(out) if out else torch.zeros(0)


def pairwise_accuracy(model: RewardModel, tokenizer, pairs: list[dict], batch_size: int, max_length: int) -> dict:
    """Share of pairs whose chosen text scores above the rejected one, and the mean margin."""
    chosen = score(model, tokenizer, [p["prompt"] + p["chosen"] for p in pairs], batch_size, max_length)
    rejected = score(model, tokenizer, [p["prompt"] + p["rejected"] for p in pairs], batch_size, max_length)
    return {
        "pairwise_accuracy": float((chosen > rejected).float().mean()),
        "margin": float((chosen - rejected).mean()),
        "chosen_reward": float(chosen.mean()),
        "rejected_reward": float(rejected.mean()),
    }


def train(
    params: Params,
    pairs: list[dict],
    heldout: list[dict],
    out_dir: Path,
    callbacks: tuple[Callable[[dict[str, float], int], None], ...] = (),
    progress: bool = True,
) -> dict:
    """Train a reward model on ``pairs``; save it to ``out_dir``; the summary (with held-out accuracy).

    The toolbox's loop: the sampler, the method's optimizer, the warmup + decay schedule, one
    accumulated, clipped optimizer step normalized by the step's pairs, the method's hooks, and
    checkpoints in ``out_dir``'s folder that resume exactly (``train.save_every``).
    """
    cfg, started_at = params.train, time.perf_counter()
    reset_peak_memory()
    set_seed(params.seed)
    precision = mixed_precision(cfg.mixed_precision)
    strategy.forget_other_precision(precision)
    accelerator = Accelerator(mixed_precision=precision, step_scheduler_with_optimizer=False)
    method = get_method(params.method.name)

    # the data: each example is a (chosen, rejected) pair, both texts in one left-padded batch
    tokenizer, limit = load_tokenizer(params.model), params.data.max_length
    chosen = _encode(tokenizer, [p["prompt"] + p["chosen"] for p in pairs], limit)
    rejected = _encode(tokenizer, [p["prompt"] + p["rejected"] for p in pairs], limit)
    sampler = Sampler(
        [len(c) + len(r) for c, r in zip(chosen, rejected, strict=True)],
        cfg.batch_size,
        params.seed,
        accelerator.process_index,
        accelerator.num_processes,
    )

    def batch_of(rows: list[int]) -> dict[str, torch.Tensor]:
        return left_pad([chosen[i] for i in rows] + [rejected[i] for i in rows], tokenizer.pad_token_id)

    def pairs_in(batch: dict[str, torch.Tensor]) -> int:
        return batch["input_ids"].shape[0] // 2

    ordered = []  # per micro-batch of the current step: pairs whose chosen text scored higher

    def bradley_terry(model: RewardModel, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        rewards = model(batch)
        n = rewards.shape[0] // 2
        margin = rewards[:n] - rewards[n:]
        ordered.append(int((margin > 0).sum()))
        return -nn.functional.logsigmoid(margin).sum()  # summed over the pairs

    # the model and what trains it
    model = RewardModel(build_model(params))
    trainable, total = count_parameters(model)
    optimizer = make_optimizer(model.backbone, cfg, method, params.method)
    optimizer.add_param_group({"params": list(model.head.parameters()), "weight_decay": 0.0})
    scheduler = make_scheduler(cfg, optimizer)
    model, optimizer, scheduler = accelerator.prepare(model, optimizer, scheduler)
    backbone = lambda: accelerator.unwrap_model(model).backbone  # noqa: E731  (what the method's hooks act on)

    ckpt_root = Path(out_dir).parent / "checkpoints"
    pairs_version = hashlib.sha256(json.dumps([pairs, heldout], sort_keys=True).encode()).hexdigest()[:12]
    state = {
        "step": 0,
        "history": [],
        "evals": [],
        "train_seconds": 0.0,
        "params": resume_fingerprint(params, pairs_version),
    }
    ckpt = checkpoint.latest(ckpt_root)
    if ckpt is not None:
        unwrapped = accelerator.unwrap_model(model)
        state = checkpoint.load(ckpt, unwrapped, optimizer, scheduler, method, state["params"], unwrapped.backbone)
        log.info("reward model: resumed from %s (step %d)", ckpt, state["step"])

    # the loop
    eval_pairs = heldout[: cfg.eval_examples]
    bar = tqdm(total=cfg.max_steps, initial=state["step"], desc="train reward model", disable=not progress, unit="step")
    while state["step"] < cfg.max_steps:
        step = state["step"] + 1
        model.train()
        started = time.perf_counter()
        micro = [batch_of(rows) for rows in sampler.step_indices(step, cfg.grad_accum)]
        ordered.clear()
        result = optimizer_step(
            model, micro, pairs_in, bradley_terry, optimizer, scheduler, accelerator, cfg.max_grad_norm, method, step,
            backbone,
        )  # fmt: skip
        state["train_seconds"] += time.perf_counter() - started
        state["step"] = step
        accuracy = sum(ordered) / max(sum(pairs_in(b) for b in micro), 1)  # this process's pairs
        state["history"].append({"step": step, "loss": result.loss, "accuracy": accuracy})
        bar.set_postfix(loss=f"{result.loss:.4f}", acc=f"{accuracy:.2f}")
        bar.update(1)
        if step % cfg.log_every == 0 or step == cfg.max_steps:
            for cb in callbacks:
                metrics = {"train_loss": result.loss, "train_pairwise_accuracy": accuracy}
                cb({**metrics, "lr": scheduler.get_last_lr()[0]}, step)
        if cfg.eval_every and (step % cfg.eval_every == 0 or step == cfg.max_steps):
            found = pairwise_accuracy(model, tokenizer, eval_pairs, params.eval.batch_size, limit)
            state["evals"].append({"step": step, **found})
            for cb in callbacks:
                cb({"val_pairwise_accuracy": found["pairwise_accuracy"], "val_margin": found["margin"]}, step)
            bar.write(
                f"step {step}: loss {result.loss:.4f}, held-out pairwise accuracy {found['pairwise_accuracy']:.3f}"
            )
        if cfg.save_every and step % cfg.save_every == 0 and step < cfg.max_steps and accelerator.is_main_process:
            unwrapped = accelerator.unwrap_model(model)
            checkpoint.save(
                ckpt_root,
                step,
                unwrapped,
                optimizer,
                scheduler,
                state,
                cfg.keep_checkpoints,
                method,
                unwrapped.backbone,
            )
    bar.close()

    # the held-out figures, the artifact and the summary
    model = accelerator.unwrap_model(model)
    final = pairwise_accuracy(model, tokenizer, heldout, params.eval.batch_size, limit)
    save(model, params, out_dir)
    shutil.rmtree(ckpt_root, ignore_errors=True)  # the artifact supersedes them
    history = state["history"]
    return {
        "steps": cfg.max_steps,
        "first_train_loss": history[0]["loss"],
        "final_train_loss": history[-1]["loss"],
        "history": history,
        "evals": state["evals"],
        "test_pairs": len(heldout),
        **{f"test_{k}": v for k, v in final.items()},
        "trainable_params": trainable,
        "total_params": total,
        "trainable_pct": 100 * trainable / total,
        "train_seconds": state["train_seconds"],
        "wall_seconds": time.perf_counter() - started_at,
        "peak_memory_bytes": peak_memory_bytes(),
        "artifact_bytes": artifacts.size_bytes(out_dir),
        "device": str(accelerator.device),
    }


def save(model: RewardModel, params: Params, out_dir: Path) -> Path:
    """The method's artifact (adapter + peftflow.json) and the head, appearing together."""
    with atomic_dir(out_dir) as tmp:
        artifacts.save(model.backbone, get_method(params.method.name), tmp, params.method)  # fills tmp in one rename
        save_file({k: v.detach().cpu().contiguous() for k, v in model.head.state_dict().items()}, tmp / HEAD_FILE)
    return Path(out_dir)


def load(params: Params, model_dir: Path) -> tuple[RewardModel, object]:
    """A saved reward model (in eval mode, on the GPU if there is one) and its tokenizer."""
    model_dir = Path(model_dir)
    if not (model_dir / HEAD_FILE).is_file():
        raise FileNotFoundError(f"{model_dir}: not a reward model (no {HEAD_FILE})")
    model = RewardModel(artifacts.load(load_base_for(params), model_dir))
    model.head.load_state_dict(load_file(model_dir / HEAD_FILE))
    return model.to(policy.device()).eval(), load_tokenizer(params.model)
