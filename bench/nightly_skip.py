"""How long a nightly run with nothing new takes (the target: under 10 s), in one process.

Runs the ``nightly-retrain`` flow once so there is a finished night to compare against (on the
embedded default that trains LoRA: minutes), then REPEAT more times with nothing changed, and
times each of those: ``dvc repro`` finding everything up to date, ``dvc push``, the MLflow lookup,
the champion, the Prefect artifact. The flows run on Prefect's temporary local server.

    python bench/nightly_skip.py             # the project in the working directory (embedded default)
    python bench/nightly_skip.py --root DIR  # another project folder
    REPEAT=5 python bench/nightly_skip.py

Prints one JSON line per timed run and a summary line; exits 1 if a run trained or took >= 10 s.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

TARGET_S = 10.0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", type=Path, default=Path("."))
    args = parser.parse_args()
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    from flows.pipeline import nightly_retrain
    from peftflow.cli_common import quiet_libraries
    from peftflow.pipeline import Project

    quiet_libraries()
    project = Project(root=args.root)
    t0 = time.perf_counter()
    first = nightly_retrain(project=project)
    print(json.dumps({"run": "first", "trained": first["trained"], "seconds": round(time.perf_counter() - t0, 1)}))
    times = []
    for i in range(int(os.environ.get("REPEAT", "3"))):
        t0 = time.perf_counter()
        out = nightly_retrain(project=project)
        times.append(time.perf_counter() - t0)
        print(json.dumps({"run": i + 1, "trained": out["trained"], "seconds": round(times[-1], 2)}))
        if out["trained"]:
            print(f"run {i + 1} trained though nothing changed: {out['reason']}", file=sys.stderr)
            return 1
    summary = {"skip_median_s": round(statistics.median(times), 2), "skip_max_s": round(max(times), 2)}
    print(json.dumps({**summary, "target_s": TARGET_S, "met": max(times) < TARGET_S}))
    return 0 if max(times) < TARGET_S else 1


if __name__ == "__main__":
    sys.exit(main())
