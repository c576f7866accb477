"""Distillation scheduler: cron slots under a frozen clock (fire once, catch up once, no overlap, DST)."""

from __future__ import annotations

import itertools
from datetime import UTC, datetime, timedelta
from zoneinfo import ZoneInfo

import pytest

from service.config import Settings
from service.jobs.scheduler import (
    CronSchedule,
    DistillScheduler,
    DueRun,
    ScheduleError,
    parse_cron_overrides,
)


class FrozenClock:
    def __init__(self, start: datetime) -> None:
        self.now = start

    def __call__(self) -> datetime:
        return self.now

    def advance(self, **delta: float) -> datetime:
        self.now += timedelta(**delta)
        return self.now


class FakeQueue:
    """Stands in for JobQueue: one queued/running distill job per namespace (dedupe_key)."""

    def __init__(self) -> None:
        self.jobs: list[DueRun] = []
        self.active: set[str] = set()

    def enqueue(self, namespace: str, scheduled_for: datetime) -> bool:
        if namespace in self.active:
            return False
        self.active.add(namespace)
        self.jobs.append(DueRun(namespace, scheduled_for))
        return True

    def finish(self, namespace: str) -> None:
        self.active.discard(namespace)

    def last_scheduled(self, namespace: str) -> datetime | None:
        slots = [job.scheduled_for for job in self.jobs if job.namespace == namespace]
        return max(slots) if slots else None


def make_scheduler(clock, queue, *, cron="0 3 * * *", tz="UTC", overrides=None, namespaces=("default",)):
    return DistillScheduler(
        default_cron=cron,
        timezone=tz,
        overrides=overrides,
        namespaces=lambda: namespaces,
        enqueue=queue.enqueue,
        last_scheduled=queue.last_scheduled,
        clock=clock,
    )


def utc(*args: int) -> datetime:
    return datetime(*args, tzinfo=UTC)


def test_due_run_fires_once():
    clock, queue = FrozenClock(utc(2026, 11, 23, 12, 0)), FakeQueue()
    scheduler = make_scheduler(clock, queue)
    assert scheduler.tick() == []  # started after today's 03:00: nothing due at start
    clock.now = utc(2026, 11, 24, 2, 59, 59)
    assert scheduler.tick() == []
    clock.now = utc(2026, 11, 24, 3, 0)
    assert scheduler.tick() == [DueRun("default", utc(2026, 11, 24, 3, 0))]
    queue.finish("default")
    for _ in range(5):
        clock.advance(minutes=7)
        assert scheduler.tick() == []
    assert len(queue.jobs) == 1
    clock.now = utc(2026, 11, 25, 3, 0, 30)
    assert scheduler.tick() == [DueRun("default", utc(2026, 11, 25, 3, 0))]


def test_missed_slots_after_downtime_fire_exactly_once():
    clock, queue = FrozenClock(utc(2026, 11, 20, 12, 0)), FakeQueue()
    queue.jobs.append(DueRun("default", utc(2026, 11, 20, 3, 0)))  # last run before the downtime
    clock.now = utc(2026, 11, 23, 17, 0)  # down for three nightly slots; a fresh process starts
    scheduler = make_scheduler(clock, queue)
    assert scheduler.tick() == [DueRun("default", utc(2026, 11, 23, 3, 0))]
    queue.finish("default")
    assert scheduler.tick() == []
    clock.advance(hours=1)
    assert scheduler.tick() == []
    assert [job.scheduled_for for job in queue.jobs] == [utc(2026, 11, 20, 3, 0), utc(2026, 11, 23, 3, 0)]


def test_due_runs_is_pure_and_catches_up_with_the_latest_slot_only():
    clock = FrozenClock(utc(2026, 1, 1))
    scheduler = make_scheduler(clock, FakeQueue(), cron="0 * * * *", namespaces=("a", "b"))
    now = utc(2026, 1, 2, 10, 30)
    runs = scheduler.due_runs(now, {"a": utc(2026, 1, 1, 23, 0), "b": utc(2026, 1, 2, 10, 0)})
    assert runs == [DueRun("a", utc(2026, 1, 2, 10, 0))]
    assert scheduler.due_runs(now, {"a": utc(2026, 1, 1, 23, 0), "b": utc(2026, 1, 2, 10, 0)}) == runs


def test_no_overlap_while_a_run_is_in_flight_then_the_deferred_slot_runs_once():
    clock, queue = FrozenClock(utc(2026, 11, 23, 0, 0)), FakeQueue()
    scheduler = make_scheduler(clock, queue, cron="0 * * * *")
    clock.now = utc(2026, 11, 23, 1, 0)
    assert len(scheduler.tick()) == 1
    # the 01:00 run is still running when 02:00 and 03:00 come due: nothing else is enqueued
    for minute in range(60, 180, 5):
        clock.now = utc(2026, 11, 23, 0, 0) + timedelta(minutes=minute + 61)
        assert scheduler.tick() == []
        assert len(queue.active) == 1
    queue.finish("default")
    assert scheduler.tick() == [DueRun("default", utc(2026, 11, 23, 3, 0))]
    assert scheduler.tick() == []
    assert len(queue.jobs) == 2


def test_ticks_from_two_threads_enqueue_once():
    import threading

    clock, _queue = FrozenClock(utc(2026, 11, 23, 2, 0)), FakeQueue()
    calls: list[str] = []

    def permissive_enqueue(namespace: str, slot: datetime) -> bool:  # a queue without dedupe
        calls.append(namespace)
        return True

    scheduler = DistillScheduler(
        default_cron="0 3 * * *",
        namespaces=lambda: ["default"],
        enqueue=permissive_enqueue,
        last_scheduled=lambda ns: None,
        clock=clock,
    )
    clock.now = utc(2026, 11, 23, 3, 0, 1)
    threads = [threading.Thread(target=scheduler.tick) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert calls == ["default"]


def test_per_namespace_overrides_and_off():
    clock, queue = FrozenClock(utc(2026, 11, 23, 0, 30)), FakeQueue()
    scheduler = make_scheduler(
        clock,
        queue,
        overrides=parse_cron_overrides("fast=*/15 * * * *; quiet=off"),
        namespaces=("default", "fast", "quiet"),
    )
    clock.now = utc(2026, 11, 23, 3, 5)
    assert scheduler.tick() == [
        DueRun("default", utc(2026, 11, 23, 3, 0)),
        DueRun("fast", utc(2026, 11, 23, 3, 0)),
    ]
    queue.finish("fast")
    clock.now = utc(2026, 11, 23, 3, 16)
    assert scheduler.tick() == [DueRun("fast", utc(2026, 11, 23, 3, 15))]
    assert scheduler.next_run("quiet") is None


def test_timezone_is_respected():
    berlin = ZoneInfo("Europe/Berlin")
    clock, queue = FrozenClock(utc(2026, 11, 22, 12, 0)), FakeQueue()
    scheduler = make_scheduler(clock, queue, tz="Europe/Berlin")
    clock.now = utc(2026, 11, 23, 1, 59)  # 02:59 in Berlin (UTC+1 in winter)
    assert scheduler.tick() == []
    clock.now = utc(2026, 11, 23, 2, 0)  # 03:00 in Berlin
    [run] = scheduler.tick()
    assert run.scheduled_for == utc(2026, 11, 23, 2, 0)
    assert run.scheduled_for.astimezone(berlin).hour == 3


def test_dst_spring_forward_gap_fires_once_after_the_gap():
    ny = ZoneInfo("America/New_York")
    schedule = CronSchedule("30 2 * * *", "America/New_York")  # 02:30 does not exist on 2026-03-08
    before = datetime(2026, 3, 8, 1, 59, tzinfo=ny)
    assert schedule.next_slot(before) == datetime(2026, 3, 8, 3, 30, tzinfo=ny).astimezone(UTC)
    last = datetime(2026, 3, 7, 2, 30, tzinfo=ny).astimezone(UTC)
    assert schedule.due_slot(datetime(2026, 3, 8, 3, 10, tzinfo=ny), last) is None
    slot = schedule.due_slot(datetime(2026, 3, 8, 3, 30, tzinfo=ny), last)
    assert slot == datetime(2026, 3, 8, 3, 30, tzinfo=ny).astimezone(UTC)
    assert schedule.due_slot(datetime(2026, 3, 8, 23, 0, tzinfo=ny), slot) is None
    # the day after, back to 02:30 EDT
    assert schedule.next_slot(slot) == datetime(2026, 3, 9, 2, 30, tzinfo=ny).astimezone(UTC)


def test_dst_fall_back_repeated_hour_fires_once():
    ny = ZoneInfo("America/New_York")
    clock, queue = FrozenClock(datetime(2026, 10, 31, 12, 0, tzinfo=ny).astimezone(UTC)), FakeQueue()
    scheduler = make_scheduler(clock, queue, cron="30 1 * * *", tz="America/New_York")
    # 01:30 happens twice on 2026-11-01 (EDT then EST); step through the whole night minute by minute
    start = datetime(2026, 11, 1, 0, 0, tzinfo=ny).astimezone(UTC)
    fired = []
    for minute in range(5 * 60):
        clock.now = start + timedelta(minutes=minute)
        fired += scheduler.tick()
        queue.finish("default")
    assert fired == [DueRun("default", datetime(2026, 11, 1, 1, 30, tzinfo=ny, fold=0).astimezone(UTC))]


def test_hourly_schedule_over_a_dst_gap_never_repeats_an_instant():
    schedule = CronSchedule("30 * * * *", "America/New_York")
    now = datetime(2026, 3, 8, 5, 0, tzinfo=UTC)  # 00:00 EST
    slots = []
    for _ in range(6):
        now = schedule.next_slot(now)
        slots.append(now)
    assert slots == sorted(set(slots))
    assert all(b - a == timedelta(hours=1) for a, b in itertools.pairwise(slots))


def test_invalid_settings_name_the_field():
    with pytest.raises(ScheduleError) as info:
        CronSchedule("61 3 * * *")
    assert info.value.field == "distill_cron"
    with pytest.raises(ScheduleError) as info:
        CronSchedule("0 3 * * *", "Mars/Olympus")
    assert info.value.field == "distill_timezone"
    with pytest.raises(ScheduleError) as info:
        parse_cron_overrides("a=0 3 * * *;broken")
    assert info.value.field == "distill_cron_overrides"
    with pytest.raises(ScheduleError) as info:
        make_scheduler(FrozenClock(utc(2026, 1, 1)), FakeQueue(), overrides={"x": "nope"})
    assert (info.value.field, info.value.namespace) == ("distill_cron_overrides", "x")
    with pytest.raises(ValueError):
        CronSchedule("0 3 * * *").latest_slot(datetime(2026, 1, 1))  # naive


def test_from_settings_uses_cron_timezone_and_overrides():
    settings = Settings(
        auth_disabled=True,
        distill_cron="0 4 * * *",
        distill_timezone="Asia/Tokyo",
        distill_cron_overrides="hot=0 * * * *",
    )
    clock = FrozenClock(utc(2026, 11, 23, 0, 0))
    scheduler = DistillScheduler.from_settings(
        settings, namespaces=list, enqueue=lambda ns, slot: True, last_scheduled=lambda ns: None, clock=clock
    )
    assert scheduler.next_run("default") == utc(2026, 11, 23, 19, 0)  # 04:00 JST
    assert scheduler.next_run("hot") == utc(2026, 11, 23, 1, 0)
    assert scheduler.seconds_until_next(["default", "hot"]) == 3600.0
    disabled = DistillScheduler.from_settings(
        Settings(auth_disabled=True, distill_enabled=False),
        namespaces=lambda: ["default"],
        enqueue=lambda ns, slot: pytest.fail("disabled scheduler enqueued"),
        last_scheduled=lambda ns: None,
        clock=FrozenClock(utc(2026, 1, 1)),
    )
    assert disabled.tick(utc(2026, 1, 5)) == []
