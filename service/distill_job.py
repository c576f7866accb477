"""The `distill` job: bake a namespace's active memories into a new adapter version.

Reads the active memories (the teacher's prefix, by priority) and stored conversations, asks the
teacher for responses (vLLM, serving the current version, when it is configured and up; else the
distiller generates locally), runs training.distill, gates the result (gap closure and drift),
publishes and promotes it through the registry and marks the memories `baked`. Also provides the
scheduler's glue: enqueue one `distill:<ns>` job per slot, the latest slot, the namespaces to watch.
Knows the database and the training code; nothing about HTTP.
"""

from __future__ import annotations

import logging
import math
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from datetime import datetime
from pathlib import Path
from typing import Any

import httpx
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from deploy.vllm_client import VllmClient
from memory_store.models import Job, Memory
from memory_store.queue import JobQueue
from memory_store.repositories import (
    FeedbackRepository,
    MemoryRepository,
    TrainingRunRepository,
)
from service.config import Settings
from service.feedback_intake import render_config
from service.registry import (
    AdapterRegistry,
    CurrentAdapter,
    PromotionFailed,
    StaleParent,
    served_name,
    train_config,
    vllm_base_urls,
)
from service.train_job import (
    drift_probes,
    feedback_item_dict,
    recent_conversations,
    render_feedback,
    scratch_dir,
    worker_tokenizer,
)
from service.worker import JobCancelled, JobContext, JobFailed, JobOutcome
from training.distill import (
    DEFAULT_PROBE_TEMPLATES,
    DistillAlignmentError,
    DistillConfig,
    DistillPlan,
    MemoryDistiller,
    MemoryNote,
    NothingToDistill,
    plan_distillation,
    teacher_messages,
)
from training.evaluate import GateDecision
from training.trainer import TrainingCancelled, TrainingDiverged

__all__ = [
    "DISTILL_JOB_KIND",
    "DistillJobHandler",
    "distill_config",
    "distill_dedupe_key",
    "distill_gate",
    "distill_namespaces",
    "enqueue_distill",
    "last_scheduled_slot",
    "scheduler_callables",
    "vllm_teacher_responses",
]

log = logging.getLogger(__name__)

DISTILL_JOB_KIND = "distill"
MAX_CONVERSATIONS = 64  # the most recent stored conversations distilled on
MAX_MIX_FEEDBACK = 64  # the most recent trained feedback items mixed in (distill_feedback_mix > 0)


def distill_dedupe_key(namespace: str) -> str:
    return f"{DISTILL_JOB_KIND}:{namespace}"


def distill_config(settings: Settings) -> DistillConfig:
    """Settings' `distill_*` knobs as training.distill's config. The probe template of the settings
    comes first, followed by the built-in phrasings (several questions per memory)."""
    templates = (settings.distill_probe_template,) + tuple(
        t for t in DEFAULT_PROBE_TEMPLATES if t != settings.distill_probe_template
    )
    return DistillConfig(
        epochs=settings.distill_epochs,
        learning_rate=settings.distill_learning_rate,
        topk=settings.distill_topk,
        student_retained_turns=settings.student_retained_turns,
        feedback_mix=settings.distill_feedback_mix,
        seed=settings.train_seed,
        time_budget_s=settings.train_time_budget_s,
        device=settings.device,
        probe_templates=templates,
        max_new_tokens=settings.distill_max_new_tokens,
        no_repeat_ngram_size=settings.distill_no_repeat_ngram_size,
        lora_rank=settings.lora_rank,
        lora_alpha=settings.lora_alpha,
        lora_dropout=settings.lora_dropout,
        lora_target_modules=tuple(settings.lora_target_modules),
        render=render_config(settings),
    )


def distill_gate(metrics: Mapping[str, float], settings: Settings) -> GateDecision:
    """Pass iff gap closure on held-out probes >= gate_min_gap_closure and drift <= gate_max_drift_kl."""
    gap = float(metrics.get("gap_closure", math.nan))
    drift = float(metrics.get("drift_kl", math.nan))
    if not (math.isfinite(gap) and math.isfinite(drift)):
        return GateDecision(False, f"non-finite metrics: gap_closure {gap}, drift_kl {drift}")
    gap_text = f"gap_closure {gap:.1%} (required {settings.gate_min_gap_closure:.1%})"
    drift_text = f"drift_kl {drift:.4f} (max {settings.gate_max_drift_kl:g})"
    failures = []
    if gap < settings.gate_min_gap_closure:
        failures.append(f"memories not baked in enough: {gap_text}")
    if drift > settings.gate_max_drift_kl:
        failures.append(f"drift too large: {drift_text}")
    if failures:
        return GateDecision(False, "; ".join(failures))
    return GateDecision(True, f"passed: {gap_text}; {drift_text}")


def vllm_teacher_responses(
    base_url: str,
    model: str,
    conversations: Sequence[Sequence[Mapping[str, Any]]],
    *,
    max_tokens: int,
    timeout_s: float,
) -> list[str]:
    """Greedy chat completions of `model` (a served adapter name) on one vLLM replica."""
    responses = []
    with httpx.Client(base_url=base_url, timeout=timeout_s) as http:
        for messages in conversations:
            reply = http.post(
                "/v1/chat/completions",
                json={"model": model, "messages": list(messages), "max_tokens": max_tokens, "temperature": 0.0},
            )
            reply.raise_for_status()
            content = reply.json()["choices"][0]["message"].get("content") or ""
            responses.append(content.strip())
    return responses


class DistillJobHandler:
    """Handler of `distill` jobs (payload `{"namespace": ..., "scheduled_for"?: ISO time}`)."""

    def __init__(self, settings: Settings, session_factory: sessionmaker[Session], registry: AdapterRegistry) -> None:
        self.settings = settings
        self.session_factory = session_factory
        self.registry = registry
        self.config = distill_config(settings)

    def __call__(self, context: JobContext) -> JobOutcome:
        namespace = context.payload.get("namespace") or context.namespace
        if not namespace:
            raise JobFailed("distill job without a namespace", retryable=False)
        started = time.perf_counter()
        context.report_progress({"phase": "prepare"})
        try:
            parent = self.registry.ensure_base_version(namespace)
        except PromotionFailed as error:
            raise JobFailed(f"no servable base version: {error}") from error
        tokenizer = worker_tokenizer(self.settings.tokenizer_path)
        with self.session_factory() as session:
            memories = MemoryRepository(session).list(
                namespace=namespace, state="active", limit=self.settings.distill_max_memories
            )
            memory_ids = [m.id for m in memories]
            notes = [MemoryNote(content=m.content, topic=m.title, priority=m.priority) for m in memories]
            conversations = recent_conversations(session, namespace, MAX_CONVERSATIONS)
            mix_items = self._mix_feedback_items(session, namespace)
        probes, _source = drift_probes(tokenizer, conversations, self.config.render)
        feedback_examples = render_feedback(tokenizer, mix_items, self.config.render).examples
        try:
            plan = plan_distillation(notes, conversations, self.config)
        except NothingToDistill as error:
            return JobOutcome({"namespace": namespace, "outcome": "nothing_to_distill", "version": None,
                               "reason": str(error)})  # fmt: skip
        plan, teacher_source = self._teacher_responses(namespace, parent, plan)

        with self.session_factory.begin() as session:
            run_id = TrainingRunRepository(session).start(
                namespace=namespace, kind="distill", job_id=context.job_id, parent_version=parent.version
            ).id
        with tempfile.TemporaryDirectory(prefix=f"distill-{namespace}-job{context.job_id}-",
                                         dir=scratch_dir(self.settings)) as scratch:  # fmt: skip
            out_dir = Path(scratch) / "adapter"
            try:
                result = MemoryDistiller(self.config, lora=train_config(self.settings)).run(
                    base_model=self.settings.base_model, tokenizer=tokenizer, plan=plan,
                    parent_adapter=parent.path, out_dir=out_dir, feedback_examples=feedback_examples,
                    drift_probes=probes, should_stop=context.should_stop,
                    on_progress=lambda p: context.report_progress({"phase": "distill", **p}),
                )  # fmt: skip
            except NothingToDistill as error:
                self._finish_run(run_id, "cancelled", error=str(error))
                return JobOutcome({"namespace": namespace, "outcome": "nothing_to_distill", "version": None,
                                   "reason": str(error)})  # fmt: skip
            except (TrainingDiverged, DistillAlignmentError) as error:
                self._finish_run(run_id, "failed", error=f"{type(error).__name__}: {error}")
                raise JobFailed(f"{type(error).__name__}: {error}", retryable=False) from error
            except TrainingCancelled as error:
                self._finish_run(run_id, "cancelled", error=str(error))
                raise JobCancelled(str(error)) from error
            except Exception as error:
                self._finish_run(run_id, "failed", error=f"{type(error).__name__}: {error}")
                raise
            metrics = {key: float(value) for key, value in result.metrics.items()}
            metrics["memories"] = float(len(memory_ids))
            metrics["teacher_from_vllm"] = 1.0 if teacher_source == "vllm" else 0.0
            decision = distill_gate(metrics, self.settings)
            context.report_progress({"phase": "publish", "gate": decision.reason})
            version = self.registry.publish_candidate(
                namespace, out_dir, parent_version=parent.version, training_run_id=run_id, metrics=metrics,
                status="candidate" if decision.passed else "rejected",
                reason=None if decision.passed else decision.reason,
                extra_metadata={"kind": "distill", "job_id": context.job_id, "memory_ids": memory_ids},
            )  # fmt: skip
        outcome = {"namespace": namespace, "version": version, "parent_version": parent.version,
                   "training_run_id": run_id, "gate": decision.reason, "memories": len(memory_ids),
                   "gap_closure": metrics.get("gap_closure"), "drift_kl": metrics.get("drift_kl"),
                   "teacher": teacher_source}  # fmt: skip
        if not decision.passed:
            self._finish_run(run_id, "rejected", version=version, error=decision.reason, metrics=metrics)
            return JobOutcome({**outcome, "outcome": "rejected", "seconds": time.perf_counter() - started})
        context.report_progress({"phase": "promote", "version": version})
        try:
            self.registry.promote(namespace, version, expected_parent=parent.version)
        except StaleParent as error:
            self._finish_run(run_id, "rejected", version=version, error=str(error), metrics=metrics)
            raise JobFailed(str(error)) from error  # retried from the new current version
        except PromotionFailed as error:
            self._finish_run(run_id, "failed", version=version, error=str(error), metrics=metrics)
            raise JobFailed(str(error)) from error
        with self.session_factory.begin() as session:
            baked = MemoryRepository(session).mark_baked(ids=memory_ids, version=version)
        self._finish_run(run_id, "succeeded", version=version, metrics=metrics)
        log.info("distill %s: v%d is current, %d memories baked (%s)", namespace, version, baked, decision.reason)
        return JobOutcome({**outcome, "outcome": "promoted", "baked": baked, "seconds": time.perf_counter() - started})

    def _mix_feedback_items(self, session: Session, namespace: str) -> list[tuple[int, dict[str, Any]]]:
        """The most recent trained feedback, mixed into the loss so baking keeps recent corrections."""
        if self.config.feedback_mix <= 0:
            return []
        feedback = FeedbackRepository(session)
        items = feedback.recent(namespace=namespace, status="trained", limit=MAX_MIX_FEEDBACK)
        return [(item.id, feedback_item_dict(item)) for item in items]

    def _teacher_responses(self, namespace: str, parent: CurrentAdapter, plan: DistillPlan) -> tuple[DistillPlan, str]:
        """Fill the plan's missing responses through vLLM when a replica is up; otherwise leave them
        to the distiller's local generation. Returns (plan, "vllm" | "local")."""
        missing = plan.prompts_without_response()
        if not missing:
            return plan, "stored"
        for url in vllm_base_urls(self.settings):
            with VllmClient(url, timeout=self.settings.vllm_timeout_s, retries=0) as client:
                if not client.health():
                    continue
            try:
                responses = vllm_teacher_responses(
                    url, served_name(namespace, parent.version),
                    [teacher_messages(plan.prefix_messages, prompt) for prompt in missing],
                    max_tokens=self.config.max_new_tokens, timeout_s=self.settings.vllm_timeout_s,
                )  # fmt: skip
            except (httpx.HTTPError, KeyError, IndexError, ValueError) as error:
                log.warning("teacher responses from %s failed (%s); generating locally", url, error)
                continue
            return plan.with_responses(responses), "vllm"
        return plan, "local"

    def _finish_run(self, run_id: int, status: str, *, version: int | None = None, error: str | None = None,
                    metrics: Mapping[str, Any] | None = None) -> None:  # fmt: skip
        with self.session_factory.begin() as session:
            TrainingRunRepository(session).finish(
                id=run_id, status=status, version=version, error=error, metrics=dict(metrics) if metrics else None
            )


# --- scheduling glue -----------------------------------------------------------------------------


def enqueue_distill(
    session: Session, settings: Settings, namespace: str, *, scheduled_for: datetime | None = None, trigger: str
) -> Job:
    """Queue a distillation of `namespace` (or return the one already queued or running)."""
    payload: dict[str, Any] = {"namespace": namespace, "trigger": trigger}
    if scheduled_for is not None:
        payload["scheduled_for"] = scheduled_for.isoformat()
    return JobQueue(session, default_max_attempts=settings.job_max_attempts).enqueue(
        kind=DISTILL_JOB_KIND, namespace=namespace, payload=payload, dedupe_key=distill_dedupe_key(namespace)
    )


def last_scheduled_slot(session: Session, namespace: str) -> datetime | None:
    """The slot of the namespace's latest distillation job (its creation time when it had no slot)."""
    job = session.scalars(
        select(Job).where(Job.kind == DISTILL_JOB_KIND, Job.namespace == namespace).order_by(Job.id.desc()).limit(1)
    ).first()
    if job is None:
        return None
    slot = (job.payload or {}).get("scheduled_for")
    return datetime.fromisoformat(slot) if isinstance(slot, str) else job.created_at


def distill_namespaces(session: Session) -> list[str]:
    """Namespaces with at least one active memory (the only ones a distillation can change)."""
    return list(
        session.scalars(select(Memory.namespace).where(Memory.state == "active").distinct().order_by(Memory.namespace))
    )


def scheduler_callables(
    settings: Settings, session_factory: sessionmaker[Session]
) -> dict[str, Callable[..., Any]]:
    """`namespaces`, `enqueue` and `last_scheduled` for `DistillScheduler.from_settings(settings, **...)`.
    `enqueue` is truthy only when a new job was queued for that slot (falsy on a dedupe hit)."""

    def namespaces() -> list[str]:
        with session_factory() as session:
            return distill_namespaces(session)

    def enqueue(namespace: str, slot: datetime) -> bool:
        with session_factory.begin() as session:
            job = enqueue_distill(session, settings, namespace, scheduled_for=slot, trigger="schedule")
            return (job.payload or {}).get("scheduled_for") == slot.isoformat()

    def last_scheduled(namespace: str) -> datetime | None:
        with session_factory() as session:
            return last_scheduled_slot(session, namespace)

    return {"namespaces": namespaces, "enqueue": enqueue, "last_scheduled": last_scheduled}
