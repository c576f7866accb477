"""The adapter registry against a real store (SQLite and PostgreSQL) and two fake vLLM replicas: a
version becomes current only after its files verified and every replica loaded it; failures leave
current unchanged; rollback takes the same path; crashed publishes leave no visible version."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import ExitStack
from pathlib import Path

import pytest
from sqlalchemy.orm import Session, sessionmaker

from memory_store.db import make_engine, make_session_factory
from memory_store.repositories import AdapterRepository
from service.adapters.registry import (
    AdapterRegistry,
    PromotionFailed,
    StaleParent,
    build_hot_swapper,
)
from service.component_configs import train_config
from service.config import Settings
from tests.unit.fake_vllm import FakeVllm, Fault
from training.adapter_store import ADAPTER_WEIGHTS_FILE, build_zero_adapter

pytestmark = pytest.mark.integration

NS = "geo"


@pytest.fixture
def replicas() -> Iterator[list[FakeVllm]]:
    with ExitStack() as stack:
        yield [stack.enter_context(FakeVllm()) for _ in range(2)]


@pytest.fixture
def registry(
    tmp_path: Path, migrated_db_url: str, tiny_model_dir: Path, replicas: list[FakeVllm]
) -> Iterator[AdapterRegistry]:
    settings = Settings(
        database_url=migrated_db_url,
        data_dir=tmp_path / "var",
        base_model=tiny_model_dir,
        auth_disabled=True,
        vllm_urls=",".join(r.url for r in replicas),
        vllm_retries=0,
        swap_drain_s=0,
    )
    engine = make_engine(migrated_db_url)
    swapper = build_hot_swapper(settings)
    yield AdapterRegistry.from_settings(settings, make_session_factory(engine), swapper)
    assert swapper is not None
    swapper.close()
    engine.dispose()


def candidate_files(registry: AdapterRegistry, tmp_path: Path, seed: int) -> Path:
    """A peft adapter folder (as a training run would leave it in its scratch dir)."""
    base = registry.settings.base_model
    return build_zero_adapter(
        base, train_config(registry.settings).lora_config(base), tmp_path / f"c{seed}", seed=seed
    )


def version_row(factory: sessionmaker[Session], version: int) -> tuple[str, str | None]:
    with factory() as session:
        row = AdapterRepository(session).get_version(name=NS, version=version)
        return row.status, row.reason


def publish(registry: AdapterRegistry, tmp_path: Path, seed: int, parent: int) -> int:
    return registry.publish_candidate(
        NS,
        candidate_files(registry, tmp_path, seed),
        parent_version=parent,
        training_run_id=None,
        metrics={"nll_before": 2.0, "nll_after": 1.0, "drift_kl": 0.01},
    )


def test_promotion_swaps_every_replica_before_the_pointer_flips(
    registry: AdapterRegistry, replicas: list[FakeVllm], tmp_path: Path
) -> None:
    factory = registry.session_factory
    base = registry.ensure_base_version(NS)
    assert base.version == 0 and registry.ensure_base_version(NS) == base  # idempotent
    assert all(r.state.adapters == {"geo-v0": str(base.path)} for r in replicas)

    v1 = publish(registry, tmp_path, 1, parent=0)
    assert version_row(factory, v1) == ("candidate", None)
    assert registry.desired_state() == {NS: (0, str(base.path))}  # a candidate is not served
    current = registry.promote(NS, v1, expected_parent=0)
    assert current.version == 1 and registry.current(NS).version == 1
    assert all("geo-v1" in r.state.adapters for r in replicas)
    assert registry.desired_state() == {NS: (1, str(current.path))}
    assert version_row(factory, 0)[0] == "retired"

    # a replica refuses the load: unloaded from the other, marked failed, current unchanged
    v2 = publish(registry, tmp_path, 2, parent=1)
    replicas[1].state.faults.append(Fault("/v1/load_lora_adapter", status=500))
    with pytest.raises(PromotionFailed, match="hot-swap failed"):
        registry.promote(NS, v2)
    assert version_row(factory, v2)[0] == "failed" and "hot-swap failed" in version_row(factory, v2)[1]
    assert registry.current(NS).version == 1 and all("geo-v2" not in r.state.adapters for r in replicas)

    # files that no longer match their sha256 never reach vLLM
    v3 = publish(registry, tmp_path, 3, parent=1)
    (registry.store.path(NS, v3) / ADAPTER_WEIGHTS_FILE).write_bytes(b"tampered")
    loads = replicas[0].calls("/v1/load_lora_adapter")
    with pytest.raises(PromotionFailed, match="integrity check failed"):
        registry.promote(NS, v3)
    assert version_row(factory, v3)[0] == "failed" and replicas[0].calls("/v1/load_lora_adapter") == loads
    assert registry.current(NS).version == 1

    # trained from v0 while v1 became current: promoting it would drop v1's update
    v4 = publish(registry, tmp_path, 4, parent=0)
    with pytest.raises(StaleParent):
        registry.promote(NS, v4, expected_parent=0)
    assert version_row(factory, v4)[0] == "rejected" and registry.current(NS).version == 1


def test_rollback_takes_the_same_verified_path(
    registry: AdapterRegistry, replicas: list[FakeVllm], tmp_path: Path
) -> None:
    factory = registry.session_factory
    registry.ensure_base_version(NS)
    registry.promote(NS, publish(registry, tmp_path, 1, parent=0))
    registry.promote(NS, publish(registry, tmp_path, 2, parent=1))

    replicas[0].state.faults.append(Fault("/v1/load_lora_adapter", status=500))
    with pytest.raises(PromotionFailed):
        registry.rollback(NS)  # to v1: a replica outage is not v1's fault
    assert registry.current(NS).version == 2 and version_row(factory, 1)[0] == "retired"

    assert registry.rollback(NS, reason="bad answers").version == 1
    assert version_row(factory, 2) == ("retired", "bad answers")
    assert all("geo-v1" in r.state.adapters for r in replicas)

    (registry.store.path(NS, 0) / ADAPTER_WEIGHTS_FILE).write_bytes(b"tampered")
    with pytest.raises(PromotionFailed, match="integrity"):
        registry.rollback(NS, to=0)
    assert registry.current(NS).version == 1 and version_row(factory, 0)[0] == "failed"


def test_a_folder_left_by_a_crashed_publish_is_replaced(registry: AdapterRegistry, tmp_path: Path) -> None:
    registry.ensure_base_version(NS)
    orphan = registry.store.path(NS, 1)
    orphan.mkdir()
    (orphan / "adapter_config.json").write_text("{}")
    version = publish(registry, tmp_path, 1, parent=0)
    assert version == 1
    registry.store.verify(NS, 1, None)
    assert registry.store.versions(NS) == [0, 1]
