"""Faults survived by real processes: vLLM down while feedback arrives and a version is promoted,
PostgreSQL restarted under load (a private throwaway cluster, never the shared server), and the disk
filling up while an adapter version is written.

SIGKILL of the API during ingestion is tests/integration/test_uvicorn_crash.py's; SIGKILL of the
worker during training and during the adapter write is tests/integration/test_worker_crash.py's.
"""

from __future__ import annotations

import errno
import os
import shutil
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from glob import glob
from pathlib import Path
from typing import Any

import httpx
import pytest
import sqlalchemy as sa

from memory_store.db import make_engine, make_session_factory, upgrade_database
from memory_store.repositories import AdapterRepository
from service.adapters.registry import AdapterRegistry
from service.component_configs import train_config
from service.config import Settings
from tests.integration.test_uvicorn_crash import ServerProcess, free_port
from tests.unit.fake_vllm import FakeVllm
from training.adapter_store import build_zero_adapter

pytestmark = [pytest.mark.integration, pytest.mark.slow]

TOKEN = "faults-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
SCOPES = "feedback:write feedback:read adapters:read adapters:write"


def feedback(key: str, namespace: str) -> dict[str, Any]:
    return {
        "messages": [
            {"role": "user", "content": f"Where is order {key}?"},
            {"role": "assistant", "content": "?"},
        ],
        "continuation": f"Order {key} ships tomorrow.",
        "namespace": namespace,
    }


def wait_for(condition: Callable[[], Any], timeout_s: float, what: str, interval_s: float = 0.2) -> Any:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(interval_s)
    raise AssertionError(f"timed out after {timeout_s:.0f}s waiting for {what}")


def start_server(db_url: str, data_dir: Path, env: dict[str, str]) -> ServerProcess:
    server = ServerProcess(db_url, data_dir, free_port())
    server.env.update(
        {"LORALOOP_AUTH_TOKENS": f"{TOKEN}={SCOPES}", "LORALOOP_DISTILL_ENABLED": "false", **env}
    )
    server.start(timeout_s=120)
    return server


# --- vLLM down ---------------------------------------------------------------------------------------


def test_vllm_down_feedback_still_accepted_and_reconciliation_catches_up(
    tmp_path: Path, tiny_model_dir: Path
) -> None:
    vllm_port = free_port()
    fake = FakeVllm(port=vllm_port).__enter__()
    server = start_server(
        f"sqlite:///{tmp_path / 'vllm-down.db'}",
        tmp_path,
        {
            "LORALOOP_VLLM_URLS": fake.url,
            "LORALOOP_BASE_MODEL": str(tiny_model_dir),
            "LORALOOP_TOKENIZER": str(tiny_model_dir),
            "LORALOOP_WORKER_ENABLED": "true",
            "LORALOOP_DEVICE": "cpu",
            "LORALOOP_RECONCILE_INTERVAL_S": "1",
            "LORALOOP_VLLM_RETRIES": "0",
            "LORALOOP_VLLM_TIMEOUT_S": "3",
            "LORALOOP_SWAP_DRAIN_S": "0",
            "LORALOOP_TRAIN_DEBOUNCE_S": "0",
            "LORALOOP_JOB_MAX_ATTEMPTS": "20",
            "LORALOOP_JOB_HEARTBEAT_S": "1",
            "LORALOOP_JOB_LEASE_S": "30",
            "LORALOOP_MAX_STEPS": "2",
            "LORALOOP_LORA_RANK": "4",
            "LORALOOP_GATE_MIN_NLL_DROP": "0",
            "LORALOOP_GATE_MAX_DRIFT_KL": "1000",
            "LORALOOP_LOG_LEVEL": "INFO",
        },
    )
    try:
        with httpx.Client(base_url=server.url, headers=AUTH, timeout=30) as client:

            def current() -> int | None:
                response = client.get("/adapters/default/current")
                return response.json()["version"] if response.status_code == 200 else None

            wait_for(lambda: current() == 0 and "default-v0" in fake.state.adapters, 120, "v0 served")
            fake.__exit__(None, None, None)  # vLLM goes down

            for index in range(8):
                started = time.monotonic()
                accepted = client.post("/feedback", json=feedback(f"d{index}", "default"))
                assert accepted.status_code == 202, accepted.text
                assert time.monotonic() - started < 5, "ingestion waited on vLLM"

            def waiting() -> dict[str, Any] | None:
                jobs = client.get("/jobs", params={"namespace": "default", "kind": "train"}).json()["items"]
                return next(
                    (j for j in jobs if j["status"] == "queued" and (j["progress"] or {}).get("waiting_for")),
                    None,
                )

            job = wait_for(waiting, 240, "a trained candidate waiting for vLLM", 0.5)
            assert "hot-swap" in (job["error"] or "") and job["attempts"] == 0, (
                job
            )  # waiting spends no attempt
            assert current() == 0, "a version became current while vLLM was down"
            versions = client.get("/adapters/default").json()["versions"]
            assert all(v["status"] != "failed" for v in versions), (
                f"an outage branded a version failed: {versions}"
            )

            fake = FakeVllm(port=vllm_port).__enter__()  # vLLM is back, empty (as after a restart)
            served = wait_for(
                lambda: (v := current()) and v > 0 and f"default-v{v}" in fake.state.adapters and v,
                300,
                "a trained version current and loaded after vLLM came back",
                0.5,
            )
            pending = client.get("/feedback", params={"namespace": "default", "status": "pending"}).json()
            assert pending["items"] == [], "feedback left untrained after the recovery"
            assert server.process is not None and server.process.poll() is None
        assert f"default-v{served}" in fake.state.adapters
    finally:
        server.stop()
        fake.__exit__(None, None, None)


# --- PostgreSQL restarted under load ------------------------------------------------------------------


def postgres_bin(name: str) -> str:
    found = sorted(glob(f"/usr/lib/postgresql/*/bin/{name}")) or [shutil.which(name) or ""]
    assert found[-1], f"{name} not found (install postgresql)"
    return found[-1]


@dataclass
class PrivatePostgres:
    """A throwaway cluster on its own port and data folder: restarting it disturbs nobody else."""

    folder: Path
    port: int
    run_as: list[str] = field(default_factory=list)

    @property
    def url(self) -> str:
        return f"postgresql+psycopg://postgres@127.0.0.1:{self.port}/postgres"

    def ctl(self, *args: str) -> None:
        subprocess.run(
            [*self.run_as, postgres_bin("pg_ctl"), "-D", str(self.folder / "data"), "-w", "-t", "60", *args],
            check=True,
            capture_output=True,
            timeout=90,
        )

    def start(self) -> None:
        options = f"-p {self.port} -c listen_addresses=127.0.0.1 -c unix_socket_directories={self.folder}"
        self.ctl("-o", options, "-l", str(self.folder / "postgres.log"), "start")

    def stop(self, mode: str = "fast") -> None:
        self.ctl("-m", mode, "stop")


@pytest.fixture
def private_postgres() -> Iterator[PrivatePostgres]:
    folder = Path(tempfile.mkdtemp(prefix="loraloop-pg-"))
    run_as: list[str] = []
    if os.geteuid() == 0:  # initdb refuses root: run the cluster as the postgres user
        shutil.chown(folder, "postgres", "postgres")
        run_as = ["runuser", "-u", "postgres", "--"]
    cluster = PrivatePostgres(folder, free_port(), run_as)
    subprocess.run(
        [
            *run_as,
            postgres_bin("initdb"),
            "-D",
            str(folder / "data"),
            "-U",
            "postgres",
            "--auth=trust",
            "--no-sync",
            "-E",
            "UTF8",
        ],
        check=True,
        capture_output=True,
        timeout=120,
    )
    cluster.start()
    try:
        yield cluster
    finally:
        try:
            cluster.stop("immediate")
        except subprocess.CalledProcessError:
            pass  # already stopped
        shutil.rmtree(folder, ignore_errors=True)


@dataclass
class Outcome:
    key: str
    status: int | None  # None: transport error
    seconds: float
    error_type: str | None
    at: float


def test_postgres_restart_under_load_fails_fast_and_recovers(
    tmp_path: Path, private_postgres: PrivatePostgres
) -> None:
    server = start_server(
        private_postgres.url,
        tmp_path,
        {"LORALOOP_DB_CONNECT_TIMEOUT_S": "2", "LORALOOP_WORKER_ENABLED": "false"},
    )
    pid = server.process.pid if server.process else None
    outcomes: list[Outcome] = []
    lock = threading.Lock()
    stop = threading.Event()

    def stream(worker: int) -> None:
        with httpx.Client(base_url=server.url, headers=AUTH, timeout=30) as client:
            sequence = 0
            while not stop.is_set():
                key = f"pg{worker}-{sequence}"
                sequence += 1
                started = time.monotonic()
                try:
                    response = client.post(
                        "/feedback", json=feedback(key, "pg"), headers={"Idempotency-Key": key}
                    )
                    status = response.status_code
                    error_type = response.json().get("error", {}).get("type") if status >= 400 else None
                except httpx.TransportError:
                    status, error_type = None, None
                with lock:
                    outcomes.append(Outcome(key, status, time.monotonic() - started, error_type, started))
                if status != 202:
                    time.sleep(0.05)

    def acknowledged() -> int:
        with lock:
            return sum(1 for o in outcomes if o.status == 202)

    threads = [threading.Thread(target=stream, args=(worker,), daemon=True) for worker in range(3)]
    for thread in threads:
        thread.start()
    try:
        wait_for(lambda: acknowledged() >= 60, 120, "ingestion before the restart")
        down_at = time.monotonic()
        private_postgres.stop("fast")
        with httpx.Client(base_url=server.url, timeout=30) as probe:
            wait_for(lambda: probe.get("/readyz").status_code == 503, 30, "/readyz to report the outage")
            time.sleep(3)  # the database stays down for a while under load
            private_postgres.start()
            up_at = time.monotonic()
            wait_for(lambda: probe.get("/readyz").status_code == 200, 60, "/readyz to recover")
        before_recovery = acknowledged()
        wait_for(lambda: acknowledged() >= before_recovery + 60, 120, "ingestion after the restart")
    finally:
        stop.set()
        for thread in threads:
            thread.join(timeout=60)

    assert server.process is not None and server.process.poll() is None and server.process.pid == pid, (
        "loraloop had to be restarted"
    )
    during = [o for o in outcomes if down_at <= o.at <= up_at]
    failures = [o for o in outcomes if o.status != 202]
    assert failures, "no request saw the outage"
    assert all(o.status == 503 and o.error_type == "database_unavailable" for o in failures), {
        (o.status, o.error_type) for o in failures
    }
    slowest = max(o.seconds for o in failures)
    assert slowest < 6, f"a 503 took {slowest:.1f}s: not failing fast"
    assert any(o.status == 503 for o in during)

    # every acknowledged item is stored exactly once; replaying the refused ones stores each once too
    acked = {o.key for o in outcomes if o.status == 202}
    refused = {o.key for o in outcomes if o.status != 202}
    with httpx.Client(base_url=server.url, headers=AUTH, timeout=30) as client:
        for key in sorted(refused):
            replay = client.post("/feedback", json=feedback(key, "pg"), headers={"Idempotency-Key": key})
            assert replay.status_code == 202, replay.text
    server.stop()
    engine = make_engine(private_postgres.url)
    try:
        with engine.connect() as connection:
            keys = [
                row[0]
                for row in connection.execute(
                    sa.text("SELECT idempotency_key FROM feedback_items WHERE namespace = 'pg'")
                )
            ]
    finally:
        engine.dispose()
    assert len(keys) == len(set(keys)), "an item is stored twice"
    assert set(keys) == acked | refused
    print(f"pg restart: {len(acked)} acknowledged, {len(refused)} refused with 503 (max {slowest:.2f}s)")


# --- disk full while saving an adapter ---------------------------------------------------------------


@pytest.fixture
def small_filesystem(tmp_path: Path) -> Iterator[Path]:
    """A 2 MiB tmpfs (root can mount one here and in CI); skipped only where mounting is not allowed."""
    mount_point = tmp_path / "small-fs"
    mount_point.mkdir()
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=2m,mode=0755", "tmpfs", str(mount_point)],
        capture_output=True,
        text=True,
        check=False,
    )
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({mounted.stderr.strip()}); the ENOSPC unit path still runs")
    try:
        yield mount_point
    finally:
        subprocess.run(["umount", "-l", str(mount_point)], check=False, capture_output=True)


def fill(folder: Path) -> Path:
    """Write until the filesystem says ENOSPC; returns the filler file (delete it to free the space)."""
    filler = folder / "filler.bin"
    with filler.open("wb", buffering=0) as handle:
        try:
            while True:
                handle.write(b"\0" * 4096)
        except OSError as error:
            assert error.errno == errno.ENOSPC
    return filler


def test_disk_full_while_publishing_leaves_no_partial_version(
    tmp_path: Path, tiny_model_dir: Path, small_filesystem: Path
) -> None:
    url = f"sqlite:///{tmp_path / 'registry.db'}"  # the database lives elsewhere: only adapters fill up
    upgrade_database(url)
    engine = make_engine(url)
    settings = Settings(
        _env_file=None,
        database_url=url,
        data_dir=small_filesystem,
        auth_disabled=True,
        base_model=tiny_model_dir,
        lora_rank=4,
    )
    with FakeVllm() as fake:
        from deploy.hotswap import HotSwapper
        from deploy.vllm_client import VllmClient

        swapper = HotSwapper([VllmClient(fake.url, timeout=5, retries=0)], drain_s=0, max_loras=4)
        registry = AdapterRegistry.from_settings(settings, make_session_factory(engine), swapper)
        assert registry.ensure_base_version("shop").version == 0
        source = tmp_path / "candidate"
        build_zero_adapter(tiny_model_dir, train_config(settings).lora_config(tiny_model_dir), source, seed=3)

        filler = fill(small_filesystem)
        with pytest.raises(OSError) as raised:
            registry.publish_candidate("shop", source, parent_version=0, training_run_id=None, metrics={})
        assert raised.value.errno == errno.ENOSPC

        namespace_dir = small_filesystem / "adapters" / "shop"
        assert sorted(p.name for p in namespace_dir.iterdir()) == ["v0"], (
            "a partial version or temp dir remains"
        )
        with registry.session_factory() as session:
            versions = [row.version for row in AdapterRepository(session).list_versions(name="shop")]
        assert versions == [0], "a version row without its files"
        current = registry.current("shop")
        assert current is not None and current.version == 0
        registry.store.verify("shop", 0)
        assert list(fake.state.adapters) == ["shop-v0"]

        filler.unlink()  # space is back: the same publish now works and is served
        version = registry.publish_candidate(
            "shop", source, parent_version=0, training_run_id=None, metrics={}
        )
        registry.promote("shop", version, expected_parent=0)
        current = registry.current("shop")
        assert current is not None and current.version == version == 1
        assert "shop-v1" in fake.state.adapters
    engine.dispose()


def test_enospc_at_the_lowest_write_is_a_clean_failure(
    tmp_path: Path, tiny_model_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The same contract without a mount: the copy of the weights fails half-way with ENOSPC."""
    from training import adapter_store

    url = f"sqlite:///{tmp_path / 'registry.db'}"
    upgrade_database(url)
    engine = make_engine(url)
    settings = Settings(
        _env_file=None,
        database_url=url,
        data_dir=tmp_path / "var",
        auth_disabled=True,
        base_model=tiny_model_dir,
        lora_rank=4,
    )
    registry = AdapterRegistry.from_settings(settings, make_session_factory(engine), None)
    registry.ensure_base_version("shop")
    source = tmp_path / "candidate"
    build_zero_adapter(tiny_model_dir, train_config(settings).lora_config(tiny_model_dir), source, seed=3)
    real_copy = shutil.copyfile

    def copy_until_full(src: Any, dst: Any, *args: Any, **kwargs: Any) -> Any:
        if str(dst).endswith(".safetensors"):
            Path(dst).write_bytes(Path(src).read_bytes()[:1000])
            raise OSError(errno.ENOSPC, "No space left on device", str(dst))
        return real_copy(src, dst, *args, **kwargs)

    monkeypatch.setattr(adapter_store.shutil, "copyfile", copy_until_full)
    with pytest.raises(OSError):
        registry.publish_candidate("shop", source, parent_version=0, training_run_id=None, metrics={})
    monkeypatch.undo()
    assert sorted(p.name for p in (tmp_path / "var" / "adapters" / "shop").iterdir()) == ["v0"]
    current = registry.current("shop")
    assert current is not None and current.version == 0
    with registry.session_factory() as session:
        assert [row.version for row in AdapterRepository(session).list_versions(name="shop")] == [0]
    engine.dispose()
