"""PPO for a language-model policy, written here: trl 1.x no longer ships a PPOTrainer.

The algorithm of Ziegler et al. (2019, arXiv:1909.08593) and Stiennon et al. (2020), as trl's
former PPOTrainer ran it. Per rollout batch:

1. sample a continuation for each prompt with the policy (``rlhf.generation``);
2. score prompt + continuation with the reward model;
3. per-token reward: ``-kl_coef * (log pi(t) - log pi_ref(t))``, plus the score on the last token;
   pi_ref is the same model with its adapter disabled (the SFT policy);
4. advantages by GAE (gamma, lambda) over a value head on the policy's last hidden state, then
   whitened; returns = advantages + values;
5. ``ppo.epochs`` passes of mini-batch updates on the clipped policy objective plus the clipped
   value loss;
6. the KL coefficient adapts towards ``kl.target`` (Ziegler et al.'s proportional controller).

The pieces are pure functions over tensors (tested against hand computations); ``train`` runs them.
"""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Callable

import torch
from torch import nn
from tqdm.auto import tqdm
from transformers import set_seed

from peftflow.config import Params
from peftflow.rlhf.policy import ScalarHead, decode, forward, response_ids, sample
from peftflow.tokens import encode_prompt
from peftflow.training.optim import make_scheduler

log = logging.getLogger(__name__)
# (prompts, response texts, response token ids up to their end-of-sequence) -> (B,) scores
RewardFn = Callable[[list[str], list[str], list[list[int]]], torch.Tensor]


def masked_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return (x * mask).sum() / mask.sum().clamp(min=1)


def whiten(x: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True) -> torch.Tensor:
    """(x - mean) / std over the masked entries (the mean is kept with shift_mean=False)."""
    mean = masked_mean(x, mask)
    var = masked_mean((x - mean) ** 2, mask)
    out = (x - mean) * torch.rsqrt(var + 1e-8)
    return (out if shift_mean else out + mean) * mask


def token_rewards(
    scores: torch.Tensor, logprobs: torch.Tensor, ref_logprobs: torch.Tensor, mask: torch.Tensor, kl_coef: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """(rewards, kl), each (B, R): the KL penalty on every response token, the score on the last."""
    kl = (logprobs - ref_logprobs) * mask
    rewards = -kl_coef * kl
    last = (mask.sum(dim=1).long() - 1).clamp(min=0)  # (B,) index of each response's last token
    rewards[torch.arange(len(scores)), last] += scores
    return rewards, kl


def gae(
    rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float, lam: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalized advantage estimation over response tokens: (advantages, returns), each (B, R).
    The value after a response's last token is 0 (the episode ends there)."""
    values, rewards = values * mask, rewards * mask
    advantages = torch.zeros_like(rewards)
    running = torch.zeros(rewards.shape[0], device=rewards.device)
    width = rewards.shape[1]
    for t in reversed(range(width)):
        next_value = values[:, t + 1] if t + 1 < width else torch.zeros_like(running)
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        running = (delta + gamma * lam * running) * mask[:, t]
        advantages[:, t] = running
    return advantages, (advantages + values) * mask


def ppo_loss(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    values: torch.Tensor,
    old_values: torch.Tensor,
    advantages: torch.Tensor,
    returns: torch.Tensor,
    mask: torch.Tensor,
    clip_range: float,
    clip_range_value: float,
    vf_coef: float,
) -> tuple[torch.Tensor, dict[str, float]]:
    """The clipped policy objective plus ``vf_coef`` x the clipped value loss; and statistics."""
    ratio = torch.exp(logprobs - old_logprobs)
    pg = torch.max(-advantages * ratio, -advantages * ratio.clamp(1 - clip_range, 1 + clip_range))
    pg_loss = masked_mean(pg, mask)
    clipped = old_values + (values - old_values).clamp(-clip_range_value, clip_range_value)
    vf = torch.max((values - returns) ** 2, (clipped - returns) ** 2)
    vf_loss = 0.5 * masked_mean(vf, mask)
    stats = {
        "pg_loss": pg_loss.item(),
        "vf_loss": vf_loss.item(),
        "clipfrac": masked_mean(((ratio - 1).abs() > clip_range).float(), mask).item(),
        "approx_kl": 0.5 * masked_mean((logprobs - old_logprobs) ** 2, mask).item(),
    }
    return pg_loss + vf_coef * vf_loss, stats


class KlController:
    """The KL penalty coefficient; with a target, adapted proportionally (Ziegler et al., 2019):
    ``coef *= 1 + clip(kl / target - 1, -0.2, 0.2) * n / horizon`` after n rollouts."""

    def __init__(self, coef: float, target: float | None, horizon: int):
        self.coef, self.target, self.horizon = coef, target, horizon

    def update(self, kl: float, n: int) -> None:
        if self.target is None:
            return
        error = min(max(kl / self.target - 1, -0.2), 0.2)
        self.coef *= 1 + error * n / self.horizon


def _rows(batch: dict, idx: torch.Tensor) -> dict:
    return {k: v[idx] for k, v in batch.items()}


def train(
    policy,
    value_head: ScalarHead,
    reward_fn: RewardFn,
    tokenizer,
    prompts: list[str],
    params: Params,
    callbacks: tuple[Callable[[dict[str, float], int], None], ...] = (),
    progress: bool = True,
) -> dict:
    """Run ``train.max_steps`` PPO iterations on ``policy`` (a PeftModel whose adapter-off self is
    the reference) and ``value_head``, in place. The summary, with per-step history."""
    cfg, ppo, gen = params.train, params.rlhf.ppo, params.rlhf.generation
    set_seed(params.seed)
    device = next(policy.parameters()).device
    value_head.to(device)
    encoded = [encode_prompt(tokenizer, p, params.data) for p in prompts]
    trainable = [p for p in policy.parameters() if p.requires_grad] + list(value_head.parameters())
    optimizer = torch.optim.AdamW(trainable, lr=cfg.lr, weight_decay=cfg.weight_decay)
    updates = cfg.max_steps * ppo.epochs * -(-cfg.batch_size // ppo.mini_batch_size)
    scheduler = make_scheduler(cfg, optimizer, updates)
    kl_ctl = KlController(ppo.kl.coef, ppo.kl.target, ppo.kl.horizon)
    order, pos = list(range(len(encoded))), len(encoded)
    rng, shuffle = random.Random(params.seed), torch.Generator().manual_seed(params.seed)
    history, seconds, tokens = [], 0.0, 0
    policy.eval()  # no dropout: the ratio must be exactly 1 before the first update
    bar = tqdm(total=cfg.max_steps, desc="ppo", disable=not progress, unit="step")
    for step in range(1, cfg.max_steps + 1):
        started = time.perf_counter()
        if pos + cfg.batch_size > len(order):  # a new seeded pass over the prompts
            rng.shuffle(order)
            pos = 0
        idx, pos = order[pos : pos + cfg.batch_size], pos + cfg.batch_size
        batch = sample(
            policy,
            [encoded[i] for i in idx],
            tokenizer.pad_token_id,
            tokenizer.eos_token_id,
            gen,
            params.seed * 100_003 + step,
        )
        scores = reward_fn([prompts[i] for i in idx], decode(tokenizer, batch), response_ids(batch)).float()
        mask = batch["mask"].float().to(device)
        with torch.no_grad():
            old_logprobs, old_values = forward(policy, batch, gen.temperature, value_head)
            with policy.disable_adapter():
                ref_logprobs, _ = forward(policy, batch, gen.temperature)
        rewards, kl = token_rewards(scores.to(device), old_logprobs, ref_logprobs, mask, kl_ctl.coef)
        if ppo.whiten_rewards:
            rewards = whiten(rewards, mask, shift_mean=False)
        advantages, returns = gae(rewards, old_values, mask, ppo.gamma, ppo.lam)
        advantages = whiten(advantages, mask)
        stats: dict[str, list[float]] = {}
        for _ in range(ppo.epochs):
            for mb in torch.randperm(len(idx), generator=shuffle).split(ppo.mini_batch_size):
                logprobs, values = forward(policy, _rows(batch, mb), gen.temperature, value_head)
                loss, mb_stats = ppo_loss(
                    logprobs,
                    old_logprobs[mb],
                    values,
                    old_values[mb],
                    advantages[mb],
                    returns[mb],
                    mask[mb],
                    ppo.clip_range,
                    ppo.clip_range_value,
                    ppo.vf_coef,
                )
                loss.backward()
                if cfg.max_grad_norm:
                    nn.utils.clip_grad_norm_(trainable, cfg.max_grad_norm)
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad(set_to_none=True)
                for k, v in mb_stats.items():
                    stats.setdefault(k, []).append(v)
        kl_per_response = float(kl.sum(dim=1).mean())
        coef_used = kl_ctl.coef
        kl_ctl.update(kl_per_response, len(idx))
        seconds += time.perf_counter() - started
        tokens += int(mask.sum())
        row = {
            "reward_mean": float(scores.mean()),
            "reward_std": float(scores.std()) if len(scores) > 1 else 0.0,
            "kl": kl_per_response,  # nats per response, sum over its tokens of log pi - log pi_ref
            "kl_coef": coef_used,
            "non_score_reward": float((-coef_used * kl).sum(dim=1).mean()),
            "response_tokens": float(mask.sum(dim=1).mean()),
            **{k: sum(v) / len(v) for k, v in stats.items()},
        }
        history.append({"step": step, **row})
        bar.set_postfix(reward=f"{row['reward_mean']:.3f}", kl=f"{row['kl']:.2f}")
        bar.update(1)
        if step % cfg.log_every == 0 or step == cfg.max_steps:
            for cb in callbacks:
                cb({f"ppo_{k}": v for k, v in row.items()}, step)
    bar.close()
    return {"steps": cfg.max_steps, "history": history, "train_seconds": seconds, "response_tokens": tokens}
