"""Readiness: named component checks behind `/readyz`, combined into one answer.

Owns the `ReadinessChecks` registry and the database component (writable, same file). Each check
returns a `ComponentHealth`; the service is ready only when every component is `ok`. Other
components (the base model, vLLM replicas) register their own check with `add`. Knows nothing
about HTTP: the route turns `Readiness` into 200 or 503.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

from sqlalchemy.engine import Engine

from memory_store.db import probe_writable
from service.schemas import ComponentHealth, Readiness

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
