"""Adapter store: immutable, atomic, verifiable version folders and the zero v0 adapter."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from training import adapter_store
from training.adapter_store import (
    ADAPTER_CONFIG_FILE,
    ADAPTER_WEIGHTS_FILE,
    METADATA_FILE,
    AdapterExists,
    AdapterIntegrityError,
    AdapterStore,
    dir_sha256,
)


def write_peft_files(folder: Path, weights: bytes = b"weights-v1") -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / ADAPTER_CONFIG_FILE).write_text('{"r": 8}')
    (folder / ADAPTER_WEIGHTS_FILE).write_bytes(weights)
    (folder / "README.md").write_text("peft model card: not part of a version")
    return folder


@pytest.fixture()
def store(tmp_path: Path) -> AdapterStore:
    return AdapterStore(tmp_path / "adapters")


@pytest.fixture()
def published(store: AdapterStore, tmp_path: Path):
    src = write_peft_files(tmp_path / "src")
    metadata = {"base_model": "/models/tiny", "parent_version": None, "metrics": {"nll_after": 1.5}}
    return store.publish("ns", 1, src, metadata)


def test_publish_writes_layout_metadata_and_digest(store: AdapterStore, published) -> None:
    assert published.path == store.root / "ns" / "v1"
    assert sorted(p.name for p in published.path.iterdir()) == sorted(
        [ADAPTER_CONFIG_FILE, ADAPTER_WEIGHTS_FILE, METADATA_FILE]
    )
    metadata = json.loads((published.path / METADATA_FILE).read_text())
    assert metadata["base_model"] == "/models/tiny"
    assert metadata["metrics"] == {"nll_after": 1.5}
    assert metadata["version"] == 1 and metadata["namespace"] == "ns"
    assert metadata["sha256"] == published.sha256 == dir_sha256(published.path)
    assert set(metadata["files"]) == {ADAPTER_CONFIG_FILE, ADAPTER_WEIGHTS_FILE}
    assert store.verify("ns", 1, published.sha256).sha256 == published.sha256
    assert store.versions("ns") == [1]
    assert [p.name for p in published.path.parent.iterdir()] == ["v1"]  # no temp dir left


def test_digest_covers_content_not_folder_name_and_not_metadata(store: AdapterStore, tmp_path: Path) -> None:
    first = store.publish("ns", 1, write_peft_files(tmp_path / "a"), {"run": 1})
    same = store.publish("other", 7, write_peft_files(tmp_path / "b"), {"run": 2})
    changed = store.publish("ns", 2, write_peft_files(tmp_path / "c", b"weights-v2"), {"run": 1})
    assert first.sha256 == same.sha256
    assert changed.sha256 != first.sha256


def test_versions_are_never_overwritten(store: AdapterStore, published, tmp_path: Path) -> None:
    before = (published.path / ADAPTER_WEIGHTS_FILE).read_bytes()
    with pytest.raises(AdapterExists):
        store.publish("ns", 1, write_peft_files(tmp_path / "other", b"other weights"), {})
    assert (published.path / ADAPTER_WEIGHTS_FILE).read_bytes() == before
    assert store.verify("ns", 1, published.sha256)


def test_rename_race_is_reported_as_exists(store: AdapterStore, tmp_path: Path, monkeypatch) -> None:
    src = write_peft_files(tmp_path / "src")
    real_rename = os.rename

    def rival_publishes_first(src_path, dst_path):
        Path(dst_path).mkdir()
        (Path(dst_path) / "winner").write_text("x")
        real_rename(src_path, dst_path)

    monkeypatch.setattr(adapter_store.os, "rename", rival_publishes_first)
    with pytest.raises(AdapterExists):
        store.publish("ns", 3, src, {})
    assert sorted(p.name for p in (store.root / "ns").iterdir()) == ["v3"]  # our temp dir was removed


@pytest.mark.parametrize(
    "tamper",
    ["flip_byte", "truncate", "delete_weights", "extra_file", "edit_recorded_sha"],
)
def test_verify_detects_tampering(store: AdapterStore, published, tamper: str) -> None:
    weights = published.path / ADAPTER_WEIGHTS_FILE
    if tamper == "flip_byte":
        data = bytearray(weights.read_bytes())
        data[0] ^= 0xFF
        weights.write_bytes(bytes(data))
    elif tamper == "truncate":
        weights.write_bytes(weights.read_bytes()[:-1])
    elif tamper == "delete_weights":
        weights.unlink()
    elif tamper == "extra_file":
        (published.path / "injected.bin").write_bytes(b"x")
    elif tamper == "edit_recorded_sha":
        metadata_path = published.path / METADATA_FILE
        metadata = json.loads(metadata_path.read_text())
        metadata["sha256"] = "0" * 64
        metadata_path.write_text(json.dumps(metadata))
    with pytest.raises(AdapterIntegrityError):
        store.verify("ns", 1, published.sha256)


def test_verify_rejects_an_unexpected_digest(store: AdapterStore, published) -> None:
    with pytest.raises(AdapterIntegrityError, match="expected"):
        store.verify("ns", 1, "f" * 64)


def test_publish_rejects_bad_input(store: AdapterStore, tmp_path: Path) -> None:
    src = write_peft_files(tmp_path / "src")
    with pytest.raises(ValueError, match="namespace"):
        store.publish("../escape", 1, src, {})
    with pytest.raises(ValueError, match="written by the store"):
        store.publish("ns", 1, src, {"sha256": "forged"})
    (src / ADAPTER_WEIGHTS_FILE).unlink()
    with pytest.raises(FileNotFoundError):
        store.publish("ns", 1, src, {})
    assert store.versions("ns") == []


def test_failed_publish_leaves_nothing(store: AdapterStore, tmp_path: Path, monkeypatch) -> None:
    def disk_full(path: Path) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(adapter_store, "_fsync_path", disk_full)
    with pytest.raises(OSError, match="No space"):
        store.publish("ns", 1, write_peft_files(tmp_path / "src"), {})
    assert list((store.root / "ns").iterdir()) == []


def _dead_pid() -> int:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def test_crash_leftovers_are_ignored_and_cleaned_on_start(store: AdapterStore, published) -> None:
    host = adapter_store._host_tag()
    crashed = published.path.parent / f".tmp-v2-{host}-{_dead_pid()}-abc123"
    write_peft_files(crashed)
    ours_in_flight = published.path.parent / f".tmp-v3-{host}-{os.getpid()}-def456"
    write_peft_files(ours_in_flight)
    remote_recent = published.path.parent / ".tmp-v4-otherhost-12345-ghi789"
    write_peft_files(remote_recent)
    remote_old = published.path.parent / ".tmp-v5-otherhost-12345-jkl000"
    write_peft_files(remote_old)
    two_hours_ago = time.time() - 7200
    os.utime(remote_old, (two_hours_ago, two_hours_ago))
    assert store.versions("ns") == [1]

    AdapterStore(store.root)  # start-up cleanup

    left = sorted(p.name for p in published.path.parent.iterdir())
    assert left == sorted(["v1", ours_in_flight.name, remote_recent.name])
    assert store.verify("ns", 1, published.sha256)


def test_zero_adapter_is_identical_to_base(tmp_path: Path, tiny_model_dir: Path) -> None:
    from peft import PeftModel
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    from training.trainer import TrainConfig

    store = AdapterStore(tmp_path / "adapters")
    zero = store.write_zero_adapter(
        "ns", base_model=tiny_model_dir, lora_config=TrainConfig(rank=4).lora_config(), metadata={"run": None}
    )
    assert zero.version == 0 and store.versions("ns") == [0]
    assert store.verify("ns", 0, zero.sha256)
    metadata = store.read_metadata("ns", 0)
    assert metadata["base_model"] == str(tiny_model_dir) and metadata["parent_version"] is None
    tensors = load_file(str(zero.path / ADAPTER_WEIGHTS_FILE))
    lora_b = [t for k, t in tensors.items() if "lora_B" in k]
    lora_a = [t for k, t in tensors.items() if "lora_A" in k]
    assert lora_b and all(torch.count_nonzero(t) == 0 for t in lora_b)
    assert lora_a and all(torch.count_nonzero(t) > 0 for t in lora_a)
    config = json.loads((zero.path / ADAPTER_CONFIG_FILE).read_text())
    assert config["r"] == 4 and config["base_model_name_or_path"] == str(tiny_model_dir)

    base = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir), dtype=torch.float32).eval()
    input_ids = torch.tensor([[1, 5, 42, 7, 300, 9, 1000, 3]])
    with torch.inference_mode():
        expected = base(input_ids=input_ids).logits.clone()
        with_adapter = PeftModel.from_pretrained(base, str(zero.path)).eval()
        loaded_a = [
            m.lora_A["default"].weight for m in with_adapter.modules() if hasattr(m, "lora_A") and m.lora_A
        ]
        assert loaded_a and all(torch.count_nonzero(w) > 0 for w in loaded_a)
        assert torch.equal(with_adapter(input_ids=input_ids).logits, expected)
