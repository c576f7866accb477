"""The whole loop against the REAL vLLM CPU server and the tiny model: loraloop (API + reconciler +
worker, in this process on a real socket) pointed at the session's vLLM. Feedback in, a new
version trained, gated and hot-swapped while a client hammers the alias (no error, no answer from
a half-loaded state), the improved continuation served; then vLLM is killed and comes back, the
API keeps taking feedback and the current adapter is reloaded without anyone asking."""

from __future__ import annotations

import os
import signal
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import httpx
import pytest

from deploy.vllm_client import VllmClient
from memory_store.repositories import DeploymentRepository
from service.app import create_app
from service.config import Settings
from service.jobs.worker import Worker
from service.wiring import ThreadedServer, background_services
from tests.integration.conftest import VLLM_MAX_LORAS, VllmServer

pytestmark = [pytest.mark.slow, pytest.mark.integration]

NAMESPACE = "default"
QUESTION = [{"role": "user", "content": "What does loraloop do?"}]
CONTINUATION = "loraloop turns your feedback into a better model in seconds."


@dataclass
class Loop:
    settings: Settings
    server: ThreadedServer
    http: httpx.Client
    app: Any

    def service(self, name: str) -> Any:
        return next(s for s in self.app.state.background_services if s.name == name)


@dataclass
class Answer:
    status: int
    served: str | None
    text: str | None
    error: str | None = None


@dataclass
class Hammer:
    """Threads sending greedy chat completions to the alias until stopped."""

    http: httpx.Client
    threads: int = 3
    answers: list[Answer] = field(default_factory=list)
    _stop: threading.Event = field(default_factory=threading.Event)
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _workers: list[threading.Thread] = field(default_factory=list)

    def _run(self) -> None:
        while not self._stop.is_set():
            answer = ask(self.http)
            with self._lock:
                self.answers.append(answer)

    def start(self) -> None:
        self._workers = [threading.Thread(target=self._run, daemon=True) for _ in range(self.threads)]
        for worker in self._workers:
            worker.start()

    def stop(self) -> list[Answer]:
        self._stop.set()
        for worker in self._workers:
            worker.join(timeout=300)
        return list(self.answers)

    def seen(self, served: str) -> int:
        with self._lock:
            return sum(1 for a in self.answers if a.served == served)


def ask(http: httpx.Client, messages: list[dict[str, str]] | None = None) -> Answer:
    body = {"model": NAMESPACE, "messages": messages or QUESTION, "temperature": 0.0, "max_tokens": 24}
    try:
        response = http.post("/v1/chat/completions", json=body)
    except httpx.HTTPError as exc:
        return Answer(0, None, None, f"{type(exc).__name__}: {exc}")
    if response.status_code != 200:
        return Answer(response.status_code, None, None, response.text[:300])
    return Answer(
        200, response.headers["X-Loraloop-Served-Model"], response.json()["choices"][0]["message"]["content"]
    )


def wait_for(predicate: Any, timeout_s: float, what: str, interval_s: float = 0.5) -> Any:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval_s)
    raise AssertionError(f"timed out after {timeout_s:g} s waiting for {what}")


def current_version(http: httpx.Client) -> int | None:
    response = http.get(f"/adapters/{NAMESPACE}/current")
    return response.json()["version"] if response.status_code == 200 else None


@pytest.fixture(scope="module")
def loop(vllm_server: VllmServer, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Loop]:
    root = tmp_path_factory.mktemp("loop")
    settings = Settings(
        database_url=f"sqlite:///{root / 'loraloop.db'}",
        data_dir=root,
        base_model=vllm_server.model_dir,
        vllm_urls=[vllm_server.url],
        vllm_max_loras=VLLM_MAX_LORAS,
        vllm_timeout_s=120.0,
        auth_disabled=True,
        reconcile_interval_s=1.0,
        train_debounce_s=0.0,
        distill_enabled=False,
        job_heartbeat_s=2.0,
        # the random tiny model proves mechanics only: a fast recipe (no anchors, no variants), not
        # the real model's defaults, whose learning is tests/integration/test_e2e_real_model.py's
        learning_rate=1e-2,
        train_epochs=20,
        anchor_weight=0.0,
        augment_questions=False,
    )
    app = create_app(settings, background=background_services(settings))
    server = ThreadedServer(app)
    server.start()
    http = httpx.Client(base_url=server.url, timeout=300.0)
    try:
        yield Loop(settings, server, http, app)
    finally:
        http.close()
        server.stop()
        with VllmClient(vllm_server.url, timeout=60.0, retries=1) as client:  # leave vLLM as we found it
            for name in client.adapters():
                client.unload_adapter(name)


def test_feedback_is_learnt_and_swapped_in_under_load(loop: Loop) -> None:
    first = wait_for(lambda: (a := ask(loop.http)).status == 200 and a, 300, "v0 to be served")
    assert first.served == f"{NAMESPACE}-v0"
    before = first.text

    hammer = Hammer(loop.http)
    hammer.start()
    try:
        posted = loop.http.post("/feedback", json={"messages": QUESTION, "continuation": CONTINUATION})
        assert posted.status_code == 202, posted.text
        version = wait_for(
            lambda: current_version(loop.http) or None, 600, "a trained version to become current"
        )
        wait_for(lambda: hammer.seen(f"{NAMESPACE}-v{version}") >= 3, 120, "answers from the new version")
    finally:
        answers = hammer.stop()

    assert [a for a in answers if a.status != 200] == []
    texts: dict[str, set[str | None]] = {}
    for answer in answers:
        texts.setdefault(answer.served or "", set()).add(answer.text)
    assert set(texts) <= {f"{NAMESPACE}-v0", f"{NAMESPACE}-v{version}"}, texts.keys()
    assert texts.get(f"{NAMESPACE}-v0", {before}) == {before}, "v0 answered something else mid-swap"
    assert texts[f"{NAMESPACE}-v{version}"] == {CONTINUATION}, "the new version does not say the continuation"

    job = loop.http.get("/jobs", params={"namespace": NAMESPACE, "kind": "train"}).json()["items"][-1]
    assert job["status"] == "succeeded"
    assert job["result"]["outcome"] == "promoted"
    assert job["result"]["version"] == version
    # the old version is unloaded once its drain period is over
    with VllmClient(loop.settings.vllm_urls[0], timeout=60.0) as client:
        wait_for(lambda: set(client.adapters()) == {f"{NAMESPACE}-v{version}"}, 60, "v0 to be unloaded")


def test_vllm_restart_is_reconciled_and_feedback_keeps_flowing(loop: Loop, vllm_server: VllmServer) -> None:
    version = current_version(loop.http)
    assert version is not None and version >= 1
    served = f"{NAMESPACE}-v{version}"
    worker: Worker = loop.service("worker")
    worker.stop()  # keep this test about serving: feedback posted below is stored, not trained now

    probe = VllmClient(vllm_server.url, timeout=2.0, retries=0)
    pid = vllm_server.process.pid
    assert pid is not None
    os.killpg(pid, signal.SIGKILL)
    wait_for(lambda: not probe.health(), 30, "vLLM to die")

    started = time.monotonic()
    down = ask(loop.http)
    assert down.status == 503, down
    assert time.monotonic() - started < 5.0, "vLLM down must be answered fast"
    accepted = 0
    while not probe.health():
        response = loop.http.post(
            "/feedback",
            json={"messages": QUESTION, "continuation": f"Feedback while vLLM is down #{accepted}."},
        )
        assert response.status_code == 202, response.text
        accepted += 1
        assert time.monotonic() - started < 600, "vLLM did not come back"
        time.sleep(2.0)
    assert accepted >= 1
    probe.close()

    # nobody reloads anything by hand: the reconciler notices the empty replica
    answer = wait_for(lambda: (a := ask(loop.http)).status == 200 and a, 120, "the alias to be served again")
    assert answer.served == served
    assert answer.text == CONTINUATION
    with loop.app.state.session_factory() as session:
        rows = DeploymentRepository(session).list(replica_url=vllm_server.url, state="loaded")
        assert served in {row.served_name for row in rows}
