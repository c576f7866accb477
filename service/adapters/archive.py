"""The download form of an adapter version: a deterministic tar streamed from its folder.

`resolve_version_dir` maps (name, version) to `<adapters_dir>/<name>/v<version>` and refuses any
path that resolves outside `adapters_dir` (symlinks included). `TarStream` yields the archive in
chunks without holding a file in memory, with its exact length known up front. Members are
`<name>/v<version>/<relpath>`, mode 0644, mtime 0, owner 0: equal folders give equal bytes.
Knows nothing about HTTP or the database.
"""

from __future__ import annotations

import tarfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

BLOCK = 512
CHUNK = 1 << 20


class UnsafeAdapterPath(ValueError):
    """The requested adapter folder would lie outside the adapters directory."""


def resolve_version_dir(adapters_dir: Path, name: str, version: int) -> Path:
    """The version folder, guaranteed to be inside `adapters_dir` after resolving symlinks."""
    if not name or "/" in name or "\\" in name or "\x00" in name or name in (".", "..") or ".." in name:
        raise UnsafeAdapterPath(f"adapter name {name!r} is not a safe folder name")
    if version < 0:
        raise UnsafeAdapterPath(f"version {version} is negative")
    root = adapters_dir.resolve()
    folder = (root / name / f"v{version}").resolve()
    if not folder.is_relative_to(root) or folder == root:
        raise UnsafeAdapterPath(f"adapter {name!r} v{version} resolves outside the adapters directory")
    return folder


@dataclass(frozen=True)
class _Member:
    path: Path
    header: bytes
    size: int


class TarStream:
    """An uncompressed POSIX tar of `folder`'s regular files, as an iterator of byte chunks."""

    def __init__(self, folder: Path, prefix: str) -> None:
        self.folder = folder
        self.members: list[_Member] = []
        for path in sorted(p for p in folder.rglob("*") if p.is_file() and not p.is_symlink()):
            info = tarfile.TarInfo(f"{prefix}/{path.relative_to(folder).as_posix()}")
            info.size = path.stat().st_size
            info.mode = 0o644
            info.mtime = 0
            info.uid = info.gid = 0
            info.uname = info.gname = ""
            self.members.append(
                _Member(path=path, header=info.tobuf(format=tarfile.PAX_FORMAT), size=info.size)
            )

    @property
    def content_length(self) -> int:
        total = sum(len(m.header) + m.size + _padding(m.size) for m in self.members)
        return total + 2 * BLOCK

    def __iter__(self) -> Iterator[bytes]:
        for member in self.members:
            yield member.header
            remaining = member.size
            with member.path.open("rb") as handle:
                while remaining > 0:
                    chunk = handle.read(min(CHUNK, remaining))
                    if not chunk:
                        raise OSError(f"{member.path} shrank while being streamed")
                    remaining -= len(chunk)
                    yield chunk
            yield b"\0" * _padding(member.size)
        yield b"\0" * (2 * BLOCK)


def _padding(size: int) -> int:
    return (BLOCK - size % BLOCK) % BLOCK
