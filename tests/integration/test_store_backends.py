"""memory_store against real databases: migrations, concurrency, the job queue, crash durability.

Every test runs on a SQLite file and on the PostgreSQL server (`db_url` in tests/conftest.py),
with real threads and real processes competing for the same rows.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from collections import Counter
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory

from memory_store.db import (
    DatabaseUnavailable,
    alembic_config,
    current_revision,
    make_engine,
    make_session_factory,
    upgrade_database,
)
from memory_store.models import Base, FeedbackItem, Job
from memory_store.queue import JobQueue
from memory_store.repositories import AdapterRepository, FeedbackRepository

pytestmark = pytest.mark.integration

REPO_ROOT = Path(__file__).resolve().parents[2]
MESSAGES = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]


class FakeClock:
    """A clock the test moves by hand, shared by the queues that stand for different workers."""

    def __init__(self) -> None:
        self.now = datetime(2026, 11, 23, 12, 0, tzinfo=UTC)

    def __call__(self) -> datetime:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += timedelta(seconds=seconds)


def run_in_threads(count: int, work: Callable[[int], Any]) -> list[Any]:
    """Run `work(i)` in `count` threads released together by a barrier."""
    barrier = threading.Barrier(count)

    def start(i: int) -> Any:
        barrier.wait(timeout=30)
        return work(i)

    with ThreadPoolExecutor(max_workers=count) as pool:
        return list(pool.map(start, range(count)))


# --- migrations --------------------------------------------------------------------------------------


def test_upgrade_from_empty_matches_models_and_is_repeatable(db_url):
    assert current_revision(db_url) is None
    # two processes starting at once (API + worker) both upgrade the same empty database
    run_in_threads(2, lambda _: upgrade_database(db_url))
    head = ScriptDirectory.from_config(alembic_config()).get_current_head()
    assert current_revision(db_url) == head
    upgrade_database(db_url)  # already at head: no-op
    engine = make_engine(db_url)
    try:
        with engine.connect() as connection:
            assert compare_metadata(MigrationContext.configure(connection), Base.metadata) == []
            tables = set(sa.inspect(connection).get_table_names())
        assert {"feedback_items", "conversations", "memories", "jobs", "training_runs", "adapters"} <= tables
        assert {"adapter_versions", "deployments", "alembic_version"} <= tables
    finally:
        engine.dispose()


def test_sqlite_engine_settings(tmp_path):
    url = f"sqlite:///{tmp_path / 'deep' / 'er' / 'store.db'}"
    engine = make_engine(url)
    try:
        with engine.connect() as connection:
            pragma = lambda name: connection.exec_driver_sql(f"PRAGMA {name}").scalar()
            assert pragma("journal_mode") == "wal"
            assert pragma("foreign_keys") == 1
            assert pragma("busy_timeout") == 30000
            assert pragma("synchronous") == 1  # NORMAL
        assert (tmp_path / "deep" / "er").is_dir()
    finally:
        engine.dispose()


# --- unavailable database ----------------------------------------------------------------------------


def test_unreachable_postgres_raises_database_unavailable_fast():
    engine = make_engine("postgresql+psycopg://postgres@127.0.0.1:9/test", connect_timeout_s=2)
    started = time.monotonic()
    try:
        with pytest.raises(DatabaseUnavailable), engine.connect():
            pass
    finally:
        engine.dispose()
    assert time.monotonic() - started < 5


def test_locked_sqlite_raises_database_unavailable_after_busy_timeout(tmp_path):
    url = f"sqlite:///{tmp_path / 'store.db'}"
    upgrade_database(url)
    holder = make_engine(url)
    impatient = make_engine(url, busy_timeout_s=0.2)
    try:
        with holder.begin() as connection:  # BEGIN IMMEDIATE: holds the write lock
            connection.execute(
                sa.insert(Job).values(
                    kind="k",
                    payload={},
                    status="queued",
                    attempts=0,
                    max_attempts=1,
                    run_after=datetime.now(UTC),
                    created_at=datetime.now(UTC),
                )
            )
            with pytest.raises(DatabaseUnavailable), make_session_factory(impatient).begin() as session:
                JobQueue(session).enqueue(kind="k")
    finally:
        holder.dispose()
        impatient.dispose()


def test_read_only_sqlite_sessions_do_not_wait_for_the_writer(tmp_path):
    url = f"sqlite:///{tmp_path / 'store.db'}"
    upgrade_database(url)
    writer_engine = make_engine(url)
    reader_engine = make_engine(url, busy_timeout_s=0.2)
    try:
        with writer_engine.begin() as connection:  # holds the write lock
            connection.execute(sa.text("SELECT 1"))
            with make_session_factory(reader_engine, read_only=True)() as session:
                assert JobQueue(session).depth() == {"queued": 0, "running": 0}
            with pytest.raises(DatabaseUnavailable), make_session_factory(reader_engine)() as session:
                JobQueue(session).depth()  # a write session queues behind the writer
    finally:
        writer_engine.dispose()
        reader_engine.dispose()


# --- idempotency under concurrency ----------------------------------------------------------------------


def test_concurrent_replays_store_one_row(db_session_factory):
    threads = 8

    def post(i: int) -> tuple[int, bool]:
        with db_session_factory.begin() as session:
            item, created = FeedbackRepository(session).add(
                namespace="ns", messages=MESSAGES, continuation="better", idempotency_key=f"key-{i % 2}"
            )
            return item.id, created

    results = run_in_threads(threads, post)
    ids_by_key = {
        key: {item_id for (item_id, _), i in zip(results, range(threads), strict=True) if i % 2 == key}
        for key in (0, 1)
    }
    assert all(len(ids) == 1 for ids in ids_by_key.values())
    assert ids_by_key[0] != ids_by_key[1]
    assert sum(created for _, created in results) == 2
    with db_session_factory() as session:
        assert session.scalar(sa.select(sa.func.count()).select_from(FeedbackItem)) == 2


def test_concurrent_version_allocation_never_collides(db_session_factory):
    with db_session_factory.begin() as session:
        AdapterRepository(session).ensure_adapter(name="ns")

    def publish(i: int) -> int:
        with db_session_factory.begin() as session:
            return AdapterRepository(session).add_version(name="ns", path=f"/tmp/v{i}").version

    versions = run_in_threads(6, publish)
    assert sorted(versions) == list(range(6))


def test_concurrent_ensure_adapter_creates_one(db_session_factory):
    def ensure(_: int) -> str:
        with db_session_factory.begin() as session:
            return AdapterRepository(session).ensure_adapter(name="fresh", base_model="/m").name

    assert run_in_threads(4, ensure) == ["fresh"] * 4


# --- job queue: claims --------------------------------------------------------------------------------


def test_claims_are_exclusive_across_threads(db_session_factory):
    with db_session_factory.begin() as session:
        queue = JobQueue(session)
        job_ids = [queue.enqueue(kind="train", namespace="ns", payload={"i": i}).id for i in range(30)]

    def drain(worker: int) -> list[int]:
        claimed = []
        while True:
            with db_session_factory.begin() as session:
                job = JobQueue(session).claim(worker_id=f"w{worker}", lease_s=60)
            if job is None:
                return claimed
            claimed.append(job.id)
            with db_session_factory.begin() as session:
                assert JobQueue(session).complete(
                    job_id=job.id, worker_id=f"w{worker}", result={"by": worker}
                )

    per_worker = run_in_threads(4, drain)
    claimed = [job_id for ids in per_worker for job_id in ids]
    assert sorted(claimed) == job_ids  # every job once, none twice
    with db_session_factory() as session:
        assert JobQueue(session).status_counts()["succeeded"] == 30
        assert JobQueue(session).depth() == {"queued": 0, "running": 0}


CLAIM_WORKER = textwrap.dedent(
    """
    import json, pathlib, sys, time
    from memory_store.db import make_engine, make_session_factory
    from memory_store.queue import JobQueue
    url, worker, out, go = sys.argv[1], sys.argv[2], sys.argv[3], pathlib.Path(sys.argv[4])
    factory = make_session_factory(make_engine(url))
    with factory() as session:
        JobQueue(session).depth()  # connected and warm
    pathlib.Path(out + ".ready").touch()
    while not go.exists():  # start claiming together with the other processes
        time.sleep(0.01)
    claimed = []
    while True:
        with factory.begin() as session:
            job = JobQueue(session).claim(worker_id=worker, lease_s=60)
        if job is None:
            break
        claimed.append(job.id)
        with factory.begin() as session:
            assert JobQueue(session).complete(job_id=job.id, worker_id=worker)
    with open(out, "w") as handle:
        json.dump(claimed, handle)
    """
)


def test_claims_are_exclusive_across_processes(migrated_db_url, db_session_factory, tmp_path):
    with db_session_factory.begin() as session:
        queue = JobQueue(session)
        job_ids = [queue.enqueue(kind="train", payload={"i": i}).id for i in range(90)]
    outputs = [tmp_path / f"claimed-{n}.json" for n in range(3)]
    go = tmp_path / "go"
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT), "OMP_NUM_THREADS": "1"}
    workers = [
        subprocess.Popen(
            [sys.executable, "-c", CLAIM_WORKER, migrated_db_url, f"proc{n}", str(out), str(go)], env=env
        )
        for n, out in enumerate(outputs)
    ]
    deadline = time.monotonic() + 60
    while not all(Path(f"{out}.ready").exists() for out in outputs) and time.monotonic() < deadline:
        time.sleep(0.02)
    go.touch()
    assert [worker.wait(timeout=120) for worker in workers] == [0, 0, 0]
    per_process = [json.loads(out.read_text()) for out in outputs]
    claimed = [job_id for ids in per_process for job_id in ids]
    assert sum(1 for ids in per_process if ids) >= 2, "the processes did not compete"
    assert Counter(claimed).most_common(1)[0][1] == 1
    assert sorted(claimed) == job_ids


def test_claim_respects_kinds_and_run_after(db_session_factory):
    clock = FakeClock()
    with db_session_factory.begin() as session:
        queue = JobQueue(session, clock=clock)
        later = queue.enqueue(kind="train", run_after=clock.now + timedelta(seconds=30))
        distill = queue.enqueue(kind="distill")
    with db_session_factory.begin() as session:
        queue = JobQueue(session, clock=clock)
        assert queue.claim(worker_id="w", kinds=["train"]) is None
        assert queue.claim(worker_id="w", kinds=["train", "distill"]).id == distill.id
        clock.advance(31)
        assert queue.claim(worker_id="w").id == later.id


# --- job queue: leases, heartbeats, retries -------------------------------------------------------------


def test_expired_lease_is_reclaimed_and_old_owner_loses_it(db_session_factory):
    clock = FakeClock()
    with db_session_factory.begin() as session:
        job_id = JobQueue(session, clock=clock).enqueue(kind="train", max_attempts=3).id
    with db_session_factory.begin() as session:
        assert JobQueue(session, clock=clock).claim(worker_id="crashed", lease_s=30).attempts == 1
    clock.advance(10)
    with db_session_factory.begin() as session:
        assert JobQueue(session, clock=clock).claim(worker_id="other", lease_s=30) is None  # still leased
    clock.advance(21)  # lease over: the first worker is presumed dead
    with db_session_factory.begin() as session:
        reclaimed = JobQueue(session, clock=clock).claim(worker_id="other", lease_s=30)
        assert (reclaimed.id, reclaimed.attempts, reclaimed.lease_owner) == (job_id, 2, "other")
    with db_session_factory.begin() as session:
        queue = JobQueue(session, clock=clock)
        assert queue.heartbeat(job_id=job_id, worker_id="crashed") is False
        assert queue.complete(job_id=job_id, worker_id="crashed", result={"stale": True}) is False
        assert queue.fail(job_id=job_id, worker_id="crashed", error="late") is None
        assert queue.heartbeat(job_id=job_id, worker_id="other", progress={"step": 3}) is True
        assert queue.complete(job_id=job_id, worker_id="other", result={"version": 1}) is True
    with db_session_factory() as session:
        job = JobQueue(session).get(job_id=job_id)
        assert (job.status, job.result, job.progress, job.attempts) == (
            "succeeded",
            {"version": 1},
            {"step": 3},
            2,
        )


def test_heartbeat_keeps_the_lease(db_session_factory):
    clock = FakeClock()
    with db_session_factory.begin() as session:
        JobQueue(session, clock=clock).enqueue(kind="train")
    with db_session_factory.begin() as session:
        job = JobQueue(session, clock=clock).claim(worker_id="a", lease_s=30)
    for _ in range(3):
        clock.advance(20)
        with db_session_factory.begin() as session:
            assert JobQueue(session, clock=clock).heartbeat(job_id=job.id, worker_id="a", lease_s=30)
            assert JobQueue(session, clock=clock).claim(worker_id="b") is None
    clock.advance(31)
    with db_session_factory.begin() as session:
        assert JobQueue(session, clock=clock).claim(worker_id="b").id == job.id
    with db_session_factory.begin() as session:
        assert JobQueue(session, clock=clock).heartbeat(job_id=job.id, worker_id="a") is False


def test_lease_expiry_after_last_attempt_dead_letters(db_session_factory):
    clock = FakeClock()
    with db_session_factory.begin() as session:
        job_id = JobQueue(session, clock=clock).enqueue(kind="train", max_attempts=1).id
        JobQueue(session, clock=clock).claim(worker_id="a", lease_s=5)
    clock.advance(6)
    with db_session_factory.begin() as session:
        queue = JobQueue(session, clock=clock)
        assert queue.requeue_expired() == 1
        assert queue.claim(worker_id="b") is None
        job = queue.get(job_id=job_id)
        assert job.status == "dead" and "lease expired" in job.error


def test_failures_retry_with_backoff_then_dead_letter(db_session_factory):
    clock = FakeClock()
    make_queue = lambda session: JobQueue(session, clock=clock, backoff_base_s=5, backoff_max_s=60)
    with db_session_factory.begin() as session:
        job_id = make_queue(session).enqueue(kind="train", dedupe_key="train:ns", max_attempts=3).id
    delays = []
    for attempt in (1, 2, 3):
        with db_session_factory.begin() as session:
            job = make_queue(session).claim(worker_id="w")
            assert (job.id, job.attempts) == (job_id, attempt)
        with db_session_factory.begin() as session:
            failed = make_queue(session).fail(job_id=job_id, worker_id="w", error=f"boom {attempt}")
        if attempt < 3:
            assert failed.status == "queued"
            delays.append((failed.run_after - clock.now).total_seconds())
            with db_session_factory.begin() as session:
                assert make_queue(session).claim(worker_id="w") is None  # backing off
            clock.advance(delays[-1])
    assert delays == [5.0, 10.0]
    with db_session_factory.begin() as session:
        queue = make_queue(session)
        job = queue.get(job_id=job_id)
        assert (job.status, job.error, job.finished_at) == ("dead", "boom 3", clock.now)
        assert queue.status_counts()["dead"] == 1
        # the dead job no longer holds its dedupe key
        assert queue.enqueue(kind="train", dedupe_key="train:ns").id != job_id


def test_non_retryable_failure_is_final(db_session_factory):
    with db_session_factory.begin() as session:
        queue = JobQueue(session)
        job_id = queue.enqueue(kind="train", max_attempts=5).id
        queue.claim(worker_id="w")
        assert queue.fail(job_id=job_id, worker_id="w", error="bad data", retryable=False).status == "failed"
        assert queue.claim(worker_id="w") is None


def test_cancel_stops_queued_and_running_jobs(db_session_factory):
    with db_session_factory.begin() as session:
        queue = JobQueue(session)
        queued = queue.enqueue(kind="a")
        running = queue.enqueue(kind="b")
        assert queue.claim(worker_id="w", kinds=["b"]).id == running.id
        assert queue.cancel(job_id=queued.id).status == "cancelled"
        assert queue.cancel(job_id=running.id).status == "cancelled"
        assert queue.heartbeat(job_id=running.id, worker_id="w") is False
        assert queue.claim(worker_id="w") is None
        assert [j.status for j in queue.list(status="cancelled")] == ["cancelled", "cancelled"]
        assert queue.list(kind="a")[0].id == queued.id


# --- job queue: dedupe ----------------------------------------------------------------------------------


def test_dedupe_returns_the_active_job(db_session_factory):
    with db_session_factory.begin() as session:
        queue = JobQueue(session)
        first = queue.enqueue(kind="distill", namespace="ns", dedupe_key="distill:ns")
        assert queue.enqueue(kind="distill", namespace="ns", dedupe_key="distill:ns").id == first.id
        assert queue.enqueue(kind="distill", namespace="b", dedupe_key="distill:b").id != first.id
        queue.claim(worker_id="w", kinds=["distill"])
        assert queue.enqueue(kind="distill", namespace="ns", dedupe_key="distill:ns").id in {first.id}
        assert queue.active_job(dedupe_key="distill:ns").status == "running"
        assert queue.depth() == {"queued": 1, "running": 1}
        assert queue.depth(kind="train") == {"queued": 0, "running": 0}


def test_concurrent_enqueue_with_same_dedupe_key_creates_one_job(db_session_factory):
    def enqueue(_: int) -> int:
        with db_session_factory.begin() as session:
            return JobQueue(session).enqueue(kind="train", namespace="ns", dedupe_key="train:ns").id

    assert len(set(run_in_threads(6, enqueue))) == 1
    with db_session_factory() as session:
        assert len(JobQueue(session).list()) == 1


# --- crash durability -----------------------------------------------------------------------------------

KILLED_WRITER = textwrap.dedent(
    """
    import os, signal, sys
    from memory_store.db import make_engine, make_session_factory
    from memory_store.repositories import FeedbackRepository
    factory = make_session_factory(make_engine(sys.argv[1]))
    for i in range(40):
        with factory.begin() as session:
            item, _ = FeedbackRepository(session).add(
                namespace="ns", messages=[{"role": "user", "content": "q"}], continuation=f"a{i}",
                idempotency_key=f"k{i}")
            item_id = item.id
        print(item_id, flush=True)  # acknowledged only after the commit returned
    os.kill(os.getpid(), signal.SIGKILL)
    """
)


def test_committed_rows_survive_sigkill(migrated_db_url, db_session_factory):
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT), "OMP_NUM_THREADS": "1"}
    writer = subprocess.run(
        [sys.executable, "-c", KILLED_WRITER, migrated_db_url],
        env=env,
        capture_output=True,
        check=False,
        text=True,
        timeout=120,
    )
    assert writer.returncode == -signal.SIGKILL, writer.stderr
    acknowledged = [int(line) for line in writer.stdout.split()]
    assert len(acknowledged) == 40
    with db_session_factory() as session:
        stored = session.scalars(sa.select(FeedbackItem.id).order_by(FeedbackItem.id)).all()
    assert stored == acknowledged
