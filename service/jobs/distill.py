"""The `distill` job: bake a namespace's active memories into a new adapter version.

Reads the active memories (the teacher's prefix, by priority) and stored conversations, asks the
teacher for responses (vLLM, serving the current version, when it is configured and up; else the
distiller generates locally), runs training.distill, gates the result (gap closure and drift),
publishes and promotes it through the registry and marks the memories `baked`. Also provides the
scheduler's glue: enqueue one `distill:<ns>` job per slot, the latest slot, the namespaces to watch.
With `distill_method = bake` (the default) the student is trained by the online recipe on the
teacher's answers to questions about each memory (training.bake), memories baked earlier and trained
feedback replayed, and gated on held-out answer agreement, gap closure, drift and general answers.
Knows the database and the training code; nothing about HTTP.
"""

from __future__ import annotations

import logging
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

from sqlalchemy.orm import Session, sessionmaker

from deploy.vllm_client import VllmClient, VllmError
from memory_store.models import Job
from memory_store.queue import JobQueue
from memory_store.repositories import (
    FeedbackRepository,
    MemoryRepository,
    TrainingRunRepository,
)
from service.adapters.registry import (
    AdapterRegistry,
    CurrentAdapter,
    PromotionFailed,
    StaleParent,
    served_name,
    vllm_base_urls,
)
from service.component_configs import bake_config, distill_config, gate_config, train_config
from service.config import Settings
from service.jobs.train import (
    TrainJobHandler,
    feedback_item_dict,
    finish_run,
    recent_conversations,
    record_run_losses,
    scratch_dir,
    training_run_outcome,
    worker_tokenizer,
)
from service.jobs.worker import JobContext, JobFailed, JobOutcome
from training.bake import MemoryBaker
from training.distill import DistillPlan, MemoryDistiller, plan_distillation
from training.distill_data import MemoryNote, teacher_messages
from training.distill_teacher import DistillAlignmentError, NothingToDistill
from training.evaluate import GateDecision, evaluate_gate
from training.feedback_examples import drift_probes, render_feedback
from training.probes import anchor_examples, general_probes, prompt_anchor_pairs

__all__ = [
    "DISTILL_JOB_KIND",
    "DistillJobHandler",
    "distill_dedupe_key",
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


def vllm_teacher_responses(
    settings: Settings,
    model: str,
    conversations: Sequence[Sequence[Mapping[str, Any]]],
    *,
    max_tokens: int,
) -> list[str] | None:
    """Greedy answers of `model` (the parent's served name) to each conversation, from the first
    healthy vLLM replica that answers them all; None when none does (the caller generates locally)."""
    for url in vllm_base_urls(settings):
        with VllmClient(url, timeout=settings.vllm_timeout_s, retries=0) as client:
            if not client.health():
                continue
            try:
                return [
                    client.chat(model, messages, max_tokens=max_tokens).strip() for messages in conversations
                ]
            except VllmError as error:
                log.warning("teacher answers from %s failed (%s); trying the next replica", url, error)
    return None


@dataclass(frozen=True)
class Distilled:
    """A distilled candidate version, as either recipe (KL or bake) leaves it for `_promote`."""

    namespace: str
    parent: CurrentAdapter
    run_id: int
    version: int
    decision: GateDecision
    metrics: dict[str, float]
    memory_ids: list[int]
    teacher_source: str
    started: float


class DistillJobHandler:
    """Handler of `distill` jobs (payload `{"namespace": ..., "scheduled_for"?: ISO time}`)."""

    def __init__(
        self,
        settings: Settings,
        session_factory: sessionmaker[Session],
        registry: AdapterRegistry,
        *,
        online: TrainJobHandler | None = None,
    ) -> None:
        self.settings = settings
        self.session_factory = session_factory
        self.registry = registry
        self.config = distill_config(settings)
        # the online handler's resident base model and cached anchor answers (bake)
        self.online = online if online is not None else TrainJobHandler(settings, session_factory, registry)

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
            if self.settings.distill_method == "bake":
                baked = MemoryRepository(session).list(namespace=namespace, state="baked", limit=None)
                replay_notes = (
                    [
                        MemoryNote(content=m.content, topic=m.title, priority=m.priority)
                        for m in baked[-self.settings.distill_replay_memories :]
                    ]
                    if self.settings.distill_replay_memories
                    else []
                )
                trained = (
                    FeedbackRepository(session).recent(
                        namespace=namespace, status="trained", limit=self.settings.distill_replay_items
                    )
                    if self.settings.distill_replay_items
                    else []
                )
                replay_items = [(item.id, feedback_item_dict(item)) for item in trained]
        if self.settings.distill_method == "bake":
            return self._bake(
                context,
                namespace,
                parent,
                tokenizer,
                notes,
                memory_ids,
                replay_notes,
                replay_items,
                conversations,
                started,
            )
        probes, _source = drift_probes(tokenizer, conversations, self.config.render)
        feedback_examples = render_feedback(tokenizer, mix_items, self.config.render).examples
        try:
            plan = plan_distillation(notes, conversations, self.config)
        except NothingToDistill as error:
            return JobOutcome(
                {
                    "namespace": namespace,
                    "outcome": "nothing_to_distill",
                    "version": None,
                    "reason": str(error),
                }
            )
        plan, teacher_source = self._teacher_responses(namespace, parent, plan)

        with self.session_factory.begin() as session:
            run_id = (
                TrainingRunRepository(session)
                .start(
                    namespace=namespace, kind="distill", job_id=context.job_id, parent_version=parent.version
                )
                .id
            )
        with tempfile.TemporaryDirectory(
            prefix=f"distill-{namespace}-job{context.job_id}-", dir=scratch_dir(self.settings)
        ) as scratch:
            out_dir = Path(scratch) / "adapter"
            try:
                with self._training_outcome(run_id):
                    result = MemoryDistiller(self.config, lora=train_config(self.settings)).run(
                        base_model=self.settings.base_model,
                        tokenizer=tokenizer,
                        plan=plan,
                        parent_adapter=parent.path,
                        out_dir=out_dir,
                        feedback_examples=feedback_examples,
                        drift_probes=probes,
                        should_stop=context.should_stop,
                        on_progress=lambda p: context.report_progress({"phase": "distill", **p}),
                    )
            except NothingToDistill as error:
                return self._nothing_distilled(namespace, run_id, error)
            record_run_losses(self.session_factory, run_id, result.loss_history)
            metrics = {key: float(value) for key, value in result.metrics.items()}
            metrics["memories"] = float(len(memory_ids))
            metrics["teacher_from_vllm"] = 1.0 if teacher_source == "vllm" else 0.0
            decision = evaluate_gate(metrics, gate_config(self.settings))
            context.report_progress({"phase": "publish", "gate": decision.reason})
            version = self.registry.publish_candidate(
                namespace,
                out_dir,
                parent_version=parent.version,
                training_run_id=run_id,
                metrics=metrics,
                status="candidate" if decision.passed else "rejected",
                reason=None if decision.passed else decision.reason,
                extra_metadata={"kind": "distill", "job_id": context.job_id, "memory_ids": memory_ids},
            )
        return self._promote(
            context,
            Distilled(
                namespace=namespace,
                parent=parent,
                run_id=run_id,
                version=version,
                decision=decision,
                metrics=metrics,
                memory_ids=memory_ids,
                teacher_source=teacher_source,
                started=started,
            ),
        )

    def _bake(
        self,
        context: JobContext,
        namespace: str,
        parent: CurrentAdapter,
        tokenizer: Any,
        notes: list[MemoryNote],
        memory_ids: list[int],
        replay_notes: list[MemoryNote],
        replay_items: list[tuple[int, dict[str, Any]]],
        conversations: list[Any],
        started: float,
    ) -> JobOutcome:
        """The bake path: training.bake on the resident base, published with its behaviour report."""
        if not any(note.content.strip() for note in notes):
            return JobOutcome(
                {
                    "namespace": namespace,
                    "outcome": "nothing_to_distill",
                    "version": None,
                    "reason": "no active memory with content: nothing to bake",
                }
            )
        render = self.config.render
        probes, _source = drift_probes(tokenizer, conversations, render)
        replay = render_feedback(tokenizer, replay_items, render).examples
        with self.session_factory.begin() as session:
            run_id = (
                TrainingRunRepository(session)
                .start(
                    namespace=namespace, kind="distill", job_id=context.job_id, parent_version=parent.version
                )
                .id
            )
        teacher_source = {"value": "local"}

        def teacher_answers(conversations: list[list[dict[str, Any]]]) -> list[str] | None:
            answers = vllm_teacher_responses(
                self.settings,
                served_name(namespace, parent.version),
                conversations,
                max_tokens=self.settings.distill_answer_tokens,
            )
            if answers is not None:
                teacher_source["value"] = "vllm"
            return answers

        with tempfile.TemporaryDirectory(
            prefix=f"bake-{namespace}-job{context.job_id}-", dir=scratch_dir(self.settings)
        ) as scratch:
            out_dir = Path(scratch) / "adapter"
            try:
                with self._training_outcome(run_id), self.online.resident.lend() as holder:
                    anchors = anchor_examples(
                        tokenizer,
                        prompt_anchor_pairs(self.online._base_anchor_answers(holder.model, tokenizer)),
                        render,
                    )
                    result = MemoryBaker(bake_config(self.settings), train_config(self.settings)).run(
                        base=holder.model,
                        base_model=self.settings.base_model,
                        tokenizer=tokenizer,
                        memories=notes,
                        parent_adapter=parent.path,
                        out_dir=out_dir,
                        anchors=anchors,
                        replay=replay,
                        replay_memories=replay_notes,
                        drift_probes=probes,
                        general=general_probes(),
                        parent_general_answers=self.online._parent_probe_answers(namespace, parent),
                        teacher_answers=teacher_answers,
                        should_stop=context.should_stop,
                        on_progress=lambda p: context.report_progress({"phase": "distill", **p}),
                    )
                    holder.model = result.model
            except NothingToDistill as error:
                return self._nothing_distilled(namespace, run_id, error)
            record_run_losses(self.session_factory, run_id, result.loss_history)
            metrics = {key: float(value) for key, value in result.metrics.items()}
            metrics["memories"] = float(len(memory_ids))
            metrics["replay_memories"] = float(len(replay_notes))
            metrics["teacher_from_vllm"] = 1.0 if teacher_source["value"] == "vllm" else 0.0
            decision = evaluate_gate(metrics, gate_config(self.settings))
            context.report_progress({"phase": "publish", "gate": decision.reason})
            version = self.registry.publish_candidate(
                namespace,
                out_dir,
                parent_version=parent.version,
                training_run_id=run_id,
                metrics=metrics,
                status="candidate" if decision.passed else "rejected",
                reason=None if decision.passed else decision.reason,
                extra_metadata={
                    "kind": "distill",
                    "method": "bake",
                    "job_id": context.job_id,
                    "memory_ids": memory_ids,
                    "behaviour_report": result.report,
                },
            )
        return self._promote(
            context,
            Distilled(
                namespace=namespace,
                parent=parent,
                run_id=run_id,
                version=version,
                decision=decision,
                metrics=metrics,
                memory_ids=memory_ids,
                teacher_source=teacher_source["value"],
                started=started,
            ),
        )

    def _promote(self, context: JobContext, candidate: Distilled) -> JobOutcome:
        """Gate's verdict applied to a distilled version: rejected, or promoted and its memories
        marked baked; the run is closed either way."""
        outcome = {
            "namespace": candidate.namespace,
            "version": candidate.version,
            "parent_version": candidate.parent.version,
            "training_run_id": candidate.run_id,
            "gate": candidate.decision.reason,
            "memories": len(candidate.memory_ids),
            "gap_closure": candidate.metrics.get("gap_closure"),
            "drift_kl": candidate.metrics.get("drift_kl"),
            "answer_agreement": candidate.metrics.get("answer_agreement"),
            "teacher": candidate.teacher_source,
        }
        if not candidate.decision.passed:
            finish_run(
                self.session_factory,
                candidate.run_id,
                "rejected",
                version=candidate.version,
                error=candidate.decision.reason,
                metrics=candidate.metrics,
            )
            return JobOutcome(
                {**outcome, "outcome": "rejected", "seconds": time.perf_counter() - candidate.started}
            )
        context.report_progress({"phase": "promote", "version": candidate.version})
        try:
            self.registry.promote(
                candidate.namespace, candidate.version, expected_parent=candidate.parent.version
            )
        except StaleParent as error:
            finish_run(
                self.session_factory,
                candidate.run_id,
                "rejected",
                version=candidate.version,
                error=str(error),
                metrics=candidate.metrics,
            )
            raise JobFailed(str(error)) from error  # retried from the new current version
        except PromotionFailed as error:
            finish_run(
                self.session_factory,
                candidate.run_id,
                "failed",
                version=candidate.version,
                error=str(error),
                metrics=candidate.metrics,
            )
            raise JobFailed(str(error)) from error
        with self.session_factory.begin() as session:
            baked = MemoryRepository(session).mark_baked(ids=candidate.memory_ids, version=candidate.version)
        finish_run(
            self.session_factory,
            candidate.run_id,
            "succeeded",
            version=candidate.version,
            metrics={**candidate.metrics, "gate": candidate.decision.reason},
        )
        log.info(
            "distill %s: v%d is current, %d memories baked (%s)",
            candidate.namespace,
            candidate.version,
            baked,
            candidate.decision.reason,
        )
        return JobOutcome(
            {
                **outcome,
                "outcome": "promoted",
                "baked": baked,
                "seconds": time.perf_counter() - candidate.started,
            }
        )

    def _mix_feedback_items(self, session: Session, namespace: str) -> list[tuple[int, dict[str, Any]]]:
        """The most recent trained feedback, mixed into the loss so baking keeps recent corrections."""
        if self.config.feedback_mix <= 0:
            return []
        feedback = FeedbackRepository(session)
        items = feedback.recent(namespace=namespace, status="trained", limit=MAX_MIX_FEEDBACK)
        return [(item.id, feedback_item_dict(item)) for item in items]

    def _teacher_responses(
        self, namespace: str, parent: CurrentAdapter, plan: DistillPlan
    ) -> tuple[DistillPlan, str]:
        """Fill the plan's missing responses through vLLM when a replica is up; otherwise leave them
        to the distiller's local generation. Returns (plan, "vllm" | "local")."""
        missing = plan.prompts_without_response()
        if not missing:
            return plan, "stored"
        prompts = [teacher_messages(plan.prefix_messages, prompt) for prompt in missing]
        responses = vllm_teacher_responses(
            self.settings,
            served_name(namespace, parent.version),
            prompts,
            max_tokens=self.config.max_new_tokens,
        )
        if responses is not None:
            return plan.with_responses(responses), "vllm"
        return plan, "local"

    def _training_outcome(self, run_id: int):
        """The shared ending of a failed training step (service.jobs.train.training_run_outcome);
        `NothingToDistill` is left to the caller, which closes the run as cancelled."""
        return training_run_outcome(
            self.session_factory, run_id, fatal=(DistillAlignmentError,), passthrough=(NothingToDistill,)
        )

    def _nothing_distilled(self, namespace: str, run_id: int, error: NothingToDistill) -> JobOutcome:
        finish_run(self.session_factory, run_id, "cancelled", error=str(error))
        return JobOutcome(
            {"namespace": namespace, "outcome": "nothing_to_distill", "version": None, "reason": str(error)}
        )


# --- scheduling glue -----------------------------------------------------------------------------


def enqueue_distill(
    session: Session,
    settings: Settings,
    namespace: str,
    *,
    scheduled_for: datetime | None = None,
    trigger: str,
    created_by: str | None = None,
) -> Job:
    """Queue a distillation of `namespace` (or return the one already queued or running)."""
    payload: dict[str, Any] = {"namespace": namespace, "trigger": trigger}
    if scheduled_for is not None:
        payload["scheduled_for"] = scheduled_for.isoformat()
    return JobQueue(session, default_max_attempts=settings.job_max_attempts).enqueue(
        kind=DISTILL_JOB_KIND,
        namespace=namespace,
        payload=payload,
        dedupe_key=distill_dedupe_key(namespace),
        created_by=created_by,
    )


def last_scheduled_slot(session: Session, namespace: str) -> datetime | None:
    """The slot of the namespace's latest distillation job (its creation time when it had no slot)."""
    job = JobQueue(session).newest(kind=DISTILL_JOB_KIND, namespace=namespace)
    if job is None:
        return None
    slot = (job.payload or {}).get("scheduled_for")
    return datetime.fromisoformat(slot) if isinstance(slot, str) else job.created_at


def distill_namespaces(session: Session) -> list[str]:
    """Namespaces with at least one active memory (the only ones a distillation can change)."""
    return MemoryRepository(session).namespaces_with_active()


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
