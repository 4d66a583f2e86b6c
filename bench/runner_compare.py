"""Wall time of one comparison on the default runner (one run after another, each in its own
process) against a local Ray cluster (runs at once, one CPU each), in one process, on the same
project, data and token budget; and whether the two gave the same metrics.

    python bench/runner_compare.py                          # 4 methods on the embedded default
    METHODS=lora,ia3 BUDGET=3000 python bench/runner_compare.py --root DIR
    SET="eval.max_examples=100" python bench/runner_compare.py   # extra overrides, space-separated

Prints one JSON line per runner and a summary line (the ratio, and the largest metric difference).
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

QUALITY = ("final_train_loss", "test_loss", "test_accuracy", "train_tokens", "steps")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", type=Path, default=Path("."))
    args = parser.parse_args()
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    from mlflow import MlflowClient

    from flows.pipeline import compare
    from peftflow import tracking
    from peftflow.cli_common import quiet_libraries
    from peftflow.pipeline import Project

    quiet_libraries()
    methods = os.environ.get("METHODS", "lora,ia3,prompt,bitfit").split(",")
    budget = int(os.environ.get("BUDGET", "15000"))
    extra = os.environ.get("SET", "").split()
    figures = {}
    # the same torch threads per run on both sides would hide what Ray buys: the default runner gives
    # each run the whole machine, Ray one CPU per run and runs as many at once as there are CPUs
    for kind in ("process", "ray"):
        project = Project(root=args.root, overrides=[*extra, f"runner.kind={kind}"])
        started = time.perf_counter()
        report = compare(methods, seeds=1, token_budget=budget, project=project, prepare=True)
        wall = time.perf_counter() - started
        params = project.params(None)
        client = MlflowClient(tracking.tracking_uri(params, args.root))
        experiment = client.get_experiment_by_name(params.tracking.experiment).experiment_id
        runs = client.search_runs([experiment], filter_string=f"tags.mlflow.parentRunId = '{report['parent_run_id']}'")
        metrics = {r.data.tags["peftflow.method"]: {k: r.data.metrics.get(k) for k in QUALITY} for r in runs}
        spans = [(r.info.start_time, r.info.end_time) for r in runs]
        overlap = sum(1 for a in spans for b in spans if a < b and a[0] < b[1] and b[0] < a[1])
        figures[kind] = {"wall_s": round(wall, 1), "metrics": metrics, "overlapping_run_pairs": overlap}
        print(json.dumps({"runner": kind, "methods": methods, "token_budget": budget, **figures[kind]}), flush=True)
    seq, ray = figures["process"], figures["ray"]
    diff = max(abs((seq["metrics"][m][k] or 0) - (ray["metrics"][m][k] or 0)) for m in seq["metrics"] for k in QUALITY)
    print(json.dumps({"summary": f"ray / sequential wall time {ray['wall_s'] / seq['wall_s']:.2f}",
                      "largest_metric_difference": diff, "cpus": os.cpu_count()}))  # fmt: skip


if __name__ == "__main__":
    main()
