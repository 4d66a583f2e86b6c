"""Typed params of the RLHF chain (the ``rlhf:`` section): data, sampling, PPO, DPO, evaluation.

They live in ``params/rlhf/base.yaml`` (shared) and the stage files ``params/rlhf/<stage>.yaml``;
see :func:`peftflow.rlhf.stages.load_stage` for the merge order.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field

from peftflow.schema import FIGURES, MODEL, NOTHING, Strict

_Strict = Strict


def _for(stages: tuple[str, ...], level: str, default):
    """A section only ``stages`` read (the others' fingerprints leave it out), at ``level``."""
    return Field(default, json_schema_extra={"affects": level, "stages": list(stages)})


class RlhfData(_Strict):
    # "pang_lee": prompts and preference pairs derived from the Pang & Lee sentences (see
    # peftflow.rlhf.data); else a .jsonl file of {"prompt", "chosen", "rejected"} rows
    source: str = "pang_lee"
    prompts: str | None = None  # a .jsonl of {"prompt"} rows for PPO rollouts; None: the pairs' prompts
    prompt_words: int = Field(5, ge=1)  # pang_lee: a prompt is the first words of a sentence
    response_words: int = Field(12, ge=1)  # pang_lee: continuations are cut to this many words
    test: int = Field(400, ge=1)  # held-out prompts (and their pairs): reward accuracy, policy evaluation
    val: int = Field(200, ge=1)  # SFT validation examples
    seed: int = 0
    out_dir: Path = Path("data/rlhf")


class Generation(_Strict):
    """Sampling for PPO rollouts and for evaluating policies."""

    max_new_tokens: int = Field(20, ge=1)
    temperature: float = Field(1.0, gt=0)
    top_k: int = Field(0, ge=0)  # 0: no top-k filter
    top_p: float = Field(1.0, gt=0, le=1)  # 1.0: no nucleus filter


class KlParams(_Strict):
    coef: float = Field(0.05, ge=0)  # initial penalty per nat of KL to the reference (SFT) policy
    target: float | None = Field(6.0, gt=0)  # adaptive: steer the coefficient to this KL (nats); None: fixed
    horizon: int = Field(10000, ge=1)  # adaptive: rollouts over which the coefficient adapts


class PpoParams(_Strict):
    """PPO over the policy adapter. train.max_steps is the number of rollout batches of
    train.batch_size prompts; train.lr, train.max_grad_norm, train.weight_decay apply."""

    epochs: int = Field(2, ge=1)  # passes over each rollout batch
    mini_batch_size: int = Field(8, ge=1)  # rollouts per gradient step
    clip_range: float = Field(0.2, gt=0)  # policy ratio clipped to [1 - c, 1 + c]
    clip_range_value: float = Field(0.2, gt=0)  # value predictions clipped to old value +- c
    vf_coef: float = Field(0.1, ge=0)  # value loss weight
    gamma: float = Field(1.0, gt=0, le=1)  # discount
    lam: float = Field(0.95, ge=0, le=1)  # GAE lambda
    whiten_rewards: bool = False  # scale per-token rewards to unit variance within a batch
    kl: KlParams = KlParams()


class DpoParams(_Strict):
    beta: float = Field(0.1, gt=0)  # higher: stay closer to the reference (SFT) policy
    loss_type: str = "sigmoid"  # trl's DPO loss: sigmoid (the paper), ipo, hinge, ...


class RlhfEval(_Strict):
    prompts: int = Field(100, ge=1)  # held-out prompts a policy is evaluated on (reward, KL, win rate)
    batch_size: int = Field(25, ge=1)
    seed: int = 1234  # sampling seed: every policy answers the same prompts under the same seed


class RlhfParams(_Strict):
    # the prepared data is identified by its DVC hash, which every stage's fingerprint holds
    data: RlhfData = Field(RlhfData(), json_schema_extra={"affects": NOTHING})
    generation: Generation = _for(("ppo", "dpo"), MODEL, Generation())  # PPO's rollouts; both stages' evaluation
    ppo: PpoParams = _for(("ppo",), MODEL, PpoParams())
    dpo: DpoParams = _for(("dpo",), MODEL, DpoParams())
    eval: RlhfEval = _for(("ppo", "dpo"), FIGURES, RlhfEval())
    # the training pairs a stage learns from: all of them, or one of two disjoint halves split by
    # prompt (peftflow.rlhf.data.pairs_for): the reward model and DPO learn from "policy", the
    # held-out judge that scores PPO and DPO from "judge", so neither policy was optimized against it
    pairs: Literal["all", "policy", "judge"] = _for(("reward", "judge", "dpo"), MODEL, "all")
    # registered models: <prefix>-sft, -reward, -judge, -ppo, -dpo
    model_prefix: str = Field("peftflow-rlhf", json_schema_extra={"affects": NOTHING})
