"""Registered versions as MLflow models, on the tiny Llama and a real SQLite registry: MLflow's own
pyfunc loader and ``mlflow models serve`` answer as ``peftflow load`` does, for every method; several
adapters share one base in one model."""

from __future__ import annotations

import json
import os
import sys
import urllib.request
from pathlib import Path

import mlflow
import pandas as pd
import pytest
from mlflow import MlflowClient

from peftflow import adapters, data, registry, runs, serving
from peftflow.config import load_params
from tests.conftest import METHODS, PARAMS_DIR, tiny_overrides

TEXTS = ["a wonderful moving film", "dull boring plot", "the story and its actor"]


@pytest.fixture(scope="module")
def store(tmp_path_factory, tiny_model_dir, tiny_data_file):
    """A project folder with prepared data and a SQLite store; ``train(method, name)`` trains,
    evaluates and registers a method as model ``name`` (version 1, alias candidate)."""
    root = tmp_path_factory.mktemp("serving")
    uri = f"sqlite:///{root / 'mlflow.db'}"

    def params(method: str | None, *extra: str):
        over = [*tiny_overrides(tiny_model_dir, tiny_data_file, root), f"tracking.uri={uri}", "train.max_steps=6"]
        return load_params(method, PARAMS_DIR, [*over, *extra])

    data.prepare(params(None).data)

    def train(method: str, name: str, *extra: str) -> str:
        p = params(method, *extra)
        run_id = runs.train_tracked(p, root, None)
        runs.evaluate_tracked(run_id, root, p)
        client = MlflowClient(uri)
        return registry.register(client, run_id, name)

    return root, uri, params, train


@pytest.fixture
def pyfunc_store(store, monkeypatch):
    """The store for MLflow's own loaders, through the environment only: ``mlflow.set_registry_uri``
    would outlive the test and point every later ``MlflowClient`` without a registry URI here."""
    root, uri, *_ = store
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.setenv("MLFLOW_REGISTRY_URI", uri)
    return store


def _raw_test_texts(root: Path) -> list[str]:
    return [ex["prompt"].split("Review: ", 1)[1] for ex in data.read_split(root / "prepared", "test")]


@pytest.mark.parametrize("method", METHODS)
def test_mlflow_loads_every_registered_method_as_peftflow_load_does(pyfunc_store, method):
    root, uri, params, train = pyfunc_store
    version = train(method, f"serve-{method}")
    uri_of = f"models:/serve-{method}/{version}"
    texts = _raw_test_texts(root)

    pyfunc = mlflow.pyfunc.load_model(uri_of)
    got = pyfunc.predict(pd.DataFrame({"text": texts}))
    predictor, _ = registry.load(uri_of, root, params(None))
    want = predictor.predict(texts)
    pd.testing.assert_frame_equal(got, want, check_exact=True)

    # what it answers is what the evaluation scored: the logged test accuracy, from raw texts
    gold = [ex["completion"] for ex in data.read_split(root / "prepared", "test")]
    accuracy = sum(g == p for g, p in zip(gold, got["label"], strict=True)) / len(gold)
    run = MlflowClient(uri).get_run(registry.resolve(MlflowClient(uri), uri_of).run_id)
    assert accuracy == pytest.approx(run.data.metrics["test_accuracy"])

    meta = pyfunc.metadata
    assert meta.get_input_schema().input_names() == ["text"]
    assert meta.get_output_schema().input_names() == ["label", "score"]
    assert meta.metadata["peftflow.method"] == method and meta.metadata["peftflow.base_digest"]
    reqs = Path(mlflow.artifacts.download_artifacts(f"{uri_of}/requirements.txt")).read_text().split()
    assert {r.split("==")[0] for r in reqs} >= {"torch", "transformers", "peft", "mlflow", "peftflow"}
    assert all("==" in r for r in reqs)  # pinned
    if method == "lora":  # MLflow reads a dict of lists as one row holding a list: refused, not labelled
        with pytest.raises(Exception, match="must hold one string per row"):
            pyfunc.predict({"text": TEXTS})


def test_a_model_trained_on_instructions_generates_text(pyfunc_store, tmp_path):
    root, uri, params, train = pyfunc_store
    words = "film story actor plot scene movie heart music light night".split()
    rows = [
        {"instruction": f"Repeat the word {w}, {n} times.", "output": " ".join([w] * n)}
        for w in words
        for n in (1, 2, 3, 4)
    ]
    source = tmp_path / "instructions.jsonl"
    source.write_text("".join(json.dumps(r) + "\n" for r in rows))
    over = ["data.format=instruction", f"data.source={source}", f"data.out_dir={tmp_path / 'prepared'}",
            "data.split.test=8", "data.split.val=8"]  # fmt: skip
    data.prepare(params("lora", *over).data)
    version = train("lora", "serve-instructions", *over)

    pyfunc = mlflow.pyfunc.load_model(f"models:/serve-instructions/{version}")
    assert pyfunc.metadata.get_output_schema().input_names() == ["generated_text"]
    prompts = ["Repeat the word film.", "Repeat the word plot."]
    got = pyfunc.predict(pd.DataFrame({"text": prompts}), params={"max_new_tokens": 4})
    predictor, _ = registry.load(f"models:/serve-instructions/{version}", root, params(None))
    want = predictor.predict(prompts, {"max_new_tokens": 4})
    pd.testing.assert_frame_equal(got, want, check_exact=True)
    assert len(got) == 2 and all(isinstance(t, str) for t in got["generated_text"])
    ids = predictor.tokenizer(list(got["generated_text"]), add_special_tokens=False)["input_ids"]
    assert all(len(i) <= 4 + 1 for i in ids)  # max_new_tokens reached the model (decoding may merge or split)


def test_a_base_other_than_the_one_trained_on_is_refused(pyfunc_store, tmp_path, tiny_model_dir):
    """The base is referenced, not stored: a version whose referenced base changed says so in one line."""
    import shutil

    root, uri, params, train = pyfunc_store
    version = train("lora", "serve-moved-base")
    moved = tmp_path / "other-base"
    shutil.copytree(tiny_model_dir, moved)
    weights = moved / "model.safetensors"
    raw = bytearray(weights.read_bytes())
    raw[-1] ^= 1
    weights.write_bytes(bytes(raw))
    stored = mlflow.artifacts.download_artifacts(f"models:/serve-moved-base/{version}", dst_path=str(tmp_path / "v"))
    folder = Path(stored)
    text = (folder / "params.yaml").read_text().replace(str(tiny_model_dir), str(moved))
    (folder / "params.yaml").write_text(text)
    with pytest.raises(ValueError, match=r"is not the one this model was trained on \(weights digest"):
        serving.Predictor(folder, root)


def test_mlflow_models_serve_answers_rest_requests_as_peftflow_load(pyfunc_store, monkeypatch):
    from typer.testing import CliRunner

    from flows.serve import _process
    from peftflow.cli import app
    from tests.test_serve import free_port

    root, uri, params, train = pyfunc_store
    version = train("lora", "serve-rest")
    MlflowClient(uri).set_registered_model_alias("serve-rest", "champion", version)
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    env = {**os.environ, "MLFLOW_TRACKING_URI": uri, "MLFLOW_REGISTRY_URI": uri, "PEFTFLOW_ROOT": str(root)}
    cmd = [str(Path(sys.executable).parent / "mlflow"), "models", "serve", "-m", "models:/serve-rest@champion",
           "--env-manager", "local", "-h", "127.0.0.1", "-p", str(port), "-w", "1"]  # fmt: skip
    # its own process group, stopped whole on exit: the uvicorn worker it starts goes too
    with _process(cmd, env, root / "serve-rest.log", f"{base}/ping", "mlflow models serve"):
        body = json.dumps({"dataframe_records": [{"text": t} for t in TEXTS]}).encode()
        request = urllib.request.Request(f"{base}/invocations", body, {"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=60) as r:
            answered = json.loads(r.read())["predictions"]

    monkeypatch.chdir(root)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    texts = [a for t in TEXTS for a in ("-t", t)]
    shown = CliRunner().invoke(app, ["load", "models:/serve-rest@champion", "--params-dir", str(PARAMS_DIR), *texts])
    assert shown.exit_code == 0, shown.output
    for text, row in zip(TEXTS, answered, strict=True):
        assert set(row) == {"label", "score"}
        assert f"{row['label']:>10} ({row['score']:.3f})  {text}" in shown.output


def test_two_adapters_share_one_base_and_each_request_goes_to_its_own(pyfunc_store, tmp_path):
    root, uri, params, train = pyfunc_store
    first = train("lora", "serve-a")
    second = train("lora", "serve-b", "seed=7", "train.lr=2.0e-2")
    routes = adapters.parse([f"models:/serve-a/{first}", f"b=models:/serve-b/{second}"])
    assert routes == {"serve-a": f"models:/serve-a/{first}", "b": f"models:/serve-b/{second}"}
    out = adapters.build(routes, tmp_path / "both", root, params(None))

    both = mlflow.pyfunc.load_model(str(out))
    assert both.metadata.get_input_schema().input_names() == ["text", "adapter"]
    names = ["serve-a", "b", "b", "serve-a", "b", "serve-a"]
    texts = [*TEXTS, *reversed(TEXTS)]
    got = both.predict(pd.DataFrame({"text": texts, "adapter": names}))
    alone = {
        "serve-a": registry.load(f"models:/serve-a/{first}", root, params(None))[0],
        "b": registry.load(f"models:/serve-b/{second}", root, params(None))[0],
    }
    for i, (text, name) in enumerate(zip(texts, names, strict=True)):
        want = alone[name].predict([text]).iloc[0]
        assert got["label"][i] == want["label"] and got["score"][i] == pytest.approx(want["score"], abs=1e-5)
    assert not got["score"].iloc[[1, 2]].equals(got["score"].iloc[[0, 3]])  # the two adapters answer differently

    with pytest.raises(ValueError, match=r"adapter 'c' is not in this model; its adapters: serve-a, b"):
        both.predict(pd.DataFrame({"text": ["x"], "adapter": ["c"]}))


def test_adapters_that_cannot_share_a_base_are_refused_in_one_line(pyfunc_store, tmp_path):
    root, uri, params, train = pyfunc_store
    lora = train("lora", "share-lora")
    ia3 = train("ia3", "share-ia3")
    bitfit = train("bitfit", "share-bitfit")
    first = f"models:/share-lora/{lora}"

    def build(other: str, out: str):
        return adapters.build(adapters.parse([first, other]), tmp_path / out, root, params(None))

    with pytest.raises(ValueError, match=r"share-ia3 \(.*\): method ia3 cannot share a base with share-lora's lora"):
        build(f"models:/share-ia3/{ia3}", "x")
    with pytest.raises(ValueError, match=r"method bitfit is not a peft adapter"):
        build(f"models:/share-bitfit/{bitfit}", "y")
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists()
    with pytest.raises(ValueError, match="at least two adapters"):
        adapters.parse([f"models:/share-lora/{lora}"])
