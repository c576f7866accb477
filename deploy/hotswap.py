"""Hot-swap policy across vLLM replicas: every adapter version is served under its own name
(`<namespace>-v<N>`, its own immutable folder), loaded on EVERY replica before it becomes current,
and old versions are unloaded only after a drain period. `reconcile` brings replicas that lost
state (a vLLM restart) back to the desired set. `preview` loads a version that is not current for
a while (asked for by its own name), and it drains like a retired one.

Knows no database: the caller passes the desired state ({namespace: (version, path)}) and records
the current version itself once `swap` returned.
"""

from __future__ import annotations

import logging
import re
import threading
import time
from collections import defaultdict
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from deploy.vllm_client import AdapterAlreadyLoaded, AdapterNotFound, VllmClient, VllmError

log = logging.getLogger(__name__)

_SERVED_NAME = re.compile(r"^(?P<namespace>.+)-v(?P<version>\d+)$")
# a previewed (not current) version stays loaded at least this long after it was last asked for
PREVIEW_HOLD_S = 120.0


def served_name(namespace: str, version: int) -> str:
    """The name a version is loaded under in vLLM (what requests put in `model`)."""
    return f"{namespace}-v{int(version)}"


def parse_served_name(name: str) -> tuple[str, int] | None:
    """Inverse of served_name; None for names loraloop did not create."""
    match = _SERVED_NAME.match(name)
    return (match["namespace"], int(match["version"])) if match else None


class SwapFailed(VllmError):
    """A version could not be loaded on every replica; it was unloaded again from the others,
    so the caller keeps the previous version current."""

    def __init__(self, name: str, errors: Mapping[str, Exception]) -> None:
        detail = "; ".join(f"{url}: {type(exc).__name__}: {exc}" for url, exc in errors.items())
        super().__init__(f"could not load {name!r} on every replica: {detail}")
        self.name = name
        self.errors = dict(errors)


@dataclass
class ReplicaReport:
    """What reconcile did on one replica."""

    base_url: str
    reachable: bool = True
    loaded: list[str] = field(default_factory=list)
    unloaded: list[str] = field(default_factory=list)
    errors: dict[str, str] = field(default_factory=dict)


@dataclass
class ReconcileReport:
    replicas: list[ReplicaReport]

    @property
    def ok(self) -> bool:
        return all(r.reachable and not r.errors for r in self.replicas)


@dataclass(frozen=True)
class _Version:
    version: int
    path: str


class HotSwapper:
    """Loads new versions on all replicas, retires old ones, unloads them once drained.

    Thread-safe: one lock per served name around every load/unload of that name, one lock per
    namespace around a swap, a short state lock for the bookkeeping. Callers that read the desired
    state from a database pass `snapshot_time=time.monotonic()` taken BEFORE that read, so a
    reconcile working from a snapshot older than a concurrent swap does not undo that swap.
    """

    def __init__(
        self,
        clients: Sequence[VllmClient],
        drain_s: float,
        max_loras: int,
        *,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if not clients:
            raise ValueError("HotSwapper needs at least one vLLM client")
        if max_loras < 1:
            raise ValueError("max_loras must be >= 1")
        self.clients = list(clients)
        self.drain_s = drain_s
        self.max_loras = max_loras
        self._clock = clock
        self._state_lock = threading.Lock()
        self._name_locks: defaultdict[str, threading.Lock] = defaultdict(threading.Lock)
        self._namespace_locks: defaultdict[str, threading.Lock] = defaultdict(threading.Lock)
        self._current: dict[str, _Version] = {}
        self._swapped_at: dict[str, float] = {}
        self._retired: dict[str, float] = {}  # served name -> when it stopped being current
        self._pool = ThreadPoolExecutor(max_workers=max(1, len(self.clients)), thread_name_prefix="hotswap")

    # --- state ------------------------------------------------------------------------------------
    def current(self, namespace: str) -> str | None:
        """Served name of the namespace's current version (as far as this swapper knows)."""
        with self._state_lock:
            entry = self._current.get(namespace)
        return served_name(namespace, entry.version) if entry else None

    def serving(self, name: str) -> bool:
        """Whether this swapper believes every replica has `name` loaded (current or draining)."""
        parsed = parse_served_name(name)
        with self._state_lock:
            if name in self._retired:
                return True
            entry = self._current.get(parsed[0]) if parsed else None
        return entry is not None and parsed is not None and entry.version == parsed[1]

    def retired(self) -> dict[str, float]:
        """Versions waiting for their drain period to end: served name -> retirement time."""
        with self._state_lock:
            return dict(self._retired)

    def close(self) -> None:
        self._pool.shutdown(wait=True)

    @contextmanager
    def _lock(self, table: defaultdict[str, threading.Lock], key: str) -> Iterator[None]:
        with self._state_lock:
            lock = table[key]
        with lock:
            yield

    def _make_current(self, namespace: str, entry: _Version, now: float) -> None:
        """Bookkeeping under the state lock: the previous current version starts draining."""
        previous = self._current.get(namespace)
        if previous is not None and previous.version != entry.version:
            self._retired.setdefault(served_name(namespace, previous.version), now)
        self._retired.pop(served_name(namespace, entry.version), None)
        self._current[namespace] = entry

    # --- per-replica operations ---------------------------------------------------------------------
    def _ensure_loaded(self, client: VllmClient, name: str, path: str) -> bool:
        """Load `name` from `path` on one replica; True when a load happened. An adapter already
        loaded under that name from another path is switched in place (new path: no stale cache)."""
        with self._lock(self._name_locks, name):
            try:
                client.load_adapter(name, path)
                return True
            except AdapterAlreadyLoaded:
                served_path = client.adapters().get(name)
                if served_path is not None and served_path != path:
                    log.warning(
                        "%s serves %s from %s; switching in place to %s", client, name, served_path, path
                    )
                    client.load_adapter(name, path, inplace=True)
                    return True
                return False

    def _unload(self, client: VllmClient, name: str) -> None:
        with self._lock(self._name_locks, name):
            try:
                client.unload_adapter(name)
            except AdapterNotFound:
                pass

    # --- swap ---------------------------------------------------------------------------------------
    def swap(self, namespace: str, version: int, path: str | Path) -> str:
        """Load version `version` of `namespace` on every replica, then make it current here.
        Returns the served name. On any failure the version is unloaded again from the replicas
        that took it and SwapFailed is raised: the previous version stays current."""
        name = served_name(namespace, version)
        path_str = str(path)
        with self._lock(self._namespace_locks, namespace):
            with self._state_lock:
                known = self._current.get(namespace) == _Version(int(version), path_str)
                # a draining version coming back: take it off the drain list BEFORE loading, so a
                # concurrent collect() cannot unload it between our load and _make_current
                reclaimed_since = self._retired.pop(name, None)
            self._evict_over_budget(incoming=0 if known else 1, keep=name)
            futures = {
                c.base_url: self._pool.submit(self._ensure_loaded, c, name, path_str) for c in self.clients
            }
            errors: dict[str, Exception] = {}
            loaded_on: list[VllmClient] = []
            for client in self.clients:
                try:
                    if futures[client.base_url].result():
                        loaded_on.append(client)
                except Exception as exc:  # noqa: BLE001 - any failure aborts the swap the same way
                    errors[client.base_url] = exc
            if errors:
                with self._state_lock:
                    is_current = self._current.get(namespace) == _Version(int(version), path_str)
                    if reclaimed_since is not None and not is_current:
                        self._retired.setdefault(name, reclaimed_since)
                if not is_current:
                    for client in loaded_on:
                        try:
                            self._unload(client, name)
                        except VllmError as exc:
                            log.warning("rollback: could not unload %s from %s: %s", name, client, exc)
                raise SwapFailed(name, errors)
            now = self._clock()
            with self._state_lock:
                self._make_current(namespace, _Version(int(version), path_str), now)
                self._swapped_at[namespace] = now
        log.info("swapped %s to %s on %d replica(s)", namespace, name, len(self.clients))
        return name

    # --- preview ------------------------------------------------------------------------------------
    def preview(self, namespace: str, version: int, path: str | Path, *, reload: bool = False) -> str:
        """Serve a version that is not current for a while (an operator asking an older version or
        a candidate): load it on every replica and let it drain like a retired version, held at
        least PREVIEW_HOLD_S after the latest preview (over max_loras, older retired ones go first). The current
        version's name is returned at once. `reload`: load again even when this swapper believes
        it is loaded (a replica answered 404 for it). Raises SwapFailed when a replica refuses."""
        name = served_name(namespace, version)
        path_str = str(path)
        with self._lock(self._namespace_locks, namespace):
            with self._state_lock:
                current = self._current.get(namespace)
                if current is not None and current.version == int(version):
                    return name
                known = name in self._retired
                # retired "since" in the future: collect() drains it PREVIEW_HOLD_S from now at the earliest
                self._retired[name] = self._clock() + max(0.0, PREVIEW_HOLD_S - self.drain_s)
            if known and not reload:
                return name
            self._evict_over_budget(incoming=0, keep=name)
            futures = {c.base_url: self._pool.submit(self._ensure_loaded, c, name, path_str) for c in self.clients}
            errors: dict[str, Exception] = {}
            for client in self.clients:
                try:
                    futures[client.base_url].result()
                except Exception as exc:  # noqa: BLE001 - any replica refusing fails the preview
                    errors[client.base_url] = exc
            if errors:
                with self._state_lock:
                    self._retired.pop(name, None)
                for client in self.clients:
                    try:
                        self._unload(client, name)
                    except VllmError as exc:
                        log.warning("preview: could not unload %s from %s: %s", name, client, exc)
                raise SwapFailed(name, errors)
        log.info("previewing %s on %d replica(s)", name, len(self.clients))
        return name

    # --- draining -----------------------------------------------------------------------------------
    def collect(self) -> list[str]:
        """Unload retired versions whose drain period is over (and, over max_loras, the oldest
        retired ones early). Returns the names unloaded from every replica."""
        now = self._clock()
        with self._state_lock:
            due = [name for name, since in self._retired.items() if now - since >= self.drain_s]
        done = [name for name in due if self._unload_everywhere(name)]
        return done + self._evict_over_budget(incoming=0)

    def _unload_everywhere(self, name: str) -> bool:
        """Unload a retired version from every replica; stops (False) as soon as it is no longer
        retired, e.g. a swap brought it back (checked under the name's lock, per replica)."""
        ok = True
        for client in self.clients:
            with self._lock(self._name_locks, name):
                with self._state_lock:
                    if name not in self._retired:
                        return False
                try:
                    client.unload_adapter(name)
                except AdapterNotFound:
                    pass
                except VllmError as exc:
                    ok = False
                    log.warning("could not unload %s from %s (retrying later): %s", name, client, exc)
        if ok:
            with self._state_lock:
                self._retired.pop(name, None)
        return ok

    def _evict_over_budget(self, incoming: int, keep: str | None = None) -> list[str]:
        """Keep current + retired + incoming <= max_loras by unloading the oldest retired first
        (never `keep`, the version being swapped in)."""
        evicted: list[str] = []
        while True:
            with self._state_lock:
                over = len(self._current) + len(self._retired) + incoming - self.max_loras
                candidates = [n for n in self._retired if n != keep]
                oldest = min(candidates, key=self._retired.__getitem__) if candidates else None
            if over <= 0 or oldest is None:
                return evicted
            log.warning(
                "over max_loras=%d: unloading %s before its drain period ends", self.max_loras, oldest
            )
            if not self._unload_everywhere(oldest):
                return evicted
            evicted.append(oldest)

    # --- reconciliation -----------------------------------------------------------------------------
    def reconcile(
        self, desired: Mapping[str, tuple[int, str | Path]], *, snapshot_time: float | None = None
    ) -> ReconcileReport:
        """Make every replica serve exactly the desired versions (plus versions still draining).

        `desired`: namespace -> (current version, its path). Missing versions are loaded on each
        replica (e.g. after a vLLM restart); loraloop-named adapters that are neither desired nor
        draining start draining and are unloaded once drained; at most max_loras stay loaded.
        Replicas that cannot be reached are reported, not raised: the next call catches up.
        """
        snapshot = self._clock() if snapshot_time is None else snapshot_time
        wanted = {ns: _Version(int(v), str(p)) for ns, (v, p) in desired.items()}
        now = self._clock()
        with self._state_lock:
            for namespace, entry in wanted.items():
                if self._swapped_at.get(namespace, float("-inf")) > snapshot:
                    continue  # a swap newer than the caller's snapshot wins
                self._make_current(namespace, entry, now)
            for namespace in [ns for ns in self._current if ns not in wanted]:
                if self._swapped_at.get(namespace, float("-inf")) > snapshot:
                    continue
                retired = self._current.pop(namespace)
                self._retired.setdefault(served_name(namespace, retired.version), now)
            keep = {served_name(ns, e.version): e.path for ns, e in self._current.items()}

        reports = list(self._pool.map(lambda c: self._reconcile_replica(c, keep, now), self.clients))
        for name in self.collect():
            for report in reports:
                if report.reachable and name not in report.unloaded:
                    report.unloaded.append(name)
        return ReconcileReport(reports)

    def _reconcile_replica(self, client: VllmClient, keep: Mapping[str, str], now: float) -> ReplicaReport:
        report = ReplicaReport(client.base_url)
        try:
            served = client.adapters()
        except VllmError as exc:
            report.reachable = False
            report.errors["models"] = str(exc)
            return report
        for name, path in keep.items():
            if served.get(name) == path:
                continue
            try:
                if name in served:  # same name, other path: switch in place from the new path
                    with self._lock(self._name_locks, name):
                        client.load_adapter(name, path, inplace=True)
                    report.loaded.append(name)
                elif self._ensure_loaded(client, name, path):
                    report.loaded.append(name)
            except VllmError as exc:
                report.errors[name] = f"{type(exc).__name__}: {exc}"
        for name in served:
            if name in keep or parse_served_name(name) is None:
                continue  # desired, or not ours (e.g. a static --lora-modules entry)
            with self._state_lock:
                self._retired.setdefault(name, now)  # unknown to us (e.g. after our restart): drain it
        return report
