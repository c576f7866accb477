"""Immutable adapter versions on disk: `<root>/<namespace>/v<N>/` with the peft files and `loraloop.json`.

Owns publishing (temp dir in the same parent, fsync, rename; never overwrites), the content digest,
verification and the zero-initialised v0 adapter. Files only: it knows nothing of the database, the
current-version pointer or vLLM; callers record the returned sha256 and decide what is served.

Digest (`dir_sha256`): every regular file under the version folder except `loraloop.json` (which
holds the digest and so cannot be covered by it), sorted by POSIX relative path; for each one the
line `"<relpath>\\t<size>\\t<sha256 hex of content>\\n"` is fed, UTF-8, into one SHA-256. The hex
digest of that stream is the version's sha256. `loraloop.json` also records each file's size/sha256.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import socket
import tempfile
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

__all__ = [
    "ADAPTER_CONFIG_FILE",
    "ADAPTER_WEIGHTS_FILE",
    "METADATA_FILE",
    "NAMESPACE_PATTERN",
    "NAMESPACE_RULE",
    "AdapterExists",
    "AdapterIntegrityError",
    "AdapterNotFound",
    "AdapterStore",
    "AdapterStoreError",
    "PublishedAdapter",
    "dir_sha256",
    "file_digests",
    "is_valid_namespace",
]

ADAPTER_CONFIG_FILE = "adapter_config.json"
ADAPTER_WEIGHTS_FILE = "adapter_model.safetensors"
METADATA_FILE = "loraloop.json"
PEFT_FILES = (ADAPTER_CONFIG_FILE, ADAPTER_WEIGHTS_FILE)
METADATA_FORMAT = 1

# The one namespace rule (the API's schemas check it too): a namespace is also a folder name and a
# vLLM adapter name, so a safe, short identifier.
NAMESPACE_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$"
NAMESPACE_RULE = (
    "must be 1-64 characters of letters, digits, '.', '_' or '-', start with a letter or digit and not contain '..'"
)
_NAMESPACE_RE = re.compile(NAMESPACE_PATTERN)
_VERSION_DIR_RE = re.compile(r"^v(0|[1-9][0-9]*)$")
_TEMP_PREFIX = ".tmp-"
_HASH_CHUNK = 1 << 20


class AdapterStoreError(Exception):
    """Base class of the adapter store's errors."""


class AdapterExists(AdapterStoreError):
    """The version folder already exists; versions are immutable."""


class AdapterNotFound(AdapterStoreError):
    """No published version folder for this namespace/version."""


class AdapterIntegrityError(AdapterStoreError):
    """The files on disk do not match the recorded digest (tampered, truncated, missing or extra)."""


@dataclass(frozen=True)
class PublishedAdapter:
    namespace: str
    version: int
    path: Path
    sha256: str


def _file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while chunk := handle.read(_HASH_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def file_digests(path: Path) -> dict[str, dict[str, Any]]:
    """`{relpath: {"size", "sha256"}}` for every regular file under `path` except `loraloop.json`."""
    path = Path(path)
    digests: dict[str, dict[str, Any]] = {}
    for file in sorted(p for p in path.rglob("*") if p.is_file() or p.is_symlink()):
        relpath = file.relative_to(path).as_posix()
        if relpath == METADATA_FILE:
            continue
        if file.is_symlink():
            raise AdapterIntegrityError(f"{file}: symlinks are not allowed in an adapter folder")
        digests[relpath] = {"size": file.stat().st_size, "sha256": _file_sha256(file)}
    return dict(sorted(digests.items()))


def _digest_of(digests: Mapping[str, Mapping[str, Any]]) -> str:
    stream = hashlib.sha256()
    for relpath in sorted(digests):
        entry = digests[relpath]
        stream.update(f"{relpath}\t{entry['size']}\t{entry['sha256']}\n".encode())
    return stream.hexdigest()


def dir_sha256(path: Path) -> str:
    """The version digest of the folder `path` (see the module docstring for the exact definition)."""
    return _digest_of(file_digests(Path(path)))


def _fsync_path(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def is_valid_namespace(namespace: str) -> bool:
    return bool(_NAMESPACE_RE.fullmatch(namespace)) and ".." not in namespace


def _check_namespace(namespace: str) -> None:
    if not is_valid_namespace(namespace):
        raise ValueError(f"namespace {namespace!r} {NAMESPACE_RULE}")


def _check_version(version: int) -> None:
    if isinstance(version, bool) or not isinstance(version, int) or version < 0:
        raise ValueError(f"version must be a non-negative int, got {version!r}")


def _host_tag() -> str:
    return socket.gethostname().replace("-", "_")


def _temp_is_local(name: str) -> bool:
    parts = name[len(_TEMP_PREFIX) :].split("-")
    return len(parts) >= 4 and parts[1] == _host_tag()


def _temp_owner_alive(name: str) -> bool:
    """Whether the local temp folder `name` (`.tmp-v<N>-<host>-<pid>-<rand>`) has a live owner process."""
    try:
        pid = int(name[len(_TEMP_PREFIX) :].split("-")[2])
    except (IndexError, ValueError):
        return False
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class AdapterStore:
    """The adapter registry's files under `root` (e.g. `<data_dir>/adapters`)."""

    def __init__(
        self, root: Path, *, clean_stale_temp: bool = True, stale_temp_age_s: float = 3600.0
    ) -> None:
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self.stale_temp_age_s = stale_temp_age_s
        if clean_stale_temp:
            self.remove_stale_temp_dirs()

    # --- layout --------------------------------------------------------------------------------
    def path(self, namespace: str, version: int) -> Path:
        _check_namespace(namespace)
        _check_version(version)
        return self.root / namespace / f"v{version}"

    def namespaces(self) -> list[str]:
        return sorted(p.name for p in self.root.iterdir() if p.is_dir() and _NAMESPACE_RE.match(p.name))

    def versions(self, namespace: str) -> list[int]:
        """Published versions of `namespace`, ascending; temp folders of unfinished publishes are ignored."""
        _check_namespace(namespace)
        folder = self.root / namespace
        if not folder.is_dir():
            return []
        found = []
        for child in folder.iterdir():
            match = _VERSION_DIR_RE.match(child.name)
            if match and child.is_dir():
                found.append(int(match.group(1)))
        return sorted(found)

    def read_metadata(self, namespace: str, version: int) -> dict[str, Any]:
        folder = self.path(namespace, version)
        if not folder.is_dir():
            raise AdapterNotFound(f"no adapter {namespace} v{version} under {self.root}")
        try:
            return json.loads((folder / METADATA_FILE).read_text(encoding="utf-8"))
        except (OSError, ValueError) as error:
            raise AdapterIntegrityError(f"{folder / METADATA_FILE}: unreadable metadata ({error})") from error

    # --- writing -------------------------------------------------------------------------------
    def publish(
        self, namespace: str, version: int, src_dir: Path, metadata: Mapping[str, Any]
    ) -> PublishedAdapter:
        """Copy the peft files of `src_dir` into a new immutable version folder.

        `metadata` (JSON-serialisable: base model, parent version, training run, data range, metrics...)
        is stored in `loraloop.json` next to `files` (per-file size/sha256) and `sha256` (the digest).
        Raises `AdapterExists` when the version folder exists, even if another process wins the race.
        """
        final = self.path(namespace, version)
        src_dir = Path(src_dir)
        missing = [name for name in PEFT_FILES if not (src_dir / name).is_file()]
        if missing:
            raise FileNotFoundError(f"{src_dir} lacks the peft files {missing}")
        if final.exists():
            raise AdapterExists(f"adapter {namespace} v{version} already exists at {final}")
        reserved = {"files", "sha256", "namespace", "version", "format"} & set(metadata)
        if reserved:
            raise ValueError(f"metadata keys {sorted(reserved)} are written by the store itself")

        final.parent.mkdir(parents=True, exist_ok=True)
        temp = Path(
            tempfile.mkdtemp(
                prefix=f"{_TEMP_PREFIX}v{version}-{_host_tag()}-{os.getpid()}-",
                dir=final.parent,
            )
        )
        try:
            for name in PEFT_FILES:
                shutil.copyfile(src_dir / name, temp / name)
            digests = file_digests(temp)
            sha256 = _digest_of(digests)
            document = {
                "format": METADATA_FORMAT,
                "namespace": namespace,
                "version": version,
                **dict(metadata),
                "files": digests,
                "sha256": sha256,
            }
            (temp / METADATA_FILE).write_text(
                json.dumps(document, indent=2, sort_keys=True, default=str) + "\n", encoding="utf-8"
            )
            for file in temp.iterdir():
                _fsync_path(file)
            os.chmod(temp, 0o755)
            _fsync_path(temp)
            try:
                os.rename(temp, final)  # fails on an existing non-empty folder: never overwrites
            except OSError as error:
                if final.exists():
                    raise AdapterExists(
                        f"adapter {namespace} v{version} already exists at {final}"
                    ) from error
                raise
            _fsync_path(final.parent)
        except BaseException:
            shutil.rmtree(temp, ignore_errors=True)
            raise
        return PublishedAdapter(namespace=namespace, version=version, path=final, sha256=sha256)

    def write_zero_adapter(
        self,
        namespace: str,
        *,
        base_model: Path,
        lora_config: Any,
        version: int = 0,
        metadata: Mapping[str, Any] | None = None,
        seed: int = 0,
    ) -> PublishedAdapter:
        """Publish an adapter whose `lora_B` weights are zero: its outputs equal the base model's.

        `lora_config` is a `peft.LoraConfig`. The base model is instantiated on the meta device (no
        weights are read), so this is cheap even for large models. `lora_A` gets peft's usual random
        init, so training can warm-start from this version.
        """
        with tempfile.TemporaryDirectory(prefix=".zero-", dir=self.root) as scratch:
            build_zero_adapter(Path(base_model), lora_config, Path(scratch), seed=seed)
            meta = {"base_model": str(base_model), "parent_version": None, "kind": "zero"}
            meta.update(metadata or {})
            return self.publish(namespace, version, Path(scratch), meta)

    # --- reading / checking ----------------------------------------------------------------------
    def verify(self, namespace: str, version: int, expected_sha256: str | None = None) -> PublishedAdapter:
        """Recompute the digest; raise `AdapterIntegrityError` unless files, `loraloop.json` and
        `expected_sha256` (the value the caller recorded, e.g. in the database) all agree."""
        folder = self.path(namespace, version)
        metadata = self.read_metadata(namespace, version)
        recorded_files = metadata.get("files")
        recorded_sha = metadata.get("sha256")
        if not isinstance(recorded_files, dict) or not isinstance(recorded_sha, str):
            raise AdapterIntegrityError(f"{folder / METADATA_FILE}: lacks 'files'/'sha256'")
        actual_files = file_digests(folder)
        if set(actual_files) != set(recorded_files):
            raise AdapterIntegrityError(
                f"{folder}: files {sorted(actual_files)} differ from recorded {sorted(recorded_files)}"
            )
        for relpath, entry in actual_files.items():
            if entry != recorded_files[relpath]:
                raise AdapterIntegrityError(
                    f"{folder / relpath}: content does not match its recorded sha256/size"
                )
        actual_sha = _digest_of(actual_files)
        if actual_sha != recorded_sha:
            raise AdapterIntegrityError(f"{folder}: digest {actual_sha} != recorded {recorded_sha}")
        if expected_sha256 is not None and actual_sha != expected_sha256:
            raise AdapterIntegrityError(f"{folder}: digest {actual_sha} != expected {expected_sha256}")
        return PublishedAdapter(namespace=namespace, version=version, path=folder, sha256=actual_sha)

    def remove_stale_temp_dirs(self) -> list[Path]:
        """Delete folders left by crashed publishes and returns what was removed.

        A publish temp folder (`<ns>/.tmp-v<N>-<host>-<pid>-<rand>`) is stale when its owner process
        on this host is gone, or once older than `stale_temp_age_s` (publishes take seconds).
        Scratch folders of `write_zero_adapter` (`<root>/.zero-*`) are stale once that old.
        """
        removed: list[Path] = []
        now = time.time()
        candidates = [p for p in self.root.iterdir() if p.name.startswith(".zero-")]
        for namespace_dir in self.root.iterdir():
            if namespace_dir.is_dir() and _NAMESPACE_RE.match(namespace_dir.name):
                candidates += [p for p in namespace_dir.iterdir() if p.name.startswith(_TEMP_PREFIX)]
        for temp in candidates:
            try:
                age = now - temp.stat().st_mtime
            except FileNotFoundError:
                continue
            if temp.name.startswith(_TEMP_PREFIX) and _temp_is_local(temp.name):
                # a reused pid (containers restart with the same pid) must not pin it forever
                stale = not _temp_owner_alive(temp.name) or age > self.stale_temp_age_s
            else:
                stale = age > self.stale_temp_age_s
            if stale:
                shutil.rmtree(temp, ignore_errors=True)
                removed.append(temp)
        return removed


def build_zero_adapter(base_model: Path, lora_config: Any, out_dir: Path, *, seed: int = 0) -> Path:
    """Write peft files for `lora_config` on `base_model` with `lora_B == 0` into `out_dir`."""
    from peft import get_peft_model, get_peft_model_state_dict
    from safetensors.torch import save_file
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(base_model)
    with torch.device("meta"):
        skeleton = AutoModelForCausalLM.from_config(config)
    lora_config = _copy_lora_config(lora_config, base_model)
    peft_model = get_peft_model(skeleton, lora_config)
    generator = torch.Generator().manual_seed(seed)
    weights: dict[str, torch.Tensor] = {}
    for key, meta_tensor in get_peft_model_state_dict(peft_model).items():
        if "lora_B" in key:
            weights[key] = torch.zeros(meta_tensor.shape, dtype=torch.float32)
        elif "lora_A" in key:
            fan_in = meta_tensor.shape[1]
            bound = 1.0 / fan_in**0.5  # peft's kaiming_uniform(a=sqrt(5)) bound
            weights[key] = (torch.rand(meta_tensor.shape, generator=generator) * 2 - 1) * bound
        else:
            raise ValueError(f"unexpected adapter tensor {key}: only lora_A/lora_B are supported for v0")
    if not weights:
        raise ValueError(f"target_modules {lora_config.target_modules} matched no module of {base_model}")
    out_dir.mkdir(parents=True, exist_ok=True)
    save_file(
        {k: v.contiguous() for k, v in weights.items()},
        str(out_dir / ADAPTER_WEIGHTS_FILE),
        metadata={"format": "pt"},
    )
    peft_model.peft_config["default"].save_pretrained(str(out_dir))
    return out_dir


def _copy_lora_config(lora_config: Any, base_model: Path) -> Any:
    from peft import LoraConfig

    if not isinstance(lora_config, LoraConfig):
        raise TypeError(f"lora_config must be a peft.LoraConfig, got {type(lora_config).__name__}")
    values = lora_config.to_dict()
    values["base_model_name_or_path"] = str(base_model)
    values["inference_mode"] = True
    for derived in ("peft_type", "auto_mapping", "revision"):
        values.pop(derived, None)
    if isinstance(values.get("target_modules"), list):
        values["target_modules"] = set(values["target_modules"])
    return LoraConfig(**values)
