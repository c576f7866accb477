"""Group commit (service.ingest.writer): a group of requests stored in one transaction settles
each request as its own transaction would, and answers only after the commit."""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from sqlalchemy.orm import Session, sessionmaker

from memory_store.errors import DatabaseUnavailable, IdempotencyConflict
from memory_store.models import FeedbackItem, Job
from service.api.auth import TokenTable
from service.api.errors import InvalidField
from service.api.schemas import FeedbackBatchItem, FeedbackCreate
from service.config import Settings
from service.ingest.intake import FeedbackValidator, StoreUnit, feedback_batch_unit, feedback_unit
from service.ingest.writer import DirectFeedbackWriter, FeedbackWriter, _Pending

pytestmark = pytest.mark.integration


def body(continuation: str = "Paris.", **overrides: Any) -> dict[str, Any]:
    return {
        "messages": [
            {"role": "user", "content": "Capital of France?"},
            {"role": "assistant", "content": "Lyon."},
        ],
        "continuation": continuation,
        "namespace": "geo",
        **overrides,
    }


@pytest.fixture
def settings(tmp_path: Path) -> Settings:
    return Settings(
        _env_file=None,
        auth_disabled=True,
        data_dir=tmp_path,
        tokenizer=tmp_path / "no-tokenizer",
        train_debounce_s=60,
    )


@pytest.fixture
def validator(settings: Settings) -> FeedbackValidator:
    checks = FeedbackValidator(settings)
    checks.load()
    return checks


WRITER = TokenTable.parse("writer=feedback:write label:writer").authenticate("writer")


def unit(validator: FeedbackValidator, settings: Settings, key: str | None, **overrides: Any):
    return feedback_unit(
        FeedbackCreate.model_validate(body(**overrides)),
        idempotency_key=key,
        settings=settings,
        validator=validator,
        principal=WRITER,
    )


def stored(factory: sessionmaker[Session]) -> list[tuple[str | None, str]]:
    with factory() as session:
        rows = session.execute(
            sa.select(FeedbackItem.idempotency_key, FeedbackItem.continuation).order_by(FeedbackItem.id)
        )
        return [tuple(row) for row in rows]


def test_one_group_settles_each_request_as_its_own_transaction(
    db_session_factory: sessionmaker[Session], settings: Settings, validator: FeedbackValidator
) -> None:
    factory = db_session_factory
    DirectFeedbackWriter(factory, settings).submit(unit(validator, settings, "old"))
    group = [
        _Pending(unit(validator, settings, "a")),
        _Pending(
            unit(validator, settings, "old", continuation="Marseille.")
        ),  # conflicts with the stored "old"
        _Pending(unit(validator, settings, "b")),
        _Pending(unit(validator, settings, "a")),  # the same key again in the group: a replay
        _Pending(unit(validator, settings, None)),
        _Pending(
            feedback_batch_unit(
                [FeedbackBatchItem.model_validate(body(f"P{i}.")) for i in range(3)],
                idempotency_key="batch",
                settings=settings,
                validator=validator,
                principal=WRITER,
            )
        ),
        _Pending(unit(validator, settings, "old")),  # a replay of the stored one
    ]
    FeedbackWriter(factory, settings)._write(group)

    with pytest.raises(IdempotencyConflict):
        group[1].future.result()
    first_a, second_a = group[0].future.result()[0], group[3].future.result()[0]
    assert first_a.created and not second_a.created and first_a.item.id == second_a.item.id
    assert group[2].future.result()[0].created and group[4].future.result()[0].created
    assert [entry.created for entry in group[5].future.result()] == [True, True, True]
    assert not group[6].future.result()[0].created
    assert stored(factory) == [
        ("old", "Paris."),
        ("a", "Paris."),
        ("b", "Paris."),
        (None, "Paris."),
        ("batch\x1f0", "P0."),
        ("batch\x1f1", "P1."),
        ("batch\x1f2", "P2."),
    ]
    with factory() as session:  # one train job for the namespace, enqueued once
        assert session.scalar(sa.select(sa.func.count()).select_from(Job).where(Job.kind == "train")) == 1


def test_invalid_item_is_refused_alone_and_answers_follow_the_commit(
    db_session_factory: sessionmaker[Session], settings: Settings, validator: FeedbackValidator
) -> None:
    with pytest.raises(InvalidField):
        unit(validator, settings, "bad", target_index=0)  # checked in the caller's thread, before the writer
    writer = FeedbackWriter(db_session_factory, settings)
    answers: list[int] = []

    def post(index: int) -> None:
        [accepted] = writer.submit(unit(validator, settings, f"k{index}"))
        with db_session_factory() as session:  # a 202 is already committed: another session sees it
            assert session.get(FeedbackItem, accepted.item.id) is not None
        answers.append(accepted.item.id)

    threads = [threading.Thread(target=post, args=(index,)) for index in range(16)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    writer.close()
    assert len(set(answers)) == 16 and len(stored(db_session_factory)) == 16


def test_a_failed_commit_fails_every_request_of_the_group(
    db_session_factory: sessionmaker[Session],
    settings: Settings,
    validator: FeedbackValidator,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    def refuse(self: Session) -> None:
        raise RuntimeError("disk on fire")

    group = [_Pending(unit(validator, settings, f"k{index}")) for index in range(3)]
    monkeypatch.setattr(Session, "commit", refuse)
    FeedbackWriter(db_session_factory, settings)._write(group)
    monkeypatch.undo()
    for pending in group:
        with pytest.raises(RuntimeError, match="disk on fire"):
            pending.future.result()
    assert stored(db_session_factory) == []


def test_a_connection_lost_mid_group_is_a_503_for_every_request_not_a_unit_error(
    db_session_factory: sessionmaker[Session],
    settings: Settings,
    validator: FeedbackValidator,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # the database restarting under load: the connection goes away while the group's items are
    # being stored; the per-unit retry must not turn the dead transaction into units' own errors
    real_store = StoreUnit.store
    calls = []

    def lose_connection(session: Session, items: list[Any]) -> Any:
        calls.append(len(items))
        if len(calls) == 1:
            session.connection().invalidate()  # what a dropped server connection leaves behind
        return real_store(session, items)

    monkeypatch.setattr(StoreUnit, "store", staticmethod(lose_connection))
    group = [_Pending(unit(validator, settings, f"k{index}")) for index in range(3)]
    writer = FeedbackWriter(db_session_factory, settings)
    writer._write(group)
    for pending in group:
        with pytest.raises(DatabaseUnavailable):
            pending.future.result()
    assert calls == [3], "no unit was retried on a transaction that was gone"
    assert stored(db_session_factory) == []
    monkeypatch.undo()
    assert writer.submit(unit(validator, settings, "after"))[0].created  # the writer carries on
    writer.close()
    assert [key for key, _ in stored(db_session_factory)] == ["after"]


def test_a_request_cancelled_while_waiting_is_not_stored_and_the_writer_keeps_going(
    db_session_factory: sessionmaker[Session], settings: Settings, validator: FeedbackValidator
) -> None:
    cancelled, kept = _Pending(unit(validator, settings, "gone")), _Pending(unit(validator, settings, "kept"))
    assert cancelled.future.cancel()  # e.g. asyncio.wrap_future's waiter cancelled with its request
    writer = FeedbackWriter(db_session_factory, settings)
    writer._write([cancelled, kept])
    assert kept.future.result()[0].created
    assert writer.submit(unit(validator, settings, "after"))[0].created
    writer.close()
    assert [key for key, _ in stored(db_session_factory)] == ["kept", "after"]


def test_after_a_group_of_several_the_writer_waits_a_moment_for_more_and_a_lone_client_is_not_delayed(
    db_session_factory: sessionmaker[Session], settings: Settings, validator: FeedbackValidator
) -> None:
    writer = FeedbackWriter(db_session_factory, settings, linger_s=0.5)
    groups: list[list[str]] = []
    write = writer._write

    def recording_write(group: list[_Pending]) -> None:
        groups.append(
            [entry.unit.prepared[0].idempotency_key or "" for entry in group if entry.unit.prepared]
        )
        write(group)

    writer._write = recording_write  # type: ignore[method-assign]
    first, second = _Pending(unit(validator, settings, "a")), _Pending(unit(validator, settings, "b"))
    writer._queue.put(first)
    writer._queue.put(second)  # both wait before the thread starts: one group of two
    writer._ensure_started()
    first.future.result(timeout=5)
    second.future.result(timeout=5)

    later: list[Any] = []
    thread = threading.Thread(target=lambda: later.append(writer.submit(unit(validator, settings, "c"))))
    thread.start()
    time.sleep(0.1)  # within the 0.5 s the writer waits after a group of several
    writer.submit(unit(validator, settings, "d"))
    thread.join()
    writer.submit(unit(validator, settings, "e"))  # alone, after a group of two: waited for company
    started = time.monotonic()
    writer.submit(unit(validator, settings, "f"))  # alone after a lone one: not delayed
    assert time.monotonic() - started < 0.4
    writer.close()
    assert groups == [["a", "b"], ["c", "d"], ["e"], ["f"]]
    assert [key for key, _ in stored(db_session_factory)] == ["a", "b", "c", "d", "e", "f"]
