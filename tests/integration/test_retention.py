"""Retention against a real store (SQLite and PostgreSQL) and real adapter folders: every rule, what
it must keep (feedback and what it points at, current, ancestors, rollback targets, pinned and
serving versions, candidates, versions inside the grace period), tombstones refused as rollback
targets (409 through the API), `loraloop db prune [--dry-run]`, and the migration from 0001."""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from fastapi.testclient import TestClient
from sqlalchemy.orm import Session, sessionmaker
from typer.testing import CliRunner

from memory_store.db import make_engine, make_session_factory, upgrade_database
from memory_store.errors import Conflict
from memory_store.models import AdapterVersion, Conversation, FeedbackItem, utcnow
from memory_store.repositories import (
    AdapterRepository,
    ConversationRepository,
    DeploymentRepository,
    FeedbackRepository,
)
from service.app import create_app
from service.cli import app as cli_app
from service.config import Settings
from service.jobs.retention import RetentionLoop, RetentionPolicy, prune
from training.adapter_store import AdapterStore

pytestmark = pytest.mark.integration

NS = "geo"
ADMIN, WRITER, READER = "admin-token", "writer-token", "adapters-token"
READER_DIGEST = hashlib.sha256(READER.encode()).hexdigest()
TOKENS = f"{ADMIN}=admin,{WRITER}=adapters:write,sha256:{READER_DIGEST}=adapters:read"
MESSAGES = [{"role": "user", "content": "Capital of France?"}, {"role": "assistant", "content": "Lyon."}]
LATER = timedelta(days=60)  # `now` of a prune run long after everything below was written


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


@pytest.fixture
def settings(migrated_db_url: str, tmp_path: Path) -> Settings:
    from training.tokenizer_files import tokenizer_dir

    return Settings(
        _env_file=None,
        database_url=migrated_db_url,
        data_dir=tmp_path / "var",
        auth_tokens=TOKENS,
        tokenizer=tokenizer_dir("qwen2"),
        retention_keep_versions=2,
        retention_version_grace_days=7,
        retention_conversation_max_age_days=30,
        retention_conversation_max_per_namespace=0,
    )


@pytest.fixture
def factory(settings: Settings) -> Iterator[sessionmaker[Session]]:
    engine = make_engine(settings.database_url)
    yield make_session_factory(engine)
    engine.dispose()


def publish(
    settings: Settings,
    factory: sessionmaker[Session],
    version: int,
    parent: int | None,
    *,
    current: bool = True,
    status: str = "candidate",
) -> Path:
    """Real version files plus their row; made current (the previous current becomes retired)."""
    source = settings.data_dir / "src" / f"v{version}"
    source.mkdir(parents=True)
    (source / "adapter_config.json").write_text('{"r": 8}')
    (source / "adapter_model.safetensors").write_bytes(bytes([version % 256]) * 4096)
    published = AdapterStore(settings.adapters_dir).publish(NS, version, source, {"parent_version": parent})
    with factory.begin() as session:
        repository = AdapterRepository(session)
        repository.ensure_adapter(name=NS, base_model="tiny")
        repository.add_version(
            name=NS,
            version=version,
            parent_version=parent,
            status=status,
            path=str(published.path),
            sha256=published.sha256,
            metrics={"nll_before": 2.0, "nll_after": 1.0 + version / 100},
        )
        if current:
            repository.set_current(name=NS, version=version)
    return published.path


def folder(settings: Settings, version: int) -> Path:
    return settings.adapters_dir / NS / f"v{version}"


def rows(factory: sessionmaker[Session]) -> dict[int, AdapterVersion]:
    with factory() as session:
        return {row.version: row for row in AdapterRepository(session).list_versions(name=NS)}


# --- conversations -------------------------------------------------------------------------------


def add_conversations(factory: sessionmaker[Session], namespace: str, count: int) -> list[int]:
    with factory.begin() as session:
        repository = ConversationRepository(session)
        return [repository.add(namespace=namespace, messages=MESSAGES).id for _ in range(count)]


def test_conversations_go_by_age_unless_feedback_points_at_them(
    settings: Settings, factory: sessionmaker[Session]
) -> None:
    old = add_conversations(factory, NS, 6)
    with factory.begin() as session:
        feedback, _ = FeedbackRepository(session).add(
            namespace=NS, continuation="Paris.", conversation_id=old[2], target_index=1
        )
        feedback_id = feedback.id
    now = utcnow() + LATER
    fresh = add_conversations(factory, NS, 2)
    with factory.begin() as session:  # the fresh ones were logged "just before" the run
        session.execute(
            sa.update(Conversation)
            .where(Conversation.id.in_(fresh))
            .values(created_at=now - timedelta(days=1))
        )

    dry = prune(settings, factory, dry_run=True, now=now)
    assert dry.conversations == {NS: 5}
    with factory() as session:
        assert session.scalar(sa.select(sa.func.count()).select_from(Conversation)) == 8  # nothing went

    report = prune(settings, factory, now=now)
    assert report.conversations == {NS: 5}
    with factory() as session:
        kept = set(session.scalars(sa.select(Conversation.id)))
        assert kept == {old[2], *fresh}
        item = session.get(FeedbackItem, feedback_id)
        assert item is not None and item.conversation_id == old[2] and item.messages == MESSAGES
    assert prune(settings, factory, now=now).conversations == {}  # idempotent


def test_conversations_beyond_the_count_per_namespace_go_oldest_first(
    settings: Settings, factory: sessionmaker[Session]
) -> None:
    geo = add_conversations(factory, NS, 12)
    other = add_conversations(factory, "other", 3)
    with factory.begin() as session:
        FeedbackRepository(session).add(namespace=NS, continuation="Paris.", conversation_id=geo[0])
        FeedbackRepository(session).add(namespace="other", continuation="x", messages=MESSAGES)
    policy = RetentionPolicy(conversation_max_age_days=0, conversation_max_per_namespace=4)
    report = prune(settings, factory, policy=policy)
    assert report.conversations == {NS: 7}  # geo[1:8]; geo[0] is referenced; "other" is under the limit
    with factory() as session:
        assert set(session.scalars(sa.select(Conversation.id))) == {geo[0], *geo[8:], *other}
        assert session.scalar(sa.select(sa.func.count()).select_from(FeedbackItem)) == 2  # never deleted
        recent = ConversationRepository(session).recent(namespace=NS, limit=4)
        assert [c.id for c in recent] == geo[8:]


def test_delete_never_removes_a_conversation_referenced_meanwhile(factory: sessionmaker[Session]) -> None:
    ids = add_conversations(factory, NS, 3)
    with factory.begin() as session:
        repository = ConversationRepository(session)
        planned = repository.prunable_ids(namespace=NS, keep_newest=0, limit=10)
        assert planned == ids
        FeedbackRepository(session).add(namespace=NS, continuation="Paris.", conversation_id=ids[1])
        assert repository.delete_unreferenced(ids=planned) == 2
    with factory() as session:
        assert list(session.scalars(sa.select(Conversation.id))) == [ids[1]]


# --- adapter versions ----------------------------------------------------------------------------


@pytest.fixture
def history(settings: Settings, factory: sessionmaker[Session]) -> dict[str, Any]:
    """v0..v9 promoted in turn (v9 current), v10 rejected, v11 a candidate, v3 pinned, v5 loaded on
    a replica, v8..v7 the current's ancestors and newest retired versions (keep_versions=2)."""
    publish(settings, factory, 0, None)
    for version in range(1, 10):
        publish(settings, factory, version, version - 1)
    publish(settings, factory, 10, 9, current=False, status="rejected")
    publish(settings, factory, 11, 9, current=False)
    with factory.begin() as session:
        AdapterRepository(session).set_pinned(name=NS, version=3, pinned=True)
        DeploymentRepository(session).upsert(
            adapter_name=NS, version=5, replica_url="http://r1", served_name=f"{NS}-v5", state="loaded"
        )
        DeploymentRepository(session).upsert(
            adapter_name=NS, version=2, replica_url="http://r1", served_name=f"{NS}-v2", state="unloaded"
        )
    return {"now": utcnow() + LATER}


def test_old_retired_versions_lose_their_weights_and_keep_their_rows(
    settings: Settings, factory: sessionmaker[Session], history: dict[str, Any]
) -> None:
    before = rows(factory)
    dry = prune(settings, factory, dry_run=True, now=history["now"])
    expected = [1, 2, 4, 6, 10]
    assert [v.version for v in dry.versions] == expected
    assert all(v.bytes > 4096 for v in dry.versions)
    assert all(folder(settings, v).is_dir() for v in expected)  # dry run: nothing deleted

    report = prune(settings, factory, now=history["now"])
    assert [v.version for v in report.versions] == expected
    after = rows(factory)
    assert set(after) == set(range(12))  # every row stays
    for version in range(12):
        deleted = version in expected
        assert folder(settings, version).exists() is not deleted, version
        assert (after[version].files_deleted_at is not None) is deleted
        assert (after[version].path is None) is deleted
        assert (
            after[version].metrics == before[version].metrics
            and after[version].sha256 == before[version].sha256
        )
        assert after[version].status == before[version].status
    assert not list((settings.adapters_dir / NS).glob(".deleted-*"))
    assert prune(settings, factory, now=history["now"]).versions == []


def test_nothing_goes_inside_the_grace_period(
    settings: Settings, factory: sessionmaker[Session], history: dict[str, Any]
) -> None:
    assert prune(settings, factory, now=utcnow() + timedelta(days=6)).versions == []
    with factory.begin() as session:  # v1 retired "recently" (e.g. it was rolled back to and away)
        session.execute(
            sa.update(AdapterVersion).where(AdapterVersion.version == 1).values(retired_at=history["now"])
        )
    assert [v.version for v in prune(settings, factory, now=history["now"]).versions] == [2, 4, 6, 10]


def test_ancestors_of_a_rolled_back_current_are_kept(
    settings: Settings, factory: sessionmaker[Session], history: dict[str, Any]
) -> None:
    with factory.begin() as session:
        AdapterRepository(session).rollback(name=NS, to=6)
        DeploymentRepository(session).upsert(
            adapter_name=NS, version=5, replica_url="http://r1", served_name=f"{NS}-v5", state="unloaded"
        )
    # kept: v6 current, its ancestors v5 v4, newest retired v9 v8, pinned v3, v0, candidate v11
    deleted = [v.version for v in prune(settings, factory, now=history["now"]).versions]
    assert deleted == [1, 2, 7, 10]


def test_tombstones_refuse_rollback_and_pins_with_409(
    settings: Settings, factory: sessionmaker[Session], history: dict[str, Any]
) -> None:
    prune(settings, factory, now=history["now"])
    with factory.begin() as session:
        with pytest.raises(Conflict, match="tombstone"):
            AdapterRepository(session).set_current(name=NS, version=4)
        with pytest.raises(Conflict, match="must keep its files"):
            AdapterRepository(session).mark_files_deleted(name=NS, version=9)
    with TestClient(create_app(settings, start_background=False)) as client:
        refused = client.post("/adapters/geo/rollback", json={"version": 4}, headers=bearer(ADMIN))
        assert refused.status_code == 409, refused.text
        assert "weights were deleted by retention" in refused.json()["error"]["message"]
        download = client.get("/adapters/geo/versions/6/download", headers=bearer(READER))
        assert download.status_code == 409 and "tombstone" in download.json()["error"]["message"]
        pin = client.put("/adapters/geo/versions/6/pin", json={"pinned": True}, headers=bearer(WRITER))
        assert pin.status_code == 409
        assert client.put("/adapters/geo/versions/7/pin", json={}, headers=bearer(READER)).status_code == 403
        pinned = client.put("/adapters/geo/versions/7/pin", json={"pinned": True}, headers=bearer(WRITER))
        assert pinned.status_code == 200 and pinned.json()["pinned"] is True
        bad = client.put("/adapters/geo/versions/7/pin", json={"pinned": "x"}, headers=bearer(WRITER))
        assert bad.status_code == 422 and bad.json()["error"]["field"] == "pinned"
        listed = client.get("/adapters/geo/versions/4", headers=bearer(READER)).json()
        assert listed["files_deleted_at"] is not None and listed["metrics"]["nll_after"] == pytest.approx(
            1.04
        )
        # the default rollback target is the newest retired version that still has its files
        rolled = client.post("/adapters/geo/rollback", headers=bearer(ADMIN))
        assert rolled.status_code == 200 and rolled.json()["current"] == 8
    assert 7 not in [v.version for v in prune(settings, factory, now=history["now"] + LATER).versions]


def test_a_crash_between_tombstone_and_delete_is_swept(
    settings: Settings, factory: sessionmaker[Session], history: dict[str, Any]
) -> None:
    with factory.begin() as session:
        AdapterRepository(session).mark_files_deleted(name=NS, version=1)  # ...then the process died
    assert folder(settings, 1).is_dir()
    report = prune(settings, factory, now=utcnow())
    assert report.versions == [] and report.swept_folders == [str(folder(settings, 1))]
    assert not folder(settings, 1).exists()


def test_the_daemon_loop_and_the_cli_prune(
    settings: Settings,
    factory: sessionmaker[Session],
    history: dict[str, Any],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import json

    add_conversations(factory, NS, 3)
    for key, value in {
        "DATABASE_URL": settings.database_url,
        "DATA_DIR": str(settings.data_dir),
        "LOG_LEVEL": "WARNING",
        "RETENTION_VERSION_GRACE_DAYS": "0",
        "RETENTION_KEEP_VERSIONS": "2",
        "RETENTION_CONVERSATION_MAX_PER_NAMESPACE": "1",
    }.items():
        monkeypatch.setenv(f"LORALOOP_{key}", value)
    monkeypatch.delenv("LORALOOP_AUTH_TOKENS", raising=False)
    result = CliRunner().invoke(cli_app, ["db", "prune", "--dry-run", "--json"])
    assert result.exit_code == 0, result.output
    dry = json.loads(result.output)
    assert dry["dry_run"] is True and dry["conversations"] == {NS: 2}
    assert [v["version"] for v in dry["versions"]] == [1, 2, 4, 6, 10] and dry["version_bytes_total"] > 0
    assert all(folder(settings, v).is_dir() for v in (1, 2, 4, 6, 10))

    result = CliRunner().invoke(cli_app, ["db", "prune"])
    assert result.exit_code == 0, result.output
    assert "deleted: 2 conversations, 5 adapter versions' weights" in result.output
    assert not folder(settings, 1).exists() and folder(settings, 3).exists()

    result = CliRunner().invoke(cli_app, ["adapters", "pin", NS, "7"])
    assert result.exit_code == 0 and rows(factory)[7].pinned
    loop = RetentionLoop(settings.model_copy(update={"retention_version_grace_days": 0.0}), factory)
    with factory.begin() as session:
        AdapterRepository(session).set_current(name=NS, version=11)  # v9 retired, v8 and v7 older
    report = loop.run_once()
    assert report is not None and [v.version for v in report.versions] == []  # v7 pinned, v8/v9 ancestors
    with factory.begin() as session:
        AdapterRepository(session).set_pinned(name=NS, version=7, pinned=False)
    report = loop.run_once()
    assert report is not None and [v.version for v in report.versions] == [7]


# --- paginated version lists ---------------------------------------------------------------------


def test_version_lists_are_paginated_with_a_stable_shape(
    settings: Settings, factory: sessionmaker[Session], history: dict[str, Any]
) -> None:
    with TestClient(create_app(settings, start_background=False)) as client:
        headers = bearer(READER)
        listing = client.get("/adapters", headers=headers).json()
        assert listing["next_cursor"] is None
        (adapter,) = listing["adapters"]
        assert {"name", "current", "base_model", "created_at", "versions"} <= set(adapter)
        assert adapter["current"] == 9 and adapter["versions_total"] == 12
        assert [v["version"] for v in adapter["versions"]] == list(range(12))
        assert {"version", "status", "metrics", "created_at"} <= set(adapter["versions"][0])

        short = client.get("/adapters", params={"versions_limit": 3}, headers=headers).json()["adapters"][0]
        assert [v["version"] for v in short["versions"]] == [9, 10, 11]
        assert short["older_versions_cursor"] == 9 and short["versions_total"] == 12
        older = client.get(
            "/adapters/geo/versions", params={"order": "desc", "cursor": 9, "limit": 4}, headers=headers
        ).json()
        assert [v["version"] for v in older["versions"]] == [8, 7, 6, 5] and older["next_cursor"] == 5
        assert older["total"] == 12
        pages, cursor = [], None
        while True:
            params = {"limit": 5} | ({"cursor": cursor} if cursor is not None else {})
            page = client.get("/adapters/geo/versions", params=params, headers=headers).json()
            pages.append([v["version"] for v in page["versions"]])
            cursor = page["next_cursor"]
            if cursor is None:
                break
        assert pages == [[0, 1, 2, 3, 4], [5, 6, 7, 8, 9], [10, 11]]
        one = client.get("/adapters/geo", params={"versions_limit": 1}, headers=headers).json()
        assert [v["version"] for v in one["versions"]] == [11] and one["older_versions_cursor"] == 11

        with factory.begin() as session:
            for name in ("alpha", "zeta"):
                AdapterRepository(session).ensure_adapter(name=name)
        first = client.get("/adapters", params={"limit": 2}, headers=headers).json()
        assert [a["name"] for a in first["adapters"]] == ["alpha", "geo"] and first["next_cursor"] == "geo"
        second = client.get("/adapters", params={"limit": 2, "cursor": "geo"}, headers=headers).json()
        assert [a["name"] for a in second["adapters"]] == ["zeta"] and second["next_cursor"] is None
        assert second["adapters"][0]["versions"] == [] and second["adapters"][0]["versions_total"] == 0

        for path, params, field in [
            ("/adapters", {"versions_limit": 0}, "versions_limit"),
            ("/adapters", {"limit": 501}, "limit"),
            ("/adapters", {"cursor": "../x"}, "cursor"),
            ("/adapters/geo/versions", {"order": "sideways"}, "order"),
            ("/adapters/geo/versions", {"cursor": -1}, "cursor"),
        ]:
            bad = client.get(path, params=params, headers=headers)
            assert bad.status_code == 422 and bad.json()["error"]["field"] == field, (path, params, bad.text)
        assert client.get("/adapters/nope/versions", headers=headers).status_code == 404


# --- migration -----------------------------------------------------------------------------------


def test_upgrade_from_0001_keeps_versions_unpinned_and_servable(db_url: str) -> None:
    upgrade_database(db_url, revision="0001")
    engine = make_engine(db_url)
    try:
        with engine.begin() as connection:
            connection.execute(
                sa.text("INSERT INTO adapters (name, current_version, created_at) VALUES ('geo', 0, :now)"),
                {"now": utcnow().replace(tzinfo=None)},
            )
            connection.execute(
                sa.text(
                    "INSERT INTO adapter_versions (adapter_name, version, status, path, sha256, created_at) "
                    "VALUES ('geo', 0, 'current', '/x/v0', 'ab', :now)"
                ),
                {"now": utcnow().replace(tzinfo=None)},
            )
        upgrade_database(db_url)
        with make_session_factory(engine)() as session:
            row = AdapterRepository(session).get_version(name="geo", version=0)
            assert row.pinned is False and row.files_deleted_at is None and row.retired_at is None
    finally:
        engine.dispose()
