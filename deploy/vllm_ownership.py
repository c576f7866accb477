"""Who owns the embedded vLLM's port. Owns the record `<data_dir>/run/vllm.json` that loraloop writes
for the server it started (instance id, pids and their kernel start times, port, model, owner), the
lookup of the processes listening on a TCP port (/proc), and the start-up verdict on a busy port:
a recorded earlier instance whose owner is gone may be stopped and replaced; anything else is not ours.

Knows processes, ports and that one file; knows nothing of vLLM's flags or HTTP API, adapters or the
database. Process identity is the pid AND its start time (pids are reused), plus the instance id in
the process's environment when it can be read.
"""

from __future__ import annotations

import ipaddress
import json
import logging
import os
import signal
import socket
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal

log = logging.getLogger(__name__)

INSTANCE_ENV = "LORALOOP_VLLM_INSTANCE_ID"
TCP_LISTEN = "0A"


# --- processes ----------------------------------------------------------------------------------


def _stat_fields(pid: int) -> list[str] | None:
    """The fields of /proc/<pid>/stat after the command name (state first), None when gone."""
    try:
        with open(f"/proc/{pid}/stat") as handle:
            return handle.read().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None


def process_start_ticks(pid: int) -> int | None:
    """When `pid` started, in clock ticks since boot (stat field 22); None when it is gone or a zombie."""
    fields = _stat_fields(pid)
    if fields is None or fields[0] == "Z":
        return None
    return int(fields[19])


def process_alive(pid: int, start_ticks: int | None = None) -> bool:
    """`pid` runs (not a zombie) and, when `start_ticks` is given, is the process that started then."""
    if pid <= 0:
        return False
    ticks = process_start_ticks(pid)
    if ticks is None:
        return False
    return start_ticks is None or ticks == start_ticks


def process_environ(pid: int) -> dict[str, str] | None:
    """The environment `pid` started with; None when it cannot be read (gone, another user)."""
    try:
        raw = Path(f"/proc/{pid}/environ").read_bytes()
    except OSError:
        return None
    pairs = (item.split(b"=", 1) for item in raw.split(b"\0") if b"=" in item)
    return {key.decode(errors="replace"): value.decode(errors="replace") for key, value in pairs}


def process_command(pid: int) -> str:
    """The command line of `pid` (shortened), or "" when it cannot be read."""
    try:
        argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return ""
    text = " ".join(part.decode(errors="replace") for part in argv if part)
    return text if len(text) <= 160 else text[:159] + "…"


def process_group(pid: int) -> int | None:
    try:
        return os.getpgid(pid)
    except (ProcessLookupError, PermissionError):
        return None


# --- ports --------------------------------------------------------------------------------------


def _decode_address(hex_address: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    raw = bytes.fromhex(hex_address)
    if len(raw) == 4:
        return ipaddress.IPv4Address(raw[::-1])
    # /proc/net/tcp6 prints four host-order 32-bit words
    return ipaddress.IPv6Address(b"".join(raw[i : i + 4][::-1] for i in range(0, 16, 4)))


def _conflicts(bound: ipaddress.IPv4Address | ipaddress.IPv6Address, host: str) -> bool:
    if isinstance(bound, ipaddress.IPv6Address) and bound.ipv4_mapped is not None:
        bound = bound.ipv4_mapped
    try:
        wanted = ipaddress.ip_address(socket.gethostbyname(host))
    except (OSError, ValueError):
        return True
    return bound.is_unspecified or wanted.is_unspecified or bound == wanted


def _listening_inodes(host: str, port: int) -> set[str]:
    inodes: set[str] = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            fields = line.split()
            if len(fields) < 10 or fields[3] != TCP_LISTEN:
                continue
            address, _, hex_port = fields[1].partition(":")
            if int(hex_port, 16) == port and _conflicts(_decode_address(address), host):
                inodes.add(fields[9])
    return inodes


def listening_pids(host: str, port: int) -> set[int]:
    """Processes holding a listening socket on `port` that a bind to `host` would clash with. Only
    processes whose descriptors this user may read are found (all of one's own)."""
    inodes = {f"socket:[{inode}]" for inode in _listening_inodes(host, port)}
    pids: set[int] = set()
    if not inodes:
        return pids
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            descriptors = os.listdir(f"/proc/{name}/fd")
        except OSError:
            continue
        for descriptor in descriptors:
            try:
                if os.readlink(f"/proc/{name}/fd/{descriptor}") in inodes:
                    pids.add(int(name))
                    break
            except OSError:
                continue
    return pids


def port_answers(host: str, port: int, timeout_s: float = 0.5) -> bool:
    """Something accepts TCP connections on host:port."""
    target = "127.0.0.1" if host in ("0.0.0.0", "") else "::1" if host == "::" else host
    try:
        with socket.create_connection((target, port), timeout=timeout_s):
            return True
    except OSError:
        return False


def describe_processes(pids: Sequence[int] | set[int]) -> str:
    if not pids:
        return "a process this user cannot see (no pid readable)"
    return ", ".join(f"pid {pid} ({process_command(pid) or '?'})" for pid in sorted(pids))


# --- the record ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class VllmRecord:
    """The embedded vLLM a loraloop process started: written once the server process exists,
    removed when loraloop stops it. `pgid` is the group loraloop can signal (the guard's)."""

    instance_id: str
    host: str
    port: int
    model: str
    pid: int  # vLLM's API server
    pid_start_ticks: int | None
    pgid: int
    owner_pid: int  # the loraloop process
    owner_start_ticks: int | None
    started_at: str  # ISO 8601, UTC

    def server_alive(self) -> bool:
        """The recorded server still runs: same pid, same start time, same instance id when readable."""
        if not process_alive(self.pid, self.pid_start_ticks):
            return False
        environ = process_environ(self.pid)
        return environ is None or environ.get(INSTANCE_ENV) == self.instance_id

    def owner_alive(self) -> bool:
        return process_alive(self.owner_pid, self.owner_start_ticks)


def write_record(path: Path, record: VllmRecord) -> None:
    """Atomically (temp file + rename), so a crash never leaves half a record."""
    path.parent.mkdir(parents=True, exist_ok=True)
    temp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    temp.write_text(json.dumps(asdict(record), indent=2) + "\n")
    os.replace(temp, path)


def read_record(path: Path) -> VllmRecord | None:
    """The record at `path`; None when absent or unreadable (an unreadable one is logged)."""
    try:
        data = json.loads(path.read_text())
        return VllmRecord(**data)
    except FileNotFoundError:
        return None
    except (OSError, ValueError, TypeError) as error:
        log.warning("ignoring unreadable vLLM record %s: %s", path, error)
        return None


def remove_record(path: Path, *, instance_id: str | None = None) -> None:
    """Delete the record (only when it still names `instance_id`, if given)."""
    if instance_id is not None:
        current = read_record(path)
        if current is not None and current.instance_id != instance_id:
            return
    try:
        path.unlink()
    except FileNotFoundError:
        pass


# --- the verdict --------------------------------------------------------------------------------


@dataclass(frozen=True)
class PortVerdict:
    """What holds host:port. `free`; `recorded`: the recorded earlier instance, its owner gone, safe
    to stop; `owned_elsewhere`: the recorded instance of a loraloop that still runs; `foreign`:
    anything else. `pids` are the listeners found (may be empty when they cannot be seen)."""

    kind: Literal["free", "recorded", "owned_elsewhere", "foreign"]
    pids: frozenset[int] = frozenset()
    record: VllmRecord | None = None

    def explain(self, host: str, port: int) -> str:
        who = describe_processes(self.pids)
        if self.kind == "owned_elsewhere" and self.record is not None:
            return (
                f"port {port} on {host} is served by vLLM pid {self.record.pid}, the embedded vLLM of the "
                f"loraloop process {self.record.owner_pid} that still runs; stop that loraloop or set "
                "another LORALOOP_VLLM_PORT / LORALOOP_DATA_DIR"
            )
        return (
            f"port {port} on {host} is already served by {who}, which this loraloop did not start; "
            "stop it or set another LORALOOP_VLLM_PORT"
        )


def _belongs_to(pid: int, record: VllmRecord) -> bool:
    return pid == record.pid or process_group(pid) == record.pgid


def inspect_port(host: str, port: int, record: VllmRecord | None) -> PortVerdict:
    """Who serves host:port, judged against `record` (this data folder's record, if any)."""
    pids = frozenset(listening_pids(host, port))
    if not pids and not port_answers(host, port):
        return PortVerdict("free")
    if record is None or record.port != port or not record.server_alive():
        return PortVerdict("foreign", pids)
    if pids and not all(_belongs_to(pid, record) for pid in pids):
        return PortVerdict("foreign", frozenset(pid for pid in pids if not _belongs_to(pid, record)))
    if record.owner_pid != os.getpid() and record.owner_alive():
        return PortVerdict("owned_elsewhere", pids, record)
    return PortVerdict("recorded", pids, record)


def stop_recorded(record: VllmRecord, *, timeout_s: float) -> bool:
    """End a recorded earlier instance: SIGTERM to its group (or the server alone when the group is
    ours or gone), SIGKILL after `timeout_s`. True once it is gone. Identity is re-checked first."""
    if not record.server_alive():
        return True
    group = process_group(record.pid)
    use_group = group == record.pgid and group not in (None, 0, 1, os.getpgid(0))

    def send(sig: signal.Signals) -> None:
        try:
            if use_group:
                os.killpg(record.pgid, sig)
            elif record.server_alive():
                os.kill(record.pid, sig)
        except (ProcessLookupError, PermissionError):
            pass

    def gone() -> bool:
        if record.server_alive():
            return False
        if not use_group:
            return True
        members = (int(name) for name in os.listdir("/proc") if name.isdigit())
        return not any(process_alive(pid) and process_group(pid) == record.pgid for pid in members)

    send(signal.SIGTERM)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if gone():
            return True
        time.sleep(0.1)
    send(signal.SIGKILL)
    deadline = time.monotonic() + 5.0
    while time.monotonic() < deadline:
        if gone():
            return True
        time.sleep(0.05)
    return False


def wait_port_free(host: str, port: int, *, timeout_s: float) -> bool:
    deadline = time.monotonic() + timeout_s
    while listening_pids(host, port) or port_answers(host, port, timeout_s=0.2):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.1)
    return True


__all__: Sequence[str] = (
    "INSTANCE_ENV",
    "PortVerdict",
    "VllmRecord",
    "describe_processes",
    "inspect_port",
    "listening_pids",
    "port_answers",
    "process_alive",
    "process_command",
    "process_environ",
    "process_group",
    "process_start_ticks",
    "read_record",
    "remove_record",
    "stop_recorded",
    "wait_port_free",
    "write_record",
)
