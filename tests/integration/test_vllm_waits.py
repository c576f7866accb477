"""No feedback is stranded by a vLLM that is not up: a gated candidate waits (no attempt spent) and
is promoted once a replica answers; a dead train job is re-queued once the cause is gone; a
namespace is served by its v0 from its first request; `/readyz` is red until vLLM serves.
Real SQL store, the tiny model, a real HTTP fake of vLLM that starts late."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi.testclient import TestClient
from sqlalchemy.orm import Session, sessionmaker

from memory_store.db import make_engine, make_session_factory
from memory_store.models import TrainingRun, utcnow
from memory_store.queue import JobQueue
from memory_store.repositories import AdapterRepository, FeedbackRepository
from service.adapters.registry import AdapterRegistry, build_hot_swapper
from service.app import create_app
from service.config import Settings
from service.ingest.intake import requeue_stranded, wake_waiting
from service.jobs.train import TrainJobHandler
from service.jobs.worker import Worker
from service.wiring import background_services
from tests.integration.test_uvicorn_crash import free_port
from tests.integration.test_worker_pipeline import FEEDBACK, TINY_TRAINING, make_settings
from tests.unit.fake_vllm import FakeVllm

pytestmark = pytest.mark.integration


@pytest.fixture
def late_vllm() -> Iterator[Callable[[], FakeVllm]]:
    """A port no vLLM answers yet; calling the fixture starts the fake vLLM on it."""
    port = free_port()
    started: list[FakeVllm] = []

    def start() -> FakeVllm:
        fake = FakeVllm(port=port).__enter__()
        started.append(fake)
        return fake

    start.url = f"http://127.0.0.1:{port}"  # type: ignore[attr-defined]
    yield start
    for fake in started:
        fake.__exit__(None, None, None)


def vllm_settings(tmp_path: Path, tiny_model_dir: Path, url: str, **overrides: Any) -> Settings:
    return make_settings(
        tmp_path,
        f"sqlite:///{tmp_path / 'loraloop.db'}",
        base_model=tiny_model_dir,
        vllm_urls=[url],
        vllm_retries=0,
        vllm_timeout_s=2.0,
        swap_drain_s=0.0,
        **{**TINY_TRAINING, **overrides},
    )


def make_due(factory: sessionmaker[Session], job_id: int) -> None:
    with factory.begin() as session:
        assert JobQueue(session).reschedule(job_id=job_id, run_after=utcnow() - timedelta(seconds=1))


def the_job(client: TestClient) -> dict[str, Any]:
    (job,) = [j for j in client.get("/jobs").json()["items"] if j["kind"] == "train"]
    return job


def test_a_candidate_waits_for_vllm_without_spending_attempts_and_is_promoted_when_it_answers(
    tmp_path: Path, tiny_model_dir: Path, late_vllm
) -> None:
    settings = vllm_settings(tmp_path, tiny_model_dir, late_vllm.url, job_max_attempts=2)
    with TestClient(create_app(settings, start_background=False)) as client:
        factory = client.app.state.session_factory
        registry = AdapterRegistry.from_settings(settings, factory, build_hot_swapper(settings))
        worker = Worker(
            settings, factory, {"train": TrainJobHandler(settings, factory, registry)}, worker_id="w"
        )
        feedback_id = client.post("/feedback", json=FEEDBACK).json()["id"]

        assert worker.run_once()  # trains v1 from an unserved v0; no replica answers the promotion
        job = the_job(client)
        assert (job["status"], job["attempts"]) == ("queued", 0), job
        assert job["progress"]["waiting_for"] == "vllm" and job["payload"]["promote"]["version"] == 1
        assert "passed the gate and waits for vLLM" in job["error"]
        item = client.get(f"/feedback/{feedback_id}").json()
        assert item["status"] == "pending" and item["job_id"] == job["id"]
        assert item["waiting_for"].startswith("vllm: v1 passed the gate"), item
        versions = {
            v["version"]: v["status"] for v in client.get("/adapters/default/versions").json()["versions"]
        }
        assert versions == {0: "candidate", 1: "candidate"}

        for _ in range(3):  # more waits than max_attempts: still waiting, never dead
            make_due(factory, job["id"])
            assert worker.run_once()
        job = the_job(client)
        assert (job["status"], job["attempts"], job["payload"]["promote"]["waits"]) == ("queued", 0, 4)

        fake = late_vllm()
        with factory.begin() as session:  # what the reconciler does once every replica answers
            assert wake_waiting(session) == [job["id"]]
        assert worker.run_once()
        job = the_job(client)
        assert (job["status"], job["result"]["outcome"], job["result"]["version"]) == (
            "succeeded",
            "promoted",
            1,
        )
        assert client.get("/adapters/default/current").json()["version"] == 1
        assert "default-v1" in fake.state.adapters
        item = client.get(f"/feedback/{feedback_id}").json()
        assert (item["status"], item["trained_in_version"], item["waiting_for"]) == ("trained", 1, None)
        with factory() as session:  # trained once: the waits only retried the promotion
            runs = session.query(TrainingRun).all()
            assert [(run.status, run.version) for run in runs] == [("succeeded", 1)]


@pytest.fixture
def factory(migrated_db_url: str) -> Iterator[sessionmaker[Session]]:
    engine = make_engine(migrated_db_url)
    yield make_session_factory(engine)
    engine.dispose()


def dead_train_job(factory: sessionmaker[Session], namespace: str) -> int:
    with factory.begin() as session:
        queue = JobQueue(session, default_max_attempts=1)
        job = queue.enqueue(
            kind="train",
            namespace=namespace,
            payload={"namespace": namespace},
            dedupe_key=f"train:{namespace}",
        )
        queue.claim(worker_id="w", kinds=["train"])
        queue.fail(job_id=job.id, worker_id="w", error="hot-swap failed: connection refused")
        return job.id


def test_a_dead_train_job_with_pending_feedback_is_requeued_once(
    tmp_path: Path, factory: sessionmaker[Session], migrated_db_url: str
) -> None:
    settings = make_settings(tmp_path, migrated_db_url)
    with factory.begin() as session:
        FeedbackRepository(session).add(
            namespace="stranded", messages=FEEDBACK["messages"], continuation=FEEDBACK["continuation"]
        )
    dead = dead_train_job(factory, "stranded")
    dead_train_job(factory, "nothing-pending")
    with factory.begin() as session:
        assert requeue_stranded(session, settings, cooldown_s=3600) == []  # died just now: cool-down
    with factory.begin() as session:
        assert requeue_stranded(session, settings, cooldown_s=0) == ["stranded"]
    with factory.begin() as session:
        assert requeue_stranded(session, settings, cooldown_s=0) == []  # a queued job holds it now
        jobs = JobQueue(session).list(namespace="stranded", kind="train")
        assert [(job.status, job.payload.get("requeued_from_job")) for job in jobs] == [
            ("dead", None),
            ("queued", dead),
        ]


def test_a_namespace_is_served_by_its_v0_from_its_first_request(
    tmp_path: Path, tiny_model_dir: Path, late_vllm
) -> None:
    settings = vllm_settings(
        tmp_path, tiny_model_dir, late_vllm.url, auth_tokens="t=inference", auth_disabled=False
    )
    chat = {"model": "acme", "messages": [{"role": "user", "content": "hello"}]}
    with TestClient(create_app(settings, start_background=False)) as client:
        assert client.post("/v1/chat/completions", json=chat).status_code == 401  # same auth as any alias
        auth = {"Authorization": "Bearer t"}
        down = client.post("/v1/chat/completions", json=chat, headers=auth)
        assert down.status_code == 503 and down.json()["error"]["type"] == "model_not_ready", down.text
        assert int(down.headers["Retry-After"]) > 0
        fake = late_vllm()
        up = client.post("/v1/chat/completions", json=chat, headers=auth)
        assert up.status_code == 200, up.text
        assert up.headers["X-Loraloop-Served-Model"] == "acme-v0"
        assert up.json()["choices"][0]["message"]["content"] == "answer from acme-v0"
        assert "acme-v0" in fake.state.adapters
        with client.app.state.session_factory() as session:
            assert AdapterRepository(session).current(name="acme").version == 0


def test_readyz_is_red_until_every_replica_serves_the_current_versions(
    tmp_path: Path, tiny_model_dir: Path, late_vllm
) -> None:
    settings = vllm_settings(
        tmp_path,
        tiny_model_dir,
        late_vllm.url,
        worker_enabled=False,
        distill_enabled=False,
        reconcile_interval_s=0.3,
    )
    with TestClient(create_app(settings, background=background_services(settings))) as client:
        deadline = time.monotonic() + 30
        while "unreachable" not in (
            (body := client.get("/readyz").json())["components"]["vllm"]["detail"] or ""
        ):
            assert time.monotonic() < deadline, body
            time.sleep(0.1)
        assert body["status"] == "unavailable" and client.get("/readyz").status_code == 503
        fake = late_vllm()
        deadline = time.monotonic() + 30
        while (response := client.get("/readyz")).status_code != 200:
            assert time.monotonic() < deadline, response.text
            time.sleep(0.1)
        assert response.json()["components"]["vllm"]["status"] == "ok"
        assert "default-v0" in fake.state.adapters  # the reconciler loaded the default namespace's v0
        assert httpx.get(fake.url + "/health").status_code == 200
