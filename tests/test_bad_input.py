"""Bad input, as a user gives it, through the command line: one red line naming the file (and line)
or the key, exit code 2, no traceback, and nothing half-written (no prepared data, no trained artifact)."""

from __future__ import annotations

import json
import re
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
from mlflow import MlflowClient
from typer.testing import CliRunner

from peftflow.cli import app
from tests.conftest import PARAMS_DIR, make_rows, tiny_overrides

runner = CliRunner()


def _edit(path: Path, old: str, new: str) -> None:
    text = path.read_text()
    assert old in text, f"{path} lacks {old!r}"
    path.write_text(text.replace(old, new, 1))


def _data(path: Path, body: bytes) -> None:
    path.write_bytes(body)


def _write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def _remove(path: Path) -> None:
    shutil.rmtree(path) if path.is_dir() else path.unlink()


def _json_edit(path: Path, key: str, value) -> None:
    doc = json.loads(path.read_text())
    doc[key] = value
    path.write_text(json.dumps(doc))


def _mamba(p: Path) -> None:
    """A model without attention heads (a state-space model): nothing for a prefix to attach to."""
    from transformers import MambaConfig, MambaForCausalLM

    tokenizer = [f for f in (p / "model").iterdir() if "token" in f.name or f.name.endswith(".jinja")]
    shutil.rmtree(p / "mamba", ignore_errors=True)
    config = MambaConfig(vocab_size=49152, hidden_size=16, state_size=4, num_hidden_layers=1, intermediate_size=32)
    MambaForCausalLM(config).save_pretrained(p / "mamba")
    for f in tokenizer:
        shutil.copy(f, p / "mamba" / f.name)


ROWS = [f'{{"text": "a fine film {i}", "label": "{1 if i % 2 else -1}"}}' for i in range(60)]
ONE_LABEL = "".join(f'{{"text": "a fine film {i}", "label": "1"}}\n' for i in range(60)).encode()
DUPLICATED = b"".join(
    f'{{"text": "{r["text"]}", "label": "{r["label"]}"}}\n'.encode() * 3 for r in make_rows(60)
)  # every row three times: copies must not straddle train and test
AT_LEAST = "Input should be greater than or equal to {}"  # pydantic's words for ge=
NO_OP = lambda p: None  # noqa: E731  (the bad input is all in the command)

# (how to make it so, the command, what the one line must say); `{tmp}` is the project folder
Case = tuple[Callable[[Path], None], list[str], str]


def _set(*overrides_then_expected: str, method: str | None = None) -> Case:
    """A case whose bad input is all in its overrides (the last argument: what the line must say):
    ``prepare`` meets them (every params section is checked, whatever the command), or
    ``train -m METHOD`` if they are the method's."""
    *overrides, expected = overrides_then_expected
    command = ["prepare"] if method is None else ["train", "-m", method]
    return NO_OP, [*command, *(a for o in overrides for a in ("-s", o))], expected


CASES: dict[str, Case] = {
    # --- params files
    "a key given twice in a params file": (
        lambda p: _edit(p / "params" / "base.yaml", "train:\n", "train:\n  lr: 1.0e-3\ntrain:\n"),
        ["train", "-m", "lora"],
        r"base.yaml: line \d+: not valid YAML \(key 'train' given twice \(first on line \d+\)\)",
    ),
    "a params file that is not valid YAML": (
        lambda p: _edit(p / "params" / "data.yaml", "  format: text_label", "  format: [text_label"),
        ["prepare"],
        r"data.yaml: line \d+: not valid YAML",
    ),
    "a params file that is a list": (
        lambda p: _write(p / "params" / "data.yaml", "- source: x.jsonl\n"),
        ["prepare"],
        r"data.yaml: expected a mapping",
    ),
    "an unknown section in base.yaml": (
        lambda p: _edit(p / "params" / "base.yaml", "seed: 42", "seed: 42\ntrian:\n  lr: 1.0e-3"),
        ["prepare"],
        r"base.yaml: trian: unknown key; expected one of: compare, data, ",
    ),
    "an unknown key in a method file": (
        lambda p: _edit(p / "params" / "methods" / "lora.yaml", "  r: 16", "  rank: 16"),
        ["train", "-m", "lora"],
        r"lora.yaml: method.rank: unknown key; expected one of: alpha, ",
    ),
    "a method file named after another method": (
        lambda p: shutil.copy(p / "params" / "methods" / "lora.yaml", p / "params" / "methods" / "copy.yaml"),
        ["train", "-m", "copy"],
        r"copy.yaml: method.name: expected 'copy' \(the file name\), got 'lora'",
    ),
    "a method with no params file": (NO_OP, ["train", "-m", "lorra"], r"no params file for method 'lorra'"),
    "a params folder that does not exist": (
        lambda p: _remove(p / "params"),
        ["prepare"],
        r"params.*base.yaml: no such params file",
    ),
    "a bad value in base.yaml that the method file overrides": (
        lambda p: _edit(p / "params" / "base.yaml", "  lr: 5.0e-4", "  lr: fast"),
        ["train", "-m", "lora"],
        r"base.yaml: train.lr: Input should be a valid number",
    ),
    "a bad cron in base.yaml": (
        lambda p: _edit(p / "params" / "base.yaml", 'cron: "0 2 * * *"', 'cron: "0 25 * * *"'),
        ["prepare"],
        r"base.yaml: nightly.cron: cron '0 25 \* \* \*'",
    ),
    # --- overrides
    "an override without a value": _set("train.lr", r"override 'train.lr': expected KEY.PATH=VALUE"),
    "an override with an empty key": _set("=3", r"override '=3': empty key"),
    "an override whose value is not YAML": _set("train.lr=[1", r"override 'train.lr=\[1': the value is not valid YAML"),
    "an override of an unknown key": _set(
        "train.lrr=0.1", r"override 'train.lrr=0.1': train.lrr: unknown key; expected one of: batch_size, "
    ),
    "an override below a value": _set("seed.x=1", r"seed"),
    "a bad cron given as an override": _set(
        "nightly.cron=0 2 * *", r"override 'nightly.cron=0 2 \* \*': nightly.cron: cron '0 2 \* \*': expected 5 fields"
    ),
    # --- train and eval values
    "a number of steps that is no number": _set(
        "train.max_steps=many", r"train.max_steps=many.*train.max_steps: Input should be"
    ),
    "zero steps": _set("train.max_steps=0", r"train.max_steps: .*greater than or equal to 1"),
    "a zero batch size": _set("train.batch_size=0", r"train.batch_size: .*greater than or equal to 1"),
    "zero accumulation steps": _set("train.grad_accum=0", r"train.grad_accum: .*greater than or equal"),
    "a negative learning rate": _set("train.lr=-1.0e-3", r"train.lr: .*greater than 0"),
    "a learning rate written 5e-4": _set("train.lr=fast", r"train.lr: Input should be a valid number"),
    "negative warmup": _set("train.warmup_steps=-1", r"train.warmup_steps: .*greater than or equal to 0"),
    "negative weight decay": _set("train.weight_decay=-0.1", r"train.weight_decay: .*greater than or equal"),
    "an unknown scheduler": _set(
        "train.scheduler=cosin", r"train.scheduler: Input should be 'linear', 'cosine' or 'constant'"
    ),
    "an unknown mixed precision": _set("train.mixed_precision=fp8", r"train.mixed_precision: Input should be"),
    "zero checkpoints kept": _set("train.keep_checkpoints=0", r"train.keep_checkpoints: .*greater than or equal to 1"),
    "an unknown weights dtype": _set(
        "model.dtype=float8", r"model.dtype: Input should be 'float32', 'bfloat16' or 'float16'"
    ),
    "a zero eval batch size": _set("eval.batch_size=0", r"eval.batch_size: .*greater than or equal to 1"),
    "zero eval examples": _set("eval.max_examples=0", r"eval.max_examples: .*greater than or equal to 1"),
    "a seed that is no integer": _set("seed=abc", r"seed: Input should be a valid integer"),
    "a negative outage wait": _set(
        "tracking.outage_wait_s=-1", r"tracking.outage_wait_s: .*greater than or equal to 0"
    ),
    # --- promotion, nightly, compare, runner, sweep
    "a promotion metric no run logs": _set(
        "promote.metric=test_acuracy",
        r"promote.metric: 'test_acuracy' is not a metric a run logs; did you mean 'val_accuracy'\?",
        method="lora",
    ),
    "a guard on a metric no run logs": _set(
        "promote.guards={val_los: {higher_is_better: false}}", r"promote.guards: 'val_los'.*did you mean 'val_loss'"
    ),
    "a promotion decided on the test split": _set(
        "promote.metric=test_accuracy",
        r"promote.metric: 'test_accuracy' is a test-split figure: the test split is reported, never used to "
        r"decide; use 'val_accuracy'",
        method="lora",
    ),
    "a promotion confidence of 1": _set("promote.confidence=1", r"promote.confidence: .*less than 1"),
    "a negative promotion margin": _set("promote.min_delta=-0.1", r"promote.min_delta: .*greater than or equal to 0"),
    "a time zone that does not exist": _set("nightly.timezone=Mars/Base", r"nightly.timezone: .*Mars/Base"),
    "a nightly method that does not exist": _set(
        "nightly.methods=[lorra]", r"nightly.methods: 'lorra' is not a method; did you mean 'lora'\?"
    ),
    "no nightly methods": _set("nightly.methods=[]", r"nightly.methods: .*at least 1"),
    "a zero token budget": _set("compare.token_budget=0", r"compare.token_budget: .*greater than or equal to 1"),
    "a compared method that does not exist": _set(
        "compare.methods=[lora, nope]", r"compare.methods: 'nope' is not a method \(methods: adalora, "
    ),
    "zero seeds": _set("compare.seeds=0", r"compare.seeds: .*greater than or equal to 1"),
    "runs on threads": _set("runner.kind=thread", r"runner.kind: 'thread': runs cannot share a process"),
    "an unknown runner": _set("runner.kind=slurm", r"runner.kind: .*'process'.*'ray'"),
    "a sweep range upside down": _set(
        "sweep.space={train.lr: {low: 0.1, high: 0.01}}", r"sweep: space.train.lr: low 0.1 is not below high 0.01"
    ),
    "a sweep of zero trials": _set("sweep.trials=0", r"sweep.trials: .*greater than or equal to 1"),
    # --- distributed
    "an unknown distributed strategy": _set("distributed.strategy=megatron", r"distributed.strategy: Input should be"),
    "zero processes": _set("distributed.num_processes=0", r"distributed.num_processes: .*greater than or equal to 1"),
    "two processes without a strategy": _set(
        "distributed.num_processes=2", r"distributed: strategy none trains in one process; with num_processes 2"
    ),
    "DeepSpeed without its config": _set(
        "distributed.strategy=deepspeed", r"strategy deepspeed needs distributed.deepspeed"
    ),
    "a DeepSpeed config that does not exist": _set(
        "distributed.strategy=deepspeed",
        "distributed.deepspeed={tmp}/zero9.json",
        r"^error: distributed.deepspeed: .*zero9.json: no such DeepSpeed config file",
        method="lora",
    ),
    "an accelerate config that does not exist": _set(
        "distributed.accelerate_config={tmp}/acc.yaml", r"distributed: accelerate_config: .*acc.yaml: no such file"
    ),
    # --- method values
    "a LoRA rank of zero": _set("method.r=0", r"method.r: .*greater than or equal to 1", method="lora"),
    "a dropout of 1.5": _set("method.dropout=1.5", r"method.dropout: .*less than 1", method="lora"),
    "LoRA on modules the model lacks": _set(
        "method.target_modules=[qkv]", r"method lora: target_modules: qkv not in the model; .*q_proj", method="lora"
    ),
    "a prefix of zero tokens": _set(
        "method.num_virtual_tokens=0", r"method.num_virtual_tokens: .*greater than or equal to 1", method="prefix"
    ),
    "a prompt initialised from no text": _set("method.init_text=", r"method.init_text", method="prompt"),
    "more frozen blocks than the model has": _set(
        "method.last_n_blocks=5", r"method freeze: last_n_blocks: 5 exceeds the model's 2 blocks", method="freeze"
    ),
    "an AdaLoRA schedule with no pruning phase": _set(
        "method.tinit_fraction=0.6",
        "method.tfinal_fraction=0.5",
        r"method adalora: tinit_fraction \+ tfinal_fraction: leave no pruning phase",
        method="adalora",
    ),
    "an AdaLoRA target rank above its initial rank": _set(
        "method.target_r=32", r"method: target_r 32 exceeds init_r 12: the budget can only shrink", method="adalora"
    ),
    "an unknown quantization type": _set(
        "method.quant_type=int3", r"method.quant_type: Input should be 'nf4' or 'fp4'", method="qlora"
    ),
    "prefix tuning of a model without attention heads": (
        _mamba,
        ["train", "-m", "prefix", "-s", "model.name_or_path={tmp}/mamba"],
        r"method prefix: the model \(mamba\) has no attention heads, so no keys and values to prefix",
    ),
    # --- data values
    "a split size that is neither a fraction nor a count": _set(
        "data.split.test=1.5",
        r"data.split.test: 1.5 is neither a fraction in \(0, 1\) nor a whole number of examples",
    ),
    "splits that leave nothing to train on": _set(
        "data.split.test=100",
        "data.split.val=60",
        r"data.split: test \(100\) \+ val \(60\) leave no training examples out of 160",
    ),
    "a split fraction of less than one example": _set(
        "data.split.val=0.001", r"data.split.val: 0.001 of 160 examples is less than one example"
    ),
    "a maximum length too short for any example": _set(
        "data.max_length=4", r"data.max_length: .*greater than or equal to 8"
    ),
    "an unknown data format": _set("data.format=chat", r"data.format: Input should be"),
    "a prompt template with an unknown field": (
        lambda p: _edit(p / "params" / "data.yaml", "Review: {text}", "Review: {review}"),
        ["prepare"],
        r"data.yaml: data.prompt_template: unknown field \{review\}; a template may use",
    ),
    "a prompt template with an unclosed brace": _set(
        "data.prompt_template='Review: {text'", r"data.prompt_template: .*not a format string"
    ),
    "two labels that give the same answer": _set(
        "data.labels={'1': positive, '-1': positive}",
        r"data.labels: '1' and '-1' both map to 'positive'; each label needs its own answer",
    ),
    # --- data files
    "a data file that does not exist": _set(
        "data.source={tmp}/missing.jsonl", r"missing.jsonl: data file not found \(data.source\)"
    ),
    "a data source that is a folder": (
        lambda p: (p / "folder.jsonl").mkdir(),
        ["prepare", "-s", "data.source={tmp}/folder.jsonl"],
        r"folder.jsonl: a folder, not a data file \(data.source: a .jsonl or .csv file\)",
    ),
    "a data file of an unsupported type": (
        lambda p: _write(p / "reviews.txt", "great film\n"),
        ["prepare", "-s", "data.source={tmp}/reviews.txt"],
        r"reviews.txt: unsupported data file type '.txt'; expected .jsonl or .csv",
    ),
    "an empty data file": (
        lambda p: _data(p / "reviews.jsonl", b""),
        ["prepare"],
        r"reviews.jsonl: no examples \(an empty file, or a header without rows\)",
    ),
    "a CSV with a header and no rows": (
        lambda p: _data(p / "reviews.csv", b"text,label\n"),
        ["prepare", "-s", "data.source={tmp}/reviews.csv"],
        r"reviews.csv: no examples",
    ),
    "a CSV without its label column": (
        lambda p: _write(p / "reviews.csv", "text,stars\n" + "".join(f"film {i},{i % 5}\n" for i in range(40))),
        ["prepare", "-s", "data.source={tmp}/reviews.csv"],
        r"reviews.csv row 1: column 'label' is missing or empty; columns present: text, stars",
    ),
    "a data file that is not UTF-8": (
        lambda p: _data(p / "reviews.jsonl", b'{"text": "fine", "label": "1"}\n{"text": "caf\xe9", "label": "-1"}\n'),
        ["prepare"],
        r"reviews.jsonl:2: not UTF-8 \(byte 0xe9 at offset \d+\)",
    ),
    "a line that is not JSON": (
        lambda p: _write(p / "reviews.jsonl", "\n".join([ROWS[0], "{'text': 'x'}", *ROWS[1:]])),
        ["prepare"],
        r"reviews.jsonl:2: not valid JSON",
    ),
    "a line that is a JSON list": (
        lambda p: _write(p / "reviews.jsonl", "\n".join([ROWS[0], '["great", "1"]', *ROWS[1:]])),
        ["prepare"],
        r"reviews.jsonl:2: expected a JSON object per line",
    ),
    "a row without text": (
        lambda p: _write(p / "reviews.jsonl", "\n".join([ROWS[0], '{"review": "x", "label": "1"}', *ROWS[1:]])),
        ["prepare"],
        r"reviews.jsonl row 2: column 'text' is missing or empty",
    ),
    "a row with empty text": (
        lambda p: _write(p / "reviews.jsonl", "\n".join([*ROWS[:2], '{"text": "", "label": "1"}', *ROWS[2:]])),
        ["prepare"],
        r"reviews.jsonl row 3: column 'text' is missing or empty",
    ),
    "a label the params do not map": (
        lambda p: _write(p / "reviews.jsonl", "\n".join([*ROWS, '{"text": "so so", "label": "0"}'])),
        ["prepare"],
        r"reviews.jsonl row 61: label '0' is not in data.labels; expected one of: 1, -1",
    ),
    "instruction data read as text and label": (
        lambda p: _write(
            p / "reviews.jsonl", "".join(f'{{"instruction": "say {i}", "output": "{i}"}}\n' for i in range(40))
        ),
        ["prepare"],
        r"reviews.jsonl row 1: column 'text' is missing or empty; columns present: instruction, output",
    ),
    "text data read as instructions": _set(
        "data.format=instruction", r"row 1: column 'instruction' is missing or empty"
    ),
    "data with a single label": (
        lambda p: _data(p / "reviews.jsonl", ONE_LABEL),
        ["prepare"],
        r"reviews.jsonl: every example has the label 'positive'; a classification task needs at least two",
    ),
    # --- the base model
    "a model folder that does not exist": _set(
        "model.name_or_path={tmp}/nowhere",
        r"model.name_or_path: .*nowhere.*neither a local checkpoint folder nor a model in the local Hugging",
        method="lora",
    ),
    "a model folder without config.json": (
        lambda p: _remove(p / "model" / "config.json"),
        ["train", "-m", "lora"],
        r"model.name_or_path: .*model has no config.json; expected a Hugging Face checkpoint folder",
    ),
    "a model config.json that is not JSON": (
        lambda p: _write(p / "model" / "config.json", "{not json"),
        ["train", "-m", "lora"],
        r"model.name_or_path: .*model: cannot be loaded: .*config.json' is not a valid JSON file",
    ),
    "a model folder without its tokenizer": (
        lambda p: [_remove(f) for f in (p / "model").iterdir() if "token" in f.name],
        ["train", "-m", "lora"],
        r"model.name_or_path: .*model: no tokenizer can be loaded from it",
    ),
    "a truncated base model weights file": (
        lambda p: _data(p / "model" / "model.safetensors", (p / "model" / "model.safetensors").read_bytes()[:1000]),
        ["train", "-m", "lora"],
        r"model.name_or_path: .*model: its weights cannot be read \(.*\); a truncated or damaged .safetensors",
    ),
    "the embedded model not converted yet": _set(
        "model.name_or_path=embedded",
        "model.embedded_dir={tmp}/none",
        r"not converted yet; run `peftflow convert-base`",
        method="lora",
    ),
    # --- prepared data and runs
    "training before any prepare": (
        lambda p: _remove(p / "prepared"),
        ["train", "-m", "lora"],
        r"prepared/manifest.json: no prepared data; run `peftflow prepare`",
    ),
    "a prepared split edited by hand": (
        lambda p: _write(p / "prepared" / "train.jsonl", (p / "prepared" / "train.jsonl").read_text()[:-200]),
        ["train", "-m", "lora"],
        r"prepared/train.jsonl: changed since data version \w+ was prepared; prepare the data again",
    ),
    "a prepared manifest that is not JSON": (
        lambda p: _write(p / "prepared" / "manifest.json", "{"),
        ["train", "-m", "lora"],
        r"prepared/manifest.json: not a prepared-data manifest \(.*\); prepare the data again",
    ),
    "evaluating a run never trained": (
        NO_OP,
        ["evaluate", "-m", "lora"],
        r"runs/lora/model: no trained artifact \(a finished run writes model/",
    ),
    "evaluating with neither a method nor a run": (NO_OP, ["evaluate"], r"give exactly one of --method or --run"),
    "merging a run folder that does not exist": (
        NO_OP,
        ["merge", "--run", "{tmp}/runs/none", "--out", "{tmp}/merged"],
        r"runs/none/params.yaml: ",
    ),
    "a leaderboard of no metrics": (
        NO_OP,
        ["leaderboard", "--metrics-dir", "{tmp}/metrics", "--out-dir", "{tmp}/board"],
        r"metrics: no metrics files",
    ),
    "loading a model URI of the wrong form": (
        NO_OP,
        ["load", "models:/peftflow-sentiment"],
        r"expected models:/NAME@ALIAS or models:/NAME/VERSION",
    ),
    # --- RLHF
    "preference pairs without a rejected answer": (
        lambda p: _write(p / "pairs.jsonl", '{"prompt": "p", "chosen": "a"}\n' * 20),
        ["rlhf", "prepare", "-s", "rlhf.data.source={tmp}/pairs.jsonl"],
        r"pairs.jsonl row 1: column\(s\) rejected missing or empty",
    ),
    "an RLHF stage that does not exist": (
        NO_OP,
        ["rlhf", "show-params", "sfx"],
        r"stage 'sfx': unknown; stages: sft, reward, judge, ppo, dpo",
    ),
}
NEEDS_PREPARED = {"train", "evaluate"}
PROGRESS = re.compile(r"\|[ \S]*\| \d+/\d+ \[")  # commands run after a good `prepare`, so that they meet the damage


@pytest.fixture
def project(tmp_path, tiny_model_dir, tiny_data_file):
    """A params folder of its own (cases edit it), the tiny model and data copied (cases damage them)."""
    shutil.copytree(PARAMS_DIR, tmp_path / "params")
    shutil.copytree(tiny_model_dir, tmp_path / "model")
    shutil.copy(tiny_data_file, tmp_path / "reviews.jsonl")
    return tmp_path


@pytest.mark.parametrize("case", sorted(CASES))
def test_bad_input_is_one_line_naming_where(case, project, monkeypatch):
    monkeypatch.chdir(project)  # commands that read the project folder (the MLflow store) read this one
    damage, command, expected = CASES[case]
    sets = [*tiny_overrides(project / "model", project / "reviews.jsonl", project)]
    if command[0] in NEEDS_PREPARED:  # data prepared before the damage, so that the command meets it
        result = runner.invoke(app, ["prepare", "--params-dir", str(project / "params"), *_flags(sets)])
        assert result.exit_code == 0, result.output
    damage(project)
    command = [a.replace("{tmp}", str(project)) for a in command]
    words = 2 if command[0] == "rlhf" else 1  # `rlhf prepare`: the options follow the subcommand
    name, args = command[:words], command[words:]
    ours = [] if name == ["merge"] else ["--params-dir", str(project / "params"), *_flags(sets)]
    result = runner.invoke(app, [*name, *ours, *args])  # the case's own -s after the tiny ones
    # progress bars (drawn in place on a terminal: "Loading weights ... 20/20 [...]") are not lines
    lines = [line for line in result.output.strip().splitlines() if not PROGRESS.search(line)]
    assert result.exit_code == 2, result.output
    assert len(lines) == 1 and lines[0].startswith("error: "), result.output
    assert re.search(expected, lines[0]), lines[0]
    if command[0] == "prepare":
        assert not (project / "prepared").exists(), "bad data must leave no prepared folder"
    assert not list((project / "runs").glob("*/model")), "bad input must leave no trained artifact"


def _flags(overrides: list[str]) -> list[str]:
    return [arg for o in overrides for arg in ("-s", o)]


def test_repeated_examples_never_straddle_the_splits(project):
    from peftflow.data import read_manifest, read_split

    _data(project / "reviews.jsonl", DUPLICATED)
    sets = tiny_overrides(project / "model", project / "reviews.jsonl", project)
    result = runner.invoke(app, ["prepare", "--params-dir", str(project / "params"), *_flags(sets)])
    assert result.exit_code == 0, result.output
    splits = {
        name: {ex["prompt"] for ex in read_split(project / "prepared", name)} for name in ("train", "val", "test")
    }
    assert not splits["test"] & splits["train"] and not splits["val"] & splits["train"]
    distinct = {(r["text"], r["label"]) for r in make_rows(60)}
    assert read_manifest(project / "prepared")["checks"] == {
        "examples_read": 180, "duplicates_removed": 180 - len(distinct), "prompts_with_several_answers": 0
    }  # fmt: skip


NOT_A_REPOSITORY = "a project folder that is not a git repository"
FLOW_CASES = {
    "a tracking URI nothing answers at": (
        ["experiment", "-m", "lora", "-s", "tracking.uri=http://127.0.0.1:9"],
        r"MLflow tracking URI http://127.0.0.1:9: unreachable or unusable",
    ),
    "a run id the store does not have": (["reproduce", "0123abc"], r"no MLflow run '0123abc' in sqlite:///"),
    "a method the experiment does not know": (["experiment", "-m", "lorra"], r"no params file for method 'lorra'"),
    "a sweep over a key that does not exist": (
        ["sweep", "-m", "lora", "-s", "sweep.space={train.lrr: {low: 0.1, high: 1}}"],
        r"sweep.space: train.lrr",
    ),
    "a sweep scored on no validation": (
        ["sweep", "-m", "lora", "-s", "train.eval_every=0"],
        r"train.eval_every: 0: a sweep scores each trial",
    ),
    "a compare of a method that does not exist": (
        ["compare", "-m", "lora", "-m", "nope"],
        r"no params file for method 'nope'",
    ),
    NOT_A_REPOSITORY: (["experiment", "-m", "lora"], r"not a git repository; a peftflow project versions its code"),
    "a tracking URI of an unknown scheme": (
        ["experiment", "-m", "lora", "-s", "tracking.uri=ftp://127.0.0.1/x"],
        r"MLflow tracking URI ftp://127.0.0.1/x: unreachable or unusable \(.*unsupported URI",
    ),
}


@pytest.fixture(scope="module")
def flow_project(tmp_path_factory, tiny_model_dir):
    """A whole project (git, DVC, params on the tiny model): each case fails before it writes to it."""
    from tests.project import make_project

    return make_project(tmp_path_factory.mktemp("flows") / "proj", tiny_model_dir)


@pytest.mark.parametrize("case", sorted(FLOW_CASES))
def test_bad_input_to_a_flow_is_one_line_before_it_starts(case, flow_project, project):
    from flows.cli import flows_app

    command, expected = FLOW_CASES[case]
    root = project if case == NOT_A_REPOSITORY else flow_project  # the bare folder: params, model and data
    result = runner.invoke(flows_app, [*command, "--root", str(root)])
    lines = result.output.strip().splitlines()
    assert result.exit_code == 2, result.output
    assert len(lines) == 1 and re.search(expected, lines[0]), result.output
    assert not (root / "runs").exists()
    if (root / "mlflow.db").exists():  # the store's reachability check may create it, empty
        client = MlflowClient(f"sqlite:///{root / 'mlflow.db'}")
        assert not client.search_runs([e.experiment_id for e in client.search_experiments()]), "no MLflow run"
