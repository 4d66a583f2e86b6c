"""The orchestrated pipeline with real parts: Prefect's test harness, a SQLite MLflow store, DVC with
a local remote, git, in a temporary project on the tiny model."""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path

import pytest
from mlflow import MlflowClient

from peftflow import data, nightly, pipeline, registry, tracking, versioning
from peftflow.config import ParamsError
from peftflow.pipeline import Project
from peftflow.reproduce import reproduce
from tests.conftest import make_rows
from tests.project import BIN, commit, make_project, set_keys

MODEL = "peftflow-sentiment"


@pytest.fixture(scope="module")
def harness():
    from prefect.testing.utilities import prefect_test_harness

    os.environ["PREFECT_SERVER_ANALYTICS_ENABLED"] = "false"  # offline: no telemetry attempts
    with prefect_test_harness(server_startup_timeout=180):
        yield


@pytest.fixture(scope="module")
def project(tmp_path_factory, tiny_model_dir):
    saved = {k: os.environ.get(k) for k in ("PATH", "MLFLOW_TRACKING_URI")}
    os.environ["PATH"] = f"{BIN}{os.pathsep}{os.environ['PATH']}"  # dvc stages call `peftflow`
    os.environ.pop("MLFLOW_TRACKING_URI", None)
    root = make_project(tmp_path_factory.mktemp("project") / "proj", tiny_model_dir)
    yield root
    for k, v in saved.items():
        os.environ.pop(k, None) if v is None else os.environ.__setitem__(k, v)


def _client(root) -> MlflowClient:
    return MlflowClient(f"sqlite:///{root / 'mlflow.db'}")


def _aliases(client: MlflowClient) -> dict[str, str]:
    return {alias: str(v) for alias, v in client.get_registered_model(MODEL).aliases.items()}


def test_experiment_flow_registers_promotes_and_logs_lineage(project, harness):
    from flows.pipeline import experiment, prepare_data

    weak = experiment(methods=["lora"], project=Project(root=project, overrides=["train.max_steps=1"]))
    strong = experiment(methods=["lora"], project=Project(root=project, overrides=["train.max_steps=24"]))
    assert weak[0]["promoted"] and "no champion yet" in weak[0]["reasons"][0]
    assert strong[0]["promoted"], strong[0]["reasons"]
    assert strong[0]["metrics"]["test_loss"] < weak[0]["metrics"]["test_loss"]

    client = _client(project)
    assert _aliases(client) == {"candidate": strong[0]["version"], "champion": strong[0]["version"]}
    again = prepare_data(project=Project(root=project))  # nothing changed: DVC runs no stage
    assert again.stages_run == []

    # registry versions answer "which data and code made this adapter?"
    version = client.get_model_version(MODEL, strong[0]["version"])
    assert set(tracking.LINEAGE_KEYS) <= set(version.tags)
    assert version.tags["peftflow.data_version"] == again.version
    assert version.tags["dvc.data_md5"] == again.dvc_md5
    assert version.tags["git.commit"] == versioning.git_commit(project)
    assert version.tags["peftflow.method"] == "lora" and version.tags["peftflow.promotion"] == "promoted"
    assert version.run_id == strong[0]["run_id"]

    run = client.get_run(strong[0]["run_id"])
    assert run.data.params["train.lr"] == "0.005" and run.data.params["method.r"] == "16"
    losses = [m.value for m in sorted(client.get_metric_history(run.info.run_id, "train_loss"), key=lambda m: m.step)]
    assert len(losses) == 12 and losses[-1] < losses[0]  # logged every 2 of 24 steps
    val = sorted(client.get_metric_history(run.info.run_id, "val_loss"), key=lambda m: (m.step, m.timestamp))
    assert [m.step for m in val] == [4, 8, 12, 16, 20, 24, 24]  # periodic, then the evaluation's (whole split)
    assert run.data.metrics["val_loss"] == val[-1].value and "val_accuracy" in run.data.metrics
    assert {f.path for f in client.list_artifacts(run.info.run_id)} >= {"metrics.json", "selection.json"}
    assert version.tags["peftflow.val_accuracy"] == f"{run.data.metrics['val_accuracy']:.4f}"
    assert strong[0]["summary"].startswith("val_accuracy ") and strong[0]["summary"].endswith(": promoted")
    for key in ("test_accuracy", "test_loss", "zeroshot_test_loss", "trainable_params", "tokens_per_s"):
        assert key in run.data.metrics
    assert {d.dataset.digest for d in run.inputs.dataset_inputs} == {again.version}
    files = {f.path for f in client.list_artifacts(run.info.run_id, "model")}
    assert {"model/peftflow.json", "model/params.yaml", "model/adapter_model.safetensors"} <= files


def _champion_and_runs(project):
    """The client, the champion version, the champion's run and the weaker run registered before it."""
    client = _client(project)
    champion = _aliases(client)["champion"]
    strong_run = client.get_model_version(MODEL, champion).run_id
    weak_run = client.get_model_version(MODEL, str(int(champion) - 1)).run_id
    return client, champion, strong_run, weak_run


def test_promotion_keeps_the_champion_on_worse_and_tie(project, harness):
    client, champion, strong_run, weak_run = _champion_and_runs(project)
    proj = Project(root=project)

    worse = pipeline.register(proj, weak_run)
    decision = pipeline.promote(proj, worse)
    assert not decision.promote and "worse" in decision.reasons[0]
    assert _aliases(client) == {"candidate": worse, "champion": champion}
    assert client.get_model_version(MODEL, worse).tags["peftflow.promotion"] == "kept"

    tie = pipeline.register(proj, strong_run)
    decision = pipeline.promote(proj, tie)
    assert not decision.promote and "a tie" in decision.reasons[0]
    assert _aliases(client) == {"candidate": tie, "champion": champion}


def test_promote_judges_its_own_version_when_another_flow_registered_meanwhile(project, harness):
    """Flow 1 registers A, flow 2 registers B (`candidate` -> B), then flow 1 promotes: about A."""
    client, champion, strong_run, weak_run = _champion_and_runs(project)
    proj = Project(root=project)

    mine = pipeline.register(proj, weak_run)  # A: worse than the champion
    theirs = pipeline.register(proj, strong_run)  # B: a tie with it
    decision = pipeline.promote(proj, mine)
    assert not decision.promote and "worse" in decision.reasons[0], decision.reasons  # B would be "a tie"
    assert client.get_model_version(MODEL, mine).tags["peftflow.promotion"] == "kept"
    assert "peftflow.promotion" not in client.get_model_version(MODEL, theirs).tags
    assert _aliases(client) == {"candidate": theirs, "champion": champion}

    # A wins this time: champion moves to A, not to B, which `candidate` names
    weak_champion = pipeline.register(proj, weak_run)
    client.set_registered_model_alias(MODEL, "champion", weak_champion)
    mine = pipeline.register(proj, strong_run)
    theirs = pipeline.register(proj, weak_run)  # a tie with the champion: B would stay out
    decision = pipeline.promote(proj, mine)
    assert decision.promote, decision.reasons
    assert _aliases(client) == {"candidate": theirs, "champion": mine}
    tags = client.get_model_version(MODEL, mine).tags
    assert tags["peftflow.promotion"] == "promoted" and tags["peftflow.promotion_against"] == f"v{weak_champion}"
    assert "peftflow.promotion" not in client.get_model_version(MODEL, theirs).tags

    with pytest.raises(tracking.TrackingError, match=f"registered model '{MODEL}' has no version '999'$"):
        pipeline.promote(proj, "999")


def test_registered_champion_loads_ready_for_inference(project, harness):
    params = Project(root=project).params(None)
    predictor, version = registry.load(f"models:/{MODEL}@champion", project, params)
    assert str(version.version) == _aliases(_client(project))["champion"] and not predictor.model.training
    from peftflow.data import read_split

    # raw texts in, labels out: as accurate as the evaluation said, so prompts are built as in training
    test = read_split(project / "data" / "prepared", "test")
    rows = predictor.predict([ex["prompt"].split("Review: ", 1)[1] for ex in test]).to_dict("records")
    accuracy = sum(r["label"] == ex["completion"] for r, ex in zip(rows, test, strict=True)) / len(test)
    logged = _client(project).get_run(version.run_id).data.metrics["test_accuracy"]
    assert accuracy == pytest.approx(logged) and all(0.5 <= r["score"] <= 1 for r in rows)


def test_predict_flow_scores_a_file_next_to_it_tracked_by_dvc_and_logged(project, harness):
    import hashlib

    from flows.pipeline import predict

    params = Project(root=project).params(None)
    predictor, champion = registry.load(f"models:/{MODEL}@champion", project, params)
    rows = [*make_rows(12, seed=5), {"text": "great superb and brilliant, a film with heart", "label": "1"}]
    folder = project / "data" / "scoring"
    folder.mkdir(exist_ok=True)
    (folder / "reviews.csv").write_text("text,label\n" + "".join(f'"{r["text"]}",{r["label"]}\n' for r in rows))

    result = predict(input_path="data/scoring/reviews.csv", project=Project(root=project))
    out = folder / "reviews.predictions.jsonl"
    assert result["output"] == str(out) and result["rows"] == len(rows)
    assert result["model"] == f"{MODEL} version {champion.version}"
    written = [json.loads(line) for line in out.read_text().splitlines()]
    want = predictor.predict([r["text"] for r in rows]).to_dict("records")
    assert [(w["text"], w["label"]) for w in written] == [(r["text"], r["label"]) for r in rows]  # rows kept
    assert [(w["prediction"], w["score"]) for w in written] == [(a["label"], a["score"]) for a in want]
    names = {"1": "positive", "-1": "negative"}
    accuracy = sum(w["prediction"] == names[w["label"]] for w in written) / len(written)
    assert result["metrics"]["accuracy"] == pytest.approx(accuracy) and "macro_f1" in result["metrics"]

    # the output's version is in DVC (its .dvc file beside it) and in the logged run
    md5 = hashlib.md5(out.read_bytes()).hexdigest()
    assert f"md5: {md5}" in (folder / "reviews.predictions.jsonl.dvc").read_text() and result["dvc_md5"] == md5
    remote = versioning.default_remote(project)[1]
    assert (Path(remote) / "files" / "md5" / md5[:2] / md5[2:]).is_file(), "pushed to the DVC remote"
    assert not versioning.git_dirty(project), "DVC's bookkeeping is not a code change (runs after stay clean)"
    run = _client(project).get_run(result["run_id"])
    assert run.info.status == "FINISHED" and run.data.tags["peftflow.kind"] == "predict"
    assert run.data.tags["peftflow.model_run_id"] == champion.run_id
    assert run.data.metrics["accuracy"] == pytest.approx(accuracy)
    assert run.data.tags["dvc.predictions_md5"] == md5
    assert [f.path for f in _client(project).list_artifacts(result["run_id"], "predictions")] == [
        "predictions/reviews.predictions.jsonl"
    ]

    # without labels: predictions, no metrics; a file without the text column: one line, nothing written
    (folder / "unlabeled.jsonl").write_text("".join(json.dumps({"text": r["text"]}) + "\n" for r in rows[:3]))
    bare = predict(input_path="data/scoring/unlabeled.jsonl", project=Project(root=project))
    assert bare["metrics"] == {} and len((folder / "unlabeled.predictions.jsonl").read_text().splitlines()) == 3
    (folder / "wrong.jsonl").write_text(json.dumps({"review": "fine"}) + "\n")
    with pytest.raises(data.DataError, match=r"wrong.jsonl row 1: column 'text' is missing or empty; columns present"):
        predict(input_path="data/scoring/wrong.jsonl", project=Project(root=project))
    assert not (folder / "wrong.predictions.jsonl").exists()


def test_a_corrupt_registry_copy_is_fetched_again_and_a_corrupt_stored_one_named(project, harness, caplog):
    from urllib.parse import urlparse

    params = Project(root=project).params(None)
    client = _client(project)
    version = registry.resolve(client, f"models:/{MODEL}@champion")
    cached = registry.fetched(client, version, project, params)
    weights = next(p for p in cached.iterdir() if p.suffix == ".safetensors")
    weights.write_bytes(weights.read_bytes()[:64])  # a copy cut short (disk full, killed download)
    registry.load(f"models:/{MODEL}@champion", project, params)  # loads: fetched again
    assert any(
        f"{weights.name} (changed)" in r.getMessage() and "fetching it again" in r.getMessage() for r in caplog.records
    )

    stored = Path(urlparse(version.source).path) / weights.name
    good = stored.read_bytes()
    shutil.rmtree(cached)
    try:
        stored.write_bytes(good[:64])
        with pytest.raises(
            tracking.TrackingError,
            match=rf"version {version.version}: the stored artifact .* is corrupt: {weights.name} \(changed\)",
        ):
            registry.load(f"models:/{MODEL}@champion", project, params)
        assert not cached.exists(), "a corrupt download must not be cached"
    finally:
        stored.write_bytes(good)


def test_reproduce_restores_the_data_from_the_remote_with_zero_drift(project, harness):
    client = _client(project)
    run_id = client.get_model_version(MODEL, _aliases(client)["champion"]).run_id
    shutil.rmtree(project / "data" / "prepared")  # neither the workspace nor the cache has the data:
    shutil.rmtree(project / ".dvc" / "cache")  # it must come back from the DVC remote
    shutil.rmtree(project / "runs" / "data")  # (nor the flows' frozen copies)
    result = reproduce(run_id, project, Project(root=project).params(None))
    assert set(result["drift"]) >= {"final_train_loss", "val_loss", "test_loss", "test_accuracy"}
    assert all(d == 0.0 for d in result["drift"].values()), result["drift"]
    assert client.get_run(result["run_id"]).data.tags["peftflow.reproduces"] == run_id


def test_reproduce_refuses_other_code(project, harness):
    client = _client(project)
    run_id = client.get_model_version(MODEL, "1").run_id
    (project / "NOTES.md").write_text("a later change\n")
    commit(project, "later")
    with pytest.raises(versioning.VersioningError, match=r"was made at commit \w{12}, the project is at \w{12}"):
        reproduce(run_id, project, Project(root=project).params(None))


def test_bad_input_fails_in_one_line_and_writes_nothing(project, harness):
    proj = Project(root=project)
    client = _client(project)
    versions_before = len(client.search_model_versions(f"name='{MODEL}'"))
    data_version = pipeline.prepare_data(proj)

    with pytest.raises(ParamsError, match="no params file for method 'nope'; available: adalora"):
        pipeline.finetune(proj, "nope", data_version)
    with pytest.raises(ParamsError, match="elsewhere/base.yaml: no such params file"):
        Project(root=project, params_dir="elsewhere").params(None)
    with pytest.raises(ParamsError, match="data.\\* is DVC-tracked"):
        pipeline.prepare_data(Project(root=project, overrides=["data.split.seed=3"]))
    with pytest.raises(versioning.VersioningError, match="data version 0+.dir: not found in the DVC cache"):
        versioning.restore(project, "0" * 32 + ".dir", project / "restored")

    started = time.monotonic()
    with pytest.raises(tracking.TrackingError, match="MLflow tracking URI http://127.0.0.1:9: unreachable"):
        pipeline.register(Project(root=project, overrides=["tracking.uri=http://127.0.0.1:9"]), "x")
    assert time.monotonic() - started < 30

    # a run that fails while training ends FAILED, and cannot be registered
    bad = Project(root=project, overrides=["train.batch_size=100000"])
    with pytest.raises(ValueError, match="train.batch_size"):
        pipeline.finetune(bad, "lora", data_version)
    failed = client.search_runs([client.get_experiment_by_name("peftflow").experiment_id], order_by=["start_time DESC"])
    assert failed[0].info.status == "FAILED"
    with pytest.raises(tracking.TrackingError, match="is FAILED, not FINISHED"):
        pipeline.register(proj, failed[0].info.run_id)
    assert len(client.search_model_versions(f"name='{MODEL}'")) == versions_before

    params = proj.params(None)
    with pytest.raises(tracking.TrackingError, match="has no alias 'production'; its aliases: candidate, champion"):
        registry.load(f"models:/{MODEL}@production", project, params)
    with pytest.raises(tracking.TrackingError, match="no registered model 'other'; registered: peftflow-sentiment"):
        registry.load("models:/other@champion", project, params)


def test_new_data_rescores_the_champion_before_comparing(project, harness):
    from flows.pipeline import experiment

    client = _client(project)
    champion = client.get_model_version(MODEL, _aliases(client)["champion"])
    # tonight's data: 40 more rows (data/raw is DVC's, not git's: no commit needed)
    with (project / "data" / "raw" / "reviews.jsonl").open("a") as f:
        f.write("".join(json.dumps(r) + "\n" for r in make_rows(40, seed=1)))
    result = experiment(methods=["lora"], project=Project(root=project, overrides=["train.max_steps=1"]))[0]
    new_version = client.get_model_version(MODEL, result["version"]).tags["peftflow.data_version"]
    assert new_version != champion.tags["peftflow.data_version"]

    # the champion scored example by example on the new validation split, paired with the candidate's
    params = Project(root=project).params(None)
    rescored = registry.selection_of(client, champion.run_id, champion.source, "champion", project, params)
    logged = registry._logged_selection(client, champion.run_id)
    assert rescored["data_version"] == new_version != logged["data_version"] and rescored["ids"] != logged["ids"]
    mine = registry._logged_selection(client, result["run_id"])
    assert mine["ids"] == rescored["ids"]  # the same examples, in the same order
    accuracy, loss = sum(rescored["correct"]) / len(rescored["ids"]), sum(rescored["nll"]) / sum(rescored["tokens"])
    assert f"vs {accuracy:.4f}: " in result["reasons"][0], result["reasons"]
    assert f"guard val_loss {result['metrics']['val_loss']:.4f} vs {loss:.4f}" in result["reasons"][1]
    assert not result["promoted"] and _aliases(client)["champion"] == str(champion.version)


def test_experiment_on_an_earlier_data_version(project, harness):
    """The UI form's data_version: train on older data (named by its data version), restored by DVC hash."""
    from flows.pipeline import experiment

    client = _client(project)
    first = client.get_model_version(MODEL, "1").tags  # made before the data changed
    workspace = pipeline.prepare_data(Project(root=project))
    assert workspace.version != first["peftflow.data_version"]

    result = experiment(
        methods=["lora"],
        project=Project(root=project, overrides=["train.max_steps=1"]),
        data_version=first["peftflow.data_version"],
    )[0]
    tags = client.get_run(result["run_id"]).data.tags
    assert tags["peftflow.data_version"] == first["peftflow.data_version"]
    assert tags["dvc.data_md5"] == first["dvc.data_md5"]
    restored = project / "runs" / "data" / first["dvc.data_md5"].removesuffix(".dir") / "manifest.json"
    assert json.loads(restored.read_text())["version"] == first["peftflow.data_version"]
    assert pipeline.prepare_data(Project(root=project)).version == workspace.version  # workspace untouched

    with pytest.raises(data.DataError, match="data version 'feedbeef0000': no logged run names it"):
        pipeline.prepare_data(Project(root=project), "feedbeef0000")


def test_nightly_check_skips_only_when_nothing_that_trains_changed(project, harness):
    base = Project(root=project)
    version = pipeline.prepare_data(base)
    first = nightly.check(base, None, version)  # None: params' nightly.methods
    assert first.methods == ["lora"] and not first.skip and first.reason == "no earlier nightly run: training"
    run_id = pipeline.finetune(Project(root=project), "lora", version)
    nightly.mark(base, [run_id], first)

    same = nightly.check(base, ["lora"], version)
    assert same.skip and f"unchanged since nightly run {run_id}" in same.reason
    where = nightly.check(Project(root=project, overrides=["tracking.ui_url=http://mlflow:5000"]), ["lora"], version)
    assert where.skip, "where runs are logged is not what they train"
    lr = nightly.check(Project(root=project, overrides=["train.lr=1.0e-3"]), ["lora"], version)
    assert not lr.skip and "params changed" in lr.reason and "lora: train.lr 0.005 -> 0.001" in lr.reason
    more = nightly.check(base, ["lora", "ia3"], version)
    assert not more.skip and "ia3 added" in more.reason
    with pytest.raises(ParamsError, match="nope"):
        nightly.check(base, ["nope"], version)


def test_nightly_retraining_to_the_same_model_is_a_tie_and_never_promotes(project, harness):
    """The nightly run retrains what the champion already is (same params, data, seed): a tie."""
    from flows.pipeline import experiment, nightly_retrain

    same = Project(root=project, overrides=["train.max_steps=3", "train.lr=4.0e-3"])
    first = experiment(methods=["lora"], project=same)[0]
    client = _client(project)
    client.set_registered_model_alias(MODEL, "champion", first["version"])
    night = nightly_retrain(methods=["lora"], project=same)
    assert night["trained"], night["reason"]
    result = night["results"][0]
    assert not result["promoted"] and "a tie" in result["reasons"][0], result["reasons"]
    assert "CI [0.0, 0.0]" in result["summary"] and result["summary"].endswith(": kept (a tie)")
    assert _aliases(client)["champion"] == first["version"]

    # the decision in words in the flow's Prefect artifacts, as on the registry version
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey

    with get_client(sync_client=True) as prefect:
        keys = ArtifactFilter(key=ArtifactFilterKey(any_=["nightly-retrain-summary", "nightly-retrain-results"]))
        found = prefect.read_artifacts(artifact_filter=keys)
    texts = [a.data for a in found if a.key == "nightly-retrain-summary"]
    assert any(f"version {result['version']} kept as candidate: {result['summary']}" in t for t in texts), texts
    tables = [json.loads(a.data) if isinstance(a.data, str) else a.data for a in found if a.key.endswith("results")]
    assert {"version": result["version"], "decision": result["summary"]}.items() <= next(
        row for table in tables for row in table if row["version"] == result["version"]
    ).items()
    version = client.get_model_version(MODEL, result["version"])
    assert version.tags["peftflow.promotion_summary"] == result["summary"]


def test_several_seeds_register_the_best_and_are_judged_by_their_mean(project, harness):
    from flows.pipeline import experiment

    result = experiment(methods=["lora"], project=Project(root=project, overrides=["train.max_steps=2",
                                                                                 "promote.seeds=2"]))[0]  # fmt: skip
    client = _client(project)
    runs = [client.get_run(r) for r in result["seed_runs"]]
    assert [r.data.tags["peftflow.seed"] for r in runs] == ["42", "43"]
    best = max(runs, key=lambda r: r.data.metrics["val_accuracy"])
    assert result["run_id"] == best.info.run_id
    version = client.get_model_version(MODEL, result["version"])
    assert version.run_id == best.info.run_id and version.tags["peftflow.seed_runs"] == ",".join(result["seed_runs"])
    assert "the mean of 2 seeds" in result["reasons"][-1]
    assert f"registered: seed {best.data.tags['peftflow.seed']}" in result["reasons"][-1]


def test_compare_flow_runs_methods_on_one_budget_and_writes_the_leaderboard(project, harness):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey

    from flows.pipeline import compare

    budget = 2000  # tokens: a few steps of the tiny model, more for the smaller batch below
    methods = ["lora", "ia3", "prompt"]
    overrides = ["train.eval_every=0"]
    prompt_file = project / "params" / "methods" / "prompt.yaml"
    saved = prompt_file.read_text()
    set_keys(prompt_file, {"train.batch_size": 4})  # another batch size: more steps, the same tokens
    try:
        report = compare(methods, seeds=2, token_budget=budget, project=Project(root=project, overrides=overrides))
    finally:
        prompt_file.write_text(saved)

    out = project / "reports" / "compare"
    for name in ("leaderboard.csv", "leaderboard.md", "leaderboard.html", "runs.csv", "quality_vs_params.png",
                 "quality_vs_memory.png", "tokens_per_s.png"):  # fmt: skip
        assert (out / name).stat().st_size > 0, name
    client = _client(project)
    parent = client.get_run(report["parent_run_id"])
    assert parent.info.status == "FINISHED" and parent.data.tags["peftflow.compare"] == "parent"
    assert parent.data.params["compare.token_budget"] == str(budget)
    assert {a.path for a in client.list_artifacts(parent.info.run_id, "compare")} >= {
        "compare/leaderboard.html", "compare/quality_vs_params.png", "compare/leaderboard.csv"}  # fmt: skip
    children = client.search_runs(
        [parent.info.experiment_id], filter_string=f"tags.mlflow.parentRunId = '{parent.info.run_id}'"
    )
    assert sorted((c.data.tags["peftflow.method"], c.data.tags["peftflow.seed"]) for c in children) == sorted(
        (m, s) for m in methods for s in ("42", "43")
    )
    for c in children:  # every run saw the budget, and not a whole step more than it
        tokens, steps = c.data.metrics["train_tokens"], c.data.metrics["steps"]
        assert budget <= tokens < budget * (1 + 1.5 / steps), (c.data.tags["peftflow.method"], tokens, steps)
        assert c.info.status == "FINISHED" and "test_accuracy" in c.data.metrics
    steps = {c.data.tags["peftflow.method"]: c.data.metrics["steps"] for c in children}
    assert steps["prompt"] > 1.5 * steps["lora"]  # batch 4 vs 8

    table = report["table"]
    assert table[0]["method"] == "base (zero-shot)" and [r["rank"] for r in table] == [0, 1, 2, 3]
    means = [r["test_accuracy_mean"] for r in table[1:]]
    assert means == sorted(means, reverse=True) and all(r["runs"] == 2 for r in table[1:])
    assert any(r["frontier_params"] for r in table[1:]) and any(r["frontier_memory"] for r in table[1:])
    with get_client(sync_client=True) as prefect:
        keys = ArtifactFilter(key=ArtifactFilterKey(any_=["compare-leaderboard", "compare-summary"]))
        artifacts = {a.key: a for a in prefect.read_artifacts(artifact_filter=keys)}
    rows = artifacts["compare-leaderboard"].data
    rows = json.loads(rows) if isinstance(rows, str) else rows
    assert [r["method"] for r in rows] == [r["method"] for r in table]
    summary = artifacts["compare-summary"].data
    assert "efficient frontier, test_accuracy vs trainable parameters:" in summary and "MLflow parent run" in summary


def test_compare_flow_reports_a_failed_method_and_fails(project, harness):
    from flows.pipeline import compare
    from peftflow.compare import ComparisonFailed

    freeze = project / "params" / "methods" / "freeze.yaml"
    saved = freeze.read_text()
    set_keys(freeze, {"method.last_n_blocks": 9})  # the tiny model has 2 blocks: fails when applied
    try:
        with pytest.raises(ComparisonFailed, match=r"1 of 2 comparison runs failed: freeze \(seed 42\): .*9"):
            compare(methods=["freeze", "ia3"], token_budget=1000, project=Project(root=project))
    finally:
        freeze.write_text(saved)
    rows = (project / "reports" / "compare" / "leaderboard.md").read_text()
    assert "| 1 | ia3 |" in rows and "| - | freeze | 0 | failed: " in rows
    client = _client(project)
    (parent,) = client.search_runs(
        [client.get_experiment_by_name("peftflow").experiment_id],
        filter_string="tags.`peftflow.compare` = 'parent' and params.`compare.methods` = 'freeze,ia3'",
    )
    assert parent.info.status == "FAILED"


def test_compare_command_refuses_a_budget_below_the_warmup(project, harness):
    from typer.testing import CliRunner

    from flows.__main__ import app

    args = ["compare", "-m", "lora", "--token-budget", "10", "--root", str(project), "-s", "train.warmup_steps=3"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 2, result.output
    assert "compare.token_budget: 10 tokens is 1 steps of lora" in result.output


def test_experiment_command_line_prints_the_results(project, harness):
    from typer.testing import CliRunner

    from flows.__main__ import app

    args = ["experiment", "-m", "lora", "--root", str(project), "-s", "train.max_steps=1"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    out = result.output
    assert "experiment: accuracy on val (decides) and test (reported)" in out, out[-1500:]
    assert "│     kept │" in out or "│ promoted │" in out, out[-1500:]
    assert "lora (run " in out and "val_accuracy" in out and "95% CI [" in out
    bad = CliRunner().invoke(app, ["experiment", "-m", "nope", "--root", str(project)])
    assert bad.exit_code == 2 and "no params file for method 'nope'" in bad.output


def test_the_flows_train_a_method_on_two_processes(project, harness):
    from flows.pipeline import compare, experiment

    two = ["distributed.strategy=ddp", "distributed.num_processes=2", "train.eval_every=0"]
    client = _client(project)
    known = client.get_experiment_by_name("peftflow")
    before = len(client.search_runs([known.experiment_id])) if known else 0
    result = experiment(methods=["lora"], project=Project(root=project, overrides=[*two, "train.max_steps=2"]))[0]
    experiment_id = client.get_experiment_by_name("peftflow").experiment_id
    assert len(client.search_runs([experiment_id])) == before + 1  # one training, one MLflow run
    run = client.get_run(result["run_id"])
    assert run.info.status == "FINISHED" and run.data.params["distributed.num_processes"] == "2"
    assert "test_accuracy" in run.data.metrics and result["version"]
    with tracking.downloaded(client, result["run_id"]) as run_dir:
        summary = json.loads((run_dir / "train_summary.json").read_text())
    assert (summary["num_processes"], summary["steps"]) == (2, 2)

    budget = 4000  # tokens over both processes
    report = compare(["lora"], seeds=1, token_budget=budget, project=Project(root=project, overrides=two))
    (child,) = client.search_runs(
        [experiment_id], filter_string=f"tags.mlflow.parentRunId = '{report['parent_run_id']}'"
    )
    tokens, steps = child.data.metrics["train_tokens"], child.data.metrics["steps"]
    assert budget <= tokens < budget * (1 + 1.5 / steps), (tokens, steps)  # every process's tokens count
    assert child.info.status == "FINISHED" and child.data.params["distributed.num_processes"] == "2"


def test_an_encoder_classifier_through_compare_experiment_registry_and_load(tmp_path, tiny_bert_dir, harness,
                                                                           monkeypatch):  # fmt: skip
    """The BERT case: a bare encoder as the base (model.task auto: a sequence classifier), its methods
    compared, one registered, promoted and loaded by alias, and texts classified by its head."""
    from typer.testing import CliRunner

    from flows.pipeline import compare, experiment
    from peftflow.cli import app

    monkeypatch.setenv("PATH", f"{BIN}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    root = make_project(tmp_path / "encoder", tiny_bert_dir)
    set_keys(root / "params" / "data.yaml", {"data.prompt_template": "{text}"})  # the [CLS] reads the text alone
    commit(root, "the tiny BERT on the review texts")
    project = Project(root=root, overrides=["train.max_steps=24", "train.eval_every=8"])

    report = compare(["bitfit"], seeds=1, token_budget=1500, project=project)  # the budget in the encoder's tokens
    assert [r["method"] for r in report["table"]] == ["base (zero-shot)", "bitfit"] and not report["failed"]
    assert report["table"][1]["test_macro_f1"] is not None and report["table"][1]["train_tokens"] >= 1500

    (result,) = experiment(methods=["lora"], project=project)
    assert result["promoted"] and result["metrics"]["test_accuracy"] > 0.5
    client = _client(root)
    assert _aliases(client)["champion"] == result["version"]
    run = client.get_run(result["run_id"])
    assert run.data.metrics["zeroshot_test_loss"] > run.data.metrics["test_loss"]  # the untrained head: chance
    stored = client.download_artifacts(result["run_id"], "model/peftflow.json", str(tmp_path))
    assert json.loads(open(stored).read())["labels"] == ["negative", "positive"]  # the head's classes, in order

    params = Project(root=root).params(None)
    predictor, version = registry.load(f"models:/{MODEL}@champion", root, params)
    test = data.read_split(root / "data" / "prepared", "test")
    rows = predictor.predict([ex["prompt"] for ex in test]).to_dict("records")
    accuracy = sum(r["label"] == ex["completion"] for r, ex in zip(rows, test, strict=True)) / len(test)
    assert accuracy == pytest.approx(run.data.metrics["test_accuracy"])
    monkeypatch.chdir(root)
    shown = CliRunner().invoke(app, ["load", f"models:/{MODEL}@champion", "-t", test[0]["prompt"]])
    assert shown.exit_code == 0, shown.output
    assert f"{rows[0]['label']:>10} ({rows[0]['score']:.3f})" in shown.output
