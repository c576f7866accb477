"""Mixed load against a real `loraloop serve` process on loopback, idle and while the worker trains.

A second process drives `POST /feedback` (single items), `POST /feedback:batch` and `GET /adapters`
at the same time for a bounded duration (the request loop is bench/ingest.py's `drive`). Runs:
SQLite and PostgreSQL with an idle worker, then both again while the in-process worker trains a
LoRA on the tiny model (API, worker and store client share one process, as `loraloop serve` runs).
One JSON line per run and route (req/s, items/s, p50/p99 ms, errors, whether p99 held its bound);
the last line compares single-item p99 while training with the idle p99 (ratio = idle / training,
> 1 = better; the run fails when training pushes p99 past `--p99-bound-ms`).

    python bench/load.py [--duration 10] [--p99-bound-ms 1000] [--postgres-url URL | --no-postgres]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))
from ingest import (
    DEFAULT_POSTGRES_URL,
    REPO_ROOT,
    TOKEN,
    Server,
    drive,
    feedback_item,
    postgres_schema,
    tokenizer_folder,
)

ROUTES = ("single", "batch", "adapters")
TRAIN_NAMESPACE = "train"
AUTH = {"Authorization": f"Bearer {TOKEN}"}


# --- load process --------------------------------------------------------------------------------


async def drive_mix(
    url: str, duration_s: float, concurrency: dict[str, int], batch_size: int
) -> dict[str, Any]:
    """Every route at once, each with its own connection pool and in-flight requests."""
    results = await asyncio.gather(
        *(drive(url, mode, duration_s, concurrency[mode], batch_size) for mode in ROUTES)
    )
    return dict(zip(ROUTES, results, strict=True))


# --- orchestration -------------------------------------------------------------------------------


def run_mix(url: str, args: argparse.Namespace) -> dict[str, Any]:
    completed = subprocess.run(
        [
            sys.executable,
            __file__,
            "--drive",
            url,
            "--duration",
            str(args.duration),
            "--concurrency",
            str(args.concurrency),
            "--batch-concurrency",
            str(args.batch_concurrency),
            "--read-concurrency",
            str(args.read_concurrency),
            "--batch-size",
            str(args.batch_size),
        ],
        capture_output=True,
        text=True,
        timeout=args.duration + 120,
        check=False,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    if completed.returncode != 0:
        raise RuntimeError(f"load process failed:\n{completed.stderr[-2000:]}")
    return json.loads(completed.stdout.strip().splitlines()[-1])


def seed_training(client: httpx.Client, items: int) -> int:
    """Feedback in the training namespace, then a training job for it; returns the job id."""
    batch = [{**feedback_item(f"train-{i}"), "namespace": TRAIN_NAMESPACE} for i in range(items)]
    response = client.post("/feedback:batch", json={"items": batch})
    response.raise_for_status()
    job = client.post("/jobs/train", json={"namespace": TRAIN_NAMESPACE})
    job.raise_for_status()
    return int(job.json()["id"])


def training_progress(client: httpx.Client, job_id: int) -> dict[str, Any]:
    job = client.get(f"/jobs/{job_id}").json()
    return {"status": job["status"], "error": job.get("error"), **(job.get("progress") or {})}


def wait_until_training(client: httpx.Client, job_id: int, timeout_s: float = 240.0) -> dict[str, Any]:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        progress = training_progress(client, job_id)
        if progress["status"] == "running" and progress.get("phase") == "train":
            return progress
        if progress["status"] not in ("queued", "running"):
            raise RuntimeError(f"training job ended before the load started: {progress}")
        time.sleep(0.2)
    raise RuntimeError("the training job did not start training in time")


def report_lines(run: str, backend: str, mix: dict[str, Any], bound_ms: float) -> list[dict[str, Any]]:
    lines = []
    for mode in ROUTES:
        result = mix[mode]
        lines.append(
            {
                "run": run,
                "backend": backend,
                "route": mode,
                **result,
                "p99_bound_ms": bound_ms,
                "p99_within_bound": bool(result["p99_ms"] <= bound_ms),
            }
        )
    total = sum(mix[mode]["requests_per_s"] for mode in ROUTES)
    lines.append(
        {
            "run": run,
            "backend": backend,
            "route": "all",
            "requests_per_s": round(total, 1),
            "items_per_s": round(sum(mix[mode]["items_per_s"] for mode in ("single", "batch")), 1),
            "errors": sum(mix[mode]["errors"] for mode in ROUTES),
            "worst_p99_ms": max(mix[mode]["p99_ms"] for mode in ROUTES),
            "p99_within_bound": all(mix[mode]["p99_ms"] <= bound_ms for mode in ROUTES),
        }
    )
    return lines


def server_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    return {
        "LORALOOP_AUTH_TOKENS": f"{TOKEN}=feedback:write adapters:read adapters:write",
        "LORALOOP_DISTILL_ENABLED": "false",
        # the load's own feedback never starts a run: "idle" means idle, "training" trains one job
        "LORALOOP_TRAIN_TRIGGER_COUNT": "1000000000",
        **(extra or {}),
    }


def start_worker(
    server: Server, db_url: str, data_dir: Path, extra: dict[str, str]
) -> subprocess.Popen[bytes]:
    """`loraloop worker` on the same database and data folder as `server` (its own process)."""
    env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "LORALOOP_DATABASE_URL": db_url,
        "LORALOOP_DATA_DIR": str(data_dir),
        "LORALOOP_LOG_LEVEL": "WARNING",
        **server_env(extra),
        "LORALOOP_WORKER_ENABLED": "true",
    }
    with (data_dir / "worker.log").open("ab") as log:
        return subprocess.Popen(
            [sys.executable, "-m", "service.cli", "worker"],
            cwd=REPO_ROOT,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--duration", type=float, default=10.0, help="seconds of load per run")
    parser.add_argument("--concurrency", type=int, default=4, help="single-item requests in flight")
    parser.add_argument("--batch-concurrency", type=int, default=1, help="batch requests in flight")
    parser.add_argument("--read-concurrency", type=int, default=2, help="GET /adapters requests in flight")
    parser.add_argument("--batch-size", type=int, default=20, help="items per batch request")
    parser.add_argument("--p99-bound-ms", type=float, default=1000.0, help="the API's p99 latency bound")
    parser.add_argument("--train-items", type=int, default=16, help="feedback items the training run learns")
    parser.add_argument(
        "--postgres-url", default=os.environ.get("LORALOOP_TEST_POSTGRES_URL", DEFAULT_POSTGRES_URL)
    )
    parser.add_argument("--no-postgres", action="store_true")
    parser.add_argument("--no-training", action="store_true", help="skip the run with a training job")
    parser.add_argument(
        "--separate-worker",
        action="store_true",
        help="train in a `loraloop worker` process, not in the API's",
    )
    parser.add_argument("--drive", help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.drive:
        concurrency = {
            "single": args.concurrency,
            "batch": args.batch_concurrency,
            "adapters": args.read_concurrency,
        }
        print(json.dumps(asyncio.run(drive_mix(args.drive, args.duration, concurrency, args.batch_size))))
        return

    sys.path.insert(0, str(REPO_ROOT))
    tokenizer = tokenizer_folder()
    results: dict[tuple[str, str], dict[str, Any]] = {}
    failures: list[str] = []
    with tempfile.TemporaryDirectory(prefix="loraloop-load-") as scratch:
        runs: list[tuple[str, str, str, Any]] = []
        for run in ("idle",) if args.no_training else ("idle", "training"):
            runs.append((run, "sqlite", f"sqlite:///{scratch}/{run}.db", None))
            if not args.no_postgres and args.postgres_url:
                created = postgres_schema(args.postgres_url)
                if created is not None:
                    runs.append((run, "postgres", created[0], created[1]))
        for run, backend, url, cleanup in runs:
            data_dir = Path(scratch) / f"{run}-{backend}"
            data_dir.mkdir()
            extra: dict[str, str] = {}
            if run == "training":
                from training.tiny_model import ensure_tiny_model

                model = ensure_tiny_model(Path(scratch) / "tiny-qwen2", family="qwen2")
                extra = {
                    "LORALOOP_BASE_MODEL": str(model),
                    "LORALOOP_TOKENIZER": str(model),
                    "LORALOOP_DEVICE": "cpu",
                    # train for longer than the load window; the budget then ends the run
                    "LORALOOP_MAX_STEPS": "1000000",
                    "LORALOOP_TRAIN_TIME_BUDGET_S": str(args.duration + 240),
                    "LORALOOP_JOB_HEARTBEAT_S": "2",  # progress visible to the bench; default 10
                    "LORALOOP_JOB_MAX_ATTEMPTS": "1",
                    "LORALOOP_WORKER_POLL_S": "0.1",
                }
            worker: subprocess.Popen[bytes] | None = None
            if run == "training" and args.separate_worker:
                extra["LORALOOP_WORKER_ENABLED"] = "false"
            server = Server(url, data_dir, tokenizer, server_env(extra))
            if run == "training" and args.separate_worker:
                worker = start_worker(server, url, data_dir, extra)
            try:
                training: dict[str, Any] = {}
                if run == "training":
                    with httpx.Client(base_url=server.url, headers=AUTH, timeout=30) as client:
                        job_id = seed_training(client, args.train_items)
                        training["before"] = wait_until_training(client, job_id)
                        mix = run_mix(server.url, args)
                        training["after"] = training_progress(client, job_id)
                    # the worker must have been training through the whole window
                    if training["after"]["status"] != "running" or training["after"].get("phase") != "train":
                        failures.append(f"training was not running through the load window: {training}")
                else:
                    mix = run_mix(server.url, args)
                for line in report_lines(run, backend, mix, args.p99_bound_ms):
                    if run == "training" and line["route"] == "all":
                        line["training_steps_during_load"] = training["after"].get("step", 0) - training[
                            "before"
                        ].get("step", 0)
                    results[(run, f"{backend}/{line['route']}")] = line
                    print(json.dumps(line), flush=True)
            finally:
                if worker is not None:
                    worker.terminate()
                    worker.wait(timeout=60)
                server.stop()
                if callable(cleanup):
                    cleanup()

    idle = results[("idle", "sqlite/single")]
    summary: dict[str, Any] = {"metric": "sqlite_feedback_p99_ms_idle", "value": idle["p99_ms"]}
    if ("training", "sqlite/single") in results:
        busy = results[("training", "sqlite/single")]
        for backend in ("sqlite", "postgres"):
            busy_all = results.get(("training", f"{backend}/all"))
            if busy_all is not None and not busy_all["p99_within_bound"]:
                failures.append(f"{backend}: p99 exceeded {args.p99_bound_ms} ms while training")
        summary = {
            "metric": "sqlite_feedback_p99_ms_while_training",
            "value": busy["p99_ms"],
            "baseline": "sqlite_feedback_p99_ms_idle",
            "baseline_value": idle["p99_ms"],
            "ratio": round(idle["p99_ms"] / busy["p99_ms"], 2) if busy["p99_ms"] else None,
        }
    else:
        summary.update(baseline=None, baseline_value=None, ratio=None)
    errors = sum(line["errors"] for key, line in results.items() if key[1].endswith("/all"))
    if errors:
        failures.append(f"{errors} requests failed")
    for failure in failures:
        print(f"FAILED: {failure}", file=sys.stderr)
    print(json.dumps(summary))
    if failures:
        sys.exit(1)


if __name__ == "__main__":
    main()
