"""HotSwapper across several fake-vLLM replicas: load-everywhere-before-current, rollback on a
partial failure, drain then unload, max_loras, and reconciliation after a replica restart."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import ExitStack
from pathlib import Path

import pytest

from deploy.hotswap import PREVIEW_HOLD_S, HotSwapper, SwapFailed, parse_served_name, served_name
from deploy.vllm_client import VllmClient
from tests.unit.fake_vllm import FakeVllm, Fault


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def replicas() -> Iterator[list[FakeVllm]]:
    with ExitStack() as stack:
        yield [stack.enter_context(FakeVllm()) for _ in range(2)]


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def swapper(replicas: list[FakeVllm], clock: FakeClock) -> Iterator[HotSwapper]:
    clients = [VllmClient(r.url, timeout=2.0, retries=1, backoff_s=0.01) for r in replicas]
    hot = HotSwapper(clients, drain_s=10.0, max_loras=4, clock=clock)
    yield hot
    hot.close()
    for c in clients:
        c.close()


def make_version(root: Path, namespace: str, version: int) -> str:
    path = root / namespace / f"v{version}"
    path.mkdir(parents=True)
    (path / "adapter_config.json").write_text("{}")
    return str(path)


def served(replica: FakeVllm) -> dict[str, str]:
    return dict(replica.state.adapters)


def test_served_names_round_trip() -> None:
    assert served_name("support-bot", 3) == "support-bot-v3"
    assert parse_served_name("support-bot-v3") == ("support-bot", 3)
    assert parse_served_name("tiny") is None


def test_swap_loads_on_every_replica_then_drains_the_old_version(
    swapper: HotSwapper, replicas: list[FakeVllm], clock: FakeClock, tmp_path: Path
) -> None:
    v1, v2 = make_version(tmp_path, "ns", 1), make_version(tmp_path, "ns", 2)
    assert swapper.swap("ns", 1, v1) == "ns-v1"
    assert swapper.swap("ns", 2, v2) == "ns-v2"
    assert swapper.current("ns") == "ns-v2"
    for r in replicas:
        assert served(r) == {"ns-v1": v1, "ns-v2": v2}  # old one still draining
    clock.now += 5
    assert swapper.collect() == []
    clock.now += 5
    assert swapper.collect() == ["ns-v1"]
    for r in replicas:
        assert served(r) == {"ns-v2": v2}
    assert swapper.retired() == {}


def test_partial_failure_unloads_and_keeps_the_previous_version(
    swapper: HotSwapper, replicas: list[FakeVllm], tmp_path: Path
) -> None:
    v1, v2 = make_version(tmp_path, "ns", 1), make_version(tmp_path, "ns", 2)
    swapper.swap("ns", 1, v1)
    replicas[1].state.faults.extend(Fault("/v1/load_lora_adapter") for _ in range(3))
    with pytest.raises(SwapFailed) as info:
        swapper.swap("ns", 2, v2)
    assert list(info.value.errors) == [replicas[1].url]
    assert swapper.current("ns") == "ns-v1"
    for r in replicas:
        assert served(r) == {"ns-v1": v1}  # ns-v2 rolled back on replica 0


def test_swap_is_idempotent(swapper: HotSwapper, replicas: list[FakeVllm], tmp_path: Path) -> None:
    v1 = make_version(tmp_path, "ns", 1)
    swapper.swap("ns", 1, v1)
    swapper.swap("ns", 1, v1)  # e.g. a retried job: already loaded is fine
    assert swapper.current("ns") == "ns-v1" and swapper.retired() == {}
    assert served(replicas[0]) == {"ns-v1": v1}


def test_rollback_to_a_draining_version_cancels_its_unload(
    swapper: HotSwapper, replicas: list[FakeVllm], clock: FakeClock, tmp_path: Path
) -> None:
    v1, v2 = make_version(tmp_path, "ns", 1), make_version(tmp_path, "ns", 2)
    swapper.swap("ns", 1, v1)
    swapper.swap("ns", 2, v2)
    swapper.swap("ns", 1, v1)
    clock.now += 60
    assert swapper.collect() == ["ns-v2"]
    assert served(replicas[0]) == {"ns-v1": v1}


def test_max_loras_unloads_the_oldest_retired_early(
    replicas: list[FakeVllm], clock: FakeClock, tmp_path: Path
) -> None:
    clients = [VllmClient(r.url, retries=0) for r in replicas]
    hot = HotSwapper(clients, drain_s=1000.0, max_loras=2, clock=clock)
    paths = {v: make_version(tmp_path, "ns", v) for v in (1, 2, 3)}
    for v in (1, 2, 3):
        clock.now += 1
        hot.swap("ns", v, paths[v])
    for r in replicas:
        assert set(served(r)) == {"ns-v2", "ns-v3"}
    hot.close()


def test_reconcile_reloads_after_a_replica_restart(
    swapper: HotSwapper, replicas: list[FakeVllm], tmp_path: Path
) -> None:
    a1, b4 = make_version(tmp_path, "a", 1), make_version(tmp_path, "b", 4)
    swapper.swap("a", 1, a1)
    replicas[1].state.adapters.clear()  # vLLM restarted: lost everything
    report = swapper.reconcile({"a": (1, a1), "b": (4, b4)})
    assert report.ok
    assert report.replicas[0].loaded == ["b-v4"]
    assert sorted(report.replicas[1].loaded) == ["a-v1", "b-v4"]
    for r in replicas:
        assert served(r) == {"a-v1": a1, "b-v4": b4}


def test_reconcile_drains_versions_that_are_no_longer_desired(
    swapper: HotSwapper, replicas: list[FakeVllm], clock: FakeClock, tmp_path: Path
) -> None:
    a1, a2 = make_version(tmp_path, "a", 1), make_version(tmp_path, "a", 2)
    replicas[0].state.adapters["a-v1"] = a1  # left over from before a loraloop restart
    replicas[0].state.adapters["static-lora"] = "/elsewhere"  # not ours: never touched
    report = swapper.reconcile({"a": (2, a2)})
    assert report.ok and "a-v1" in swapper.retired()
    assert served(replicas[0]) == {"a-v1": a1, "static-lora": "/elsewhere", "a-v2": a2}
    clock.now += 11
    report = swapper.reconcile({"a": (2, a2)})
    assert "a-v1" in report.replicas[0].unloaded
    assert served(replicas[0]) == {"static-lora": "/elsewhere", "a-v2": a2}


def test_reconcile_reports_an_unreachable_replica_and_catches_up_later(
    swapper: HotSwapper, replicas: list[FakeVllm], tmp_path: Path
) -> None:
    a1 = make_version(tmp_path, "a", 1)
    replicas[1].state.faults.extend(Fault("/v1/models") for _ in range(2))
    report = swapper.reconcile({"a": (1, a1)})
    assert not report.ok and report.replicas[1].reachable is False
    assert served(replicas[0]) == {"a-v1": a1} and served(replicas[1]) == {}
    assert swapper.reconcile({"a": (1, a1)}).ok
    assert served(replicas[1]) == {"a-v1": a1}


def test_stale_reconcile_snapshot_does_not_undo_a_newer_swap(
    swapper: HotSwapper, replicas: list[FakeVllm], clock: FakeClock, tmp_path: Path
) -> None:
    a1, a2 = make_version(tmp_path, "a", 1), make_version(tmp_path, "a", 2)
    swapper.swap("a", 1, a1)
    snapshot = clock()  # the caller reads the DB (still says v1) ...
    clock.now += 1
    swapper.swap("a", 2, a2)  # ... a worker swaps to v2 meanwhile ...
    swapper.reconcile({"a": (1, a1)}, snapshot_time=snapshot)  # ... then reconciles the stale view
    assert swapper.current("a") == "a-v2"
    assert "a-v2" in served(replicas[0])


def test_reconcile_switches_a_same_name_other_path_in_place(
    swapper: HotSwapper, replicas: list[FakeVllm], tmp_path: Path
) -> None:
    a1 = make_version(tmp_path, "a", 1)
    replicas[0].state.adapters["a-v1"] = "/old/place"
    report = swapper.reconcile({"a": (1, a1)})
    assert report.replicas[0].loaded == ["a-v1"]
    assert served(replicas[0]) == {"a-v1": a1}
    assert replicas[0].state.requests[-1][2]["load_inplace"] is True


def test_preview_serves_an_old_version_for_a_while_then_drains_it(
    swapper: HotSwapper, replicas: list[FakeVllm], clock: FakeClock, tmp_path: Path
) -> None:
    v1, v2 = make_version(tmp_path, "ns", 1), make_version(tmp_path, "ns", 2)
    swapper.swap("ns", 1, v1)
    swapper.swap("ns", 2, v2)
    clock.now += 10
    assert swapper.collect() == ["ns-v1"]
    assert swapper.preview("ns", 2, v2) == "ns-v2"  # the current one: nothing to load
    assert swapper.serving("ns-v2") and not swapper.serving("ns-v1")
    assert swapper.preview("ns", 1, v1) == "ns-v1"
    for r in replicas:
        assert served(r) == {"ns-v1": v1, "ns-v2": v2}
    assert swapper.current("ns") == "ns-v2" and swapper.serving("ns-v1")
    loads = replicas[0].calls("/v1/load_lora_adapter")
    clock.now += PREVIEW_HOLD_S - 1
    assert swapper.preview("ns", 1, v1) == "ns-v1"  # asked again: held again, not reloaded
    assert replicas[0].calls("/v1/load_lora_adapter") == loads
    clock.now += PREVIEW_HOLD_S - 1
    assert swapper.collect() == []
    clock.now += 2
    assert swapper.collect() == ["ns-v1"]
    for r in replicas:
        assert served(r) == {"ns-v2": v2}


def test_preview_reload_loads_again_and_a_refusing_replica_fails_it_everywhere(
    swapper: HotSwapper, replicas: list[FakeVllm], tmp_path: Path
) -> None:
    v1, v2 = make_version(tmp_path, "ns", 1), make_version(tmp_path, "ns", 2)
    swapper.swap("ns", 2, v2)
    swapper.preview("ns", 1, v1)
    replicas[1].state.adapters.pop("ns-v1")  # e.g. another process's reconciler unloaded it
    swapper.preview("ns", 1, v1, reload=True)
    assert served(replicas[1])["ns-v1"] == v1
    v3 = make_version(tmp_path, "ns", 3)
    replicas[1].state.faults.extend(Fault("/v1/load_lora_adapter") for _ in range(3))
    with pytest.raises(SwapFailed):
        swapper.preview("ns", 3, v3)
    for r in replicas:
        assert "ns-v3" not in served(r)
    assert not swapper.serving("ns-v3") and swapper.current("ns") == "ns-v2"
