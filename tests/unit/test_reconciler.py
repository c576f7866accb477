"""service.adapters.reconciler and the co-located GPU sleep window against the fake vLLM: a replica that
lost its adapters gets the current version back, retired versions are unloaded after the drain,
Deployment rows follow, an unreachable vLLM or registry never stops the loop."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy.orm import Session, sessionmaker

from deploy.hotswap import HotSwapper
from deploy.vllm_client import VllmClient
from memory_store.db import make_engine, make_session_factory, upgrade_database
from memory_store.repositories import AdapterRepository, DeploymentRepository
from service.adapters.reconciler import Reconciler
from service.jobs.worker import JobContext, JobOutcome
from service.wiring import VllmSleepWindow
from tests.unit.fake_vllm import FakeVllm


def adapter_dir(root: Path, namespace: str, version: int) -> str:
    folder = root / namespace / f"v{version}"
    folder.mkdir(parents=True)
    (folder / "adapter_config.json").write_text("{}")
    return str(folder)


@pytest.fixture
def session_factory(tmp_path: Path) -> Iterator[sessionmaker[Session]]:
    url = f"sqlite:///{tmp_path / 'r.db'}"
    upgrade_database(url)
    engine = make_engine(url)
    yield make_session_factory(engine)
    engine.dispose()


@pytest.fixture
def vllm() -> Iterator[FakeVllm]:
    with FakeVllm() as fake:
        yield fake


def make_reconciler(
    vllm_url: str,
    session_factory: sessionmaker[Session],
    desired: dict[str, tuple[int, str]],
    clock: list[float],
) -> Reconciler:
    swapper = HotSwapper(
        [VllmClient(vllm_url, timeout=2.0, retries=0)], drain_s=10.0, max_loras=4, clock=lambda: clock[0]
    )
    return Reconciler(
        swapper=swapper,
        desired_state=lambda: desired,
        session_factory=session_factory,
        interval_s=0.05,
        clock=lambda: clock[0],
    )


def register(session_factory: sessionmaker[Session], namespace: str, version: int, path: str) -> None:
    with session_factory.begin() as session:
        repository = AdapterRepository(session)
        repository.ensure_adapter(name=namespace)
        repository.add_version(name=namespace, version=version, path=path, sha256="0" * 64)
        repository.set_current(name=namespace, version=version)


def deployments(session_factory: sessionmaker[Session]) -> dict[str, str]:
    with session_factory() as session:
        return {row.served_name: row.state for row in DeploymentRepository(session).list()}


def test_a_restarted_replica_gets_the_current_version_back_and_old_ones_drain(
    vllm: FakeVllm, session_factory: sessionmaker[Session], tmp_path: Path
) -> None:
    v1, v2 = adapter_dir(tmp_path, "ns", 1), adapter_dir(tmp_path, "ns", 2)
    register(session_factory, "ns", 1, v1)
    clock = [100.0]
    desired = {"ns": (1, v1)}
    reconciler = make_reconciler(vllm.url, session_factory, desired, clock)

    reconciler.reconcile_once()
    assert vllm.state.adapters == {"ns-v1": v1}
    assert deployments(session_factory) == {"ns-v1": "loaded"}

    vllm.state.adapters.clear()  # vLLM restarted: it serves nothing
    clock[0] += 1
    report = reconciler.reconcile_once()
    assert report is not None and report.replicas[0].loaded == ["ns-v1"]
    assert vllm.state.adapters == {"ns-v1": v1}

    register(session_factory, "ns", 2, v2)
    desired["ns"] = (2, v2)
    clock[0] += 1
    reconciler.reconcile_once()
    assert set(vllm.state.adapters) == {"ns-v1", "ns-v2"}  # v1 drains first
    clock[0] += 11
    reconciler.reconcile_once()
    assert vllm.state.adapters == {"ns-v2": v2}
    assert deployments(session_factory) == {"ns-v1": "unloaded", "ns-v2": "loaded"}


def test_unreachable_vllm_and_registry_are_survived(
    session_factory: sessionmaker[Session], tmp_path: Path
) -> None:
    path = adapter_dir(tmp_path, "ns", 0)
    register(session_factory, "ns", 0, path)
    reconciler = make_reconciler("http://127.0.0.1:9", session_factory, {"ns": (0, path)}, [0.0])
    report = reconciler.reconcile_once()
    assert report is not None and not report.replicas[0].reachable
    assert deployments(session_factory) == {"ns-v0": "failed"}

    def broken_registry() -> dict[str, tuple[int, str]]:
        raise RuntimeError("database is down")

    reconciler.desired_state = broken_registry
    assert reconciler.reconcile_once() is None


def test_the_loop_runs_at_start_and_on_trigger_and_stops(
    vllm: FakeVllm, session_factory: sessionmaker[Session], tmp_path: Path
) -> None:
    path = adapter_dir(tmp_path, "ns", 0)
    register(session_factory, "ns", 0, path)
    reconciler = make_reconciler(vllm.url, session_factory, {"ns": (0, path)}, [0.0])
    reconciler.interval_s = 3600.0
    ensured = threading.Event()
    reconciler.ensure_namespace = ensured.set
    reconciler.start()
    try:
        deadline = time.monotonic() + 10
        while "ns-v0" not in vllm.state.adapters and time.monotonic() < deadline:
            time.sleep(0.02)
        assert "ns-v0" in vllm.state.adapters and ensured.is_set()
        vllm.state.adapters.clear()
        reconciler.trigger()
        while "ns-v0" not in vllm.state.adapters and time.monotonic() < deadline:
            time.sleep(0.02)
        assert "ns-v0" in vllm.state.adapters
    finally:
        started = time.monotonic()
        reconciler.stop()
    assert time.monotonic() - started < 5


def test_sleep_window_sleeps_vllm_only_while_the_job_trains(vllm: FakeVllm) -> None:
    window = VllmSleepWindow([VllmClient(vllm.url, timeout=2.0, retries=0)], enabled=True)
    seen: list[tuple[str, bool]] = []

    def handler(context: JobContext) -> JobOutcome:
        for phase in ("prepare", "train", "train", "evaluate", "promote"):
            context.report_progress({"phase": phase})
            seen.append((phase, vllm.state.sleeping))
        return JobOutcome({"ok": True})

    context = JobContext(job_id=1, kind="train", namespace="ns", payload={}, attempt=1, max_attempts=3)
    assert window.wrap(handler)(context).result == {"ok": True}
    assert seen == [
        ("prepare", False),
        ("train", True),
        ("train", True),
        ("evaluate", False),
        ("promote", False),
    ]
    assert context.take_progress() == {"phase": "promote"}

    def failing(context: JobContext) -> JobOutcome:
        context.report_progress({"phase": "train"})
        raise RuntimeError("diverged")

    with pytest.raises(RuntimeError):
        window.wrap(failing)(context)
    assert vllm.state.sleeping is False
    assert VllmSleepWindow([], enabled=True).wrap(handler) is handler
