"""Policies for the preference stages: the SFT model folded into the base weights, a fresh
adapter on top, sampling, per-token log-probs and values, and evaluation against the SFT policy.

The reference policy is the same model with its adapter disabled (``disable_adapter``): after SFT
is merged into the base, "adapter off" *is* the SFT policy, so no second copy of the weights is
held. A saved policy carries its SFT artifact in ``sft/`` and loads on its own.
"""

from __future__ import annotations

from pathlib import Path

import torch
from peft import PeftModel
from torch import nn

from peftflow import artifacts
from peftflow.config import Params
from peftflow.methods import get_method, weight_adapter_names
from peftflow.model import load_base_for
from peftflow.rlhf.params import Generation
from peftflow.tokens import left_pad


def device() -> torch.device:
    """Where the RLHF stages run: the GPU if there is one."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


class ScalarHead(nn.Module):
    """hidden state -> one number: PPO's value head and the reward model's score head."""

    def __init__(self, hidden: int):
        super().__init__()
        self.linear = nn.Linear(hidden, 1)
        nn.init.zeros_(self.linear.weight)  # starts at 0: no prior preference, no value guess
        nn.init.zeros_(self.linear.bias)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:  # (..., H) -> (...)
        return self.linear(hidden.float()).squeeze(-1)


def with_adapter(model: nn.Module, params: Params, stage: str) -> PeftModel:
    """``params.method`` applied to ``model``; refused in one line unless it is a peft adapter
    over the weights (the reference policy is the adapter switched off; input prompts would shift
    the token positions the stages rely on)."""
    method = get_method(params.method.name)
    if not method.weight_adapter:
        raise ValueError(
            f"{stage}: method {method.name} is not a peft adapter over the weights; "
            f"use one of: {', '.join(weight_adapter_names())}"
        )
    return method.apply(model, params.method)


def merged_sft(params: Params, sft_dir: Path) -> nn.Module:
    """The base model with the SFT artifact folded into its weights (the reference policy)."""
    method, _ = artifacts.read_manifest(sft_dir)
    artifacts.check_mergeable(method, "sft: ")
    return method.merge(artifacts.load(load_base_for(params), sft_dir))


def load_policy(params: Params, policy_dir: Path) -> PeftModel:
    """A saved PPO/DPO policy: base + its ``sft/`` merged, + its adapter."""
    return PeftModel.from_pretrained(merged_sft(params, Path(policy_dir) / "sft"), policy_dir)


def response_mask(responses: torch.Tensor, eos_id: int) -> torch.Tensor:
    """(B, R) 1 up to and including each row's first end-of-sequence token, 0 after it."""
    is_eos = (responses == eos_id).long()
    after = (is_eos.cumsum(dim=1) - is_eos) > 0  # strictly after the first eos
    return (~after).long()


@torch.no_grad()
def sample(model, prompts: list[list[int]], pad_id: int, eos_id: int, gen: Generation, seed: int) -> dict:
    """Sampled continuations of ``prompts`` (token ids): query ids/mask (B, P), responses and their mask (B, R)."""
    query = left_pad(prompts, pad_id)
    device = next(model.parameters()).device
    torch.manual_seed(seed)
    out = model.generate(
        input_ids=query["input_ids"].to(device),
        attention_mask=query["attention_mask"].to(device),
        do_sample=True,
        temperature=gen.temperature,
        top_k=gen.top_k,  # 0: off (None could pick up a library default)
        top_p=gen.top_p,
        max_new_tokens=gen.max_new_tokens,
        pad_token_id=pad_id,
        eos_token_id=eos_id,
    )
    responses = out[:, query["input_ids"].shape[1] :].cpu()
    return {
        "query": query["input_ids"],
        "query_mask": query["attention_mask"],
        "responses": responses,
        "mask": response_mask(responses, eos_id),
    }


def forward(model, batch: dict, temperature: float, value_head: ScalarHead | None = None):
    """Per-token log-probs of the responses under ``model`` (B, R), and values (B, R) with a head.

    Log-probs are of the sampling distribution (logits / temperature), as PPO's ratio needs.
    """
    device = next(model.parameters()).device
    ids = torch.cat([batch["query"], batch["responses"]], dim=1).to(device)
    mask = torch.cat([batch["query_mask"], batch["mask"]], dim=1).to(device)
    positions = (mask.cumsum(dim=1) - 1).clamp(min=0)
    width = batch["responses"].shape[1]
    out = model(
        input_ids=ids,
        attention_mask=mask,
        position_ids=positions,
        logits_to_keep=width + 1,
        output_hidden_states=value_head is not None,
    )
    logits = out.logits[:, :-1].float() / temperature  # (B, R, V): column t predicts response token t
    logprobs = torch.log_softmax(logits, dim=-1).gather(-1, batch["responses"].to(device)[..., None]).squeeze(-1)
    if value_head is None:
        return logprobs, None
    hidden = out.hidden_states[-1][:, -width - 1 : -1]  # (B, R, H): the state before each response token
    return logprobs, value_head(hidden)


def response_ids(batch: dict) -> list[list[int]]:
    """Each response's token ids, up to and including its end-of-sequence token."""
    return [r[: int(m.sum())].tolist() for r, m in zip(batch["responses"], batch["mask"], strict=True)]


def decode(tokenizer, batch: dict) -> list[str]:
    """The responses as text, up to their end-of-sequence token."""
    return [tokenizer.decode(ids, skip_special_tokens=True) for ids in response_ids(batch)]


def _versus(mine: torch.Tensor, sft: torch.Tensor) -> dict[str, float]:
    """Mean reward of the policy's and the SFT policy's continuations, and the policy's win rate (ties count half)."""
    wins = (mine > sft).float() + 0.5 * (mine == sft).float()
    return {
        "reward_mean": float(mine.mean()),
        "sft_reward_mean": float(sft.mean()),
        "win_rate_vs_sft": float(wins.mean()),
    }


@torch.no_grad()
def evaluate(
    policy: PeftModel,
    tokenizer,
    reward_fn,
    prompts: list[str],
    params: Params,
    examples: int = 5,
    judges: dict | None = None,
) -> dict:
    """The policy against the SFT policy (its adapter off) on held-out prompts, same sampling seed
    for both: mean reward of each, the policy's win rate under the reward model (ties count
    half), and KL(policy || SFT) per response, estimated on the policy's own samples.

    ``judges``: other scorers (name -> a function like ``reward_fn``) of the same continuations,
    e.g. a reward model the policy was not trained against; their figures are ``<name>_reward_mean``,
    ``<name>_sft_reward_mean`` and ``<name>_win_rate_vs_sft``.
    """
    from peftflow.tokens import encode_prompt

    ev, gen = params.rlhf.eval, params.rlhf.generation
    scorers = {"": reward_fn, **{f"{name}_": fn for name, fn in (judges or {}).items()}}
    prompts = prompts[: ev.prompts]
    policy.eval()
    scores = {key: ([], []) for key in scorers}  # per scorer: the policy's and the SFT policy's rewards
    kls, lengths, shown = [], [], []
    for start in range(0, len(prompts), ev.batch_size):
        chunk = prompts[start : start + ev.batch_size]
        ids = [encode_prompt(tokenizer, p, params.data) for p in chunk]
        pad, eos = tokenizer.pad_token_id, tokenizer.eos_token_id
        mine = sample(policy, ids, pad, eos, gen, ev.seed + start)
        with policy.disable_adapter():
            sft = sample(policy, ids, pad, eos, gen, ev.seed + start)
        mine_text, sft_text = decode(tokenizer, mine), decode(tokenizer, sft)
        mine_ids, sft_ids = response_ids(mine), response_ids(sft)
        for key, fn in scorers.items():  # every scorer reads the same continuations
            scores[key][0].append(fn(chunk, mine_text, mine_ids).float())
            scores[key][1].append(fn(chunk, sft_text, sft_ids).float())
        logprobs, _ = forward(policy, mine, gen.temperature)
        with policy.disable_adapter():
            ref, _ = forward(policy, mine, gen.temperature)
        mask = mine["mask"].to(logprobs.device)
        kls.append(((logprobs - ref) * mask).sum(dim=1).cpu())
        lengths.append(mine["mask"].sum(dim=1).float())
        for i, (p, a, b) in enumerate(zip(chunk, mine_text, sft_text, strict=True)):
            if len(shown) < examples:
                shown.append({"prompt": p, "policy": a, "sft": b})
                for key, (m, r) in scores.items():
                    shown[-1].update({f"{key}policy_reward": float(m[-1][i]), f"{key}sft_reward": float(r[-1][i])})
    out: dict = {"eval_prompts": len(prompts)}
    for key, (m, r) in scores.items():
        out.update({key + k: v for k, v in _versus(torch.cat(m), torch.cat(r)).items()})
    return {
        **out,
        "kl_vs_sft": float(torch.cat(kls).mean()),
        "response_tokens": float(torch.cat(lengths).mean()),
        "examples": shown,
    }
