"""service.adapters.archive: the streamed tar is a valid, deterministic archive; paths stay inside."""

from __future__ import annotations

import io
import tarfile
from pathlib import Path

import pytest

from service.adapters.archive import TarStream, UnsafeAdapterPath, resolve_version_dir


def make_version(root: Path, name: str = "geo", version: int = 1) -> Path:
    folder = root / name / f"v{version}"
    (folder / "sub").mkdir(parents=True)
    (folder / "adapter_config.json").write_text('{"r": 8}')
    (folder / "adapter_model.safetensors").write_bytes(bytes(range(256)) * 7 + b"x")  # not block-aligned
    (folder / "sub" / "empty.txt").write_bytes(b"")
    return folder


def test_tar_stream_round_trips_with_exact_length(tmp_path: Path) -> None:
    folder = make_version(tmp_path)
    stream = TarStream(folder, prefix="geo/v1")
    data = b"".join(stream)
    assert len(data) == stream.content_length
    with tarfile.open(fileobj=io.BytesIO(data)) as archive:
        names = sorted(archive.getnames())
        assert names == [
            "geo/v1/adapter_config.json",
            "geo/v1/adapter_model.safetensors",
            "geo/v1/sub/empty.txt",
        ]
        weights = archive.extractfile("geo/v1/adapter_model.safetensors")
        assert weights is not None and weights.read() == (folder / "adapter_model.safetensors").read_bytes()
        assert all(member.mtime == 0 and member.mode == 0o644 for member in archive.getmembers())


def test_tar_stream_is_deterministic(tmp_path: Path) -> None:
    first = b"".join(TarStream(make_version(tmp_path / "a"), prefix="geo/v1"))
    second = b"".join(TarStream(make_version(tmp_path / "b"), prefix="geo/v1"))
    assert first == second


def test_resolve_version_dir_stays_inside(tmp_path: Path) -> None:
    root = tmp_path / "adapters"
    folder = make_version(root)
    assert resolve_version_dir(root, "geo", 1) == folder.resolve()
    for name in ("..", "../etc", "a/b", "a\\b", "x\x00", "", "a..b"):
        with pytest.raises(UnsafeAdapterPath):
            resolve_version_dir(root, name, 1)
    with pytest.raises(UnsafeAdapterPath):
        resolve_version_dir(root, "geo", -1)


def test_symlinked_folder_pointing_outside_is_refused(tmp_path: Path) -> None:
    root = tmp_path / "adapters"
    outside = make_version(tmp_path / "elsewhere", "evil", 1)
    (root / "evil").mkdir(parents=True)
    (root / "evil" / "v1").symlink_to(outside, target_is_directory=True)
    with pytest.raises(UnsafeAdapterPath):
        resolve_version_dir(root, "evil", 1)
