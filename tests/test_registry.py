"""Promotion through a real SQLite MLflow registry, on runs logged by hand (no training): what the
decision reads, how it is recorded, and two promotions in separate processes at once.

Each run is what an evaluated peftflow run leaves in the store: its test and validation figures,
``selection.json`` (per-example values on the validation split) and a ``model/`` artifact."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from mlflow import MlflowClient

from peftflow import data, registry, tracking
from peftflow.config import Params

N = 200
DATA = "dv-test"  # the data version every run here was evaluated on


@pytest.fixture
def store(tmp_path):
    """A project folder whose prepared data is only a manifest: no split file exists, so anything
    that read the test split (or any split) would fail."""
    prepared = tmp_path / "data" / "prepared"
    prepared.mkdir(parents=True)
    (prepared / "manifest.json").write_text(json.dumps({"version": DATA, "files": {}}))
    params = Params()
    params.tracking.uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client, experiment = tracking.connect(params, tmp_path)
    return tmp_path, params, client, experiment


def _answers(right: int) -> list[int]:
    """Right on the first ``right`` examples of a fixed shuffled order: a model right on more
    examples is right on every example a weaker one gets (so the better one is clear)."""
    order = list(range(N))
    random.Random(0).shuffle(order)
    correct = [0] * N
    for i in order[:right]:
        correct[i] = 1
    return correct


def _run(client: MlflowClient, experiment: str, right: int, test_accuracy: float, seed: int = 42, **tags) -> str:
    correct = _answers(right)
    nll = [0.2 if c else 1.5 for c in correct]
    tags = {"peftflow.evaluated": "true", "peftflow.data_version": DATA, "peftflow.method": "lora",
            "peftflow.seed": str(seed), **tags}  # fmt: skip
    run = client.create_run(experiment, tags=tags)
    run_id = run.info.run_id
    val_loss = sum(nll) / (2 * N)
    tracking.log_metrics(client, run_id, {"val_accuracy": right / N, "val_loss": val_loss,
                                          "test_accuracy": test_accuracy, "test_loss": 0.3})  # fmt: skip
    selection = {"split": "val", "data_version": DATA, "ids": [f"ex{i}" for i in range(N)], "correct": correct,
                 "nll": nll, "tokens": [2] * N}  # fmt: skip
    client.log_dict(run_id, selection, "selection.json")
    client.log_dict(run_id, {"method": "lora"}, "model/peftflow.json")
    client.log_text(run_id, "method: {name: lora}\n", "model/params.yaml")
    client.set_terminated(run_id, "FINISHED")
    return run_id


def _aliases(client: MlflowClient) -> dict[str, str]:
    return {k: str(v) for k, v in client.get_registered_model("peftflow-sentiment").aliases.items()}


def test_the_decision_follows_validation_not_test(store):
    root, params, client, experiment = store
    name = params.promote.model_name
    champion = registry.register(client, _run(client, experiment, right=176, test_accuracy=0.80), name)
    assert registry.promote(client, root, params, champion).promote
    # far better on test, one example better on validation: kept (and no split file was read)
    test_only = registry.register(client, _run(client, experiment, right=177, test_accuracy=0.99), name)
    decision = registry.promote(client, root, params, test_only)
    assert not decision.promote and "not significantly better" in decision.summary
    # worse on test, clearly better on validation: promoted
    val_better = registry.register(client, _run(client, experiment, right=194, test_accuracy=0.70), name)
    decision = registry.promote(client, root, params, val_better)
    assert decision.promote and decision.summary.startswith("val_accuracy +9.0 pt, 95% CI [")
    assert _aliases(client)["champion"] == val_better

    # recorded on the version, in its run (tag, interval metrics, the decision as JSON)
    version = client.get_model_version(name, val_better)
    assert version.tags["peftflow.promotion"] == "promoted" and version.tags["peftflow.promotion_against"] == "v1"
    assert version.tags["peftflow.promotion_summary"] == decision.summary
    assert version.tags["peftflow.val_accuracy"] == "0.9700" and version.tags["peftflow.test_accuracy"] == "0.7000"
    run = client.get_run(version.run_id)
    assert run.data.tags[f"peftflow.promotion.v{val_better}"] == f"{decision.summary} (against v1)"
    low, high = run.data.metrics["promotion_ci_low"], run.data.metrics["promotion_ci_high"]
    assert 0 < low < 0.09 < high
    logged = client.download_artifacts(version.run_id, f"promotion/v{val_better}.json", str(root))
    record = json.loads(Path(logged).read_text())
    assert record["promoted"] and record["against"] == "v1" and record["comparison"]["n"] == N


def _champion_from_older_data(client: MlflowClient, experiment: str, name: str) -> tuple[str, str]:
    """A champion (version 1) evaluated on older data, and a better candidate (version 2) on this."""
    old = registry.register(client, _run(client, experiment, right=150, test_accuracy=0.75), name)
    client.set_registered_model_alias(name, "champion", old)
    client.set_model_version_tag(name, old, "peftflow.data_version", "dv-older")
    return old, registry.register(client, _run(client, experiment, right=190, test_accuracy=0.9), name)


def test_a_classifier_and_a_causal_lm_are_not_compared_on_their_losses(store):
    """A classifier's val_loss is per example, a causal LM's per answer token: other units."""
    root, params, client, experiment = store
    name = params.promote.model_name
    champion = registry.register(client, _run(client, experiment, 150, 0.75), name)
    assert registry.promote(client, root, params, champion).promote
    run = _run(client, experiment, 170, 0.85, **{"peftflow.task": "sequence_classification"})
    candidate = registry.register(client, run, name)
    with pytest.raises(tracking.TrackingError, match=rf"^promote: version {candidate} is a sequence_classification "
                       rf"model and the champion v{champion} a causal_lm one: val_loss is per example for one and "
                       r"per answer token for the other"):  # fmt: skip
        registry.promote(client, root, params, candidate)
    assert _aliases(client)["champion"] == champion and "peftflow.promotion" not in client.get_model_version(
        name, candidate).tags  # fmt: skip
    params.promote.guards = {}  # on accuracy alone the two compare, example by example
    assert registry.promote(client, root, params, candidate).promote
    assert _aliases(client)["champion"] == candidate


def test_a_candidate_is_judged_on_its_own_data(store):
    root, params, client, experiment = store
    old, new = _champion_from_older_data(client, experiment, params.promote.model_name)
    (root / "data" / "prepared" / "manifest.json").write_text(json.dumps({"version": "dv-other", "files": {}}))
    judged = r"version 2 is judged on the data it was evaluated on \(dv-test\), but data/prepared holds dv-other"
    with pytest.raises(tracking.TrackingError, match=judged):
        registry.promote(client, root, params, new)
    assert _aliases(client)["champion"] == old


def test_a_champion_on_other_data_is_not_compared_on_figures_that_cannot_be_scored_again(store):
    root, params, client, experiment = store
    old, new = _champion_from_older_data(client, experiment, params.promote.model_name)
    name = params.promote.model_name
    client.log_metric(client.get_model_version(name, old).run_id, "val_ppl", 1.5)
    client.log_metric(client.get_model_version(name, new).run_id, "val_ppl", 1.2)
    params.promote.guards = {"val_ppl": {"higher_is_better": False}}
    params = params.model_validate(params.model_dump())
    with pytest.raises(tracking.TrackingError, match=r"champion v1's val_ppl was measured on other data \(dv-older\)"):
        registry.promote(client, root, params, new)


def test_several_seeds_are_judged_by_their_mean(store):
    root, params, client, experiment = store
    name = params.promote.model_name
    champion = registry.register(client, _run(client, experiment, right=176, test_accuracy=0.8), name)
    registry.promote(client, root, params, champion)
    # one lucky seed far ahead, two no better than the champion: their mean is not significantly better
    runs = [_run(client, experiment, right=r, test_accuracy=0.9, seed=s) for r, s in ((196, 42), (176, 43), (175, 44))]
    version = registry.register(client, runs[0], name, seed_runs=runs)
    decision = registry.promote(client, root, params, version)
    assert not decision.promote, decision.reasons
    assert decision.comparison.gain == pytest.approx((20 + 0 - 1) / 3 / N)
    assert "the mean of 3 seeds" in decision.reasons[-1] and "registered: seed 42" in decision.reasons[-1]
    assert client.get_model_version(name, version).tags["peftflow.seed_runs"] == ",".join(runs)


def test_a_lock_held_too_long_is_named_and_a_stale_one_removed(store):
    _, params, client, _ = store
    lock = f"{params.promote.model_name}{registry.LOCK_SUFFIX}"
    client.create_registered_model(lock, tags={"peftflow.lock_owner": "otherhost:123:abc"})
    with pytest.raises(tracking.TrackingError, match=r"another promotion \(otherhost:123:abc\) holds '.*lock'; w"):
        with registry.champion_lock(client, params.promote.model_name, timeout_s=0.5):
            pass
    with registry.champion_lock(client, params.promote.model_name, timeout_s=5, stale_s=0):  # seen unchanged: stale
        assert client.get_registered_model(lock).tags["peftflow.lock_owner"].startswith(os.uname().nodename)
    assert not [m for m in client.search_registered_models() if m.name == lock]  # released

    # a holder whose lock was taken over (it was thought stale) never deletes the new holder's
    with registry.champion_lock(client, params.promote.model_name, timeout_s=5):
        client.delete_registered_model(lock)
        client.create_registered_model(lock, tags={"peftflow.lock_owner": "newhost:1:def"})
    assert client.get_registered_model(lock).tags["peftflow.lock_owner"] == "newhost:1:def"


RACER = textwrap.dedent(
    """
    import sys, time
    from pathlib import Path
    from peftflow import registry, tracking
    from peftflow.config import Params

    root, version, me, other, delay = Path(sys.argv[1]), sys.argv[2], sys.argv[3], sys.argv[4], float(sys.argv[5])
    decide, calls = registry.decide, []

    def slow(*args, **kwargs):
        # the first decision of each waits until the other process has decided too (both against
        # the same champion), then this one waits `delay` s before it commits
        decision = decide(*args, **kwargs)
        calls.append(decision)
        if len(calls) == 1:
            (root / f"decided-{me}").touch()
            while not (root / f"decided-{other}").exists():
                time.sleep(0.05)
            time.sleep(delay)
        return decision

    registry.decide = slow
    params = Params()
    params.tracking.uri = f"sqlite:///{root / 'mlflow.db'}"
    client, _ = tracking.connect(params, root)
    decision = registry.promote(client, root, params, version)
    print(f"{me}: {len(calls)} decisions; {decision.summary}")
    """
)


def test_two_promotions_at_once_end_with_the_better_champion(store):
    """Both read champion v1 and decide to promote; the worse one commits last. Without the lock
    and the re-read of the champion inside it, the last writer (the worse one) would win."""
    root, params, client, experiment = store
    name = params.promote.model_name
    v1 = registry.register(client, _run(client, experiment, right=140, test_accuracy=0.7), name)
    registry.promote(client, root, params, v1)
    medium = registry.register(client, _run(client, experiment, right=170, test_accuracy=0.85), name)
    strong = registry.register(client, _run(client, experiment, right=196, test_accuracy=0.98), name)

    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    script = root / "racer.py"
    script.write_text(RACER)
    start = time.monotonic()
    procs = [
        subprocess.Popen([sys.executable, str(script), str(root), medium, "medium", "strong", "2.0"], env=env,
                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True),
        subprocess.Popen([sys.executable, str(script), str(root), strong, "strong", "medium", "0"], env=env,
                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True),
    ]  # fmt: skip
    outputs = [p.communicate(timeout=180)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outputs
    assert time.monotonic() - start < 180

    assert _aliases(client)["champion"] == strong, outputs
    tags = {v: client.get_model_version(name, v).tags for v in (medium, strong)}
    assert tags[strong]["peftflow.promotion"] == "promoted" and tags[strong]["peftflow.promotion_against"] == "v1"
    # the medium one decided twice: against v1 (promote), then, the champion having moved, against strong
    assert "medium: 2 decisions" in outputs[0], outputs[0]
    assert tags[medium]["peftflow.promotion"] == "kept" and tags[medium]["peftflow.promotion_against"] == f"v{strong}"
    assert ": worse" in tags[medium]["peftflow.promotion_reasons"]
    assert not [m for m in client.search_registered_models() if m.name.endswith(registry.LOCK_SUFFIX)]
    assert data.read_manifest(root / "data" / "prepared")["version"] == DATA
