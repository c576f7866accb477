"""Repositories and models of memory_store, on SQLite and PostgreSQL (`db_session_factory`)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta, timezone

import pytest
from sqlalchemy import select
from sqlalchemy import text as sa_text

from memory_store.errors import Conflict, IdempotencyConflict, NotFound
from memory_store.models import FeedbackItem, Job
from memory_store.repositories import (
    AdapterRepository,
    ConversationRepository,
    DeploymentRepository,
    FeedbackRepository,
    MemoryRepository,
    NewFeedback,
    TrainingRunRepository,
)

MESSAGES = [
    {"role": "system", "content": "be brief"},
    {"role": "user", "content": "capital of France?"},
    {"role": "assistant", "content": "It is Paris, a city in France."},
]


def feedback(namespace: str = "ns", continuation: str = "Paris.", **fields: object) -> dict[str, object]:
    return {
        "namespace": namespace,
        "messages": MESSAGES,
        "target_index": 2,
        "continuation": continuation,
        **fields,
    }


# --- feedback --------------------------------------------------------------------------------------


def test_feedback_add_and_get_round_trips_every_field(db_session_factory):
    with db_session_factory.begin() as session:
        conversation = ConversationRepository(session).add(namespace="ns", messages=MESSAGES, model="m")
        item, created = FeedbackRepository(session).add(
            **feedback(reason="too long", memories=["m1"], tags=["a", "b"], conversation_id=conversation.id)
        )
        item_id = item.id
    assert created
    with db_session_factory() as session:
        stored = FeedbackRepository(session).get(id=item_id)
        assert stored.messages == MESSAGES
        assert (stored.target_index, stored.continuation, stored.reason) == (2, "Paris.", "too long")
        assert (stored.memories, stored.tags, stored.conversation_id) == (["m1"], ["a", "b"], conversation.id)
        assert stored.status == "pending" and stored.trained_in_version is None
        assert stored.created_at.tzinfo is not None
        with pytest.raises(NotFound):
            FeedbackRepository(session).get(id=item_id, namespace="other")
        with pytest.raises(NotFound):
            FeedbackRepository(session).get(id=item_id + 1000)


def test_feedback_idempotent_replay_returns_same_row_and_different_body_conflicts(db_session_factory):
    with db_session_factory.begin() as session:
        first, created_first = FeedbackRepository(session).add(**feedback(idempotency_key="key-1"))
    with db_session_factory.begin() as session:
        replay, created_replay = FeedbackRepository(session).add(**feedback(idempotency_key="key-1"))
        # the same key in another namespace is another item
        other_ns, created_other = FeedbackRepository(session).add(
            **feedback(namespace="ns2", idempotency_key="key-1")
        )
    assert created_first and not created_replay and created_other
    assert replay.id == first.id != other_ns.id
    with db_session_factory.begin() as session, pytest.raises(IdempotencyConflict) as raised:
        FeedbackRepository(session).add(**feedback(continuation="Something else.", idempotency_key="key-1"))
    assert raised.value.existing_id == first.id
    with db_session_factory() as session:
        assert (
            session.scalar(select(FeedbackItem.id).where(FeedbackItem.namespace == "ns").limit(5)) == first.id
        )
        assert len(session.scalars(select(FeedbackItem)).all()) == 2


def test_feedback_from_conversation_copies_messages_and_checks_namespace(db_session_factory):
    with db_session_factory.begin() as session:
        conversation = ConversationRepository(session).add(namespace="ns", messages=MESSAGES, source="agent")
        item, _ = FeedbackRepository(session).add(
            namespace="ns", continuation="Paris.", conversation_id=conversation.id
        )
        assert item.messages == MESSAGES
        with pytest.raises(NotFound):
            FeedbackRepository(session).add(
                namespace="other", continuation="x", conversation_id=conversation.id
            )
        with pytest.raises(NotFound):
            FeedbackRepository(session).add(
                namespace="ns", continuation="x", conversation_id=conversation.id + 99
            )
        with pytest.raises(ValueError, match="messages or a conversation_id"):
            FeedbackRepository(session).add(namespace="ns", continuation="x")


def test_feedback_add_many_is_one_transaction(db_session_factory):
    items = [NewFeedback(namespace="ns", messages=MESSAGES, continuation=f"answer {i}") for i in range(5)]
    with db_session_factory.begin() as session:
        results = FeedbackRepository(session).add_many(items=items)
    assert [item.continuation for item, created in results] == [f"answer {i}" for i in range(5)]
    assert all(created for _, created in results)
    ids = [item.id for item, _ in results]
    assert ids == sorted(ids)

    # a bad item in the middle rolls the whole batch back
    bad_batch = [*items[:2], NewFeedback(namespace="ns", continuation="x", conversation_id=424242)]
    with pytest.raises(NotFound), db_session_factory.begin() as session:
        FeedbackRepository(session).add_many(items=bad_batch)
    with db_session_factory() as session:
        assert FeedbackRepository(session).count_pending(namespace="ns") == 5


def test_feedback_add_many_replays_keys_within_and_across_batches(db_session_factory):
    keyed = NewFeedback(namespace="ns", messages=MESSAGES, continuation="a", idempotency_key="k")
    with db_session_factory.begin() as session:
        results = FeedbackRepository(session).add_many(items=[keyed, keyed])
    assert results[0][0].id == results[1][0].id and [c for _, c in results] == [True, False]
    with db_session_factory.begin() as session:
        again = FeedbackRepository(session).add_many(items=[keyed])
    assert again[0][0].id == results[0][0].id and again[0][1] is False


def test_feedback_add_many_settles_a_key_won_by_a_concurrent_request(db_session_factory, monkeypatch):
    """The bulk lookup misses a key that another request stores before the batch's flush: the
    batch still returns that request's row as a replay, stores the others once, duplicates none."""
    raced = NewFeedback(namespace="ns", messages=MESSAGES, continuation="a", idempotency_key="raced")
    with db_session_factory.begin() as session:
        winner, _ = FeedbackRepository(session).add(**vars(raced))
    monkeypatch.setattr(FeedbackRepository, "_by_keys", lambda self, keys: {})  # lookup ran before the race
    others = [
        NewFeedback(namespace="ns", messages=MESSAGES, continuation=f"b{i}", idempotency_key=f"k{i}")
        for i in range(3)
    ]
    with db_session_factory.begin() as session:
        results = FeedbackRepository(session).add_many(items=[others[0], raced, *others[1:]])
    assert [created for _, created in results] == [True, False, True, True]
    assert results[1][0].id == winner.id
    with db_session_factory() as session:
        assert FeedbackRepository(session).count_pending(namespace="ns") == 4


def test_feedback_list_filters_and_paginates(db_session_factory):
    with db_session_factory.begin() as session:
        repo = FeedbackRepository(session)
        ids = [repo.add(**feedback(continuation=f"c{i}"))[0].id for i in range(7)]
        repo.add(**feedback(namespace="elsewhere"))
        repo.mark_trained(ids=ids[:2], version=1)
    with db_session_factory() as session:
        repo = FeedbackRepository(session)
        pages, after = [], None
        while page := repo.list(namespace="ns", limit=3, after_id=after):
            pages.append([item.id for item in page])
            after = page[-1].id
        assert pages == [ids[0:3], ids[3:6], ids[6:7]]
        assert [item.id for item in repo.list(namespace="ns", status="pending")] == ids[2:]
        assert [item.id for item in repo.list(namespace="ns", status="trained")] == ids[:2]
        assert repo.list(namespace="ns", since=datetime.now(UTC) + timedelta(hours=1)) == []
        assert len(repo.list(namespace="ns", since=datetime.now(UTC) - timedelta(hours=1))) == 7
        assert len(repo.list()) == 8
        with pytest.raises(ValueError, match="status"):
            repo.list(status="bogus")


def test_feedback_training_bookkeeping(db_session_factory):
    with db_session_factory.begin() as session:
        repo = FeedbackRepository(session)
        ids = [repo.add(**feedback(continuation=f"c{i}"))[0].id for i in range(10)]
        repo.add(**feedback(namespace="b"))
        assert repo.mark_trained(ids=ids[:6], version=3) == 6
        assert repo.mark_skipped(ids=[ids[6]]) == 1
    with db_session_factory() as session:
        repo = FeedbackRepository(session)
        assert repo.count_pending(namespace="ns") == 3
        assert repo.count_pending() == 4
        assert repo.status_counts(namespace="ns") == {"pending": 3, "trained": 6, "skipped": 1}
        assert [item.id for item in repo.pending_since(namespace="ns")] == ids[7:]
        assert [item.id for item in repo.pending_since(namespace="ns", after_id=ids[7])] == ids[8:]
        assert repo.get(id=ids[0]).trained_in_version == 3

        sample = repo.replay_sample(namespace="ns", before_id=ids[7], n=4, seed=7)
        assert len(sample) == 4 and all(item.status == "trained" for item in sample)
        assert [i.id for i in sample] == [
            i.id for i in repo.replay_sample(namespace="ns", before_id=ids[7], n=4, seed=7)
        ]
        assert {i.id for i in repo.replay_sample(namespace="ns", before_id=ids[3], n=10, seed=1)} == set(
            ids[:3]
        )
        assert repo.replay_sample(namespace="ns", before_id=ids[7], n=0, seed=1) == []
        seeds_differ = {
            tuple(i.id for i in repo.replay_sample(namespace="ns", before_id=ids[7], n=2, seed=s))
            for s in range(8)
        }
        assert len(seeds_differ) > 1


# --- conversations and memories --------------------------------------------------------------------


def test_conversations_list_by_namespace(db_session_factory):
    with db_session_factory.begin() as session:
        repo = ConversationRepository(session)
        first = repo.add(namespace="ns", messages=MESSAGES)
        repo.add(namespace="other", messages=MESSAGES)
        second = repo.add(namespace="ns", messages=MESSAGES[:2], model="tiny", source="import")
    with db_session_factory() as session:
        repo = ConversationRepository(session)
        assert [c.id for c in repo.list(namespace="ns")] == [first.id, second.id]
        assert [c.id for c in repo.list(namespace="ns", after_id=first.id)] == [second.id]
        assert repo.get(id=second.id).model == "tiny"
        with pytest.raises(NotFound):
            repo.get(id=first.id, namespace="other")


def test_memories_soft_delete_and_bake(db_session_factory):
    with db_session_factory.begin() as session:
        repo = MemoryRepository(session)
        a = repo.add(
            namespace="ns", content="The user prefers metric units.", title="units", priority=5, tags=["pref"]
        )
        b = repo.add(namespace="ns", content="The user's name is Ada.")
        c = repo.add(namespace="ns", content="Retire me.")
        repo.add(namespace="other", content="Not here.")
    with db_session_factory.begin() as session:
        repo = MemoryRepository(session)
        retired = repo.delete(id=c.id)
        assert retired.state == "retired"
        assert repo.delete(id=c.id).state == "retired"  # idempotent
        assert repo.mark_baked(ids=[a.id, c.id], version=4) == 1  # retired memories are not baked
    with db_session_factory() as session:
        repo = MemoryRepository(session)
        assert [m.id for m in repo.list(namespace="ns")] == [b.id]
        assert [m.id for m in repo.list(namespace="ns", state=None)] == [a.id, b.id, c.id]
        baked = repo.get(id=a.id)
        assert (baked.state, baked.baked_in_version, baked.priority, baked.tags) == ("baked", 4, 5, ["pref"])
        assert baked.updated_at >= baked.created_at
        with pytest.raises(NotFound):
            repo.delete(id=a.id, namespace="other")


# --- adapters ----------------------------------------------------------------------------------------


def test_adapter_versions_current_pointer_and_rollback(db_session_factory):
    with db_session_factory.begin() as session:
        repo = AdapterRepository(session)
        repo.ensure_adapter(name="ns", base_model="/models/tiny")
        assert repo.ensure_adapter(name="ns").base_model == "/models/tiny"
        assert repo.current(name="ns") is None
        assert repo.next_version(name="ns") == 0
        v0 = repo.add_version(name="ns", path="/a/ns/v0", sha256="0" * 64)
        repo.set_current(name="ns", version=v0.version)
        v1 = repo.add_version(name="ns", parent_version=0, feedback_from_id=1, feedback_to_id=9)
        assert (v0.version, v1.version) == (0, 1)
        with pytest.raises(Conflict, match="path"):
            repo.set_current(name="ns", version=1)  # no files yet
        v1.path, v1.sha256 = "/a/ns/v1", "1" * 64  # the files published
        v1.metrics = {"nll_after": 0.5, "drift_kl": 0.01}
        repo.set_current(name="ns", version=1)
        repo.add_version(name="ns", path="/a/ns/v2", parent_version=1)
        repo.set_status(name="ns", version=2, status="rejected", reason="gate: nll did not drop")
        with pytest.raises(Conflict):
            repo.set_current(name="ns", version=2)
        with pytest.raises(Conflict):
            repo.add_version(name="ns", version=1, path="/dup")
        with pytest.raises(Conflict, match="current"):
            repo.set_status(name="ns", version=1, status="retired")
        with pytest.raises(ValueError):
            repo.add_version(name="ns", status="current")
        with pytest.raises(NotFound):
            repo.add_version(name="missing")

    with db_session_factory() as session:
        repo = AdapterRepository(session)
        current = repo.current(name="ns")
        assert current is not None and current.version == 1
        assert current.metrics == {"nll_after": 0.5, "drift_kl": 0.01}
        assert (current.feedback_from_id, current.feedback_to_id, current.parent_version) == (1, 9, 0)
        [adapter] = repo.list_with_versions()
        assert adapter.current_version == 1
        assert [(v.version, v.status) for v in adapter.versions] == [
            (0, "retired"),
            (1, "current"),
            (2, "rejected"),
        ]
        assert repo.get_version(name="ns", version=2).reason == "gate: nll did not drop"

    with db_session_factory.begin() as session:
        repo = AdapterRepository(session)
        rolled = repo.rollback(name="ns", reason="regressed in production")
        assert rolled.version == 0
        assert repo.get_version(name="ns", version=1).reason == "regressed in production"
        with pytest.raises(Conflict, match="no earlier version"):
            repo.rollback(name="ns")
        assert repo.rollback(name="ns", to=1).version == 1
    with db_session_factory() as session:
        repo = AdapterRepository(session)
        assert [(v.version, v.status) for v in repo.list_versions(name="ns")] == [
            (0, "retired"),
            (1, "current"),
            (2, "rejected"),
        ]
        assert repo.get_adapter(name="ns").current_version == 1
        with pytest.raises(NotFound):
            repo.get_version(name="ns", version=9)
        with pytest.raises(NotFound):
            repo.current(name="nope")


def test_failed_set_current_leaves_pointer_unchanged(db_session_factory):
    with db_session_factory.begin() as session:
        repo = AdapterRepository(session)
        repo.ensure_adapter(name="ns")
        repo.add_version(name="ns", path="/v0")
        repo.set_current(name="ns", version=0)
        repo.add_version(name="ns", path="/v1")
    with pytest.raises(RuntimeError), db_session_factory.begin() as session:
        AdapterRepository(session).set_current(name="ns", version=1)
        raise RuntimeError("crash between the flip and the commit")
    with db_session_factory() as session:
        repo = AdapterRepository(session)
        assert repo.current(name="ns").version == 0
        assert repo.get_version(name="ns", version=1).status == "candidate"


# --- training runs and deployments -------------------------------------------------------------------


def test_training_runs_record_outcomes(db_session_factory):
    with db_session_factory.begin() as session:
        job = Job(kind="train", namespace="ns", payload={})
        session.add(job)
        session.flush()
        repo = TrainingRunRepository(session)
        run = repo.start(
            namespace="ns",
            kind="train",
            job_id=job.id,
            parent_version=0,
            feedback_from_id=1,
            feedback_to_id=5,
        )
        repo.finish(id=run.id, status="succeeded", version=1, metrics={"train_tokens": 120})
        rejected = repo.start(namespace="ns", kind="distill")
        repo.finish(id=rejected.id, status="rejected", metrics={"gap_closure": 0.1}, error="gate")
        with pytest.raises(ValueError):
            repo.start(namespace="ns", kind="bogus")
        with pytest.raises(ValueError):
            repo.finish(id=run.id, status="running")
    with db_session_factory() as session:
        repo = TrainingRunRepository(session)
        stored = repo.get(id=run.id)
        assert (stored.status, stored.version, stored.metrics, stored.job_id) == (
            "succeeded",
            1,
            {"train_tokens": 120},
            job.id,
        )
        assert stored.finished_at is not None and stored.finished_at >= stored.started_at
        assert [r.id for r in repo.list(namespace="ns")] == [run.id, rejected.id]
        assert [r.id for r in repo.list(namespace="ns", kind="distill")] == [rejected.id]
        assert repo.latest(namespace="ns").id == rejected.id
        assert repo.latest(namespace="ns", status="succeeded").id == run.id
        assert repo.latest(namespace="none") is None


def test_deployments_upsert_per_replica_and_name(db_session_factory):
    with db_session_factory.begin() as session:
        AdapterRepository(session).ensure_adapter(name="ns")
        repo = DeploymentRepository(session)
        first = repo.upsert(
            adapter_name="ns", version=1, replica_url="http://a:8000", served_name="ns-v1", state="loading"
        )
        same = repo.upsert(
            adapter_name="ns", version=1, replica_url="http://a:8000", served_name="ns-v1", state="loaded"
        )
        repo.upsert(
            adapter_name="ns",
            version=1,
            replica_url="http://b:8000",
            served_name="ns-v1",
            state="failed",
            error="down",
        )
        assert same.id == first.id
        repo.upsert(
            adapter_name="ns", version=1, replica_url="http://a:8000", served_name="ns-v1", state="unloading"
        )
        with pytest.raises(ValueError):
            repo.upsert(
                adapter_name="ns", version=1, replica_url="http://a:8000", served_name="ns-v1", state="bogus"
            )
    with db_session_factory.begin() as session:
        repo = DeploymentRepository(session)
        assert [(d.replica_url, d.state) for d in repo.list(adapter_name="ns")] == [
            ("http://a:8000", "unloading"),
            ("http://b:8000", "failed"),
        ]
        assert [d.error for d in repo.list(state="failed")] == ["down"]
        repo.delete(id=first.id)
        assert len(repo.list(replica_url="http://a:8000")) == 0


# --- timestamps --------------------------------------------------------------------------------------


def test_timestamps_round_trip_as_aware_utc(db_session_factory):
    plus_two = timezone(timedelta(hours=2))
    moment = datetime(2026, 1, 2, 3, 4, 5, 678901, tzinfo=plus_two)
    naive_utc = datetime(2026, 1, 2, 1, 4, 5, 678901)
    with db_session_factory.begin() as session:
        first = Job(kind="k", payload={}, run_after=moment, created_at=moment)
        second = Job(kind="k", payload={}, run_after=naive_utc, created_at=moment + timedelta(microseconds=1))
        session.add_all([first, second])
        session.flush()
        ids = (first.id, second.id)
    with db_session_factory() as session:
        stored = [session.get(Job, i) for i in ids]
        for job in stored:
            assert job.run_after.tzinfo is not None and job.run_after.utcoffset() == timedelta(0)
            assert job.run_after == moment  # same instant, whatever zone it was written in
        assert stored[0].run_after.hour == 1
        # range filters compare instants, on SQLite too
        found = session.scalars(select(Job.id).where(Job.created_at > moment).order_by(Job.id)).all()
        assert found == [ids[1]]
        found = session.scalars(select(Job.id).where(Job.created_at >= moment.astimezone(UTC))).all()
        assert sorted(found) == list(ids)


# --- bounded queries (months of history) -----------------------------------------------------------


def _bulk_feedback(session, rows: list[dict[str, object]]) -> None:
    now = datetime.now(UTC)
    session.execute(
        FeedbackItem.__table__.insert(),
        [{"messages": MESSAGES, "continuation": "c", "created_at": now, **row} for row in rows],
    )


def test_recent_conversations_are_ordered_and_limited_in_sql(db_session_factory):
    from service.jobs.train import recent_conversations

    with db_session_factory.begin() as session:
        repo = ConversationRepository(session)
        ids = [repo.add(namespace="a", messages=[{"role": "user", "content": f"q{i}"}]).id for i in range(40)]
        repo.add(namespace="b", messages=MESSAGES)
    with db_session_factory() as session:
        assert [c.id for c in ConversationRepository(session).recent(namespace="a", limit=5)] == ids[-5:]
        messages = recent_conversations(session, "a", 3)
        assert [m[0]["content"] for m in messages] == ["q37", "q38", "q39"]
        assert recent_conversations(session, "a", 0) == []
        assert len(recent_conversations(session, "b", 32)) == 1
        with pytest.raises(ValueError, match="limit"):
            ConversationRepository(session).recent(namespace="a", limit=0)


def test_replay_sample_over_a_long_history_reads_a_bounded_number_of_rows(db_session_factory):
    from sqlalchemy import event

    # 12,000 ids: every third one a trained item of "ns", the rest another namespace's (gaps)
    with db_session_factory.begin() as session:
        _bulk_feedback(
            session,
            [
                {
                    "namespace": "ns" if i % 3 == 0 else "other",
                    "status": "trained" if i % 3 == 0 else "pending",
                }
                for i in range(12_000)
            ],
        )
    with db_session_factory() as session:
        trained = set(session.scalars(select(FeedbackItem.id).where(FeedbackItem.namespace == "ns")))
        before_id = max(trained) - 30
        statements: list[str] = []
        engine = session.get_bind()

        def count(conn, cursor, statement, *args):
            statements.append(statement)

        event.listen(engine, "before_cursor_execute", count)
        try:
            sample = FeedbackRepository(session).replay_sample(
                namespace="ns", before_id=before_id, n=16, seed=3
            )
        finally:
            event.remove(engine, "before_cursor_execute", count)
        assert len(sample) == 16 and len({i.id for i in sample}) == 16
        assert all(i.id in trained and i.id < before_id and i.namespace == "ns" for i in sample)
        ids = [i.id for i in sample]
        assert ids == sorted(ids) and min(ids) < min(trained) + 4000 and max(ids) > max(trained) - 4000
        assert len(statements) <= 4 + 3  # seeks batched per statement, never a scan of every trained id
        unbounded = [s for s in statements if "LIMIT" not in s.upper() and " IN (" not in s.upper()]
        assert unbounded == []
        again = FeedbackRepository(session).replay_sample(namespace="ns", before_id=before_id, n=16, seed=3)
        assert [i.id for i in again] == ids
        other = FeedbackRepository(session).replay_sample(namespace="ns", before_id=before_id, n=16, seed=4)
        assert [i.id for i in other] != ids


def test_recent_feedback_and_version_pages(db_session_factory):
    with db_session_factory.begin() as session:
        feedback_repo = FeedbackRepository(session)
        ids = [feedback_repo.add(**feedback(continuation=f"c{i}"))[0].id for i in range(6)]
        feedback_repo.mark_trained(ids=ids[:4], version=1)
        repo = AdapterRepository(session)
        repo.ensure_adapter(name="ns")
        for version in range(7):
            repo.add_version(name="ns", version=version, path=f"/a/v{version}", sha256="ab")
        repo.set_current(name="ns", version=2)
        repo.set_current(name="ns", version=5)
    with db_session_factory() as session:
        recent = FeedbackRepository(session).recent(namespace="ns", status="trained", limit=3)
        assert [i.id for i in recent] == ids[1:4]
        repo = AdapterRepository(session)
        assert [v.version for v in repo.list_versions(name="ns", limit=3, newest_first=True)] == [6, 5, 4]
        assert [v.version for v in repo.list_versions(name="ns", after_version=4, newest_first=True)] == [
            3,
            2,
            1,
            0,
        ]
        assert [v.version for v in repo.list_versions(name="ns", after_version=4, limit=1)] == [5]
        assert repo.count_versions(name="ns") == 7 and repo.has_version(name="ns", version=6)
        assert not repo.has_version(name="ns", version=7)
        retired = repo.get_version(name="ns", version=2)
        assert retired.status == "retired" and retired.retired_at is not None
        assert repo.get_version(name="ns", version=1).retired_at is None


def test_bounded_queries_use_indexes_on_sqlite(tmp_path):
    from memory_store.db import make_engine, make_session_factory, upgrade_database
    from memory_store.models import Conversation

    url = f"sqlite:///{tmp_path / 'plan.db'}"
    upgrade_database(url)
    engine = make_engine(url)
    try:
        with make_session_factory(engine)() as session:

            def plan(stmt) -> str:
                compiled = stmt.compile(engine, compile_kwargs={"literal_binds": True})
                rows = session.execute(sa_text(f"EXPLAIN QUERY PLAN {compiled}")).all()
                return " | ".join(str(row[-1]) for row in rows)

            recent = (
                select(Conversation)
                .where(Conversation.namespace == "a")
                .order_by(Conversation.id.desc())
                .limit(32)
            )
            assert "ix_conversations_namespace_id" in plan(recent)
            assert "TEMP B-TREE" not in plan(recent)
            seek = (
                select(FeedbackItem.id)
                .where(FeedbackItem.namespace == "a", FeedbackItem.status == "trained", FeedbackItem.id >= 5)
                .order_by(FeedbackItem.id)
                .limit(1)
            )
            assert "ix_feedback_items_namespace_status_id" in plan(seek) and "TEMP B-TREE" not in plan(seek)
            aged = select(Conversation.id).where(
                Conversation.namespace == "a", Conversation.created_at < datetime(2020, 1, 1)
            )
            assert "ix_conversations_namespace_created_at" in plan(aged)
    finally:
        engine.dispose()


def test_the_queries_jobs_and_pages_read_through_the_repositories(db_session_factory):
    """What retention, the registry, the scheduler and the dashboard ask the store (no raw SQL in service/)."""
    from memory_store.queue import JobQueue

    with db_session_factory.begin() as session:
        adapters = AdapterRepository(session)
        for name in ("b", "a", "idle"):
            adapters.ensure_adapter(name=name)
        adapters.add_version(name="a", path="/a/a/v0")
        adapters.set_current(name="a", version=0)
        adapters.add_version(name="a", path="/a/a/v1", parent_version=0)
        adapters.set_current(name="a", version=1)
        adapters.add_version(name="a", path="/a/a/v2", parent_version=1)
        adapters.set_status(name="a", version=2, status="rejected", reason="gate")
        adapters.set_pinned(name="a", version=2, pinned=True)
        adapters.add_version(name="a", path="/a/a/v3", parent_version=1)
        adapters.set_status(name="a", version=3, status="failed", reason="crash")
        adapters.add_version(name="b", path="/a/b/v0")
        adapters.set_current(name="b", version=0)
        adapters.mark_files_deleted(name="a", version=0)
        deployments = DeploymentRepository(session)
        deployments.upsert(adapter_name="a", version=1, replica_url="http://r", served_name="a-v1", state="loaded")
        deployments.upsert(adapter_name="a", version=3, replica_url="http://r", served_name="a-v3", state="failed")
        memories = MemoryRepository(session)
        memories.add(namespace="z", content="kept")
        memories.add(namespace="a", content="kept too")
        gone = memories.add(namespace="y", content="retired")
        memories.delete(id=gone.id)
        runs = TrainingRunRepository(session)
        run_ids = [runs.start(namespace="a", kind="train").id for _ in range(4)]
        runs.start(namespace="b", kind="train")
        queue = JobQueue(session)
        job_ids = [queue.enqueue(kind="train", namespace=ns, payload={}).id for ns in ("a", "b", "a")]
    with db_session_factory() as session:
        adapters = AdapterRepository(session)
        assert adapters.lineage(name="a") == [
            (3, 1, "failed", False),
            (2, 1, "rejected", True),
            (1, 0, "current", False),
            (0, None, "retired", False),
        ]
        # v0 is a tombstone already, v2 pinned, v1 current: only v3's files may go
        assert [v.version for v in adapters.versions_with_deletable_files(name="a")] == [3]
        assert adapters.tombstones() == [("a", 0)]
        assert [a.name for a in adapters.all_adapters()] == ["a", "b", "idle"]
        assert adapters.current_versions() == [("a", 1, "/a/a/v1"), ("b", 0, "/a/b/v0")]
        assert adapters.recorded_versions(name="a", versions=[1, 2, 7, *range(100, 1200)]) == {1, 2}
        deployments = DeploymentRepository(session)
        assert deployments.versions_in_states(adapter_name="a", states=("loading", "loaded")) == {1}
        assert MemoryRepository(session).namespaces_with_active() == ["a", "z"]
        runs = TrainingRunRepository(session)
        assert [r.id for r in runs.recent(namespace="a", limit=2)] == run_ids[:1:-1]
        assert [r.id for r in runs.by_ids([run_ids[0], run_ids[0], 10**6])] == [run_ids[0]]
        assert runs.by_ids([]) == []
        assert [j.id for j in JobQueue(session).recent(limit=2)] == job_ids[:0:-1]
        with pytest.raises(ValueError):
            JobQueue(session).recent(limit=0)
