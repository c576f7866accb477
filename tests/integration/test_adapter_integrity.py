"""Adapter integrity at the registry (service/adapters/registry.py): a version whose files were tampered with,
truncated, extended or stripped of their metadata is refused BEFORE any vLLM replica is asked to
load it (promote and rollback alike), it is marked failed, and the current version keeps serving.
The replica is tests/unit/fake_vllm.py's HTTP server, which records every request it gets.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from sqlalchemy.orm import Session, sessionmaker

from deploy.hotswap import HotSwapper
from deploy.vllm_client import VllmClient
from memory_store.db import make_engine, make_session_factory, upgrade_database
from memory_store.repositories import AdapterRepository
from service.adapters.registry import AdapterRegistry, PromotionFailed
from service.config import Settings
from tests.unit.fake_vllm import FakeVllm
from training.adapter_store import (
    ADAPTER_CONFIG_FILE,
    ADAPTER_WEIGHTS_FILE,
    METADATA_FILE,
    build_zero_adapter,
)

pytestmark = pytest.mark.integration

NAMESPACE = "shop"
LOAD = "/v1/load_lora_adapter"


@pytest.fixture
def fake_vllm() -> Iterator[FakeVllm]:
    with FakeVllm() as fake:
        yield fake


@pytest.fixture
def registry(tmp_path: Path, tiny_model_dir: Path, fake_vllm: FakeVllm) -> Iterator[AdapterRegistry]:
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
        lora_target_modules="q_proj,v_proj",
    )
    swapper = HotSwapper([VllmClient(fake_vllm.url, timeout=5, retries=0)], drain_s=0, max_loras=4)
    yield AdapterRegistry.from_settings(settings, make_session_factory(engine), swapper)
    engine.dispose()


def publish(registry: AdapterRegistry, tmp_path: Path, seed: int, parent: int | None) -> int:
    from service.component_configs import train_config

    source = tmp_path / f"src-{seed}"
    config = train_config(registry.settings).lora_config(registry.settings.base_model)
    build_zero_adapter(registry.settings.base_model, config, source, seed=seed)
    return registry.publish_candidate(
        NAMESPACE, source, parent_version=parent, training_run_id=None, metrics={}
    )


def status_of(factory: sessionmaker[Session], version: int) -> str:
    with factory() as session:
        return AdapterRepository(session).get_version(name=NAMESPACE, version=version).status


def flip_a_byte(folder: Path) -> None:
    weights = folder / ADAPTER_WEIGHTS_FILE
    data = bytearray(weights.read_bytes())
    data[len(data) // 2] ^= 0x01
    weights.write_bytes(bytes(data))


def truncate(folder: Path) -> None:
    weights = folder / ADAPTER_WEIGHTS_FILE
    os.truncate(weights, weights.stat().st_size // 2)


def add_a_file(folder: Path) -> None:
    (folder / "extra.bin").write_bytes(b"\x00" * 16)


def rewrite_config(folder: Path) -> None:
    config = json.loads((folder / ADAPTER_CONFIG_FILE).read_text())
    config["r"] = 64
    (folder / ADAPTER_CONFIG_FILE).write_text(json.dumps(config))


def forge_metadata(folder: Path) -> None:
    """Tamper with the weights AND update loraloop.json to match: only the database digest can tell."""
    from training.adapter_store import _digest_of, file_digests

    flip_a_byte(folder)
    metadata = json.loads((folder / METADATA_FILE).read_text())
    metadata["files"] = file_digests(folder)
    metadata["sha256"] = _digest_of(metadata["files"])
    (folder / METADATA_FILE).write_text(json.dumps(metadata))


def drop_metadata(folder: Path) -> None:
    (folder / METADATA_FILE).unlink()


def drop_weights(folder: Path) -> None:
    (folder / ADAPTER_WEIGHTS_FILE).unlink()


TAMPERINGS: dict[str, Callable[[Path], None]] = {
    "flipped-byte": flip_a_byte,
    "truncated": truncate,
    "extra-file": add_a_file,
    "rewritten-config": rewrite_config,
    "forged-metadata": forge_metadata,
    "missing-metadata": drop_metadata,
    "missing-weights": drop_weights,
}


@pytest.mark.parametrize("tamper", list(TAMPERINGS))
def test_tampered_candidate_is_refused_before_loading(
    registry: AdapterRegistry, fake_vllm: FakeVllm, tmp_path: Path, tamper: str
) -> None:
    v0 = publish(registry, tmp_path, seed=0, parent=None)
    registry.promote(NAMESPACE, v0)
    v1 = publish(registry, tmp_path, seed=1, parent=v0)
    loads_before = fake_vllm.calls(LOAD)
    TAMPERINGS[tamper](registry.store.path(NAMESPACE, v1))

    with pytest.raises(PromotionFailed, match="integrity check failed"):
        registry.promote(NAMESPACE, v1, expected_parent=v0)

    assert fake_vllm.calls(LOAD) == loads_before, "a tampered version reached vLLM"
    assert f"{NAMESPACE}-v{v1}" not in fake_vllm.state.adapters
    assert f"{NAMESPACE}-v{v0}" in fake_vllm.state.adapters
    current = registry.current(NAMESPACE)
    assert current is not None and current.version == v0
    assert status_of(registry.session_factory, v1) == "failed"
    assert status_of(registry.session_factory, v0) == "current"
    registry.store.verify(NAMESPACE, v0)  # the serving version's files are untouched


@pytest.mark.parametrize("tamper", ["flipped-byte", "truncated"])
def test_rollback_to_a_tampered_version_is_refused(
    registry: AdapterRegistry, fake_vllm: FakeVllm, tmp_path: Path, tamper: str
) -> None:
    v0 = publish(registry, tmp_path, seed=0, parent=None)
    registry.promote(NAMESPACE, v0)
    v1 = publish(registry, tmp_path, seed=1, parent=v0)
    registry.promote(NAMESPACE, v1, expected_parent=v0)
    TAMPERINGS[tamper](registry.store.path(NAMESPACE, v0))
    loads_before = fake_vllm.calls(LOAD)

    with pytest.raises(PromotionFailed, match="integrity check failed"):
        registry.rollback(NAMESPACE, v0)

    assert fake_vllm.calls(LOAD) == loads_before
    current = registry.current(NAMESPACE)
    assert current is not None and current.version == v1
    assert status_of(registry.session_factory, v1) == "current"


def test_an_intact_candidate_is_loaded_then_made_current(
    registry: AdapterRegistry, fake_vllm: FakeVllm, tmp_path: Path
) -> None:
    """The control case: the same steps without tampering end with v1 loaded and current."""
    v0 = publish(registry, tmp_path, seed=0, parent=None)
    registry.promote(NAMESPACE, v0)
    v1 = publish(registry, tmp_path, seed=1, parent=v0)
    registry.promote(NAMESPACE, v1, expected_parent=v0)
    loaded = [body for method, path, body in fake_vllm.state.requests if path == LOAD]
    assert [body["lora_name"] for body in loaded] == [f"{NAMESPACE}-v{v0}", f"{NAMESPACE}-v{v1}"]
    assert loaded[-1]["lora_path"] == str(registry.store.path(NAMESPACE, v1))
    current = registry.current(NAMESPACE)
    assert current is not None and current.version == v1
