"""A real `loraloop serve` with the embedded real vLLM (CPU build): the vLLM never outlives loraloop,
and loraloop never adopts a server it did not start.

- SIGKILL of `serve` (only that process, as an OOM kill would): every process of its vLLM (guard,
  API server, engine core, resource tracker: all carry the instance id in their environment) is
  gone within 10 s; the next `serve` on the same data folder starts and owns a fresh server, and a
  graceful SIGTERM stops all of it.
- A stranger on the embedded port: `serve` exits 1 at once, naming the port and the stranger's pid.
- A real vLLM orphaned by an earlier run and recorded in the data folder: stopped and replaced.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import pytest

from deploy.embedded import EmbeddedVllmConfig, build_command, build_env, free_port, resolve_vllm_python
from deploy.vllm_ownership import (
    INSTANCE_ENV,
    VllmRecord,
    port_answers,
    process_environ,
    process_start_ticks,
    read_record,
    write_record,
)

pytestmark = [pytest.mark.integration]

REPO_ROOT = Path(__file__).resolve().parents[2]
VLLM_START_TIMEOUT_S = 600.0
GONE_WITHIN_S = 10.0
# uvicorn re-raises SIGTERM once its graceful shutdown (lifespan included) has finished
GRACEFUL_EXIT = (0, -signal.SIGTERM)


def instance_processes(instance_id: str) -> set[int]:
    """Every live process started for this vLLM instance (the id is inherited by all descendants)."""
    found = set()
    for name in os.listdir("/proc"):
        if name.isdigit() and int(name) != os.getpid():
            environ = process_environ(int(name)) or {}
            alive = process_start_ticks(int(name)) is not None  # not a zombie
            if alive and environ.get(INSTANCE_ENV) == instance_id:
                found.add(int(name))
    return found


def wait_gone(instance_id: str, timeout_s: float) -> float:
    """Seconds until no process of `instance_id` is left (fails after `timeout_s`)."""
    started = time.monotonic()
    while left := instance_processes(instance_id):
        elapsed = time.monotonic() - started
        assert elapsed < timeout_s, f"vLLM processes still running after {elapsed:.1f} s: {sorted(left)}"
        time.sleep(0.1)
    return time.monotonic() - started


@dataclass
class Serve:
    """`python -m service.cli serve` in its own session, on an embedded vLLM, logging to a file."""

    env: dict[str, str]
    port: int
    log_path: Path
    process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> None:
        with self.log_path.open("ab") as log:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "service.cli", "serve", "--port", str(self.port)],
                cwd=REPO_ROOT,
                env=self.env,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace")

    def log_tail(self) -> str:
        return self.log_text()[-4000:]

    def wait_vllm_healthy(self, timeout_s: float = VLLM_START_TIMEOUT_S) -> dict[str, Any]:
        """/readyz until it reports the embedded vLLM healthy; returns that entry."""
        assert self.process is not None
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            assert self.process.poll() is None, f"serve exited:\n{self.log_tail()}"
            try:
                body = httpx.get(f"{self.url}/readyz", timeout=2).json()
            except (httpx.TransportError, ValueError):
                body = {}
            embedded = body.get("embedded_vllm") or {}
            if embedded.get("status") == "healthy":
                return embedded
            time.sleep(0.5)
        raise AssertionError(f"embedded vLLM not healthy after {timeout_s:g} s:\n{self.log_tail()}")

    def stop(self) -> int:
        """SIGTERM (graceful), the exit status."""
        assert self.process is not None
        self.process.send_signal(signal.SIGTERM)
        return self.process.wait(timeout=90)

    def kill_group(self) -> None:
        if self.process is not None and self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait()


@pytest.fixture
def vllm_python() -> str:
    python = resolve_vllm_python(os.environ.get("LORALOOP_VLLM_PYTHON", ""))
    probe = subprocess.run(
        [python, "-c", "import importlib.util, sys; sys.exit(importlib.util.find_spec('vllm') is None)"],
        check=False,
        timeout=60,
    )
    if probe.returncode != 0:
        pytest.fail(f"vLLM is not installed for {python} (run `make vllm`, or set LORALOOP_VLLM_PYTHON)")
    return python


@pytest.fixture
def serve_env(tmp_path: Path, vllm_model_dir: Path, vllm_python: str) -> dict[str, str]:
    return {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "LORALOOP_DATABASE_URL": f"sqlite:///{tmp_path / 'loraloop.db'}",
        "LORALOOP_DATA_DIR": str(tmp_path / "var"),
        "LORALOOP_BASE_MODEL": str(vllm_model_dir),
        "LORALOOP_VLLM_URLS": "embedded",
        "LORALOOP_VLLM_PORT": str(free_port()),
        "LORALOOP_VLLM_PYTHON": vllm_python,
        "LORALOOP_VLLM_KV_CACHE_BYTES": str(32 * 1024 * 1024),
        "LORALOOP_DEVICE": "cpu",
        "LORALOOP_AUTH_DISABLED": "true",
        "LORALOOP_WORKER_ENABLED": "false",
        "LORALOOP_DISTILL_ENABLED": "false",
        "LORALOOP_LOG_LEVEL": "INFO",
    }


@pytest.fixture
def serves(tmp_path: Path, serve_env: dict[str, str]) -> Iterator[list[Serve]]:
    """`serves.append(...)`-style factory: every server started here is killed at the end."""
    started: list[Serve] = []
    yield started
    for serve in started:
        serve.kill_group()
    # on failure, leave no vLLM behind: everything these servers started inherited their data dir
    for name in os.listdir("/proc"):
        environ = process_environ(int(name)) if name.isdigit() else None
        if (
            environ
            and INSTANCE_ENV in environ
            and environ.get("LORALOOP_DATA_DIR") == serve_env["LORALOOP_DATA_DIR"]
        ):
            try:
                os.kill(int(name), signal.SIGKILL)
            except ProcessLookupError:
                pass


def new_serve(serves: list[Serve], env: dict[str, str], tmp_path: Path) -> Serve:
    serve = Serve(env=env, port=free_port(), log_path=tmp_path / f"serve-{len(serves)}.log")
    serves.append(serve)
    serve.start()
    return serve


def record_path(env: dict[str, str]) -> Path:
    return Path(env["LORALOOP_DATA_DIR"]) / "run" / "vllm.json"


def assert_owned(embedded: dict[str, Any], env: dict[str, str]) -> set[int]:
    """/readyz names the server, the record agrees, and its processes carry its instance id."""
    assert embedded["model"] == env["LORALOOP_BASE_MODEL"]
    assert embedded["url"] == f"http://127.0.0.1:{env['LORALOOP_VLLM_PORT']}"
    started_at = datetime.fromisoformat(embedded["started_at"])
    assert abs((datetime.now(UTC) - started_at).total_seconds()) < VLLM_START_TIMEOUT_S + 60
    record = read_record(record_path(env))
    assert (
        record is not None and record.pid == embedded["pid"] and record.instance_id == embedded["instance_id"]
    )
    processes = instance_processes(embedded["instance_id"])
    # the guard, vLLM's API server and its engine core at least
    assert {embedded["pid"], embedded["process_group"]} <= processes and len(processes) >= 3, processes
    return processes


@pytest.mark.slow
@pytest.mark.timeout(1800)  # two vLLM CPU starts: 1.5-11 min each on a contended 2-core box
def test_sigkill_of_serve_leaves_no_vllm_and_the_next_serve_owns_a_fresh_one(
    serves: list[Serve], serve_env: dict[str, str], tmp_path: Path
) -> None:
    first = new_serve(serves, serve_env, tmp_path)
    embedded = first.wait_vllm_healthy()
    assert_owned(embedded, serve_env)
    assert first.process is not None
    os.kill(first.process.pid, signal.SIGKILL)  # the serve process alone: a crash, an OOM kill
    first.process.wait()
    took = wait_gone(embedded["instance_id"], GONE_WITHIN_S)
    print(f"vLLM gone {took:.2f} s after SIGKILL of serve")
    assert not port_answers("127.0.0.1", int(serve_env["LORALOOP_VLLM_PORT"]))

    second = new_serve(serves, serve_env, tmp_path)  # same data folder: the stale record is dropped
    fresh = second.wait_vllm_healthy()
    assert fresh["instance_id"] != embedded["instance_id"] and fresh["pid"] != embedded["pid"]
    assert_owned(fresh, serve_env)
    assert "embedded vLLM healthy" in second.log_text()
    assert second.stop() in GRACEFUL_EXIT  # graceful: SIGTERM
    wait_gone(fresh["instance_id"], GONE_WITHIN_S)
    assert read_record(record_path(serve_env)) is None


def test_a_stranger_on_the_embedded_port_is_refused_naming_port_and_pid(
    serves: list[Serve], serve_env: dict[str, str], tmp_path: Path
) -> None:
    vllm_port = int(serve_env["LORALOOP_VLLM_PORT"])
    stranger = subprocess.Popen(
        [sys.executable, "-m", "http.server", str(vllm_port), "--bind", "127.0.0.1", "-d", str(tmp_path)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        deadline = time.monotonic() + 30
        while not port_answers("127.0.0.1", vllm_port):
            assert stranger.poll() is None and time.monotonic() < deadline
            time.sleep(0.05)
        serve = new_serve(serves, serve_env, tmp_path)
        assert serve.process is not None
        assert serve.process.wait(timeout=120) == 1
        output = serve.log_text()
        assert f"port {vllm_port} on 127.0.0.1 is already served by pid {stranger.pid}" in output, output
        assert "did not start" in output and "Traceback" not in output
        assert stranger.poll() is None  # left alone
        assert not record_path(serve_env).exists()  # no vLLM was started
    finally:
        stranger.kill()
        stranger.wait()


@pytest.mark.slow
@pytest.mark.timeout(1800)  # two vLLM CPU starts: 1.5-11 min each on a contended 2-core box
def test_a_recorded_vllm_orphaned_by_an_earlier_run_is_stopped_and_replaced(
    serves: list[Serve], serve_env: dict[str, str], tmp_path: Path, vllm_model_dir: Path
) -> None:
    """The issue's leak as the old code left it: a real vLLM in its own session, its loraloop gone,
    serving on the embedded port; this time the earlier run recorded it in the data folder."""
    vllm_port = int(serve_env["LORALOOP_VLLM_PORT"])
    config = EmbeddedVllmConfig(
        model=vllm_model_dir,
        log_path=tmp_path / "orphan.log",
        python=serve_env["LORALOOP_VLLM_PYTHON"],
        port=vllm_port,
        kv_cache_bytes=32 * 1024 * 1024,
        max_model_len=1024,
        cpu_threads=1,
    )
    env = {**build_env(config, os.environ), INSTANCE_ENV: "earlier-run"}
    with config.log_path.open("ab") as log:
        orphan = subprocess.Popen(
            build_command(config, vllm_port),
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        deadline = time.monotonic() + VLLM_START_TIMEOUT_S
        while not port_answers("127.0.0.1", vllm_port):
            assert orphan.poll() is None, config.log_path.read_text()[-3000:]
            assert time.monotonic() < deadline, "the orphan never listened"
            time.sleep(0.5)
        code = "import os; print(os.getpid())"
        gone_owner = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True)
        write_record(
            record_path(serve_env),
            VllmRecord(
                instance_id="earlier-run",
                host="127.0.0.1",
                port=vllm_port,
                model=str(vllm_model_dir),
                pid=orphan.pid,
                pid_start_ticks=process_start_ticks(orphan.pid),
                pgid=orphan.pid,
                owner_pid=int(gone_owner.stdout),
                owner_start_ticks=None,
                started_at=datetime.now(UTC).isoformat(),
            ),
        )
        orphan_processes = instance_processes("earlier-run")
        assert orphan.pid in orphan_processes

        serve = new_serve(serves, serve_env, tmp_path)
        embedded = serve.wait_vllm_healthy()
        assert orphan.wait(timeout=5) is not None
        assert not instance_processes("earlier-run")  # the whole orphan tree, engine core included
        assert embedded["pid"] != orphan.pid and embedded["instance_id"] != "earlier-run"
        assert_owned(embedded, serve_env)
        assert "recorded by an earlier loraloop run" in serve.log_text()
        assert serve.stop() in GRACEFUL_EXIT
        wait_gone(embedded["instance_id"], GONE_WITHIN_S)
    finally:
        if orphan.poll() is None:
            os.killpg(orphan.pid, signal.SIGKILL)
            orphan.wait()


def test_readyz_without_the_embedded_vllm_reports_none(serves: list[Serve], tmp_path: Path) -> None:
    env = {
        **os.environ,
        "LORALOOP_DATABASE_URL": f"sqlite:///{tmp_path / 'plain.db'}",
        "LORALOOP_DATA_DIR": str(tmp_path / "plain"),
        "LORALOOP_TOKENIZER": str(tmp_path / "no-tokenizer"),
        "LORALOOP_AUTH_DISABLED": "true",
        "LORALOOP_WORKER_ENABLED": "false",
        "LORALOOP_DISTILL_ENABLED": "false",
    }
    serve = new_serve(serves, env, tmp_path)
    deadline = time.monotonic() + 120
    while True:
        assert serve.process is not None and serve.process.poll() is None, serve.log_tail()
        try:
            response = httpx.get(f"{serve.url}/readyz", timeout=2)
            break
        except httpx.TransportError:
            assert time.monotonic() < deadline, serve.log_tail()
            time.sleep(0.2)
    assert response.status_code == 200
    body = json.loads(response.text)
    assert (body["status"], body["embedded_vllm"]) == ("ok", None)
    assert body["components"]["database"]["status"] == "ok"
    assert serve.stop() in GRACEFUL_EXIT
