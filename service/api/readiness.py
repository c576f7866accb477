"""Readiness: named component checks behind `/readyz`, combined into one answer.

Owns the `ReadinessChecks` registry and the checks of the database (writable, same file), the
tokenizer (its files present, in a process that trains) and vLLM (the reconciler's last round reached every
replica and loaded every current version). Each check returns a `ComponentHealth`; the service is
ready only when every component is `ok`. Knows nothing about HTTP: the route turns `Readiness`
into 200 or 503.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from sqlalchemy.engine import Engine

from memory_store.db import probe_writable
from service.api.schemas import ComponentHealth, Readiness

logger = logging.getLogger(__name__)

ReadinessCheck = Callable[[], ComponentHealth]


class ReadinessChecks:
    """The components `/readyz` reports, in registration order."""

    def __init__(self) -> None:
        self._checks: dict[str, ReadinessCheck] = {}
        self._lock = threading.Lock()

    def add(self, name: str, check: ReadinessCheck) -> None:
        """Register (or replace) the check of component `name`."""
        with self._lock:
            self._checks[name] = check

    @property
    def names(self) -> list[str]:
        with self._lock:
            return list(self._checks)

    def run(self) -> Readiness:
        """Run every check; a check that raises reports its component unavailable."""
        with self._lock:
            checks = list(self._checks.items())
        components: dict[str, ComponentHealth] = {}
        for name, check in checks:
            started = time.perf_counter()
            try:
                health = check()
            except Exception as exc:  # noqa: BLE001 - a broken check means "not ready", not a 500
                logger.warning("readiness check %s raised %s", name, type(exc).__name__)
                health = ComponentHealth(status="unavailable", detail=f"check failed ({type(exc).__name__})")
            if health.latency_ms is None:
                health = health.model_copy(
                    update={"latency_ms": round((time.perf_counter() - started) * 1e3, 2)}
                )
            components[name] = health
        ready = all(health.status == "ok" for health in components.values())
        return Readiness(status="ok" if ready else "unavailable", components=components)


def database_check(engine: Engine) -> ReadinessCheck:
    """The database component: writable now (see `memory_store.db.probe_writable`)."""

    def check() -> ComponentHealth:
        probe = probe_writable(engine)
        if probe.ok:
            return ComponentHealth(status="ok")
        logger.warning("readiness: database not ready: %s", probe.reason)
        return ComponentHealth(status="unavailable", detail=probe.reason)

    return check


TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json")


def tokenizer_check(tokenizer_dir: Path) -> ReadinessCheck:
    """The tokenizer component of a process that trains: its files are there to load."""

    def check() -> ComponentHealth:
        if any((Path(tokenizer_dir) / name).is_file() for name in TOKENIZER_FILES):
            return ComponentHealth(status="ok")
        return ComponentHealth(
            status="unavailable", detail=f"no tokenizer files in {tokenizer_dir} (LORALOOP_TOKENIZER)"
        )

    return check


def vllm_check(
    last_report: Callable[[], tuple[Any, float] | None],
    *,
    max_age_s: float,
    clock: Callable[[], float] = time.monotonic,
) -> ReadinessCheck:
    """The vLLM component from the reconciler's last round (`(report, monotonic time)` or None):
    ok when it is at most `max_age_s` old, reached every replica and every current version loaded."""

    def check() -> ComponentHealth:
        last = last_report()
        if last is None:
            return ComponentHealth(status="unavailable", detail="vLLM not reconciled yet (starting?)")
        report, at = last
        age = clock() - at
        if age > max_age_s:
            return ComponentHealth(status="unavailable", detail=f"last reconcile round {age:.0f}s ago")
        for replica in report.replicas:
            if not replica.reachable:
                return ComponentHealth(status="unavailable", detail=f"{replica.base_url} unreachable")
            if replica.errors:
                name, error = next(iter(sorted(replica.errors.items())))
                return ComponentHealth(
                    status="unavailable", detail=f"{replica.base_url}: {name}: {error}"[:300]
                )
        return ComponentHealth(status="ok")

    return check
