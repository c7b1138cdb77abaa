"""How the search spends its time, and what concurrent trials cost the MLflow store.

    python benchmarks/tune.py [stores] [searches]      (both by default; minutes on 2 CPUs)

1. The 4-trial search of tests/tune (tiny VAE, 20 steps, in-memory data) with trials one at a
   time and two at a time: wall times, their ratio, and the share of Ray's start-up.
2. Concurrent writers on the default SQLite store, as concurrent trials' rank-0 loggers are:
   "database is locked" errors without retries, with genflow.track.mlflow.with_retries, and the
   same load through a local `mlflow server` on that SQLite file (plus that server's start-up).
Prints ratios measured in this one run; nothing is asserted.
"""

from __future__ import annotations

import json
import multiprocessing
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import genflow  # noqa: F401  (telemetry off)

WRITERS = 4  # processes logging at once (trials' rank-0 loggers and the driver)
BATCHES = 150  # log_batch calls per writer


def search_params(root: Path, max_concurrent: int):
    from genflow.config import load_params

    space = {
        "train.lr": {"loguniform": [3e-4, 3e-3]},
        "models.vae.kl.kind": {"choice": ["constant", "linear", "cyclical", "capacity"]},
        "models.vae.kl.weight": {"loguniform": [1e-5, 1e-2]},
    }
    section = {"trials": 4, "max_concurrent": max_concurrent, "grace_period": 20, "space": space}
    return load_params(root / "none.yaml", [
        "models.vae.hidden_channels=[8,16,32,32]", "models.vae.latent_dim=8", "models.vae.norm_groups=8",
        f"tracking.uri=sqlite:///{root}/mlflow.db", f"train.storage_path={root}/ray", "train.batch_size=8",
        "train.log_every=5", "train.max_steps=20", "train.checkpoint_every=5", "tune.vae=" + json.dumps(section),
    ])


def time_searches() -> None:
    import torch

    from genflow.config import RayParams
    from genflow.train.loop import InMemoryBatches
    from genflow.train.trainer import ensure_ray
    from genflow.tune.search import tune

    generator = torch.Generator().manual_seed(0)
    batches = InMemoryBatches(torch.rand(64, 3, 64, 64, generator=generator), torch.zeros(64, 40), 8)
    start = time.perf_counter()
    ensure_ray(RayParams())
    ray_start = time.perf_counter() - start
    walls = {}
    for concurrent in (1, 2):
        with tempfile.TemporaryDirectory() as root:
            start = time.perf_counter()
            tune("vae", search_params(Path(root), concurrent), batch_source=batches, dataset_digest="bench")
            walls[concurrent] = time.perf_counter() - start
    print(f"Ray start-up (ensure_ray): {ray_start:.1f} s")
    for concurrent, wall in walls.items():
        print(f"4-trial search, {concurrent} at a time: {wall:.1f} s; with Ray start-up {wall + ray_start:.1f} s, "
              f"of which start-up {ray_start / (wall + ray_start):.0%}")
    print(f"two at a time / one at a time: {walls[2] / walls[1]:.2f} of the wall time")


def _writer(uri: str, retries: bool, out) -> None:
    from mlflow import MlflowClient
    from mlflow.entities import Metric

    from genflow.track.mlflow import with_retries

    client = MlflowClient(uri)
    call = with_retries if retries else (lambda action: action())
    errors, start = 0, time.perf_counter()
    run_id = call(lambda: client.create_run(client.get_experiment_by_name("bench").experiment_id)).info.run_id
    for step in range(BATCHES):
        metrics = [Metric(f"train/m{i}", float(step), int(time.time() * 1000), step) for i in range(8)]
        try:
            call(lambda: client.log_batch(run_id, metrics=metrics))
        except Exception as err:  # noqa: BLE001  (counted, not hidden)
            if "database is locked" not in str(err):
                raise
            errors += 1
    call(lambda: client.set_terminated(run_id))
    out.put((errors, time.perf_counter() - start))


def _load(uri: str, retries: bool) -> tuple[int, float, float]:
    """(locked errors, wall s, mean per-writer s) for WRITERS processes logging at once."""
    queue = multiprocessing.get_context("spawn").Queue()
    writers = [multiprocessing.get_context("spawn").Process(target=_writer, args=(uri, retries, queue))
               for _ in range(WRITERS)]
    start = time.perf_counter()
    for w in writers:
        w.start()
    results = [queue.get() for _ in writers]
    for w in writers:
        w.join()
    return sum(e for e, _ in results), time.perf_counter() - start, sum(t for _, t in results) / len(results)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def time_stores() -> None:
    from mlflow import MlflowClient

    with tempfile.TemporaryDirectory() as root:
        sqlite = f"sqlite:///{root}/mlflow.db"
        MlflowClient(sqlite).create_experiment("bench")  # the schema exists before the writers start
        rows = {"sqlite, no retries": _load(sqlite, retries=False), "sqlite, with_retries": _load(sqlite, retries=True)}
        port = _free_port()
        start = time.perf_counter()
        server = subprocess.Popen(
            [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", sqlite, "--host", "127.0.0.1",
             "--port", str(port), "--artifacts-destination", f"{root}/artifacts"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
        try:
            url = f"http://127.0.0.1:{port}"
            while True:
                try:
                    urllib.request.urlopen(url + "/health", timeout=1)
                    break
                except OSError:
                    if time.perf_counter() - start > 120:
                        raise RuntimeError("mlflow server did not start in 120 s") from None
                    time.sleep(0.2)
            server_start = time.perf_counter() - start
            rows["local mlflow server"] = _load(url, retries=True)
        finally:
            server.terminate()
            server.wait()
    print(f"\n{WRITERS} processes x {BATCHES} log_batch calls (8 metrics each) at once:")
    for name, (errors, wall, mean) in rows.items():
        print(f"  {name:22s} locked errors {errors:4d}   wall {wall:6.1f} s   per writer {mean:6.1f} s")
    base = rows["sqlite, with_retries"][1]
    print(f"  server wall / sqlite-with-retries wall: {rows['local mlflow server'][1] / base:.2f}; "
          f"server start-up {server_start:.1f} s")


if __name__ == "__main__":
    parts = sys.argv[1:] or ["stores", "searches"]
    if "stores" in parts:
        time_stores()
    if "searches" in parts:
        time_searches()
