"""Engines, sessions and schema upgrades for the loraloop store (SQLite or PostgreSQL).

Owns connection settings (SQLite: WAL, busy timeout, foreign keys, `BEGIN IMMEDIATE` write
transactions; PostgreSQL: psycopg 3, pre-ping, connect timeout), the translation of connection
failures into `DatabaseUnavailable`, the SQLite file guard (a deleted or replaced database file is
refused, never written), the writability probe behind readiness, and running the Alembic migrations
shipped in this package.

Durability on SQLite: WAL with `synchronous=NORMAL` keeps every committed transaction across a crash
or SIGKILL of the process (the WAL is in the OS page cache, which outlives the process); only an OS
crash or power loss can drop the last commits. Pass `sqlite_synchronous="FULL"` to survive those too.
"""

from __future__ import annotations

import os
import sqlite3
import threading
import weakref
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psycopg
import sqlalchemy as sa
from alembic import command
from alembic.config import Config
from sqlalchemy import event
from sqlalchemy.engine import URL, Connection, Engine, ExceptionContext, make_url
from sqlalchemy.engine.interfaces import Dialect
from sqlalchemy.orm import Session, sessionmaker

from memory_store.errors import DatabaseFileChanged, DatabaseReadOnly, DatabaseUnavailable

MIGRATIONS_DIR = Path(__file__).resolve().parent / "migrations"

# Execution option read by the SQLite `begin` hook: "IMMEDIATE" (default) takes the write lock when
# the transaction starts, so read-then-write transactions never fail with SQLITE_BUSY_SNAPSHOT and
# concurrent writers queue on busy_timeout instead; "DEFERRED" is for read-only sessions.
SQLITE_BEGIN_OPTION = "loraloop_sqlite_begin"

# Any 64-bit constant: serialises concurrent `upgrade_database` calls on one PostgreSQL database.
_PG_MIGRATION_LOCK_ID = 0x6C6F72616C6F6F70


class SqliteFileGuard:
    """Pins the identity (device, inode) of an engine's SQLite file and refuses to use any other.

    Deleting or replacing the file under a running service leaves pooled connections writing to the
    unlinked inode (acknowledged writes that no restart will see) and lets new connections create an
    empty file. The guard records the file the engine first opened; afterwards a connection is only
    opened onto that same file (never creating one), and every transaction start (and, through
    `check_database_file`, every acknowledged commit) checks that the path still names it, raising
    `DatabaseFileChanged` otherwise.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self._identity: tuple[int, int] | None = None
        self._lock = threading.Lock()

    def _current(self) -> tuple[int, int] | None:
        try:
            stat = os.stat(self.path)
        except FileNotFoundError:
            return None
        return stat.st_dev, stat.st_ino

    def before_connect(self) -> None:
        """Called before sqlite3 opens the path: once pinned, a missing file is not re-created, and a
        write-protected file is refused (sqlite3 would open it read-only, and every connection of
        the process to that file would stay read-only until all of them are closed)."""
        if self._identity is not None:
            self.check()
        self.check_writable()

    def check_writable(self) -> None:
        """Raise `DatabaseReadOnly` when the file, its WAL/SHM or its folder is write-protected."""
        for path in (self.path, Path(f"{self.path}-wal"), Path(f"{self.path}-shm"), self.path.parent):
            if path.exists() and not os.access(path, os.W_OK):
                raise DatabaseReadOnly(f"the SQLite database {self.path} is read-only ({path.name})")

    def pin(self) -> None:
        """Called once a connection is open: the first one pins the file, later ones must match."""
        with self._lock:
            if self._identity is None:
                self._identity = self._current()
                return
        self.check()

    def check(self) -> None:
        """Raise `DatabaseFileChanged` when the path no longer names the pinned file."""
        if self._identity is None:
            return
        current = self._current()
        if current is None:
            raise DatabaseFileChanged(f"the SQLite database file {self.path} was deleted")
        if current != self._identity:
            raise DatabaseFileChanged(f"the SQLite database file {self.path} was replaced by another file")


# One guard per SQLite engine, found through the engine's dialect (shared by `execution_options`
# copies and kept across `dispose()`).
_SQLITE_GUARDS: weakref.WeakKeyDictionary[Dialect, SqliteFileGuard] = weakref.WeakKeyDictionary()


def sqlite_file_guard(bind: Engine | Connection) -> SqliteFileGuard | None:
    """The file guard of an engine on a SQLite file (None for PostgreSQL and in-memory SQLite)."""
    return _SQLITE_GUARDS.get(bind.dialect)


def make_engine(
    url: str | URL,
    *,
    connect_timeout_s: float = 5.0,
    pool_size: int = 5,
    busy_timeout_s: float = 30.0,
    sqlite_synchronous: str = "NORMAL",
    echo: bool = False,
) -> Engine:
    """An engine for `sqlite:///path` or `postgresql+psycopg://...` with loraloop's settings.

    Connection failures surface as `DatabaseUnavailable` (also SQLite's "database is locked" after
    `busy_timeout_s`), so the API can answer 503 quickly instead of a generic 500.
    """
    url = make_url(url)
    backend = url.get_backend_name()
    if backend == "sqlite":
        engine = _make_sqlite_engine(
            url, busy_timeout_s=busy_timeout_s, synchronous=sqlite_synchronous, echo=echo
        )
    elif backend == "postgresql":
        if url.get_driver_name() != "psycopg":
            raise ValueError(
                f"PostgreSQL URLs must use the psycopg 3 driver (postgresql+psycopg://), got {url.drivername}"
            )
        engine = sa.create_engine(
            url,
            pool_pre_ping=True,
            pool_size=pool_size,
            max_overflow=pool_size * 2,
            pool_timeout=max(connect_timeout_s, 1.0) * 2,
            connect_args={"connect_timeout": max(round(connect_timeout_s), 1)},
            echo=echo,
            hide_parameters=True,  # errors are logged: bound values (feedback text) must not be
        )
    else:
        raise ValueError(
            f"unsupported database URL {url.render_as_string(hide_password=True)!r}: use sqlite or postgresql+psycopg"
        )
    event.listen(engine, "handle_error", _translate_unavailable)
    return engine


def _make_sqlite_engine(url: URL, *, busy_timeout_s: float, synchronous: str, echo: bool) -> Engine:
    if synchronous.upper() not in ("NORMAL", "FULL", "EXTRA"):
        raise ValueError(f"sqlite_synchronous must be NORMAL, FULL or EXTRA, got {synchronous!r}")
    database = url.database or ""
    in_memory = database in ("", ":memory:") or database.startswith("file::memory:")
    if not in_memory:
        Path(database).expanduser().parent.mkdir(parents=True, exist_ok=True)
    engine = sa.create_engine(
        url,
        connect_args={"timeout": busy_timeout_s, "check_same_thread": False},
        echo=echo,
        hide_parameters=True,
    )
    busy_timeout_ms = int(busy_timeout_s * 1000)
    guard = None
    if not in_memory and not database.startswith("file:"):
        guard = SqliteFileGuard(Path(database).expanduser().resolve())
        _SQLITE_GUARDS[engine.dialect] = guard

        @event.listens_for(engine, "do_connect")
        def _guard_connect(*_args: Any) -> None:
            guard.before_connect()

    @event.listens_for(engine, "connect")
    def _configure_sqlite(dbapi_connection: sqlite3.Connection, _record: Any) -> None:
        # Take transaction control away from the sqlite3 module; the `begin` hook below emits BEGIN.
        dbapi_connection.isolation_level = None
        cursor = dbapi_connection.cursor()
        try:
            if not in_memory:
                cursor.execute("PRAGMA journal_mode=WAL")
            cursor.execute(f"PRAGMA busy_timeout={busy_timeout_ms}")
            cursor.execute("PRAGMA foreign_keys=ON")
            cursor.execute(f"PRAGMA synchronous={synchronous.upper()}")
        finally:
            cursor.close()
        if guard is not None:
            guard.pin()

    @event.listens_for(engine, "begin")
    def _begin_sqlite(connection: sa.Connection) -> None:
        if guard is not None:
            guard.check()
        mode = connection.get_execution_options().get(SQLITE_BEGIN_OPTION, "IMMEDIATE")
        connection.exec_driver_sql("BEGIN IMMEDIATE" if mode == "IMMEDIATE" else "BEGIN")

    return engine


def _translate_unavailable(context: ExceptionContext) -> None:
    """Raise `DatabaseUnavailable` for transient failures: connect errors, dropped connections,
    PostgreSQL operational errors (server restarting, timeouts, deadlocks), SQLite lock/disk errors.
    Anything else (constraint violations, SQL errors) keeps SQLAlchemy's own exception."""
    error = context.original_exception
    backend = context.dialect.name if context.dialect is not None else ""
    unavailable = context.is_disconnect or (context.connection is None and context.execution_context is None)
    if backend == "sqlite" and isinstance(error, sqlite3.OperationalError):
        message = str(error).lower()
        if "readonly" in message or getattr(error, "sqlite_errorname", "").startswith("SQLITE_READONLY"):
            # drop the pool's connections: new ones are refused until the file is writable again
            context.is_disconnect = True
            raise DatabaseReadOnly(f"database is read-only: {error}") from error
        unavailable = unavailable or any(
            sign in message for sign in ("locked", "unable to open", "disk i/o", "disk is full")
        )
    elif backend == "postgresql":
        if isinstance(error, psycopg.errors.ReadOnlySqlTransaction):
            raise DatabaseReadOnly(f"database is read-only: {error}") from error
        unavailable = unavailable or isinstance(error, psycopg.OperationalError)
    if unavailable:
        raise DatabaseUnavailable(f"database unavailable: {error}") from error


def make_session_factory(engine: Engine, *, read_only: bool = False) -> sessionmaker[Session]:
    """Sessions bound to `engine`; objects stay readable after commit (`expire_on_commit=False`).

    Use `with factory.begin() as session:` (commits on success, rolls back on error). On SQLite a
    session takes the write lock when it begins unless `read_only=True`; keep sessions short and
    never hold one open across a training run.
    """
    bind = engine.execution_options(**{SQLITE_BEGIN_OPTION: "DEFERRED"}) if read_only else engine
    return sessionmaker(bind=bind, expire_on_commit=False)


def check_database_file(bind: Engine | Connection) -> None:
    """After a commit, before acknowledging it: raise `DatabaseFileChanged` when the SQLite file
    was deleted or replaced meanwhile (the commit went into a file no restart will open). No-op on
    PostgreSQL and in-memory SQLite."""
    guard = sqlite_file_guard(bind)
    if guard is not None:
        guard.check()


@dataclass(frozen=True)
class WritableProbe:
    """What `probe_writable` found: `ok`, and when not, a short reason safe to show unauthenticated."""

    ok: bool
    reason: str | None = None


def probe_writable(engine: Engine) -> WritableProbe:
    """Can the service write to its database right now? Writes nothing.

    SQLite: the pinned file is still at its path and the file, its WAL/SHM and its folder are
    writable (pooled connections keep writing to a file that new connections open read-only), and
    the file reads as a database. PostgreSQL: a connection answers and its transactions are not read-only
    (a hot standby, `default_transaction_read_only`).
    """
    guard = sqlite_file_guard(engine)
    try:
        if guard is not None:
            guard.check()
            guard.check_writable()
        # a read transaction: the probe must not queue behind writers for SQLite's write lock
        with engine.execution_options(**{SQLITE_BEGIN_OPTION: "DEFERRED"}).connect() as connection:
            if connection.dialect.name == "postgresql":
                read_only = connection.execute(sa.text("SELECT current_setting('transaction_read_only')"))
                if read_only.scalar_one() == "on":
                    return WritableProbe(False, "database is read-only")
            else:
                connection.execute(sa.text("SELECT count(*) FROM sqlite_master"))
            connection.rollback()
    except DatabaseFileChanged:
        return WritableProbe(False, "database file deleted or replaced")
    except DatabaseReadOnly:
        return WritableProbe(False, "database is read-only")
    except DatabaseUnavailable:
        return WritableProbe(False, "database unreachable")
    except (sa.exc.DBAPIError, sa.exc.TimeoutError):
        return WritableProbe(False, "database unreachable")
    return WritableProbe(True)


def alembic_config(url: str | URL | None = None) -> Config:
    """An Alembic config pointing at the migrations shipped inside memory_store."""
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS_DIR))
    if url is not None:
        rendered = make_url(url).render_as_string(hide_password=False)
        config.set_main_option("sqlalchemy.url", rendered.replace("%", "%%"))
    return config


def upgrade_database(url: str | URL, *, revision: str = "head") -> None:
    """Bring the schema at `url` to `revision` (creates everything on an empty database).

    Safe to call from several processes at once: SQLite serialises on the write lock, PostgreSQL
    on an advisory lock held for the migration transaction.
    """
    engine = make_engine(url)
    try:
        with engine.begin() as connection:
            if connection.dialect.name == "postgresql":
                connection.execute(
                    sa.text("SELECT pg_advisory_xact_lock(:key)"), {"key": _PG_MIGRATION_LOCK_ID}
                )
            config = alembic_config(url)
            config.attributes["connection"] = connection
            command.upgrade(config, revision)
    finally:
        engine.dispose()


def current_revision(url: str | URL) -> str | None:
    """The Alembic revision the database at `url` is at (None when never migrated)."""
    from alembic.runtime.migration import MigrationContext

    engine = make_engine(url)
    try:
        with engine.connect() as connection:
            return MigrationContext.configure(connection).get_current_revision()
    finally:
        engine.dispose()
