"""A real `loraloop serve` process on loopback: basic routes, and SIGKILL during ingestion.

The crash test streams feedback with idempotency keys from several client threads, kills the
server with SIGKILL mid-stream, restarts it on the same database, replays every key, and checks
that every item that got a 2xx is stored exactly once (and that replays created no duplicates).
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import sqlalchemy as sa

from memory_store.db import make_engine

pytestmark = [pytest.mark.integration, pytest.mark.slow]

TOKEN = "crash-test-token"
HEADERS = {"Authorization": f"Bearer {TOKEN}"}
REPO_ROOT = Path(__file__).resolve().parents[2]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class ServerProcess:
    """`python -m service.cli serve` in its own process group, logs to a file."""

    def __init__(self, db_url: str, data_dir: Path, port: int) -> None:
        self.url = f"http://127.0.0.1:{port}"
        self.port = port
        self.log_path = data_dir / f"server-{port}.log"
        self.env = {
            **os.environ,
            "OMP_NUM_THREADS": "1",
            "LORALOOP_DATABASE_URL": db_url,
            "LORALOOP_DATA_DIR": str(data_dir),
            "LORALOOP_AUTH_TOKENS": f"{TOKEN}=feedback:write feedback:read",
            "LORALOOP_TOKENIZER": str(data_dir / "no-tokenizer"),
            "LORALOOP_LOG_LEVEL": "WARNING",
            "LORALOOP_TRAIN_DEBOUNCE_S": "3600",
            "LORALOOP_WORKER_ENABLED": "false",  # ingestion under test; no tokenizer, so no worker
        }
        self.process: subprocess.Popen[bytes] | None = None

    def start(self, timeout_s: float = 60.0) -> None:
        with self.log_path.open("ab") as log:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "service.cli", "serve", "--port", str(self.port)],
                cwd=REPO_ROOT,
                env=self.env,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise AssertionError(f"server exited early:\n{self.log_path.read_text()[-3000:]}")
            try:
                if httpx.get(f"{self.url}/readyz", timeout=1).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.1)
        raise AssertionError(f"server not ready after {timeout_s}s:\n{self.log_path.read_text()[-3000:]}")

    def kill(self) -> None:
        assert self.process is not None
        os.killpg(self.process.pid, signal.SIGKILL)
        self.process.wait(timeout=30)

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.kill()


@pytest.fixture
def server_factory(tmp_path: Path) -> Iterator[list[ServerProcess]]:
    started: list[ServerProcess] = []
    yield started
    for server in started:
        server.stop()


def feedback_body(key: str) -> dict[str, object]:
    return {
        "messages": [
            {"role": "user", "content": f"question {key}"},
            {"role": "assistant", "content": "draft"},
        ],
        "continuation": f"answer for {key}",
        "namespace": "crash",
    }


def stored_keys(db_url: str) -> list[str]:
    engine = make_engine(db_url)
    try:
        with engine.connect() as connection:
            rows = connection.execute(
                sa.text("SELECT idempotency_key FROM feedback_items WHERE namespace = 'crash'")
            ).all()
    finally:
        engine.dispose()
    return [row[0] for row in rows]


def test_sigkill_during_ingestion_loses_and_duplicates_nothing(
    db_url: str, tmp_path: Path, server_factory: list[ServerProcess]
) -> None:
    port = free_port()
    server = ServerProcess(db_url, tmp_path, port)
    server_factory.append(server)
    server.start()

    acknowledged: set[str] = set()
    attempted: list[str] = []
    lock = threading.Lock()
    stop = threading.Event()

    def stream(worker: int) -> None:
        with httpx.Client(base_url=server.url, headers=HEADERS, timeout=5) as client:
            sequence = 0
            while not stop.is_set():
                key = f"w{worker}-{sequence}"
                sequence += 1
                with lock:
                    attempted.append(key)
                try:
                    response = client.post(
                        "/feedback", json=feedback_body(key), headers={"Idempotency-Key": key}
                    )
                except httpx.TransportError:
                    time.sleep(0.02)
                    continue
                if 200 <= response.status_code < 300:
                    with lock:
                        acknowledged.add(key)

    threads = [threading.Thread(target=stream, args=(worker,)) for worker in range(4)]
    for thread in threads:
        thread.start()
    deadline = time.monotonic() + 30
    while len(acknowledged) < 150 and time.monotonic() < deadline:
        time.sleep(0.05)
    server.kill()  # SIGKILL while the clients are still sending
    time.sleep(0.3)
    stop.set()
    for thread in threads:
        thread.join(timeout=30)
    assert len(acknowledged) >= 150, "the server acknowledged too little before the kill"

    keys = stored_keys(db_url)
    assert len(keys) == len(set(keys)), "an idempotency key is stored twice"
    assert acknowledged <= set(keys), f"acknowledged but lost: {sorted(acknowledged - set(keys))[:10]}"

    # restart on the same database and replay every key: nothing new for stored ones, no duplicates
    restarted = ServerProcess(db_url, tmp_path, free_port())
    server_factory.append(restarted)
    restarted.start()
    with httpx.Client(base_url=restarted.url, headers=HEADERS, timeout=10) as client:
        ids_by_key = {}
        for key in attempted:
            response = client.post("/feedback", json=feedback_body(key), headers={"Idempotency-Key": key})
            assert response.status_code == 202, response.text
            ids_by_key[key] = response.json()["id"]
        listed = []
        cursor = None
        while True:
            params: dict[str, object] = {"namespace": "crash", "limit": 500}
            if cursor is not None:
                params["cursor"] = cursor
            page = client.get("/feedback", params=params).json()
            listed.extend(page["items"])
            cursor = page["next_cursor"]
            if cursor is None:
                break
    keys = stored_keys(db_url)
    assert sorted(keys) == sorted(set(attempted))
    assert len({row["id"] for row in listed}) == len(set(attempted)) == len(set(ids_by_key.values()))
    continuations = [row["continuation"] for row in listed]
    assert sorted(continuations) == sorted(f"answer for {key}" for key in set(attempted))


def test_real_process_serves_basic_routes(tmp_path: Path, server_factory: list[ServerProcess]) -> None:
    server = ServerProcess(f"sqlite:///{tmp_path / 'basic.db'}", tmp_path, free_port())
    server_factory.append(server)
    server.start()
    with httpx.Client(base_url=server.url, timeout=10) as client:
        assert client.get("/healthz").json()["status"] == "ok"
        assert client.post("/feedback", json=feedback_body("x")).status_code == 401
        accepted = client.post("/feedback", json=feedback_body("x"), headers=HEADERS)
        assert accepted.status_code == 202
        feedback_id = accepted.json()["id"]
        assert (
            client.get(f"/feedback/{feedback_id}", headers=HEADERS).json()["continuation"] == "answer for x"
        )
        bad = client.post("/feedback", json={**feedback_body("y"), "target_index": 0}, headers=HEADERS)
        assert bad.status_code == 422 and bad.json()["error"]["field"] == "target_index"
        assert client.get("/adapters", headers=HEADERS).status_code == 403
        metrics = client.get("/metrics").text
        assert 'loraloop_http_requests_total{method="POST",route="/feedback",status="202"} 1.0' in metrics
