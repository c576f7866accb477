"""service.api.readiness: components combine into one answer; a failing or raising check turns it red."""

from __future__ import annotations

from service.api.readiness import ReadinessChecks
from service.api.schemas import ComponentHealth


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


def test_tokenizer_component_needs_the_files(tmp_path) -> None:
    from service.api.readiness import tokenizer_check

    check = tokenizer_check(tmp_path)
    assert check().status == "unavailable" and str(tmp_path) in (check().detail or "")
    (tmp_path / "tokenizer.json").write_text("{}")
    assert check().status == "ok"


def test_vllm_component_follows_the_last_reconcile_round() -> None:
    from deploy.hotswap import ReconcileReport, ReplicaReport
    from service.api.readiness import vllm_check

    now = [100.0]
    last: list = [None]
    check = vllm_check(lambda: last[0], max_age_s=10, clock=lambda: now[0])
    assert check().detail == "vLLM not reconciled yet (starting?)"
    up = ReplicaReport(base_url="http://a", reachable=True)
    last[0] = (ReconcileReport(replicas=[up]), 95.0)
    assert check().status == "ok"
    last[0] = (ReconcileReport(replicas=[ReplicaReport(base_url="http://a", reachable=False)]), 95.0)
    assert check().detail == "http://a unreachable"
    last[0] = (ReconcileReport(replicas=[up]), 80.0)
    assert check().status == "unavailable" and "20s ago" in (check().detail or "")
