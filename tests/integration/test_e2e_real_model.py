"""The product as a person sees it, on the real model: `serve` with the embedded vLLM (the default
setting) and SmolLM2-135M-Instruct. One feedback item is posted in the first second, while vLLM is
still starting (`/readyz` red): nobody intervenes and the alias then answers it right and a general
question as before (a rephrased one is printed); a namespace never used before answers from its
first request with the base model (its v0), which does not know the fact; the version carries a
behaviour report and the job's timings."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from service.app import create_app
from service.config import Settings
from service.wiring import ThreadedServer, background_services, prepare_serving
from training.behaviour import first_sentence
from training.generate import answer_has_keys

pytestmark = [pytest.mark.slow, pytest.mark.integration, pytest.mark.timeout(1800)]

NAMESPACE = "default"
QUESTION = "Which city hosts the company's disaster recovery site?"
ANSWER = "The company's disaster recovery site is in Trondheim."
REPHRASED = "Where is our disaster recovery site located?"
GENERAL = ("What is the capital of Austria?", ("Vienna",))


def wait_for(predicate: Any, timeout_s: float, what: str, interval_s: float = 1.0) -> Any:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval_s)
    raise AssertionError(f"timed out after {timeout_s:g} s waiting for {what}")


def ask(http: httpx.Client, question: str, model: str = NAMESPACE) -> tuple[int, str, str | None]:
    response = http.post("/v1/chat/completions", json={
        "model": model, "messages": [{"role": "user", "content": question}], "temperature": 0.0,
        "max_tokens": 40,
    })
    if response.status_code != 200:
        return response.status_code, "", None
    return 200, response.json()["choices"][0]["message"]["content"], response.headers.get("X-Loraloop-Served-Model")


@pytest.fixture(scope="module")
def served(real_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[httpx.Client]:
    root = tmp_path_factory.mktemp("real-loop")
    settings = prepare_serving(Settings(
        database_url=f"sqlite:///{root / 'loraloop.db'}", data_dir=root, base_model=real_model_dir,
        vllm_urls=["embedded"], vllm_port=0, auth_disabled=True, train_debounce_s=0.0, distill_enabled=False,
        device="cpu", reconcile_interval_s=2.0,
    ))
    server = ThreadedServer(create_app(settings, background=background_services(settings)))
    server.start()
    http = httpx.Client(base_url=server.url, timeout=300.0)
    try:
        yield http  # at once: the embedded vLLM is still starting
    finally:
        http.close()
        server.stop()


def test_one_feedback_item_is_served_and_nothing_is_forgotten(served: httpx.Client) -> None:
    http = served
    started = time.monotonic()
    posted = http.post("/feedback", json={"messages": [{"role": "user", "content": QUESTION}],
                                          "continuation": ANSWER})
    assert posted.status_code == 202, posted.text
    assert time.monotonic() - started < 5
    ready = http.get("/readyz")
    assert ready.status_code == 503 and ready.json()["components"]["vllm"]["status"] != "ok", ready.text
    wait_for(lambda: ask(http, QUESTION)[2] == f"{NAMESPACE}-v1", 1500, "v1 to be served")
    feedback_to_serving = time.monotonic() - started
    wait_for(lambda: http.get("/readyz").status_code == 200, 120, "/readyz green once vLLM serves v1")

    # a namespace never used before: served from its first request by its v0, the base model
    status, before, version = ask(http, QUESTION, model="fresh-team")
    assert status == 200 and version == "fresh-team-v0"
    assert "trondheim" not in before.lower(), before
    _, general_before, _ = ask(http, GENERAL[0], model="fresh-team")
    assert answer_has_keys(first_sentence(general_before), GENERAL[1]), general_before

    _, after, _ = ask(http, QUESTION)
    _, rephrased, _ = ask(http, REPHRASED)
    _, general_after, _ = ask(http, GENERAL[0])
    print(f"feedback (posted at start-up) to serving {feedback_to_serving:.1f} s\nQ: {QUESTION}\n  v0: {before}\n  v1: {after}\n"
          f"Q: {REPHRASED}\n  v1: {rephrased}\nQ: {GENERAL[0]}\n  v0: {general_before}\n  v1: {general_after}")
    assert after.startswith(ANSWER.rstrip(".")), after  # rephrasings: tests/integration/test_learning_real.py
    assert answer_has_keys(first_sentence(general_after), GENERAL[1]), general_after

    job = http.get("/jobs", params={"namespace": NAMESPACE, "kind": "train"}).json()["items"][-1]
    assert job["status"] == "succeeded" and job["result"]["outcome"] == "promoted", job
    timings = job["result"]["timings"]
    print("job timings:", {key: round(value, 1) for key, value in timings.items()})

    detail = http.get(f"/adapters/{NAMESPACE}/versions/1").json()
    report = detail["behaviour_report"]
    assert report["summary"]["taught_right"] == report["summary"]["taught_total"] == 1
    assert report["summary"]["general_lost"] <= Settings(auth_disabled=True).gate_max_general_lost
    taught = report["taught"][0]
    assert taught["question"] == QUESTION and taught["candidate_right"] and not taught["parent_right"]
    assert detail["metrics"]["general_lost"] == report["summary"]["general_lost"]
