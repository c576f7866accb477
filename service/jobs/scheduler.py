"""When memory distillation runs: cron slots per namespace, evaluated against an injectable clock.

Owns the cron arithmetic (timezone and DST aware) and the decision "which namespace is due now".
It knows nothing of the database or the queue: `DistillScheduler` is handed an `enqueue` callable
(the queue's dedupe_key `distill:<ns>` keeps one queued/running run per namespace) and a
`last_scheduled` callable returning the slot of the namespace's latest distillation job.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from croniter import CroniterError, croniter

from service.config import Settings

log = logging.getLogger(__name__)

DISABLED = "off"  # an override `ns=off` turns the schedule of that namespace off

# A cron expression matches at most once per second; stepping back from `now` by less than that
# makes a slot that falls exactly on `now` count as due.
_JUST_AFTER = timedelta(microseconds=1)
# How far back the search for the latest slot goes before giving up (a yearly expression such as
# `0 3 29 2 *` needs up to eight years).
_MAX_LOOKBACK = timedelta(days=366 * 8 + 2)


class ScheduleError(ValueError):
    """A schedule setting is invalid; `field` names the setting, `namespace` the namespace (if any)."""

    def __init__(self, message: str, *, field: str, namespace: str | None = None) -> None:
        super().__init__(message)
        self.field = field
        self.namespace = namespace


@dataclass(frozen=True)
class CronSchedule:
    """One cron expression read as wall-clock times in one timezone.

    DST rule: slots are wall-clock times. A wall time that does not exist (spring forward) fires at
    the instant it maps to with the pre-transition offset (02:30 in a 02:00->03:00 gap fires at
    03:30 local); a wall time that occurs twice (fall back) fires once, at its first occurrence.
    """

    expression: str
    timezone: str = "UTC"

    def __post_init__(self) -> None:
        if not croniter.is_valid(self.expression):
            raise ScheduleError(f"invalid cron expression {self.expression!r}", field="distill_cron")
        try:
            ZoneInfo(self.timezone)
        except (ZoneInfoNotFoundError, ValueError) as exc:
            raise ScheduleError(f"unknown timezone {self.timezone!r}", field="distill_timezone") from exc

    @property
    def zone(self) -> ZoneInfo:
        return ZoneInfo(self.timezone)

    def _to_instant(self, wall: datetime) -> datetime:
        # fold=0: first occurrence of a repeated wall time, pre-transition offset inside a gap
        return wall.replace(tzinfo=self.zone, fold=0).astimezone(UTC)

    def latest_slot(self, now: datetime) -> datetime | None:
        """The latest slot at or before `now` (a UTC instant), or None when none in the lookback."""
        now = _require_aware(now, "now")
        wall_now = now.astimezone(self.zone).replace(tzinfo=None)
        slots = croniter(self.expression, wall_now + _JUST_AFTER)
        while True:
            try:
                wall = slots.get_prev(datetime)
            except CroniterError:
                return None
            if wall_now - wall > _MAX_LOOKBACK:
                return None
            instant = self._to_instant(wall)
            # a gap slot can map to an instant after `now` (02:30 -> 03:30 local): look further back
            if instant <= now:
                return instant

    def next_slot(self, now: datetime) -> datetime:
        """The first slot strictly after `now`, as a UTC instant."""
        now = _require_aware(now, "now")
        wall_now = now.astimezone(self.zone).replace(tzinfo=None)
        slots = croniter(self.expression, wall_now)
        while True:
            instant = self._to_instant(slots.get_next(datetime))
            if instant > now:
                return instant

    def due_slot(self, now: datetime, last_run_at: datetime | None) -> datetime | None:
        """The slot to run now, or None.

        A slot is due when it is at or before `now` and after `last_run_at` (the slot of the latest
        run already scheduled). However many slots were missed, only the latest one is returned:
        after downtime the namespace catches up with exactly one run.
        """
        slot = self.latest_slot(now)
        if slot is None:
            return None
        if last_run_at is not None and slot <= _require_aware(last_run_at, "last_run_at"):
            return None
        return slot


@dataclass(frozen=True)
class DueRun:
    namespace: str
    scheduled_for: datetime  # the cron slot (UTC) this run stands for


def parse_cron_overrides(text: str) -> dict[str, str]:
    """Parse `ns=expr;ns2=expr` (Settings.distill_cron_overrides) into {namespace: expression}."""
    overrides: dict[str, str] = {}
    for entry in text.split(";"):
        if not entry.strip():
            continue
        namespace, sep, expression = entry.partition("=")
        namespace, expression = namespace.strip(), " ".join(expression.split())
        if not sep or not namespace or not expression:
            raise ScheduleError(
                f"cron override {entry.strip()!r} is not `namespace=cron expression`",
                field="distill_cron_overrides",
            )
        if namespace in overrides:
            raise ScheduleError(
                f"namespace {namespace!r} has two cron overrides",
                field="distill_cron_overrides",
                namespace=namespace,
            )
        overrides[namespace] = expression
    return overrides


def utc_now() -> datetime:
    return datetime.now(UTC)


class DistillScheduler:
    """Enqueues one distillation job per namespace when its cron slot comes due.

    `tick(now)` is what the service's background loop calls (and `loraloop distill` without
    `--now` may call once). `enqueue(namespace, scheduled_for)` returns something truthy when a job
    was enqueued and falsy when the queue deduplicated it (a run of that namespace is already
    queued or running); a deduplicated slot is retried on later ticks, so it runs once the
    running job ends. `last_scheduled(namespace)` returns the slot of the namespace's latest
    distillation job in the store (any status), or None; a namespace with no job yet counts from
    the scheduler's start, so a fresh install does not distil the moment it starts.

    With `memory_store.queue.JobQueue` (which returns the active job on a dedupe hit) the glue is:
    `job = queue.enqueue(kind="distill", namespace=ns, payload={"scheduled_for": slot.isoformat()},
    dedupe_key=f"distill:{ns}")`, enqueued iff `job.payload["scheduled_for"] == slot.isoformat()`.
    """

    def __init__(
        self,
        *,
        default_cron: str,
        timezone: str = "UTC",
        overrides: Mapping[str, str] | None = None,
        namespaces: Callable[[], Iterable[str]],
        enqueue: Callable[[str, datetime], object],
        last_scheduled: Callable[[str], datetime | None],
        clock: Callable[[], datetime] = utc_now,
        enabled: bool = True,
    ) -> None:
        self._default = CronSchedule(default_cron, timezone)
        self._overrides: dict[str, CronSchedule | None] = {}
        for namespace, expression in (overrides or {}).items():
            if expression.strip().lower() == DISABLED:
                self._overrides[namespace] = None
                continue
            try:
                self._overrides[namespace] = CronSchedule(expression, timezone)
            except ScheduleError as exc:
                raise ScheduleError(
                    f"namespace {namespace!r}: {exc}", field="distill_cron_overrides", namespace=namespace
                ) from exc
        self._namespaces = namespaces
        self._enqueue = enqueue
        self._last_scheduled = last_scheduled
        self._clock = clock
        self.enabled = enabled
        self.started_at = _require_aware(clock(), "clock()")
        self._enqueued: dict[str, datetime] = {}  # slots enqueued by this process, newest per namespace
        self._lock = threading.Lock()

    @classmethod
    def from_settings(
        cls,
        settings: Settings,
        *,
        namespaces: Callable[[], Iterable[str]],
        enqueue: Callable[[str, datetime], object],
        last_scheduled: Callable[[str], datetime | None],
        clock: Callable[[], datetime] = utc_now,
    ) -> DistillScheduler:
        return cls(
            default_cron=settings.distill_cron,
            timezone=settings.distill_timezone,
            overrides=parse_cron_overrides(settings.distill_cron_overrides),
            namespaces=namespaces,
            enqueue=enqueue,
            last_scheduled=last_scheduled,
            clock=clock,
            enabled=settings.distill_enabled,
        )

    def schedule_for(self, namespace: str) -> CronSchedule | None:
        """The namespace's schedule; None when its override is `off`."""
        return self._overrides.get(namespace, self._default)

    def next_run(self, namespace: str, now: datetime | None = None) -> datetime | None:
        schedule = self.schedule_for(namespace)
        if schedule is None or not self.enabled:
            return None
        return schedule.next_slot(now if now is not None else self._clock())

    def due_runs(self, now: datetime, last_run_at: Mapping[str, datetime | None]) -> list[DueRun]:
        """Pure: the runs due at `now` given each namespace's latest scheduled slot.

        At most one run per namespace; a namespace missing from `last_run_at` or mapped to None
        counts from the scheduler's start time.
        """
        now = _require_aware(now, "now")
        if not self.enabled:
            return []
        runs = []
        for namespace in sorted(last_run_at):
            schedule = self.schedule_for(namespace)
            if schedule is None:
                continue
            last = last_run_at[namespace]
            slot = schedule.due_slot(now, last if last is not None else self.started_at)
            if slot is not None:
                runs.append(DueRun(namespace, slot))
        return runs

    def tick(self, now: datetime | None = None) -> list[DueRun]:
        """Enqueue every due run; returns the runs that were enqueued (deduplicated ones excluded)."""
        now = _require_aware(now if now is not None else self._clock(), "now")
        if not self.enabled:
            return []
        with self._lock:
            last_run_at: dict[str, datetime | None] = {}
            for namespace in set(self._namespaces()):
                stored = self._last_scheduled(namespace)
                local = self._enqueued.get(namespace)
                candidates = [t for t in (stored, local) if t is not None]
                last_run_at[namespace] = max(candidates) if candidates else None
            enqueued = []
            for run in self.due_runs(now, last_run_at):
                if self._enqueue(run.namespace, run.scheduled_for):
                    self._enqueued[run.namespace] = run.scheduled_for
                    enqueued.append(run)
                    log.info("distillation of %r enqueued for slot %s", run.namespace, run.scheduled_for)
                else:
                    log.info(
                        "distillation of %r for slot %s deferred: a run is queued or running",
                        run.namespace,
                        run.scheduled_for,
                    )
            return enqueued

    def seconds_until_next(self, namespaces: Iterable[str], now: datetime | None = None) -> float | None:
        """Seconds from `now` to the earliest next slot of `namespaces` (for the loop's sleep)."""
        now = now if now is not None else self._clock()
        slots = [slot for ns in namespaces if (slot := self.next_run(ns, now)) is not None]
        return (min(slots) - now).total_seconds() if slots else None


def _require_aware(moment: datetime, name: str) -> datetime:
    if moment.tzinfo is None or moment.utcoffset() is None:
        raise ValueError(f"{name} must be timezone-aware, got naive {moment.isoformat()}")
    return moment
