"""service.readiness: components combine into one answer; a failing or raising check turns it red."""

from __future__ import annotations

from service.readiness import ReadinessChecks
from service.schemas import ComponentHealth


def test_ready_only_when_every_component_is_ok() -> None:
    checks = ReadinessChecks()
    checks.add("database", lambda: ComponentHealth(status="ok"))
    assert checks.run().status == "ok"
    checks.add("vllm", lambda: ComponentHealth(status="unavailable", detail="replica 1 down"))
    answer = checks.run()
    assert answer.status == "unavailable"
    assert list(answer.components) == ["database", "vllm"]
    assert answer.components["vllm"].detail == "replica 1 down"
    assert answer.components["database"].status == "ok"
    assert all(health.latency_ms is not None for health in answer.components.values())


def test_a_check_that_raises_reports_its_component_unavailable() -> None:
    checks = ReadinessChecks()

    def broken() -> ComponentHealth:
        raise RuntimeError("secret connection string")

    checks.add("model", broken)
    answer = checks.run()
    assert answer.status == "unavailable"
    assert answer.components["model"].detail == "check failed (RuntimeError)"


def test_adding_a_component_again_replaces_its_check() -> None:
    checks = ReadinessChecks()
    checks.add("database", lambda: ComponentHealth(status="unavailable"))
    checks.add("database", lambda: ComponentHealth(status="ok"))
    assert checks.names == ["database"] and checks.run().status == "ok"
