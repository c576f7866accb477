"""The SQLite file deleted, moved away or made read-only under a running service (issue 12, items 4
and 5): acknowledged means durable and visible after a restart, refusals are 503
`database_unavailable` (never 500), `/readyz` goes red with the database component's reason and
green again once the fault is gone.

The guard itself (memory_store.db.SqliteFileGuard) is exercised on a real file first; then real
`loraloop serve` processes under load.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest
import sqlalchemy as sa

from memory_store.db import (
    check_database_file,
    make_engine,
    make_session_factory,
    probe_writable,
    upgrade_database,
)
from memory_store.errors import DatabaseFileChanged, DatabaseReadOnly
from tests.integration.test_uvicorn_crash import REPO_ROOT, ServerProcess, feedback_body, free_port

pytestmark = pytest.mark.integration

TOKEN = "crash-test-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
# An answer received this long after the fault began can only come from a request begun after it
# (a commit made before the fault answers at once); the durability check itself has no margin.
LATE_S = 2.0


# --- the guard on a real file ------------------------------------------------------------------------


@pytest.fixture
def store(tmp_path: Path) -> Iterator[tuple[Path, sa.Engine]]:
    path = tmp_path / "db" / "loraloop.db"
    url = f"sqlite:///{path}"
    upgrade_database(url)
    engine = make_engine(url)
    with make_session_factory(engine).begin() as session:
        session.execute(sa.text("CREATE TABLE probe (x INTEGER)"))
    yield path, engine
    engine.dispose()


def insert(engine: sa.Engine, value: int) -> None:
    with make_session_factory(engine)() as session:
        session.execute(sa.text("INSERT INTO probe VALUES (:x)"), {"x": value})
        session.commit()


def test_a_deleted_file_is_refused_and_never_recreated(store: tuple[Path, sa.Engine]) -> None:
    path, engine = store
    insert(engine, 1)
    assert probe_writable(engine).ok
    path.unlink()
    with pytest.raises(DatabaseFileChanged, match="deleted"):
        insert(engine, 2)  # a pooled connection: it would write into the unlinked inode
    engine.dispose()
    with pytest.raises(DatabaseFileChanged):
        insert(engine, 3)  # a new connection: sqlite3 would create an empty file at the path
    assert not path.exists()
    assert probe_writable(engine).reason == "database file deleted or replaced"


def test_a_replaced_file_is_refused_and_the_original_restored_works_again(
    store: tuple[Path, sa.Engine], tmp_path: Path
) -> None:
    path, engine = store
    insert(engine, 1)
    aside = tmp_path / "aside.db"
    os.link(path, aside)  # keep the original inode
    other = tmp_path / "other.db"
    upgrade_database(f"sqlite:///{other}")
    os.replace(other, path)
    with pytest.raises(DatabaseFileChanged, match="replaced"):
        insert(engine, 2)
    assert not probe_writable(engine).ok
    os.replace(aside, path)
    insert(engine, 3)
    assert probe_writable(engine).ok
    with engine.connect() as connection:
        assert connection.execute(sa.text("SELECT x FROM probe ORDER BY x")).scalars().all() == [1, 3]


def test_a_file_deleted_during_the_transaction_is_caught_after_the_commit(
    store: tuple[Path, sa.Engine],
) -> None:
    path, engine = store
    with make_session_factory(engine)() as session:
        session.execute(sa.text("INSERT INTO probe VALUES (1)"))
        check_database_file(session.get_bind())
        path.unlink()
        session.commit()  # went into the unlinked inode: the caller must not acknowledge it
        with pytest.raises(DatabaseFileChanged, match="deleted"):
            check_database_file(session.get_bind())


def test_sqlite_readonly_errors_are_database_unavailable(store: tuple[Path, sa.Engine]) -> None:
    _path, engine = store
    with engine.connect() as connection:
        connection.exec_driver_sql("PRAGMA query_only=ON")  # writes answer SQLITE_READONLY
        with pytest.raises(DatabaseReadOnly):
            connection.execute(sa.text("INSERT INTO probe VALUES (1)"))


# --- real processes -------------------------------------------------------------------------------


@dataclass
class Stream:
    """Feedback posted from client threads, each answer recorded with its time."""

    url: str
    acked: dict[str, float] = field(default_factory=dict)
    refused: dict[str, float] = field(default_factory=dict)
    other: list[tuple[str, int, str]] = field(default_factory=list)
    stop: threading.Event = field(default_factory=threading.Event)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def run(self, prefix: str) -> None:
        with httpx.Client(base_url=self.url, timeout=30) as client:
            index = 0
            while not self.stop.is_set():
                key = f"{prefix}-{index}"
                index += 1
                try:
                    response = client.post(
                        "/feedback", json=feedback_body(key), headers={**AUTH, "Idempotency-Key": key}
                    )
                except httpx.TransportError:
                    continue
                with self.lock:
                    if response.status_code == 202:
                        self.acked[key] = time.monotonic()
                    elif response.status_code == 503:
                        assert response.json()["error"]["type"] == "database_unavailable"
                        self.refused[key] = time.monotonic()
                    else:
                        self.other.append((key, response.status_code, response.text[:200]))

    def start(self, clients: int) -> list[threading.Thread]:
        threads = [threading.Thread(target=self.run, args=(f"c{n}",), daemon=True) for n in range(clients)]
        for thread in threads:
            thread.start()
        return threads


def stored(path: Path) -> set[str]:
    engine = make_engine(f"sqlite:///{path}")
    try:
        with engine.connect() as connection:
            rows = connection.execute(sa.text("SELECT idempotency_key FROM feedback_items")).scalars()
            return set(rows)
    finally:
        engine.dispose()


def readiness(url: str) -> tuple[int, dict]:
    response = httpx.get(f"{url}/readyz", timeout=10)
    return response.status_code, response.json()


@pytest.mark.slow
def test_database_moved_away_under_load_acknowledges_only_durable_items(tmp_path: Path) -> None:
    """Move the file (and its WAL/SHM) away while 3 clients stream: after the move every answer is
    503, no file appears at the path, and every 202 is in the moved file; moved back, a restarted
    service serves all of them."""
    data = tmp_path / "var"
    data.mkdir()
    db_path = data / "loraloop.db"
    server = ServerProcess(f"sqlite:///{db_path}", data, free_port())
    stream = Stream(server.url)
    try:
        server.start(timeout_s=180)  # inside: a start that times out still stops the process
        threads = stream.start(3)
        time.sleep(3)
        aside = tmp_path / "aside"
        aside.mkdir()
        moved_at = time.monotonic()
        for suffix in ("", "-wal", "-shm"):
            if Path(f"{db_path}{suffix}").exists():
                os.rename(f"{db_path}{suffix}", aside / f"loraloop.db{suffix}")
        time.sleep(3)
        status, body = readiness(server.url)
        assert status == 503, body
        database = body["components"]["database"]
        assert (database["status"], database["detail"]) == (
            "unavailable",
            "database file deleted or replaced",
        )
        stream.stop.set()
        for thread in threads:
            thread.join(timeout=60)
        assert not db_path.exists(), "a new empty database file was created at the path"
        late = [key for key, at in stream.acked.items() if at > moved_at + LATE_S]
        assert not late, f"acknowledged after the file was moved: {late}"
        assert stream.other == [], stream.other[:5]
        assert len(stream.acked) > 10 and len(stream.refused) > 10, (len(stream.acked), len(stream.refused))
    finally:
        stream.stop.set()
        server.stop()
    assert set(stream.acked) <= stored(aside / "loraloop.db"), "a 202 is missing from the database"
    for name in os.listdir(aside):
        os.rename(aside / name, data / name)
    restarted = ServerProcess(f"sqlite:///{db_path}", data, free_port())
    try:
        restarted.start(timeout_s=180)
        keys = set()
        cursor = None
        while True:
            params = {"limit": 500, "namespace": "crash", **({"cursor": cursor} if cursor else {})}
            page = httpx.get(f"{restarted.url}/feedback", params=params, headers=AUTH, timeout=30).json()
            keys |= {item["continuation"].removeprefix("answer for ") for item in page["items"]}
            cursor = page["next_cursor"]
            if cursor is None:
                break
        assert set(stream.acked) <= keys
        print(f"moved away: {len(stream.acked)} acknowledged (all durable), {len(stream.refused)} refused")
    finally:
        restarted.stop()


@pytest.mark.slow
def test_database_deleted_under_load_is_refused_with_503(tmp_path: Path) -> None:
    """`rm loraloop.db` while 3 clients stream (a hard link elsewhere keeps the inode for the
    check): every 202 is in that inode, nothing is acknowledged after the deletion, no new file."""
    data = tmp_path / "var"
    data.mkdir()
    db_path = data / "loraloop.db"
    server = ServerProcess(f"sqlite:///{db_path}", data, free_port())
    stream = Stream(server.url)
    kept = tmp_path / "kept"
    kept.mkdir()
    try:
        server.start(timeout_s=180)
        threads = stream.start(3)
        time.sleep(2)
        os.link(f"{db_path}-wal", kept / "loraloop.db-wal")
        os.link(db_path, kept / "loraloop.db")
        deleted_at = time.monotonic()
        db_path.unlink()
        time.sleep(3)
        stream.stop.set()
        for thread in threads:
            thread.join(timeout=60)
        status, body = readiness(server.url)
        assert (
            status == 503 and body["components"]["database"]["detail"] == "database file deleted or replaced"
        )
        assert stream.other == [], stream.other[:5]
        late = [key for key, at in stream.acked.items() if at > deleted_at + LATE_S]
        assert not late and len(stream.refused) > 10, (late, len(stream.refused))
        assert not db_path.exists(), "a new empty database file was created at the path"
        assert httpx.get(f"{server.url}/healthz", timeout=10).status_code == 200  # liveness stays green
    finally:
        stream.stop.set()
        server.stop()
    assert set(stream.acked) <= stored(kept / "loraloop.db"), "a 202 went into no file"
    print(f"deleted: {len(stream.acked)} acknowledged (all durable), {len(stream.refused)} refused")


class ReadOnlyServer(ServerProcess):
    """`loraloop serve` as an unprivileged user (root ignores file modes), ready or not."""

    def start(self, timeout_s: float = 60.0) -> None:
        prefix = []
        if os.geteuid() == 0:
            prefix = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"]
        self.env["HOME"] = str(self.log_path.parent)
        # ingest only: a model folder this user can read stands in for the (root-owned) cache
        model = self.log_path.parent / "model"
        model.mkdir(exist_ok=True)
        (model / "config.json").write_text("{}")
        self.env["LORALOOP_BASE_MODEL"] = str(model)
        with self.log_path.open("ab") as log:
            self.process = subprocess.Popen(
                [*prefix, sys.executable, "-m", "service.cli", "serve", "--port", str(self.port)],
                cwd=REPO_ROOT,
                env=self.env,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise AssertionError(f"server exited early:\n{self.log_path.read_text()[-3000:]}")
            try:
                if httpx.get(f"{self.url}/healthz", timeout=1).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.1)
        raise AssertionError(f"server not up after {timeout_s}s:\n{self.log_path.read_text()[-3000:]}")


def post(url: str, key: str) -> httpx.Response:
    headers = {**AUTH, "Idempotency-Key": key}
    return httpx.post(f"{url}/feedback", json=feedback_body(key), headers=headers, timeout=30)


def set_writable(folder: Path, writable: bool) -> None:
    for path in folder.iterdir():
        if path.name.startswith("loraloop.db"):
            path.chmod(0o644 if writable else 0o444)
    folder.chmod(0o755 if writable else 0o555)


@pytest.mark.slow
def test_read_only_database_is_503_and_readiness_red_until_writable_again() -> None:
    """File, WAL, SHM and folder made read-only under a running service, then a burst of writes:
    every answer 202 (through a connection opened before, into the same durable file) or 503, never
    500; `/readyz` red meanwhile, green and writing again once writable, without a restart. A fresh
    process refuses to start on a read-only database, naming the cause."""
    if os.stat(REPO_ROOT).st_mode & 0o005 != 0o005 or not all(os.stat(p).st_mode & 0o001 for p in REPO_ROOT.parents):
        pytest.skip(f"{REPO_ROOT} is not readable by other users: the unprivileged server cannot import it")
    # not under tmp_path: pytest's base folder is private to its user, the server runs as another
    folder = Path(tempfile.mkdtemp(prefix="loraloop-ro-"))
    folder.chmod(0o755)
    data = folder / "var"
    data.mkdir()
    if os.geteuid() == 0:
        os.chown(data, 65534, 65534)
    db_path = data / "loraloop.db"
    try:
        server = ReadOnlyServer(f"sqlite:///{db_path}", data, free_port())
        try:
            server.start(timeout_s=180)
            first = post(server.url, "before")
            assert first.status_code == 202, first.text
            assert readiness(server.url)[0] == 200
            set_writable(data, False)
            status, body = readiness(server.url)
            assert status == 503 and body["components"]["database"]["detail"] == "database is read-only", body
            burst: dict[str, httpx.Response] = {}
            threads = [
                threading.Thread(target=lambda key=f"ro-{n}": burst.__setitem__(key, post(server.url, key)))
                for n in range(12)
            ]
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join(timeout=120)
            statuses = {key: response.status_code for key, response in burst.items()}
            assert len(statuses) == 12 and set(statuses.values()) <= {202, 503}, statuses
            for response in burst.values():
                if response.status_code == 503:
                    assert response.json()["error"]["type"] == "database_unavailable"
                    assert response.headers["Retry-After"] == "1"
            fresh = ReadOnlyServer(f"sqlite:///{db_path}", data, free_port())
            fresh.log_path = data / "fresh.log"
            try:
                with pytest.raises(AssertionError, match="exited early"):
                    fresh.start(timeout_s=180)
            finally:
                fresh.stop()
            assert "is read-only" in fresh.log_path.read_text()
            set_writable(data, True)
            deadline = time.monotonic() + 30
            while readiness(server.url)[0] != 200:
                assert time.monotonic() < deadline, "readiness did not recover"
                time.sleep(0.2)
            again = post(server.url, "after")
            assert again.status_code == 202, again.text
        finally:
            server.stop()
        keys = stored(db_path)
        acked = {key for key, code in statuses.items() if code == 202}
        assert {"before", "after"} | acked <= keys, keys
        print(f"read-only: {len(acked)} of 12 acknowledged (all durable), {12 - len(acked)} refused with 503")
    finally:
        set_writable(data, True)
        shutil.rmtree(folder, ignore_errors=True)


# --- PostgreSQL read-only -------------------------------------------------------------------------


@pytest.mark.postgres
def test_read_only_postgres_is_503_and_not_ready(postgres_admin_engine: sa.Engine, tmp_path: Path) -> None:
    """A server whose transactions are read-only (a hot standby, default_transaction_read_only):
    writes answer 503 `database_unavailable`, `/readyz` names the database read-only."""
    from fastapi.testclient import TestClient

    from service.app import create_app
    from tests.conftest import _postgres_schema_url
    from tests.integration.test_api import WRITER, bearer, item, make_settings

    for url in _postgres_schema_url(postgres_admin_engine):
        upgrade_database(url)
        options = sa.engine.make_url(url).query["options"]
        read_only = sa.engine.make_url(url).update_query_dict(
            {"options": f"{options} -cdefault_transaction_read_only=on"}
        )
        settings = make_settings(read_only.render_as_string(hide_password=False), tmp_path, tmp_path / "none")
        client = TestClient(create_app(settings, start_background=False))  # no lifespan: no upgrade
        status = client.get("/readyz")
        assert status.status_code == 503, status.text
        assert status.json()["components"]["database"]["detail"] == "database is read-only"
        refused = client.post("/feedback", json=item(), headers=bearer(WRITER))
        assert refused.status_code == 503, refused.text
        assert refused.json()["error"]["type"] == "database_unavailable"
        client.app.state.resources.engine.dispose()
        writable = TestClient(
            create_app(make_settings(url, tmp_path, tmp_path / "none"), start_background=False)
        )
        ready = writable.get("/readyz")
        writable.app.state.resources.engine.dispose()
        assert ready.status_code == 200 and ready.json()["components"]["database"]["status"] == "ok"
