"""Several adapters on one base model in one serving process.

:func:`build` makes one MLflow model from registered versions (e.g. the champion of each model
trained on one base): their trained files under ``adapters/<name>/``, ``manifest.json`` naming
where each came from, and the MLflow files, whose signature takes an ``adapter`` column beside
``text``. :class:`Routed` loads the base once and every adapter onto it by name (peft's
multi-adapter model), and answers each row with the adapter it names. Served like any version:
``mlflow models serve -m <folder>``.

Only peft adapters of one kind share a base (peft refuses to mix kinds in one model, and a method
that changes the base's own weights cannot share it); anything else is refused in one line.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

from peftflow.config import Params, read_resolved

MANIFEST = "manifest.json"


def parse(items: list[str]) -> dict[str, str]:
    """``NAME=models:/...`` or ``models:/NAME@ALIAS`` (named after the registered model) -> {name: uri}."""
    from peftflow import registry

    routes: dict[str, str] = {}
    for item in items:
        name, _, uri = item.partition("=") if "=" in item.split("models:/")[0] else ("", "", item)
        registered = registry.parse_uri(uri)[0]  # a malformed URI is named here, named or not
        name = name or registered
        if name in routes:
            raise ValueError(f"adapter name {name!r} given twice; name them: NAME=models:/...")
        routes[name] = uri
    if len(routes) < 2:
        raise ValueError("a multi-adapter model needs at least two adapters")
    return routes


def _kind(folder: Path) -> str:
    config = folder / "adapter_config.json"
    return json.loads(config.read_text())["peft_type"] if config.is_file() else ""


def build(routes: dict[str, str], out_dir: Path, root: Path, params: Params) -> Path:
    """The adapters that ``routes`` names (name -> model URI) as one MLflow model in ``out_dir``."""
    from peftflow import artifacts, registry, tracking
    from peftflow.atomic import atomic_dir
    from peftflow.serving import metadata, write_mlflow_model

    client, _ = tracking.connect(params, root)
    versions = {name: registry.resolve(client, uri) for name, uri in routes.items()}
    fetched = {name: registry.fetched(client, v, root, params) for name, v in versions.items()}
    methods = {name: artifacts.read_manifest(folder)[0] for name, folder in fetched.items()}
    first_name, first = next(iter(fetched.items()))
    method, kind, labels = methods[first_name], _kind(first), artifacts.labels(first)
    shared = {key: metadata(first).get(key) for key in ("peftflow.base_digest", "peftflow.task")}
    for name, folder in fetched.items():
        other, where = methods[name], f"{name} ({routes[name]})"
        if not _kind(folder):
            raise ValueError(f"{where}: method {other.name} is not a peft adapter; only peft adapters share a base")
        if _kind(folder) != kind or other.quantizes_base != method.quantizes_base:
            raise ValueError(
                f"{where}: method {other.name} cannot share a base with {first_name}'s {method.name} "
                f"(peft loads one kind of adapter per model, on one base)"
            )
        if {key: metadata(folder).get(key) for key in shared} != shared or None in shared.values():
            raise ValueError(f"{where}: trained on another base model (or task) than {first_name}")
        if artifacts.labels(folder) != labels:
            raise ValueError(f"{where}: its labels differ from {first_name}'s; a shared classifier head needs the same")
    with atomic_dir(Path(out_dir)) as tmp:
        for name, folder in fetched.items():
            (tmp / "adapters" / name).mkdir(parents=True)
            for file in [*artifacts.trained_files(folder), "params.yaml"]:
                shutil.copy2(folder / file, tmp / "adapters" / name / file)
        shutil.copy2(first / "params.yaml", tmp / "params.yaml")  # the base they share, as the first names it
        manifest = {name: {"uri": routes[name], "model": v.name, "version": str(v.version), "run_id": v.run_id,
                           "method": methods[name].name}
                    for name, v in versions.items()}  # fmt: skip
        (tmp / MANIFEST).write_text(json.dumps({"adapters": manifest}, indent=2))
        user = read_resolved(first / "params.yaml")
        write_mlflow_model(tmp, user, user.rebased(root), routed=list(routes))
    return Path(out_dir)


class Routed:
    """One base, several adapters; ``predict`` answers each row with the adapter its ``adapter`` names."""

    def __init__(self, folder: Path, root: Path | None = None):
        from peftflow import artifacts
        from peftflow.model import load_base_for, load_tokenizer
        from peftflow.serving import base_params, project_root

        folder = Path(folder)
        root = Path(root) if root is not None else project_root()
        self.params = base_params(folder, root)
        names = list(json.loads((folder / MANIFEST).read_text())["adapters"])
        dirs = {name: folder / "adapters" / name for name in names}
        self.of = {name: self._own(read_resolved(d / "params.yaml").rebased(root)) for name, d in dirs.items()}
        base = load_base_for(self.params, artifacts.labels(dirs[names[0]]))
        self.model = artifacts.load_many(base, dirs).eval()
        self.tokenizer = load_tokenizer(self.params.model)

    def _own(self, params: Params) -> Params:
        params.model = self.params.model  # where the shared base was found
        return params

    def predict(self, model_input: Any, params: dict[str, Any] | None = None):
        import pandas as pd

        from peftflow.serving import answer, texts_of

        texts, names = texts_of(model_input), texts_of(model_input, "adapter")
        unknown = sorted(set(names) - set(self.of))
        if unknown:
            raise ValueError(f"adapter {unknown[0]!r} is not in this model; its adapters: {', '.join(self.of)}")
        rows: list[dict] = [{}] * len(texts)
        for name in dict.fromkeys(names):  # each adapter once, in order of first use
            at = [i for i, n in enumerate(names) if n == name]
            self.model.set_adapter(name)
            answers = answer(self.model, self.tokenizer, self.of[name], [texts[i] for i in at], params)
            for i, row in zip(at, answers, strict=True):
                rows[i] = row
        return pd.DataFrame(rows)
