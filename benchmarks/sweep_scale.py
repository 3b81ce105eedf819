"""What a sweep's storage traffic and driver memory do as the trial count grows: N micro-model trials on
this machine's Ray, with the output (and so Ray's storage path: Tune's experiment state, every trial's
results and checkpoints) on a loopback S3 server (moto, as the tests use) that counts what it is sent.

    .venv/bin/python benchmarks/sweep_scale.py --trials 40 --json runs/bench/sweep_scale-40.json
    make bench-scale      # the paper grid's trial count (1,512), figures in docs/results.md

The grid keeps the paper's shape per cell: 4 cells (scratch, image, depth 1-2, width 32-64), each with
S Optuna search trials and 2 seed re-runs (seeds [0, 1, 2]), so N = 4 (S + 2). Each trial fine-tunes a
micro image tower for 8 steps with an evaluation (and a checkpoint) after each: 8 checkpoints per
trial, as the paper preset makes 9. The driver is jobs/sweep.py in a subprocess, connected to a Ray instance this script starts (2 CPUs), as a submitted
job is. JSON: trials_planned, trials_finished, wall_s, driver_peak_rss_mb, storage_bytes_written,
storage_puts, and per trial: bytes written and puts. Linear syncing: bytes and puts per trial stay
flat from N to 4N; so does the driver's peak memory.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from mmlg_ray.config import as_overrides

ROOT = Path(__file__).resolve().parents[1]
# configs/tiny.yaml's micro ancestor; 4 cells of scratch trials, each evaluated (and checkpointed) 8 times
MICRO = as_overrides("tiny") + [
    "descendants.grid.modality=[image]",
    "descendants.grid.depth=[1,2]",
    "descendants.grid.width=[32,64]",
    "descendants.grid.method=[scratch]",
    "descendants.seeds=[0,1,2]",
    "descendants.finetune.steps=8",
    "descendants.finetune.eval_every=1",
    "descendants.finetune.batch_size=32",
]
CELLS, SEED_RERUNS = 4, 2


def kind_of(path: str) -> str:
    """What an object written under the output is, by its key."""
    name = path.rsplit("/", 1)[-1]
    if "/checkpoint_" in path:
        return "trial checkpoints"
    if name.startswith(("experiment_state", "searcher-state", "basic-variant-state", "tuner.pkl", "trainable.pkl")):
        return "Tune experiment state"
    if name.startswith(("result.json", "progress.csv", "params.json", "params.pkl", "events.out.tfevents")):
        return "trial results (Tune's loggers)"
    if "/ray/" in path:
        return "other Ray storage"
    return "job outputs (tables, artifacts, report)"


class CountingS3:
    """moto's S3 as a WSGI app on 127.0.0.1, behind a counter of the requests that write: PUT and POST
    (objects, multipart parts and completions) with their body bytes; DELETE counted apart."""

    def __init__(self):
        from moto.server import DomainDispatcherApplication, create_backend_app
        import logging

        from werkzeug.serving import make_server

        logging.getLogger("werkzeug").setLevel(logging.WARNING)  # no line per request

        self.lock = threading.Lock()
        self.puts = self.bytes = self.deletes = self.requests = 0
        self.by_kind: dict[str, list[int]] = {}  # kind -> [puts, bytes]
        self.paths: dict[str, int] = {}  # key -> puts
        app = DomainDispatcherApplication(create_backend_app)

        counter = self

        class Body:  # the request body as moto reads it: counts what is sent, chunked or not
            def __init__(self, raw, kind):
                self.raw, self.kind = raw, kind

            def _count(self, data):
                with counter.lock:
                    counter.bytes += len(data)
                    counter.by_kind[self.kind][1] += len(data)
                return data

            def read(self, *a):
                return self._count(self.raw.read(*a))

            def readline(self, *a):
                return self._count(self.raw.readline(*a))

            def __iter__(self):
                return iter(self.readline, b"")

        def counted(environ, start_response):
            method = environ["REQUEST_METHOD"]
            with self.lock:
                self.requests += 1
                if method in ("PUT", "POST") and "delete" not in environ.get("QUERY_STRING", ""):
                    self.puts += 1
                    kind = kind_of(environ.get("PATH_INFO", ""))
                    self.by_kind.setdefault(kind, [0, 0])[0] += 1
                    self.paths[environ.get("PATH_INFO", "")] = self.paths.get(environ.get("PATH_INFO", ""), 0) + 1
                    environ["wsgi.input"] = Body(environ["wsgi.input"], kind)
                elif method == "DELETE" or method == "POST":  # DeleteObject, DeleteObjects (POST ?delete)
                    self.deletes += 1
            return app(environ, start_response)

        self.server = make_server("127.0.0.1", 0, counted, threaded=True)
        self.endpoint = f"http://127.0.0.1:{self.server.server_port}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def snapshot(self) -> dict:
        with self.lock:
            return {
                "puts": self.puts,
                "bytes": self.bytes,
                "deletes": self.deletes,
                "requests": self.requests,
                "by_kind": {k: list(v) for k, v in self.by_kind.items()},
            }

    def stop(self):
        self.server.shutdown()


def peak_rss_mb(pid: int, stop: threading.Event, out: dict) -> None:
    """The process's resident memory, sampled every 0.5 s until `stop`: its peak, in MB."""
    import psutil

    proc, peak, series = psutil.Process(pid), 0, []
    t0 = time.perf_counter()
    while not stop.is_set():
        try:
            rss = proc.memory_info().rss
        except psutil.Error:
            break
        peak = max(peak, rss)
        series.append((time.perf_counter() - t0, rss))
        stop.wait(0.5)
    out["peak_mb"] = peak / 2**20
    if series:  # the peak within each tenth of the run: growth during the trials, or at the end (tables, report)
        end = series[-1][0] or 1.0
        out["by_decile"] = [
            round(max((r for t, r in series if i / 10 * end <= t <= (i + 1) / 10 * end), default=0) / 2**20)
            for i in range(10)
        ]


def run(n: int, cache_dir: str) -> dict:
    import boto3
    import pandas as pd
    import ray

    search = max(1, round(n / CELLS) - SEED_RERUNS)
    planned = CELLS * (search + SEED_RERUNS)
    s3 = CountingS3()
    env = {
        "AWS_ENDPOINT_URL": s3.endpoint,
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_EC2_METADATA_DISABLED": "true",
        "RAY_USAGE_STATS_ENABLED": "0",
    }
    os.environ.update(env)
    bucket = "mmlg-bench"
    boto3.client("s3").create_bucket(Bucket=bucket)
    ray.init(num_cpus=2, include_dashboard=True, dashboard_host="127.0.0.1", runtime_env={"env_vars": env})
    address = ray.get_runtime_context().gcs_address
    out = f"s3://{bucket}/sweep-{n}"
    sets = MICRO + [f"cache_dir={cache_dir}", f"ray.address={address}", f"ray.tune.num_samples={search}"]
    argv = [sys.executable, str(ROOT / "jobs/sweep.py"), "--output", out] + sum((["--set", s] for s in sets), [])
    log_path = Path(tempfile.gettempdir()) / f"sweep_scale-{n}.log"
    try:
        before = s3.snapshot()
        t0 = time.perf_counter()
        with open(log_path, "w") as log:
            proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, env={**os.environ, **env})
            stop, rss = threading.Event(), {}
            watcher = threading.Thread(target=peak_rss_mb, args=(proc.pid, stop, rss))
            watcher.start()
            rc = proc.wait()
            stop.set()
            watcher.join()
        wall = time.perf_counter() - t0
        after = s3.snapshot()
        if rc != 0:
            raise SystemExit(f"the sweep exited {rc}; its log: {log_path}")
        import io

        body = boto3.client("s3").get_object(Bucket=bucket, Key=f"sweep-{n}/trials.parquet")["Body"].read()
        trials = pd.read_parquet(io.BytesIO(body))
    finally:
        ray.shutdown()
        s3.stop()
    written, puts = after["bytes"] - before["bytes"], after["puts"] - before["puts"]
    finished = int(trials.status.isin(["finished", "stopped_early"]).sum())
    return {
        "trials_planned": planned,
        "trials_finished": finished,
        "wall_s": round(wall, 1),
        "driver_peak_rss_mb": round(rss.get("peak_mb", float("nan")), 1),
        "driver_rss_mb_by_decile": rss.get("by_decile"),
        "storage_bytes_written": written,
        "storage_puts": puts,
        "storage_deletes": after["deletes"] - before["deletes"],
        "by_kind": {
            k: {"puts": v[0] - before["by_kind"].get(k, [0, 0])[0], "bytes": v[1] - before["by_kind"].get(k, [0, 0])[1]}
            for k, v in sorted(after["by_kind"].items())
        },
        "most_written_keys": dict(sorted(s3.paths.items(), key=lambda kv: -kv[1])[:8]),
        "bytes_written_per_trial": round(written / planned),
        "puts_per_trial": round(puts / planned, 2),
        "log": str(log_path),
    }


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--trials", type=int, required=True, help="about this many trials (4 cells x (S + 2))")
    p.add_argument("--json", default=None, help="write the figures here too")
    p.add_argument("--cache-dir", default=str(ROOT / "runs/bench/cache"), help="the micro ancestor's cache")
    a = p.parse_args(argv)
    if a.trials < CELLS * (1 + SEED_RERUNS):
        p.error(f"--trials: at least {CELLS * (1 + SEED_RERUNS)}")
    res = run(a.trials, a.cache_dir)
    text = json.dumps(res, indent=2)
    print(text)
    if a.json:
        Path(a.json).parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(a.json).with_suffix(".tmp")
        tmp.write_text(text + "\n")
        tmp.replace(a.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
