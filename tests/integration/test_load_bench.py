"""bench/load.py end to end, short: a real server, a second load process on loopback, SQLite idle and
SQLite while the worker trains. The bench itself fails (exit 1) on any request error or when the
training run was not going through the whole load window; the p99 bound is loose here because CI's
two cores are shared (the README's figures come from the full-length run).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = [pytest.mark.integration, pytest.mark.slow]

REPO_ROOT = Path(__file__).resolve().parents[2]


def test_load_bench_runs_idle_and_while_training() -> None:
    completed = subprocess.run(
        [
            sys.executable,
            "bench/load.py",
            "--duration",
            "5",
            "--no-postgres",
            "--p99-bound-ms",
            "30000",
            "--train-items",
            "4",
        ],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=500,
        check=False,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert completed.returncode == 0, completed.stdout[-3000:] + completed.stderr[-3000:]
    lines = [json.loads(line) for line in completed.stdout.strip().splitlines() if line.startswith("{")]
    summary = lines[-1]
    assert set(summary) == {"metric", "value", "baseline", "baseline_value", "ratio"}
    assert summary["metric"] == "sqlite_feedback_p99_ms_while_training" and summary["value"] > 0
    runs = {(line["run"], line["route"]): line for line in lines[:-1]}
    for run in ("idle", "training"):
        assert runs[(run, "all")]["errors"] == 0
        for route in ("single", "batch", "adapters"):
            assert runs[(run, route)]["requests"] > 0, (run, route)
    assert runs[("training", "all")]["training_steps_during_load"] >= 1


def test_sqlite_reads_do_not_queue_behind_a_writer(tmp_path: Path) -> None:
    """GET routes read in a DEFERRED transaction: while another connection holds SQLite's write lock
    (a feedback batch being inserted), GET /adapters and GET /feedback still answer at once."""
    import sqlite3
    import time

    from fastapi.testclient import TestClient

    from service.app import create_app
    from service.config import Settings

    database = tmp_path / "reads.db"
    settings = Settings(
        _env_file=None,
        database_url=f"sqlite:///{database}",
        data_dir=tmp_path,
        auth_tokens="t=admin",
        tokenizer=tmp_path / "none",
    )
    with TestClient(create_app(settings, start_background=False)) as client:
        writer = sqlite3.connect(database, isolation_level=None)
        try:
            writer.execute("BEGIN IMMEDIATE")  # hold the write lock
            started = time.monotonic()
            for path in ("/adapters", "/feedback", "/jobs", "/memories"):
                response = client.get(path, headers={"Authorization": "Bearer t"})
                assert response.status_code == 200, (path, response.text)
            assert time.monotonic() - started < 5, "a read waited for the write lock"
        finally:
            writer.execute("ROLLBACK")
            writer.close()


def test_history_bench_runs_small_and_prints_the_contract_line() -> None:
    """bench/history.py at a small scale: both stores generated in bulk, every case measured."""
    command = [sys.executable, "bench/history.py", "--conversations", "5000", "--feedback", "600"]
    command += ["--versions", "50", "--posts", "50", "--reps", "3"]
    completed = subprocess.run(
        command,
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert completed.returncode == 0, completed.stdout[-3000:] + completed.stderr[-3000:]
    lines = [json.loads(line) for line in completed.stdout.strip().splitlines() if line.startswith("{")]
    summary = lines[-1]
    assert set(summary) == {"metric", "value", "baseline", "baseline_value", "ratio"}
    assert summary["value"] > 0 and summary["baseline_value"] > 0
    cases = lines[-2]["cases"]
    assert set(cases) == {"feedback_post_p99_ms", "train_prepare_median_ms", "get_adapters_median_ms"}
    assert lines[0]["generated"] == {"conversations": 5000, "feedback": 600, "versions": 50}
