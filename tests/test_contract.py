"""The structure's promises: which keys matter is declared once, the core asks methods what they
are (never their names), and the correctness bugs the redesign fixed stay fixed."""

from __future__ import annotations

import ast
import re

import pytest
import torch
from accelerate import Accelerator

from peftflow import config
from peftflow.config import TrainParams
from peftflow.methods import get_method, method_names
from tests.conftest import ROOT


def test_which_keys_matter_is_declared_once_and_every_fingerprint_follows_it(tiny_params):
    from peftflow.rlhf.stages import fingerprint as rlhf_fingerprint

    base = tiny_params("lora")
    same = ["compare.token_budget=999", "compare.seeds=5", "train.log_every=3", "train.save_every=7",
            "train.eval_every=9", "train.keep_checkpoints=5", "nightly.cron=0 3 * * *", "promote.min_delta=0.5",
            "tracking.experiment=other", "train.run_name=elsewhere"]  # fmt: skip
    for item in same:
        other = tiny_params("lora", item)
        assert config.fingerprint(other) == config.fingerprint(base), item  # resume
        assert config.fingerprint(other, config.FIGURES) == config.fingerprint(base, config.FIGURES), item  # nightly
        assert rlhf_fingerprint("sft", other, "md5", {}) == rlhf_fingerprint("sft", base, "md5", {}), item
    for item in ("train.lr=1.0e-3", "method.r=4", "seed=7", "data.max_length=64"):
        other = tiny_params("lora", item)
        assert config.fingerprint(other) != config.fingerprint(base), item
        assert rlhf_fingerprint("sft", other, "md5", {}) != rlhf_fingerprint("sft", base, "md5", {}), item
    # evaluation settings change the figures, not the model: nightly and RLHF reuse see them, resume does not
    other = tiny_params("lora", "eval.batch_size=4")
    assert config.fingerprint(other) == config.fingerprint(base)
    assert config.fingerprint(other, config.FIGURES) != config.fingerprint(base, config.FIGURES)


def test_resume_ignores_logging_cadence_comparison_and_schedule_but_not_the_rank(tiny_params):
    from peftflow.training.sft import train

    common = ("train.max_steps=4", "train.save_every=2", "train.run_name=cadence")
    train(tiny_params("lora", *common), stop_after=2, progress=False)
    later = tiny_params("lora", *common, "train.log_every=1", "compare.token_budget=123", "nightly.cron=5 4 * * *")
    assert train(later, progress=False).finished
    train(tiny_params("lora", *common, "train.run_name=rank"), stop_after=2, progress=False)
    with pytest.raises(ValueError, match=r"other params \(method.r changed\)"):
        train(tiny_params("lora", *common, "train.run_name=rank", "method.r=4"), progress=False)


def test_the_zero_shot_baseline_of_an_input_prompt_method_is_the_base_model(tiny_params):
    """Bug: with the adapter switched off, the soft-token count was still read from the active
    config, so the base model's logits were sliced as if soft tokens were there (IndexError)."""
    from peftflow import data
    from peftflow.evaluate import evaluate_run, score
    from peftflow.model import load_base_model, load_tokenizer
    from peftflow.training.sft import train

    for method in ("prompt", "ptuning"):
        params = tiny_params(method, "train.max_steps=2", f"train.run_name={method}-zs")
        train(params, progress=False)
        assert not (params.train.output_dir / "zeroshot").exists() or method != "prompt"  # no cached figure
        result = evaluate_run(params.run_dir, params)
        base = load_base_model(params.model).eval()
        examples = data.read_split(params.data.out_dir, "test")
        labels = data.read_manifest(params.data.out_dir)["labels"]
        alone = score(base, load_tokenizer(params.model), params, examples, labels, torch.device("cpu"))
        assert result.zeroshot.test_loss == pytest.approx(alone["test_loss"], abs=1e-5)
        assert result.zeroshot.test_accuracy == alone["test_accuracy"]
        for cached in (params.train.output_dir / "zeroshot").glob("*.json"):
            cached.unlink()  # the next method must compute its own


def _tiny_lora(tiny_params):
    from peftflow.training.sft import build_model

    params = tiny_params("lora", "method.dropout=0.0")
    torch.manual_seed(0)
    return params, build_model(params)


def test_accumulated_steps_weigh_every_completion_token_the_same(tiny_params):
    """Bug: the mean of per-micro-batch means weighed the tokens of sparse micro-batches more."""
    from peftflow.model import load_tokenizer
    from peftflow.tokens import Encoded, collate, completion_loss_sum, completion_tokens
    from peftflow.training.optim import optimizer_step

    params, model = _tiny_lora(tiny_params)
    tok = load_tokenizer(params.model)
    rows = [Encoded(tok.encode("a film with a story"), tok.encode(" positive and warm", add_special_tokens=False)),
            Encoded(tok.encode("dull"), tok.encode(" negative", add_special_tokens=False))]  # fmt: skip
    state = {n: p.detach().clone() for n, p in model.named_parameters()}
    accelerator = Accelerator(cpu=True)

    def step(micro):
        model.load_state_dict(state, strict=False)
        optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1.0)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _: 1.0)
        out = optimizer_step(
            model, micro, completion_tokens, completion_loss_sum, optimizer, scheduler, accelerator, None
        )
        return out, {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}

    split, split_weights = step([collate([rows[0]], tok.pad_token_id), collate([rows[1]], tok.pad_token_id)])
    whole, whole_weights = step([collate(rows, tok.pad_token_id)])
    assert split.units == whole.units == 4
    assert split.loss == pytest.approx(whole.loss, abs=1e-5)
    for name, w in whole_weights.items():
        torch.testing.assert_close(split_weights[name], w, atol=1e-5, rtol=1e-4)


def test_a_constant_schedule_warms_up_first():
    """Bug: scheduler: constant ignored warmup_steps."""
    from peftflow.training.optim import make_scheduler

    cfg = TrainParams(scheduler="constant", warmup_steps=4, max_steps=10, lr=1.0)
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    scheduler = make_scheduler(cfg, optimizer)
    lrs = []
    for _ in range(8):
        lrs.append(scheduler.get_last_lr()[0])
        optimizer.step()
        scheduler.step()
    assert lrs == [0.0, 0.25, 0.5, 0.75, 1.0, 1.0, 1.0, 1.0]


def test_multi_token_labels_are_scored_as_trained_with_the_stop_token(tiny_params):
    """Bug: without the end-of-sequence token, a label that is a prefix of another could never
    score below it (log p(good) >= log p(good enough))."""
    from peftflow.evaluate import _label_ids
    from peftflow.model import load_tokenizer

    params = tiny_params("lora")
    tok = load_tokenizer(params.model)
    ids = _label_ids(tok, ["good", "good enough"], params)
    assert ids[0][-1] == ids[1][-1] == tok.eos_token_id
    assert ids[1][: len(ids[0]) - 1] == ids[0][:-1]  # "good" is a prefix of "good enough": EOS tells them apart
    single = _label_ids(tok, ["positive", "negative"], params)
    assert all(len(i) == 1 for i in single)  # distinct single tokens: one pass decides, as before


def _core_modules():
    for path in sorted((ROOT / "src" / "peftflow").rglob("*.py")):
        if "methods" not in path.relative_to(ROOT / "src" / "peftflow").parts:
            yield path


def test_no_core_module_outside_methods_names_a_method():
    """The core asks a method what it is (capabilities), never which one it is."""
    names = set(method_names())
    distinctive = {n for n in names if n not in {"full", "prompt", "prefix", "adapter", "freeze"}}
    offenders = []
    for path in _core_modules():
        tree = ast.parse(path.read_text())
        docstrings = {
            id(node.body[0].value)
            for node in ast.walk(tree)
            if isinstance(node, ast.Module | ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef)
            and node.body
            and isinstance(node.body[0], ast.Expr)
            and isinstance(node.body[0].value, ast.Constant)
        }
        where = path.relative_to(ROOT)
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("peftflow.methods"):
                imported = node.module.split(".")[2:] + [a.name for a in node.names]
                offenders += [f"{where}: imports method {n}" for n in imported if n in names]
            if isinstance(node, ast.Compare):  # method == "lora", params.method.name in ("full", ...)
                sides = [node.left, *node.comparators]
                about_methods = any(
                    (isinstance(x, ast.Attribute) and x.attr == "name")
                    or (isinstance(x, ast.Name) and "method" in x.id)
                    for x in sides
                )
                for const in ast.walk(node):
                    if isinstance(const, ast.Constant) and const.value in (names if about_methods else distinctive):
                        offenders.append(f"{where}:{node.lineno}: compares with {const.value!r}")
            if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docstrings:
                words = set(re.findall(r"[a-z0-9_]+", node.value))
                offenders += [f"{where}:{node.lineno}: {node.value!r}" for w in words & distinctive]
    assert not offenders, "\n".join(offenders)


def test_every_method_declares_what_it_is():
    for name in method_names():
        m = get_method(name)
        assert m.name == name and m.trains in ("all weights", "some weights", "added weights", "prompts")
        assert not (m.weight_adapter and m.trains == "prompts"), name
        assert m.input_virtual_tokens(m.Params()) == 0 or m.trains == "prompts", name


def test_a_flow_reads_its_params_files_once(tmp_path):
    """Steps of one flow run resolve the params as they were when it started, not as edited since."""
    import shutil

    from peftflow.pipeline import Project

    shutil.copytree(ROOT / "params", tmp_path / "params")
    project = Project(root=tmp_path, overrides=["train.max_steps=7"]).frozen()
    assert project.params("lora").method.r == 16
    lora_file = tmp_path / "params" / "methods" / "lora.yaml"
    lora_file.write_text(lora_file.read_text().replace("r: 16", "r: 2"))
    assert project.params("lora").method.r == 16 and project.params("lora").train.max_steps == 7
    assert project.params("ia3").method.name == "ia3"  # a method first asked for later: the snapshot's file
    mine = project.params("lora")
    mine.train.lr = 1.0  # a caller's change stays its own
    assert project.params("lora").train.lr != 1.0
    other = project.model_copy(update={"overrides": ["train.max_steps=9"]})  # a comparison run's project
    assert other.params("lora").train.max_steps == 9 and project.params("lora").train.max_steps == 7
    assert Project(root=tmp_path).params("lora").method.r == 2  # not frozen: the files as they are
