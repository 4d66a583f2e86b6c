"""The RLHF chain's stages over a project folder: each an MLflow run and a registered version.

``sft`` -> ``reward`` -> ``ppo`` (uses both), and ``dpo`` (trains from SFT; its win rate is
measured under the reward model, so it records both too). ``judge`` is a second reward model,
trained on the other half of the preference pairs (``rlhf.pairs``): PPO and DPO are also scored
by it, a scorer neither was optimized against, so reward hacking shows as a gap between the two
win rates. Each stage's params are
``params/base.yaml``, ``params/rlhf/base.yaml``, ``params/methods/<method>.yaml`` (the method the
stage file names), ``params/rlhf/<stage>.yaml``, then overrides; ``STAGE:KEY=VALUE`` overrides
apply to that stage only.

A stage is reused, not retrained, when a registered version of ``<model_prefix>-<stage>`` carries
the same fingerprint: the stage's resolved params that change its model or figures (declared in
the schema, :func:`peftflow.config.fingerprint`; ``rlhf.*`` sections only for the stages that read
them), the DVC hash of the RLHF data and the exact registry versions of its inputs. So a changed reward model re-runs
the reward stage and the stages that consume it, and SFT is reused. Code changes are not in the
fingerprint (as in nightly retraining): pass ``force`` to retrain.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
from pathlib import Path
from typing import Any

from pydantic import BaseModel

from peftflow import config, registry, tracking, versioning
from peftflow.config import Params, ParamsError, merge_files, method_file, named_method, parse_override
from peftflow.pipeline import DataVersion, Project, check_overrides, data_version, reproduce_stage

log = logging.getLogger(__name__)

STAGES = ("sft", "reward", "judge", "ppo", "dpo")
INPUTS = {"sft": (), "reward": (), "judge": (), "ppo": ("sft", "reward", "judge"), "dpo": ("sft", "reward", "judge")}


class StageResult(BaseModel):
    stage: str
    run_id: str
    model_name: str
    version: str
    reused: bool
    metrics: dict[str, float]


def stage_overrides(overrides: list[str], stage: str) -> list[str]:
    """The overrides for ``stage``: plain ones, and ``STAGE:KEY=VALUE`` ones for this stage."""
    out = []
    for item in overrides:
        head, sep, rest = item.partition(":")
        if sep and "=" not in head:
            if head not in STAGES:
                raise ParamsError(f"override {item!r}: unknown stage {head!r}; stages: {', '.join(STAGES)}")
            if head == stage:
                out.append(rest)
        else:
            out.append(item)
    return out


def load_stage(
    stage: str, params_dir: Path, overrides: list[str] | tuple[str, ...] = (), files: config.Files | None = None
) -> Params:
    """The resolved params of one stage (see the module docstring for the merge order)."""
    if stage not in STAGES:
        raise ParamsError(f"stage {stage!r}: unknown; stages: {', '.join(STAGES)}")
    params_dir = Path(params_dir)
    stage_file = params_dir / "rlhf" / f"{stage}.yaml"
    mine = stage_overrides(list(overrides), stage)
    method = named_method(stage_file, files)
    for item in mine:
        path, value = parse_override(item)
        method = value if path == ("method", "name") else method
    if not method:
        raise ParamsError(f"{stage_file}: method.name: required key is missing")
    method_path = method_file(params_dir, method, stage_file, files)
    paths = [params_dir / "base.yaml", params_dir / "rlhf" / "base.yaml", method_path, stage_file]
    params = merge_files(paths, mine, files)
    _causal_lm_only(params, stage_file)
    return params


def _causal_lm_only(params: Params, stage_file: Path) -> None:
    """The chain samples continuations: a model.task that makes the base a classifier is refused here."""
    from peftflow.model import CLASSIFIER, task_of

    try:
        classifier = task_of(params.model) == CLASSIFIER
    except (FileNotFoundError, ValueError):  # a model that is not there is named when it loads
        return
    if classifier:
        raise ParamsError(
            f"{stage_file}: model: the RLHF chain samples text from a causal LM; {params.model.name_or_path} is "
            f"loaded as a sequence classifier (model.task {params.model.task}); set model.task: causal_lm or "
            f"another base model"
        )


def check_judge(params_dir: Path, overrides: list[str] | tuple[str, ...] = (), files: config.Files | None = None):
    """Refuse, in one line, a judge that saw pairs the reward model or DPO trained on."""
    pairs = {s: load_stage(s, params_dir, overrides, files).rlhf.pairs for s in ("reward", "dpo", "judge")}
    judge = pairs["judge"]
    overlap = [s for s in ("reward", "dpo") if judge == "all" or pairs[s] in ("all", judge)]
    if overlap:
        raise ParamsError(
            f"{Path(params_dir) / 'rlhf' / 'judge.yaml'}: rlhf.pairs: {judge!r} overlaps the pairs "
            + ", ".join(f"{s} trains on ({pairs[s]!r})" for s in overlap)
            + "; the judge must be held out: rlhf.pairs 'judge' for the judge, 'policy' for reward and dpo"
        )


def fingerprint(stage: str, params: Params, data_md5: str | None, inputs: dict[str, str]) -> str:
    keep = config.fingerprint(params, config.FIGURES, stage=stage)
    blob = json.dumps({"stage": stage, "params": keep, "data": data_md5, "inputs": inputs}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def prepare_data(project: Project) -> DataVersion:
    """``dvc repro`` of the base model (embedded only) and the RLHF data, ``dvc push``; the data version."""
    check_overrides(project.overrides)
    params = load_stage("sft", project.root / project.params_dir, project.overrides, project.files)
    ran = reproduce_stage(project, params, "rlhf_prepare")
    out_dir = params.rlhf.data.out_dir
    return data_version(project, out_dir, versioning.out_hash(project.root, str(out_dir)), ran)


def _reusable(client, name: str, fp: str):
    try:
        versions = client.search_model_versions(f"name='{name}'")
    except Exception:  # not registered yet
        return None
    found = [v for v in versions if v.tags.get("peftflow.rlhf.fingerprint") == fp]
    return max(found, key=lambda v: int(v.version)) if found else None


def run_stage(
    project: Project,
    stage: str,
    data_version: DataVersion,
    inputs: dict[str, StageResult],
    tags: dict[str, str] | None = None,
    force: bool = False,
    progress: bool = True,
) -> StageResult:
    """Train, evaluate and register one stage, or reuse the version its fingerprint names."""
    from peftflow.rlhf.runs import TRAINERS

    params = load_stage(stage, project.root / project.params_dir, project.overrides, project.files)
    if stage in ("judge", "ppo", "dpo"):
        check_judge(project.root / project.params_dir, project.overrides, project.files)
    missing = [s for s in INPUTS[stage] if s not in inputs]
    if missing:
        raise ValueError(f"stage {stage}: needs the {', '.join(missing)} stage(s) first")
    used = {s: f"{inputs[s].model_name}/{inputs[s].version}" for s in INPUTS[stage]}
    fp = fingerprint(stage, params, data_version.dvc_md5, used)
    name = f"{params.rlhf.model_prefix}-{stage}"
    client, _ = tracking.connect(params, project.root)
    found = None if force else _reusable(client, name, fp)
    if found is not None:
        log.info("%s: reusing %s version %s (same params, data and inputs)", stage, name, found.version)
        return StageResult(
            stage=stage,
            run_id=found.run_id,
            model_name=name,
            version=str(found.version),
            reused=True,
            metrics=tracking.run_metrics(client, found.run_id),
        )

    local = params.rebased(project.root)
    local.rlhf.data.out_dir = project.root / data_version.out_dir
    manifest = json.loads((local.rlhf.data.out_dir / "manifest.json").read_text())
    extra = {
        "peftflow.rlhf.stage": stage,
        "peftflow.rlhf.fingerprint": fp,
        **{f"peftflow.rlhf.input.{s}": v for s, v in used.items()},
    }
    run_tags = {**tracking.lineage(params, project.root, manifest, data_version.dvc_md5), **extra, **(tags or {})}
    input_dirs = {
        s: registry.fetched(client, client.get_model_version(r.model_name, r.version), project.root, params)
        for s, r in inputs.items()
        if s in INPUTS[stage]
    }
    with tracking.tracked_run(params, project.root, f"rlhf-{stage}", run_tags) as run:
        run_id = run.run_id
        run_dir = local.train.output_dir / run_id
        local.train.run_name = run_id
        summary = TRAINERS[stage](local, run_dir, input_dirs, (run.log_metrics,), progress)
        run.log_metrics(tracking.metrics_to_log(summary), summary.get("steps", 0))
        run.log_json("summary.json", summary)
        run.log_artifacts(run_dir / "model", "model")
        for name_ in ("examples.json", "history.json"):  # policy samples beside the SFT's; PPO's per-step figures
            if (run_dir / name_).is_file():
                run.log_artifact(run_dir / name_)
        run.set_tag("peftflow.evaluated", "true")
    version = registry.register(client, run_id, name)
    for key, value in extra.items():
        client.set_model_version_tag(name, version, key, value)
    shutil.rmtree(run_dir, ignore_errors=True)  # MLflow holds the artifact now
    return StageResult(
        stage=stage,
        run_id=run_id,
        model_name=name,
        version=version,
        reused=False,
        metrics=tracking.run_metrics(client, run_id),
    )


def headline(result: StageResult) -> str:
    """A stage's result in one line, for tables and summaries."""
    m = {k: result.metrics.get(k, float("nan")) for k in _HEADLINE}
    if result.stage == "sft":
        return f"test loss {m['test_loss']:.3f} (base model {m['zeroshot_test_loss']:.3f})"
    if result.stage in ("reward", "judge"):
        return f"held-out pairwise accuracy {m['test_pairwise_accuracy']:.3f}"
    return (
        f"reward {m['test_reward_mean']:.3f} vs SFT {m['test_sft_reward_mean']:.3f}, "
        f"win rate {100 * m['test_win_rate_vs_sft']:.1f}% (judge {100 * m['test_judge_win_rate_vs_sft']:.1f}%), "
        f"KL {m['test_kl_vs_sft']:.2f} nats"
    )


_HEADLINE = (
    "test_loss",
    "zeroshot_test_loss",
    "test_pairwise_accuracy",
    "test_reward_mean",
    "test_sft_reward_mean",
    "test_win_rate_vs_sft",
    "test_judge_win_rate_vs_sft",
    "test_kl_vs_sft",
)


def summary_rows(results: list[StageResult]) -> list[dict[str, Any]]:
    """One row per stage for reports: version, reused or trained, the run and its headline."""
    return [
        {
            "stage": r.stage,
            "version": f"{r.model_name}/{r.version}",
            "how": "reused" if r.reused else "trained",
            "result": headline(r),
            "run": r.run_id,
        }
        for r in results
    ]
