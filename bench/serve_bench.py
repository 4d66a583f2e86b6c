"""The champion behind ``mlflow models serve``: REST latency and throughput, what a version stores,
and the memory of several adapters on one base against one server per adapter.

Run in a project (the working directory) whose registry has the models, e.g. after ``make demo``:

    python bench/serve_bench.py                                   # models:/peftflow-sentiment@champion
    python bench/serve_bench.py --second models:/other@champion   # and the two-adapter comparison

Each server is ``mlflow models serve --env-manager local`` (this environment, one uvicorn worker)
on 127.0.0.1, started, measured and stopped here. Latency: one text per request, in sequence;
throughput: requests of 64 texts, in sequence. Memory: the proportional set size (PSS, shared pages
split between the processes sharing them) of each server's process tree once it has answered.
Texts are the prepared test split's raw texts. Prints Markdown.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import socket
import statistics
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import psutil


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def pss(pid: int) -> int:
    """Bytes of PSS of ``pid`` and its descendants."""
    total = 0
    root = psutil.Process(pid)
    for proc in [root, *root.children(recursive=True)]:
        try:
            total += proc.memory_full_info().pss
        except psutil.Error:
            pass
    return total


@contextlib.contextmanager
def served(model: str, log: Path) -> Iterator[Server]:
    """``mlflow models serve -m model`` answering on a free loopback port; stopped (its whole process
    group, the uvicorn worker too) on exit."""
    from flows.serve import _process

    port = free_port()
    url = f"http://127.0.0.1:{port}"
    cmd = [str(Path(sys.executable).parent / "mlflow"), "models", "serve", "-m", model, "--env-manager", "local",
           "-h", "127.0.0.1", "-p", str(port), "-w", "1"]  # fmt: skip
    start = time.perf_counter()
    with _process(cmd, dict(os.environ), log, f"{url}/ping", f"mlflow models serve -m {model}") as proc:
        yield Server(url, proc.pid, time.perf_counter() - start)


@dataclass
class Server:
    url: str
    pid: int
    startup_s: float

    def post(self, records: list[dict]) -> tuple[float, list[dict]]:
        body = json.dumps({"dataframe_records": records}).encode()
        request = urllib.request.Request(f"{self.url}/invocations", body, {"Content-Type": "application/json"})
        start = time.perf_counter()
        with urllib.request.urlopen(request, timeout=600) as r:
            answer = json.loads(r.read())["predictions"]
        return time.perf_counter() - start, answer


def texts() -> list[str]:
    from peftflow.config import load_params
    from peftflow.data import read_split

    params = load_params(None, Path("params"), [])
    return [ex["prompt"].split("Review: ", 1)[-1] for ex in read_split(params.data.out_dir, "test")]


def stored(model: str) -> tuple[int, int]:
    """(bytes of trained weights, bytes of everything else) that the version's folder holds."""
    import mlflow

    from peftflow.artifacts import WEIGHT_SUFFIXES

    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(mlflow.artifacts.download_artifacts(model, dst_path=tmp))
        files = [p for p in folder.rglob("*") if p.is_file()]
        weights = sum(p.stat().st_size for p in files if p.suffix in WEIGHT_SUFFIXES)
        return weights, sum(p.stat().st_size for p in files) - weights


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="models:/peftflow-sentiment@champion")
    parser.add_argument("--second", help="another registered adapter on the same base: the memory comparison")
    parser.add_argument("--singles", type=int, default=100, help="one-text requests timed")
    parser.add_argument("--batches", type=int, default=10, help="64-text requests timed")
    args = parser.parse_args()
    os.environ.setdefault("MLFLOW_TRACKING_URI", f"sqlite:///{Path('mlflow.db').resolve()}")
    pool = texts()
    logs = Path(tempfile.mkdtemp(prefix="serve-bench-"))

    weights, other = stored(args.model)
    with served(args.model, logs / "one.log") as server:
        for t in pool[:3]:
            server.post([{"text": t}])  # warm-up
        single = [server.post([{"text": pool[i % len(pool)]}])[0] for i in range(args.singles)]
        batch = [server.post([{"text": t} for t in (pool * 2)[i * 64 : i * 64 + 64]])[0] for i in range(args.batches)]
        memory_one = pss(server.pid)
    ms = sorted(s * 1000 for s in single)
    print(f"## {args.model} behind `mlflow models serve` (1 worker, {os.cpu_count()} CPUs)\n")
    print("| figure | value |\n|---|---|")
    print(f"| server start to first /ping | {server.startup_s:.1f} s |")
    print(f"| 1 text: latency median / p90 / p99 | {statistics.median(ms):.1f} / {ms[int(0.9 * len(ms))]:.1f} / "
          f"{ms[min(len(ms) - 1, int(0.99 * len(ms)))]:.1f} ms ({len(ms)} requests) |")  # fmt: skip
    print(f"| 1 text: throughput | {len(single) / sum(single):.1f} texts/s |")
    print(f"| 64 texts: latency median | {statistics.median(batch) * 1000:.0f} ms ({len(batch)} requests) |")
    print(f"| 64 texts: throughput | {64 * len(batch) / sum(batch):.1f} texts/s |")
    print(f"| server memory (PSS) | {memory_one / 2**30:.2f} GiB |")
    print(f"| stored per version | {weights / 2**20:.1f} MiB of weights + {other / 2**10:.0f} KiB of other files |")

    if args.second:
        from peftflow.adapters import build, parse
        from peftflow.config import load_params

        routed = logs / "both"
        build(parse([args.model, args.second]), routed, Path("."), load_params(None, Path("params"), []))
        with served(args.model, logs / "a.log") as a, served(args.second, logs / "b.log") as b:
            for s in (a, b):
                s.post([{"text": pool[0]}])
            separate = pss(a.pid) + pss(b.pid)
        names = list(json.loads((routed / "manifest.json").read_text())["adapters"])
        with served(str(routed), logs / "both.log") as both:
            for name in names:
                both.post([{"text": pool[0], "adapter": name}])
            shared = pss(both.pid)
        print(f"\n## Two adapters ({', '.join(names)}): one server each against one server with both\n")
        print("| setup | memory (PSS) |\n|---|---|")
        print(f"| two servers, one adapter each | {separate / 2**30:.2f} GiB |")
        print(f"| one server, both adapters on one base | {shared / 2**30:.2f} GiB ({shared / separate:.0%}) |")


if __name__ == "__main__":
    main()
