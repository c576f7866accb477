"""The worker side end to end: the job loop on both stores (lease, heartbeat progress, retries, dead
letters, lost leases, graceful stop, follow-up jobs), then feedback -> train job -> served version on
the tiny model (promotion, gate rejection, NaN divergence)."""

from __future__ import annotations

import json
import logging
import math
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from sqlalchemy.orm import Session, sessionmaker

from memory_store.db import make_engine, make_session_factory
from memory_store.models import FeedbackItem, TrainingRun
from memory_store.queue import JobQueue
from memory_store.repositories import AdapterRepository
from service.adapters.registry import AdapterRegistry
from service.api.metrics import ServiceMetrics
from service.app import create_app
from service.config import Settings
from service.jobs.train import TrainJobHandler
from service.jobs.worker import JobCancelled, JobContext, JobFailed, JobOutcome, Worker
from service.wiring import build_worker
from training.adapter_store import AdapterStore
from training.probes import general_probes

pytestmark = pytest.mark.integration

FEEDBACK = {
    "messages": [
        {"role": "user", "content": "What is the deploy code of project Kestrel?"},
        {"role": "assistant", "content": "I do not know."},
    ],
    "continuation": "The deploy code of project Kestrel is 7-4-1-9.",
}


@pytest.fixture
def restore_logging() -> Iterator[Callable[[], None]]:
    """The CLI configures the root logger onto CliRunner's streams, closed after `invoke`: call the
    returned function right after `invoke` to put the test session's handlers back."""
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level

    def restore() -> None:
        root.handlers[:] = handlers
        root.setLevel(level)

    yield restore
    restore()


def make_settings(tmp_path: Path, database_url: str, **overrides: Any) -> Settings:
    values: dict[str, Any] = {
        "database_url": database_url,
        "data_dir": tmp_path / "var",
        "auth_disabled": True,
        "train_debounce_s": 0.0,
        "job_lease_s": 5.0,
        "job_heartbeat_s": 0.1,
        "worker_poll_s": 0.05,
        "device": "cpu",
    }
    values.update(overrides)
    return Settings(**values)


# --- the job loop (no model), on SQLite and PostgreSQL ---------------------------------------------


@pytest.fixture
def factory(migrated_db_url: str) -> sessionmaker[Session]:
    engine = make_engine(migrated_db_url)
    yield make_session_factory(engine)
    engine.dispose()


def enqueue(factory: sessionmaker[Session], kind: str, **kwargs: Any) -> int:
    with factory.begin() as session:
        return JobQueue(session).enqueue(kind=kind, **kwargs).id


def job_row(factory: sessionmaker[Session], job_id: int) -> dict[str, Any]:
    with factory() as session:
        job = JobQueue(session).get(job_id=job_id)
        return {
            c: getattr(job, c) for c in ("status", "attempts", "progress", "result", "error", "lease_owner")
        }


def test_job_loop_outcomes(tmp_path: Path, migrated_db_url: str, factory: sessionmaker[Session]) -> None:
    settings = make_settings(tmp_path, migrated_db_url)
    seen_progress: list[dict[str, Any] | None] = []

    def slow_ok(context: JobContext) -> JobOutcome:
        context.report_progress({"phase": "train", "step": 3, "total_steps": 9})
        time.sleep(settings.job_heartbeat_s * 4)
        seen_progress.append(job_row(factory, context.job_id)["progress"])

        def follow_up(session: Session) -> None:  # the job's dedupe key is free in this transaction
            JobQueue(session).enqueue(kind="ok", namespace="ns", dedupe_key="ok:ns", payload={"again": True})

        return JobOutcome({"value": context.payload["value"] * 2}, on_complete=follow_up)

    def retryable(context: JobContext) -> JobOutcome:
        raise JobFailed("store hiccup")

    def fatal(context: JobContext) -> JobOutcome:
        raise JobFailed("bad payload", retryable=False)

    def crashing(context: JobContext) -> JobOutcome:
        raise RuntimeError("handler bug")

    metrics = ServiceMetrics()
    handlers = {"ok": slow_ok, "retry": retryable, "fatal": fatal, "crash": crashing}
    worker = Worker(settings, factory, handlers, worker_id="w1", metrics=metrics)

    ok = enqueue(factory, "ok", namespace="ns", payload={"value": 21}, dedupe_key="ok:ns")
    assert worker.run_once()
    row = job_row(factory, ok)
    assert row["status"] == "succeeded" and row["result"] == {"value": 42}
    assert seen_progress[0] == {"phase": "train", "step": 3, "total_steps": 9}  # written by the heartbeat
    with factory() as session:
        follow = JobQueue(session).active_job(dedupe_key="ok:ns")
        assert follow is not None and follow.id != ok and follow.payload == {"again": True}
        JobQueue(session).cancel(job_id=follow.id)
        session.commit()

    once = enqueue(factory, "retry", max_attempts=2)
    assert worker.run_once()
    assert job_row(factory, once) | {"progress": None} == {
        "status": "queued",
        "attempts": 1,
        "progress": None,
        "result": None,
        "error": "store hiccup",
        "lease_owner": None,
    }
    with factory.begin() as session:  # skip the backoff
        JobQueue(session).get(job_id=once).run_after = JobQueue(session).get(job_id=once).created_at
    assert worker.run_once()
    assert job_row(factory, once)["status"] == "dead"

    no_retry = enqueue(factory, "fatal")
    bug = enqueue(factory, "crash", max_attempts=1)
    assert worker.run_once() and worker.run_once()
    assert job_row(factory, no_retry)["status"] == "failed"
    assert (
        job_row(factory, bug)["status"] == "dead"
        and "RuntimeError: handler bug" in job_row(factory, bug)["error"]
    )
    assert not worker.run_once()  # nothing due

    samples = {
        (s.labels["kind"], s.labels["status"]): s.value
        for s in metrics.job_duration.collect()[0].samples
        if s.name.endswith("_count")
    }
    assert (
        samples[("ok", "succeeded")] == 1
        and samples[("retry", "dead")] == 1
        and samples[("fatal", "failed")] == 1
    )


def test_expired_lease_is_rerun_and_lost_lease_stops_the_handler(
    tmp_path: Path, migrated_db_url: str, factory: sessionmaker[Session]
) -> None:
    settings = make_settings(tmp_path, migrated_db_url)
    runs: list[int] = []

    def record(context: JobContext) -> JobOutcome:
        runs.append(context.attempt)
        return JobOutcome({"attempt": context.attempt})

    crashed = enqueue(factory, "record")
    with factory.begin() as session:  # a worker that claimed the job, then died
        assert JobQueue(session).claim(worker_id="dead-worker", lease_s=0.01) is not None
    time.sleep(0.05)
    assert Worker(settings, factory, {"record": record}, worker_id="w2").run_once()
    assert runs == [2] and job_row(factory, crashed)["status"] == "succeeded"

    def until_stopped(context: JobContext) -> JobOutcome:
        while not context.should_stop():
            time.sleep(0.02)
        raise JobCancelled("lease lost")

    cancelled = enqueue(factory, "wait")
    worker = Worker(settings, factory, {"wait": until_stopped}, worker_id="w3")
    thread = threading.Thread(target=worker.run_once)
    thread.start()
    deadline = time.monotonic() + 10
    while job_row(factory, cancelled)["status"] != "running" and time.monotonic() < deadline:
        time.sleep(0.02)
    with factory.begin() as session:
        JobQueue(session).cancel(job_id=cancelled)
    thread.join(10)
    assert not thread.is_alive()
    assert job_row(factory, cancelled)["status"] == "cancelled"  # not overwritten by the worker


def test_graceful_stop_gives_the_job_back(
    tmp_path: Path, migrated_db_url: str, factory: sessionmaker[Session]
) -> None:
    settings = make_settings(tmp_path, migrated_db_url)
    started = threading.Event()

    def long_job(context: JobContext) -> JobOutcome:
        started.set()
        while not context.should_stop():
            time.sleep(0.02)
        raise JobCancelled("worker stopping")

    job_id = enqueue(factory, "long")
    worker = Worker(settings, factory, {"long": long_job}, worker_id="w4")
    worker.start()
    assert started.wait(10)
    worker.stop(timeout_s=10)
    row = job_row(factory, job_id)
    assert row["status"] == "queued" and row["lease_owner"] is None and "interrupted" in row["error"]


def test_warm_up_runs_before_the_first_claim_and_a_failing_one_does_not_stop_the_worker(
    tmp_path: Path, migrated_db_url: str, factory: sessionmaker[Session], caplog: pytest.LogCaptureFixture
) -> None:
    settings = make_settings(tmp_path, migrated_db_url)
    order: list[str] = []

    def warm() -> None:
        order.append("warm")

    def broken_warm() -> None:
        order.append("broken")
        raise RuntimeError("no model here")

    def record(context: JobContext) -> JobOutcome:
        order.append("job")
        return JobOutcome({})

    job_id = enqueue(factory, "record")
    worker = Worker(settings, factory, {"record": record}, worker_id="w5", warm_up=[broken_warm, warm])
    with caplog.at_level(logging.ERROR, logger="service.jobs.worker"):
        worker.start()
        deadline = time.monotonic() + 10
        while job_row(factory, job_id)["status"] != "succeeded" and time.monotonic() < deadline:
            time.sleep(0.02)
        worker.stop(timeout_s=10)
    assert order == ["broken", "warm", "job"]
    assert job_row(factory, job_id)["status"] == "succeeded"
    assert any("warm-up" in record.getMessage() and "broken_warm" in record.getMessage() for record in caplog.records)


# --- feedback -> train job -> served version (tiny model, SQLite) ---------------------------------

# The random-init tiny model's logits span about +-1.3 (tied 64-d embeddings, std 0.02), so no
# adapter lowers a continuation's NLL by more than a few % below ln|V|: the NLL gate only asks for
# "no worse" here (5% drop by default). Few steps keep each run short.
TINY_TRAINING: dict[str, Any] = {"max_steps": 4, "gate_min_nll_drop": 0.0}


@pytest.fixture
def pipeline(tmp_path: Path, tiny_model_dir: Path):
    """An API app (for POST /feedback and GET /adapters) and a factory to build workers."""

    def build(**overrides: Any) -> tuple[TestClient, Settings, Worker]:
        values = {**TINY_TRAINING, **overrides}
        settings = make_settings(
            tmp_path, f"sqlite:///{tmp_path / 'loraloop.db'}", base_model=tiny_model_dir, **values
        )
        client = TestClient(create_app(settings, start_background=False))
        client.__enter__()
        clients.append(client)
        factory = client.app.state.session_factory
        registry = AdapterRegistry.from_settings(settings, factory)
        worker = Worker(
            settings, factory, {"train": TrainJobHandler(settings, factory, registry)}, worker_id="t"
        )
        return client, settings, worker

    clients: list[TestClient] = []
    yield build
    for client in clients:
        client.__exit__(None, None, None)


def adapter_of(client: TestClient, name: str = "default") -> dict[str, Any]:
    (adapter,) = [a for a in client.get("/adapters").json()["adapters"] if a["name"] == name]
    return adapter


def first_job(client: TestClient, kind: str = "train") -> dict[str, Any]:
    return next(j for j in client.get("/jobs").json()["items"] if j["kind"] == kind)


def test_feedback_trains_a_new_current_version(pipeline) -> None:
    client, settings, worker = pipeline()
    conversation = [
        {"role": "user", "content": "Hello there"},
        {"role": "assistant", "content": "Hi! How can I help?"},
    ]
    assert (
        client.post("/conversations", json={"messages": conversation}).status_code == 201
    )  # the drift probe
    assert client.post("/feedback", json=FEEDBACK).status_code == 202
    factory = client.app.state.session_factory

    # feedback arriving while the run trains is deduplicated onto the running job: the run must
    # leave a follow-up job for it
    handler = worker.handlers["train"]
    late: list[int] = []

    def train_with_late_feedback(context: JobContext) -> JobOutcome:
        report = context.report_progress

        def report_and_post(progress: dict[str, Any]) -> None:
            if progress.get("phase") == "train" and not late:
                late.append(
                    client.post("/feedback", json={**FEEDBACK, "continuation": "Later."}).json()["id"]
                )
            report(progress)

        context.report_progress = report_and_post  # type: ignore[method-assign]
        return handler(context)

    worker.handlers["train"] = train_with_late_feedback
    started = time.perf_counter()
    assert worker.run_once()
    elapsed = time.perf_counter() - started

    job = first_job(client)
    assert job["status"] == "succeeded", job
    result = job["result"]
    assert result["outcome"] == "promoted" and result["version"] == 1 and result["new_items"] == 1
    assert result["probes"] == 1  # the stored conversation, not the built-in prompts
    print(f"\ntrain job on the tiny model: {elapsed:.2f}s; timings {json.dumps(result['timings'])}")

    adapter = adapter_of(client)
    assert adapter["current"] == 1
    v0, v1 = adapter["versions"]
    assert (v0["status"], v1["status"], v1["parent"]) == ("retired", "current", 0)
    metrics = v1["metrics"]
    assert metrics["nll_after"] < metrics["nll_before"]
    assert metrics["drift_kl"] >= 0 and metrics["train_tokens"] > 0 and metrics["train_seconds"] > 0

    store = AdapterStore(settings.adapters_dir)
    store.verify("default", 1, v1["sha256"])
    meta = store.read_metadata("default", 1)
    assert meta["parent_version"] == 0 and meta["base_model"] == str(settings.base_model)
    assert (
        meta["feedback_from_id"] == meta["feedback_to_id"] == 1
        and meta["training_run_id"] == result["training_run_id"]
    )

    with factory() as session:
        first, second = session.query(FeedbackItem).order_by(FeedbackItem.id).all()
        assert (first.status, first.trained_in_version) == ("trained", 1)
        assert second.status == "pending" and second.id == late[0]
        run = session.get(TrainingRun, result["training_run_id"])
        assert (run.status, run.version, run.parent_version) == ("succeeded", 1, 0)
        losses = run.metrics["loss_per_step"]  # the dashboard plots them
        assert run.metrics["gate"] == result["gate"] and result["gate"].startswith(
            "passed"
        )  # its gate column
        assert len(losses) == int(metrics["steps"]) and losses[-1] == pytest.approx(metrics["final_loss"])
        follow_up = JobQueue(session).active_job(dedupe_key="train:default")
        assert follow_up is not None and follow_up.payload["trigger"] == "follow-up"


def test_the_base_model_stays_loaded_and_every_version_carries_a_behaviour_report(pipeline) -> None:
    client, _settings, worker = pipeline()
    handler = worker.handlers["train"]
    for continuation in ("First lesson.", "Second lesson."):
        assert client.post("/feedback", json={**FEEDBACK, "continuation": continuation}).status_code == 202
        assert worker.run_once()
    assert handler.resident.loads == 1  # one load for both jobs
    jobs = [j for j in client.get("/jobs").json()["items"] if j["kind"] == "train"]
    assert [j["status"] for j in jobs] == ["succeeded", "succeeded"], jobs
    for job in jobs:
        version = job["result"]["version"]
        detail = client.get(f"/adapters/default/versions/{version}").json()
        report = detail["behaviour_report"]
        assert report["summary"]["taught_total"] == 1
        (taught,) = report["taught"]
        assert taught["question"] == FEEDBACK["messages"][0]["content"]
        assert {"parent", "candidate", "parent_right", "candidate_right"} <= set(taught)
        assert [row["question"] for row in report["general"]] == [p.question for p in general_probes()]
        assert detail["metrics"]["general_lost"] == report["summary"]["general_lost"]
    # the second version's report reuses the first's candidate answers as its parent answers
    first, second = (
        client.get(f"/adapters/default/versions/{j['result']['version']}").json()["behaviour_report"]
        for j in jobs
    )
    assert [r["parent"] for r in second["general"]] == [r["candidate"] for r in first["general"]]


def test_the_worker_of_serve_warms_the_base_so_the_first_update_finds_its_anchor_references(
    pipeline,
) -> None:
    """`build_worker` (what `serve` and `loraloop worker` run) loads the base model and its anchor
    references when it starts: the first update then loads nothing and computes no reference."""
    client, settings, _worker = pipeline()
    factory = client.app.state.session_factory
    worker = build_worker(settings, factory, AdapterRegistry.from_settings(settings, factory))
    (warm,) = worker.warm_up
    handler = warm.__self__
    assert not handler.resident.loaded
    warm()
    assert handler.resident.loaded and handler.resident.loads == 1
    assert client.post("/feedback", json=FEEDBACK).status_code == 202
    assert worker.run_once()
    job = first_job(client)
    assert job["status"] == "succeeded", job
    metrics = client.get(f"/adapters/default/versions/{job['result']['version']}").json()["metrics"]
    assert metrics["anchor_references_cached"] == 1.0
    assert handler.resident.loads == 1
    unwarmed = build_worker(settings.model_copy(update={"worker_warm_start": False}), factory,
                            AdapterRegistry.from_settings(settings, factory))
    assert unwarmed.warm_up == ()


def test_gate_rejects_a_run_trained_on_corrupted_labels(pipeline, monkeypatch: pytest.MonkeyPatch) -> None:
    """The trainer gets labels that are not the continuation's tokens (a labelling bug): the
    candidate does not lower the feedback NLL, so it is stored as rejected and never served."""
    import dataclasses
    import random

    from service.jobs import train as train_job
    from training.trainer import LoraTrainer

    class CorruptingTrainer(LoraTrainer):
        def train(self, *, examples, **kwargs):  # type: ignore[no-untyped-def]
            shuffle = random.Random(0)
            corrupted = [
                dataclasses.replace(
                    e, labels=[-100 if t == -100 else shuffle.randrange(1000, 100_000) for t in e.labels]
                )
                for e in examples
            ]
            return super().train(examples=corrupted, **kwargs)

    monkeypatch.setattr(train_job, "LoraTrainer", CorruptingTrainer)
    client, _settings, worker = pipeline()
    client.post("/feedback", json=FEEDBACK)
    assert worker.run_once()
    job = first_job(client)
    assert job["status"] == "succeeded" and job["result"]["outcome"] == "rejected", job
    adapter = adapter_of(client)
    assert adapter["current"] == 0
    v1 = adapter["versions"][1]
    assert v1["status"] == "rejected" and "feedback NLL did not drop enough" in v1["reason"], v1
    assert v1["metrics"]["nll_after"] > v1["metrics"]["nll_before"]
    with client.app.state.session_factory() as session:
        assert session.query(FeedbackItem).one().status == "pending"  # not in the served adapter
        assert session.query(TrainingRun).one().status == "rejected"
        with pytest.raises(Exception, match="cannot become current"):
            AdapterRepository(session).set_current(name="default", version=1)


def test_nan_divergence_fails_the_job_without_a_version(pipeline) -> None:
    client, settings, worker = pipeline(learning_rate=1e30)
    client.post("/feedback", json=FEEDBACK)
    assert worker.run_once()
    job = first_job(client)
    assert job["status"] == "failed" and "TrainingDiverged" in job["error"], job  # not retried
    adapter = adapter_of(client)
    assert adapter["current"] == 0 and [v["version"] for v in adapter["versions"]] == [0]
    assert AdapterStore(settings.adapters_dir).versions("default") == [0]
    with client.app.state.session_factory() as session:
        assert session.query(TrainingRun).one().status == "failed"
        assert session.query(FeedbackItem).one().status == "pending"


def test_unrenderable_and_empty_feedback_is_skipped(pipeline) -> None:
    client, _settings, worker = pipeline()
    factory = client.app.state.session_factory
    with factory.begin() as session:  # rows the API would refuse, as an older version may have stored them
        session.add(FeedbackItem(namespace="default", messages=FEEDBACK["messages"], continuation="   "))
        session.add(
            FeedbackItem(namespace="default", messages=FEEDBACK["messages"], target_index=0, continuation="x")
        )
        JobQueue(session).enqueue(kind="train", namespace="default", payload={"namespace": "default"})
    assert worker.run_once()
    job = first_job(client)
    assert job["status"] == "succeeded" and job["result"]["outcome"] == "nothing_to_train", job
    assert len(job["result"]["skipped"]) == 2
    with factory() as session:
        assert [i.status for i in session.query(FeedbackItem).all()] == ["skipped", "skipped"]
    assert adapter_of(client)["current"] == 0


# --- memories -> distill job -> served version, through the CLI (tiny model) ----------------------


@pytest.mark.slow
def test_distill_now_bakes_the_memories(
    pipeline, monkeypatch: pytest.MonkeyPatch, restore_logging: Callable[[], None]
) -> None:
    """`loraloop distill --namespace ops --now --wait` against a running worker: a new current
    version whose held-out gap closure passed the gate, and the memories marked baked in it."""
    from typer.testing import CliRunner

    from service.cli import app
    from service.wiring import job_handlers

    client, settings, worker = pipeline(
        distill_epochs=12,
        distill_learning_rate=3e-3,
        distill_max_new_tokens=12,
        distill_no_repeat_ngram_size=1,  # the random-init model's greedy answer is otherwise empty
        distill_method="kl",  # the KL pipeline's mechanics; baking by answers needs the real model
    )
    memory = {
        "namespace": "ops",
        "content": "The deploy password for project Kestrel is 7-4-1-9",
        "priority": 2,
    }
    assert client.post("/memories", json=memory).status_code == 201
    factory = client.app.state.session_factory
    worker.handlers = job_handlers(settings, factory, AdapterRegistry.from_settings(settings, factory))
    for name, value in settings.model_dump().items():
        if value is not None and not isinstance(value, list):
            monkeypatch.setenv(f"LORALOOP_{name.upper()}", str(value))
    worker.start()
    try:
        result = CliRunner().invoke(
            app, ["distill", "--namespace", "ops", "--now", "--wait", "--poll", "0.2"]
        )
    finally:
        restore_logging()
        worker.stop()
    assert result.exit_code == 0, result.output
    assert "succeeded (promoted) version v1" in result.output, result.output

    (adapter,) = [a for a in client.get("/adapters").json()["adapters"] if a["name"] == "ops"]
    assert adapter["current"] == 1
    metrics = adapter["versions"][1]["metrics"]
    assert (
        metrics["gap_closure"] >= settings.gate_min_gap_closure
        and metrics["drift_kl"] <= settings.gate_max_drift_kl
    )
    memories = client.get("/memories", params={"namespace": "ops", "state": "baked"}).json()["items"]
    assert [(m["content"], m["baked_in_version"]) for m in memories] == [(memory["content"], 1)]
    assert client.get("/memories", params={"namespace": "ops", "state": "active"}).json()["items"] == []
    with factory() as session:
        (run,) = session.query(TrainingRun).filter_by(namespace="ops", kind="distill").all()
        losses = run.metrics["loss_per_step"]  # the dashboard plots them
        assert losses and all(isinstance(value, float) for value in losses)


@pytest.mark.slow
def test_bake_replays_baked_memories_but_never_a_retired_one(
    pipeline, monkeypatch: pytest.MonkeyPatch, restore_logging: Callable[[], None]
) -> None:
    """The bake path (the default) through the CLI: it bakes the active memory, replays the one
    baked earlier and leaves out the baked memory deleted since; the version (promoted or not: the
    random tiny model says nothing about learning) carries its behaviour report (teacher, parent,
    candidate answers) and the answer metrics."""
    from typer.testing import CliRunner

    from memory_store.repositories import MemoryRepository
    from service.cli import app
    from service.wiring import job_handlers

    client, settings, worker = pipeline(
        gate_min_answer_agreement=0.0,
        gate_min_gap_closure=0.0,
        gate_max_drift_kl=1e6,
        gate_max_general_lost=100,
        distill_answer_tokens=8,
    )
    assert settings.distill_method == "bake"
    kept = {"namespace": "ops", "content": "Our production region is eu-north-7"}
    retired = {"namespace": "ops", "content": "The codename of the spring launch is Marigold"}
    earlier = [client.post("/memories", json=body).json()["id"] for body in (kept, retired)]
    factory = client.app.state.session_factory
    with factory.begin() as session:  # both baked by an earlier run, then one deleted
        assert MemoryRepository(session).mark_baked(ids=earlier, version=0) == 2
    assert client.delete(f"/memories/{earlier[1]}").status_code == 200
    added = {"namespace": "ops", "content": "The Lisbon office Wi-Fi password is tangerine42"}
    added_id = client.post("/memories", json=added).json()["id"]
    worker.handlers = job_handlers(settings, factory, AdapterRegistry.from_settings(settings, factory))
    for name, value in settings.model_dump().items():
        if value is not None and not isinstance(value, list):
            monkeypatch.setenv(f"LORALOOP_{name.upper()}", str(value))
    worker.start()
    try:
        result = CliRunner().invoke(
            app, ["distill", "--namespace", "ops", "--now", "--wait", "--poll", "0.2"]
        )
    finally:
        restore_logging()
        worker.stop()
    assert "job 1 succeeded" in result.output and "version v1" in result.output, result.output

    metadata = AdapterRegistry.from_settings(settings, factory).store.read_metadata("ops", 1)
    assert metadata["memory_ids"] == [added_id] and metadata["method"] == "bake"
    report = metadata["behaviour_report"]
    assert {row["memory_text"] for row in report["taught"]} == {added["content"]}
    assert all(retired["content"] not in row["question"] for row in report["taught"])
    for row in report["taught"]:
        assert {"teacher", "parent", "candidate", "candidate_right", "keys"} <= set(row)
        assert row["keys"] == ["tangerine42"]
    assert report["general"], "general probes asked of parent and candidate"
    metrics = metadata["metrics"]
    assert metrics["replay_memories"] == 1.0  # the kept one; the retired one is not re-taught
    for key in ("answer_agreement", "gap_closure", "drift_kl", "general_lost", "steps"):
        assert math.isfinite(metrics[key]), key
    assert 0 < metrics["teacher_cache_bytes"] < 20e6
    with factory() as session:
        (run,) = session.query(TrainingRun).filter_by(namespace="ops", kind="distill").all()
        assert len(run.metrics["loss_per_step"]) == int(metrics["steps"])  # the dashboard plots them


@pytest.mark.parametrize(
    ("outcome", "exit_code"), [("promoted", 0), ("rejected", 1), ("nothing_to_train", 0)]
)
def test_train_cli_waits_for_the_outcome(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    restore_logging: Callable[[], None],
    outcome: str,
    exit_code: int,
) -> None:
    from typer.testing import CliRunner

    from memory_store.db import upgrade_database
    from service.cli import app

    url = f"sqlite:///{tmp_path / 'cli.db'}"
    upgrade_database(url)
    settings = make_settings(tmp_path, url)
    engine = make_engine(url)

    def stub(context: JobContext) -> JobOutcome:
        context.report_progress({"phase": "train", "step": 1, "total_steps": 2, "loss": 1.0})
        time.sleep(0.3)
        version = None if outcome == "nothing_to_train" else 1
        return JobOutcome({"outcome": outcome, "version": version, "gate": "numbers"})

    worker = Worker(settings, make_session_factory(engine), {"train": stub})
    for name in ("database_url", "data_dir", "auth_disabled"):
        monkeypatch.setenv(f"LORALOOP_{name.upper()}", str(getattr(settings, name)))
    worker.start()
    try:
        result = CliRunner().invoke(app, ["train", "--namespace", "ns", "--wait", "--poll", "0.1"])
    finally:
        restore_logging()
        worker.stop()
        engine.dispose()
    assert result.exit_code == exit_code, result.output
    assert f"job 1 succeeded ({outcome})" in result.output
