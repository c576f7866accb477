"""The `train` job: a namespace's pending feedback becomes a new adapter version, served or rejected.

Gathers the pending feedback (plus a replay sample of older trained items), renders it, trains a
LoRA warm-started from the current version, scores it against its parent (feedback NLL, drift on
probes), publishes it through the registry (`candidate` -> promoted, or `rejected` with the reason)
and records the training run and the feedback's new status; `warm()` loads the resident base model and
its anchor references before the first job. Knows the database and the training
code; knows nothing about HTTP or how vLLM is driven (the registry does that).
"""

from __future__ import annotations

import logging
import math
import shutil
import tempfile
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from datetime import timedelta
from functools import lru_cache
from pathlib import Path
from typing import Any

from sqlalchemy.orm import Session, sessionmaker

from memory_store.errors import Conflict
from memory_store.models import FeedbackItem, utcnow
from memory_store.repositories import ConversationRepository, FeedbackRepository, TrainingRunRepository
from service.adapters.registry import (
    AdapterRegistry,
    CurrentAdapter,
    PromotionFailed,
    StaleParent,
)
from service.component_configs import gate_config, render_config, train_config
from service.config import Settings
from service.ingest.intake import queue_train_job
from service.jobs.worker import JobCancelled, JobContext, JobFailed, JobOutcome, JobWaiting
from training.adapter_store import AdapterStoreError
from training.anchor_cache import anchor_answers
from training.augment import question_variants
from training.behaviour import TaughtItem, behaviour_report
from training.evaluate import AdapterView, evaluate_gate, score_views
from training.feedback_examples import (
    RenderedFeedback,
    conversations_not_taught,
    drift_probes,
    render_feedback,
    taught_item,
)
from training.model_loading import ResidentBaseModel
from training.probes import anchor_examples, general_probes, prompt_anchor_pairs
from training.render import Example, RenderError, resolve_target_index
from training.trainer import LoraTrainer, TrainingBudgetExceeded, TrainingCancelled, TrainingDiverged

__all__ = [
    "MAX_PROBE_CONVERSATIONS",
    "TrainJobHandler",
    "feedback_item_dict",
    "recent_conversations",
    "scratch_dir",
    "worker_tokenizer",
]

log = logging.getLogger(__name__)

MAX_RECORDED_LOSSES = 500  # per-step losses kept with a training run (thinned beyond)
MAX_PROBE_CONVERSATIONS = 32  # the most recent stored conversations used as drift probes
WAIT_FIRST_S, WAIT_MAX_S = 5.0, 60.0  # a candidate waiting for vLLM: retried after 5, 10, 20, 40, 60, 60... s
STALE_SCRATCH_S = 6 * 3600.0


@lru_cache(maxsize=4)
def _worker_tokenizer(path: str) -> Any:
    from training.tokenizer_files import load_tokenizer

    return load_tokenizer(path)


def worker_tokenizer(path: Path) -> Any:
    """The worker's tokenizer of `path`, loaded once per process. Not the API's instance: a fast
    tokenizer must not be used by two threads at once, and a run uses it for minutes."""
    return _worker_tokenizer(str(Path(path).resolve()))


def feedback_item_dict(item: FeedbackItem) -> dict[str, Any]:
    """A stored feedback row in the `POST /feedback` shape training.render takes."""
    return {"messages": item.messages, "target_index": item.target_index, "continuation": item.continuation}


def recent_conversations(session: Session, namespace: str, limit: int) -> list[list[dict[str, Any]]]:
    """The messages of the namespace's `limit` most recent stored conversations, oldest first
    (ordered and limited in SQL: reads `limit` rows however many are stored)."""
    if limit <= 0:
        return []
    rows = ConversationRepository(session).recent(namespace=namespace, limit=limit)
    return [list(row.messages) for row in rows]


def scratch_dir(settings: Settings) -> Path:
    """Where runs write adapters before publishing (same filesystem as the adapters: cheap copies).
    Folders left by crashed runs are removed once stale."""
    root = settings.data_dir / "work"
    root.mkdir(parents=True, exist_ok=True)
    now = time.time()
    for child in root.iterdir():
        try:
            if now - child.stat().st_mtime > STALE_SCRATCH_S:
                shutil.rmtree(child, ignore_errors=True)
        except FileNotFoundError:
            continue
    return root


def finish_run(
    session_factory: sessionmaker[Session],
    run_id: int,
    status: str,
    *,
    version: int | None = None,
    error: str | None = None,
    metrics: Mapping[str, Any] | None = None,
) -> None:
    """Close a training run's row (succeeded / failed / cancelled), in its own transaction."""
    with session_factory.begin() as session:
        TrainingRunRepository(session).finish(
            id=run_id, status=status, version=version, error=error, metrics=dict(metrics) if metrics else None
        )


@contextmanager
def training_run_outcome(
    session_factory: sessionmaker[Session],
    run_id: int,
    *,
    fatal: tuple[type[BaseException], ...] = (),
    passthrough: tuple[type[BaseException], ...] = (),
    failed_metrics: Mapping[str, Any] | None = None,
) -> Iterator[None]:
    """How a train or distill job's training step ends when it raises, in one place: divergence, an
    exhausted time budget and the `fatal` errors close the run as failed and fail the job for good
    (a retry would fail the same way); a cancellation closes it as cancelled; anything else closes it
    as failed and propagates (the worker retries). `passthrough` errors propagate untouched: the
    caller closes the run for them."""
    try:
        yield
    except passthrough:
        raise
    except (TrainingDiverged, TrainingBudgetExceeded, *fatal) as error:
        finish_run(
            session_factory,
            run_id,
            "failed",
            error=f"{type(error).__name__}: {error}",
            metrics=failed_metrics,
        )
        raise JobFailed(f"{type(error).__name__}: {error}", retryable=False) from error
    except (TrainingCancelled, JobCancelled) as error:
        finish_run(session_factory, run_id, "cancelled", error=str(error))
        raise JobCancelled(str(error)) from error
    except Exception as error:
        finish_run(session_factory, run_id, "failed", error=f"{type(error).__name__}: {error}")
        raise


def record_run_losses(session_factory: sessionmaker[Session], run_id: int, losses: Sequence[float]) -> None:
    """Keep a training run's loss per optimiser step in its metrics (`loss_per_step`, plotted by
    the dashboard); evenly thinned to at most MAX_RECORDED_LOSSES points, the last one kept."""
    values = [float(loss) for loss in losses]
    if not values:
        return
    if len(values) > MAX_RECORDED_LOSSES:
        stride = len(values) / MAX_RECORDED_LOSSES
        values = [values[int(i * stride)] for i in range(MAX_RECORDED_LOSSES - 1)] + [values[-1]]
    with session_factory.begin() as session:
        run = TrainingRunRepository(session).get(id=run_id)
        run.metrics = {**(run.metrics or {}), "loss_per_step": values}


class TrainJobHandler:
    """Handler of `train` jobs (payload `{"namespace": ...}`)."""

    def __init__(
        self, settings: Settings, session_factory: sessionmaker[Session], registry: AdapterRegistry
    ) -> None:
        self.settings = settings
        self.session_factory = session_factory
        self.registry = registry
        self.render_config = render_config(settings)
        self.gate = gate_config(settings)
        # the base model stays loaded between jobs; each job puts its adapters on and takes them off
        self.resident = ResidentBaseModel(settings.base_model, device=settings.device)
        self._anchor_answers: list[str] | None = None

    def warm(self) -> None:
        """Load what every update needs before the first one asks: the resident base model, its
        answers to the anchor prompts and its distributions at their positions (the KL reference,
        `training/reference_cache.py`). The worker calls this when it starts, so the first update
        after a restart costs what later ones do."""
        started = time.perf_counter()
        tokenizer = worker_tokenizer(self.settings.tokenizer_path)
        with self.resident.lend() as holder:
            anchors = self._anchors(holder.model, tokenizer)
            cached = LoraTrainer(train_config(self.settings)).warm_base_references(holder.model, anchors)
        log.info("train handler warm in %.1fs (%d anchors, references %s)", time.perf_counter() - started,
                 len(anchors), "already cached" if cached else "computed")

    def __call__(self, context: JobContext) -> JobOutcome:
        namespace = context.payload.get("namespace") or context.namespace
        if not namespace:
            raise JobFailed("train job without a namespace", retryable=False)
        timings: dict[str, float] = {}
        started = time.perf_counter()
        waiting = context.payload.get("promote")
        if isinstance(waiting, dict):  # trained earlier; only the promotion was waiting for vLLM
            return self._resume_promotion(context, namespace, waiting, started)
        context.report_progress({"phase": "prepare"})
        try:
            parent = self.registry.training_parent(namespace)
        except PromotionFailed as error:
            raise JobFailed(f"no servable base version: {error}") from error
        tokenizer = worker_tokenizer(self.settings.tokenizer_path)

        clock = time.perf_counter()
        with self.session_factory() as session:  # read, then render without holding a transaction
            feedback = FeedbackRepository(session)
            new_items = [
                (item.id, feedback_item_dict(item))
                for item in feedback.pending_since(namespace=namespace, limit=self.settings.train_max_items)
            ]
            if not new_items:
                return self._nothing_to_train(namespace, {})
            replay_n = min(
                self.settings.replay_max_items, math.ceil(self.settings.replay_ratio * len(new_items))
            )
            replay_items = [
                (item.id, feedback_item_dict(item))
                for item in feedback.replay_sample(
                    namespace=namespace,
                    before_id=new_items[0][0],
                    n=replay_n,
                    seed=self.settings.train_seed + context.job_id,
                )
            ]
            conversations = recent_conversations(session, namespace, MAX_PROBE_CONVERSATIONS)
        new = render_feedback(tokenizer, new_items, self.render_config)
        augment = self.settings.augment_questions and len(new.examples) <= self.settings.augment_max_items
        variants = self._question_variants(tokenizer, new_items, new) if augment else []
        replay = render_feedback(tokenizer, replay_items, self.render_config)
        probes, probe_source = drift_probes(
            tokenizer, conversations_not_taught(conversations, new_items), self.render_config
        )
        from_id, to_id = new_items[0][0], new_items[-1][0]
        for item_id, reason in new.skipped.items():
            log.warning("feedback %d skipped: %s", item_id, reason)
        with self.session_factory.begin() as session:
            FeedbackRepository(session).mark_skipped(ids=new.skipped)
            if not new.examples:
                return self._nothing_to_train(namespace, new.skipped)
            run_id = (
                TrainingRunRepository(session)
                .start(
                    namespace=namespace,
                    kind="train",
                    job_id=context.job_id,
                    parent_version=parent.version,
                    feedback_from_id=from_id,
                    feedback_to_id=to_id,
                )
                .id
            )
        timings["render_seconds"] = time.perf_counter() - clock
        counts = {
            "new_items": len(new.examples),
            "question_variants": len(variants),
            "replay_items": len(replay.examples),
            "skipped_items": len(new.skipped),
            "probes": len(probes),
        }
        log.info("train %s: %s from v%d (probes: %s)", namespace, counts, parent.version, probe_source)

        with tempfile.TemporaryDirectory(
            prefix=f"train-{namespace}-job{context.job_id}-", dir=scratch_dir(self.settings)
        ) as scratch:
            candidate_dir = Path(scratch) / "adapter"
            with training_run_outcome(self.session_factory, run_id, failed_metrics=counts):
                trained_ids = set(new.example_ids)
                taught = [
                    item
                    for item in (taught_item(i, body) for i, body in new_items if i in trained_ids)
                    if item is not None
                ]
                metrics, report = self._train_and_score(
                    context,
                    namespace,
                    parent,
                    new.examples,
                    variants,
                    replay.examples,
                    probes,
                    candidate_dir,
                    timings,
                    taught[: self.settings.report_max_items],
                    tokenizer,
                    run_id=run_id,
                )
            metrics.update({key: float(value) for key, value in counts.items()})
            metrics["probe_source_conversations"] = 1.0 if probe_source == "conversations" else 0.0
            decision = evaluate_gate(metrics, self.gate)
            context.report_progress({"phase": "publish", "gate": decision.reason})
            clock = time.perf_counter()
            version = self.registry.publish_candidate(
                namespace,
                candidate_dir,
                parent_version=parent.version,
                training_run_id=run_id,
                metrics=metrics,
                feedback_from_id=from_id,
                feedback_to_id=to_id,
                status="candidate" if decision.passed else "rejected",
                reason=None if decision.passed else decision.reason,
                extra_metadata={"kind": "train", "job_id": context.job_id, "behaviour_report": report},
            )
            timings["publish_seconds"] = time.perf_counter() - clock

        result: dict[str, Any] = {
            "namespace": namespace,
            "version": version,
            "parent_version": parent.version,
            "training_run_id": run_id,
            "gate": decision.reason,
            **counts,
        }
        if not decision.passed:
            finish_run(
                self.session_factory,
                run_id,
                "rejected",
                version=version,
                error=decision.reason,
                metrics=metrics,
            )
            log.warning("train %s: v%d rejected: %s", namespace, version, decision.reason)
            return self._outcome(
                namespace, to_id, {**result, "outcome": "rejected", "timings": timings, "started": started}
            )
        pending = {
            "version": version,
            "parent_version": parent.version,
            "training_run_id": run_id,
            "feedback_ids": list(new.example_ids),
            "to_id": to_id,
            "result": result,
            "metrics": {key: value for key, value in metrics.items() if math.isfinite(value)},
            "timings": timings,
            "waits": 0,
        }
        return self._promote(context, namespace, pending, started)

    def _promote(
        self, context: JobContext, namespace: str, pending: dict[str, Any], started: float
    ) -> JobOutcome:
        """Make the gated candidate current and mark its feedback trained. When no vLLM replica
        answers, the job waits (JobWaiting: no attempt spent) with `pending` in its payload, so the
        next run promotes the same candidate instead of training again."""
        version, run_id, to_id = (
            int(pending["version"]),
            int(pending["training_run_id"]),
            int(pending["to_id"]),
        )
        result, metrics, timings = dict(pending["result"]), dict(pending["metrics"]), dict(pending["timings"])
        context.report_progress({"phase": "promote", "version": version})
        clock = time.perf_counter()
        try:
            self.registry.promote(namespace, version, expected_parent=int(pending["parent_version"]))
        except (StaleParent, Conflict) as error:  # Conflict: decided meanwhile (rejected, files deleted)
            finish_run(
                self.session_factory, run_id, "rejected", version=version, error=str(error), metrics=metrics
            )
            return self._outcome(
                namespace, to_id, {**result, "outcome": "stale", "timings": timings, "started": started}
            )
        except PromotionFailed as error:
            if error.unreachable:
                waits = int(pending.get("waits", 0))
                delay = min(WAIT_FIRST_S * 2**waits, WAIT_MAX_S)
                raise JobWaiting(
                    f"v{version} passed the gate and waits for vLLM to load it: {error.reason}",
                    waiting_for="vllm",
                    delay_s=delay,
                    payload={**context.payload, "promote": {**pending, "waits": waits + 1}},
                ) from error
            finish_run(
                self.session_factory, run_id, "failed", version=version, error=str(error), metrics=metrics
            )
            raise JobFailed(str(error)) from error
        timings["promote_seconds"] = time.perf_counter() - clock
        with self.session_factory.begin() as session:
            FeedbackRepository(session).mark_trained(
                ids=[int(i) for i in pending["feedback_ids"]], version=version
            )
        # the gate's decision stays with the run (the dashboard's "gate" column, next to the metrics)
        finish_run(
            self.session_factory,
            run_id,
            "succeeded",
            version=version,
            metrics={**metrics, **timings, "gate": result["gate"]},
        )
        log.info("train %s: v%d is current (%s)", namespace, version, result.get("gate"))
        return self._outcome(
            namespace, to_id, {**result, "outcome": "promoted", "timings": timings, "started": started}
        )

    def _resume_promotion(
        self, context: JobContext, namespace: str, pending: dict[str, Any], started: float
    ) -> JobOutcome:
        """A run after a wait: promote the candidate trained before, unless it was decided meanwhile
        (promoted or rolled back by hand, rejected as stale): then its feedback follows that."""
        version = int(pending["version"])
        current = self.registry.current(namespace)
        if current is not None and current.version == version:  # promoted meanwhile (e.g. by hand)
            with self.session_factory.begin() as session:
                FeedbackRepository(session).mark_trained(
                    ids=[int(i) for i in pending["feedback_ids"]], version=version
                )
            finish_run(
                self.session_factory,
                int(pending["training_run_id"]),
                "succeeded",
                version=version,
                metrics={**pending["metrics"], "gate": pending["result"]["gate"]},
            )
            return self._outcome(
                namespace,
                int(pending["to_id"]),
                {
                    **pending["result"],
                    "outcome": "promoted",
                    "timings": dict(pending["timings"]),
                    "started": started,
                },
            )
        return self._promote(context, namespace, pending, started)

    # --- steps ---------------------------------------------------------------------------------
    def _train_and_score(
        self,
        context: JobContext,
        namespace: str,
        parent: CurrentAdapter,
        new_examples: list[Example],
        variants: list[Example],
        replay_examples: list[Example],
        probes: list[Example],
        candidate_dir: Path,
        timings: dict[str, float],
        taught: list[TaughtItem],
        tokenizer: Any,
        *,
        run_id: int | None = None,
    ) -> tuple[dict[str, float], dict[str, Any]]:
        """Train on the resident base, then score and report with the same weights in memory: the
        candidate is the trained `default` adapter, the parent is loaded beside it."""

        def on_progress(progress: dict[str, Any]) -> None:
            context.report_progress({"phase": "train", **progress})

        with self.resident.lend() as holder:
            clock = time.perf_counter()
            anchors = self._anchors(holder.model, tokenizer)
            timings["anchor_seconds"] = time.perf_counter() - clock
            clock = time.perf_counter()
            trained = LoraTrainer(train_config(self.settings)).train(
                base_model=self.settings.base_model,
                examples=[*new_examples, *variants, *replay_examples],
                parent_adapter=parent.path,
                out_dir=candidate_dir,
                on_progress=on_progress,
                should_stop=context.should_stop,
                anchors=anchors,
                must_learn=len(new_examples) + len(variants),
                base=holder.model,
            )
            model = holder.model = trained.model
            timings["train_seconds"] = time.perf_counter() - clock
            if run_id is not None:
                self._record_losses(run_id, trained.loss_history)
            if context.should_stop():
                raise JobCancelled("stopped after training, before evaluation")
            context.report_progress({"phase": "evaluate"})
            clock = time.perf_counter()
            parent_name = None
            if parent.path is not None:
                model.load_adapter(str(parent.path), adapter_name="parent")
                parent_name = "parent"
            scores = score_views(
                AdapterView(model, parent_name), AdapterView(model, "default"), new_examples, probes
            )
            timings["eval_seconds"] = time.perf_counter() - clock
            context.report_progress({"phase": "report"})
            clock = time.perf_counter()
            report = behaviour_report(
                model,
                tokenizer,
                parent_adapter=parent_name,
                candidate_adapter="default",
                taught=taught,
                probes=general_probes(),
                parent_probe_answers=self._parent_probe_answers(namespace, parent),
            )
            timings["report_seconds"] = time.perf_counter() - clock
        metrics = {key: float(value) for key, value in trained.metrics.items()}
        metrics.update({key: float(value) for key, value in scores.items()})
        summary = report["summary"]
        for key in (
            "taught_right",
            "taught_total",
            "general_right",
            "general_lost",
            "general_parent_right",
            "general_total",
        ):
            metrics[key] = float(summary[key])
        return metrics, report

    def _question_variants(
        self, tokenizer: Any, items: Sequence[tuple[int, Mapping[str, Any]]], rendered: RenderedFeedback
    ) -> list[Example]:
        """The framed variants (training.augment) of each rendered chat item's question."""
        trained = set(rendered.example_ids)
        framed: list[tuple[int, Mapping[str, Any]]] = []
        for item_id, item in items:
            messages = item.get("messages")
            if item_id not in trained or not isinstance(messages, list):
                continue
            try:
                index = resolve_target_index(messages, item.get("target_index"))
            except RenderError:
                continue
            framed.extend((item_id, variant) for variant in question_variants(item, index))
        return render_feedback(tokenizer, framed, self.render_config).examples

    def _anchors(self, base: Any, tokenizer: Any) -> list[Example]:
        """The built-in anchor prompts with the base model's answers, rendered."""
        answers = self._base_anchor_answers(base, tokenizer)
        return anchor_examples(tokenizer, prompt_anchor_pairs(answers), self.render_config)

    def _base_anchor_answers(self, base: Any, tokenizer: Any) -> list[str]:
        """The base model's greedy answers to the built-in anchor prompts (training.anchor_cache:
        computed once per base model, kept on disk and here)."""
        if self._anchor_answers is None:
            self._anchor_answers = anchor_answers(Path(self.settings.base_model), lambda: base, tokenizer)
        return self._anchor_answers

    def _parent_probe_answers(self, namespace: str, parent: CurrentAdapter) -> list[str] | None:
        """The parent's answers to the general probes, from its own behaviour report (it was the
        candidate there), when that report asked the same questions."""
        try:
            report = (
                self.registry.store.read_metadata(namespace, parent.version).get("behaviour_report") or {}
            )
        except AdapterStoreError:  # missing or unreadable: the parent answers them here instead
            return None
        rows = report.get("general") or []
        questions = [probe.question for probe in general_probes()]
        if [row.get("question") for row in rows] != questions:
            return None
        return [str(row.get("candidate", "")) for row in rows]

    def _record_losses(self, run_id: int, losses: Sequence[float]) -> None:
        record_run_losses(self.session_factory, run_id, losses)

    def _nothing_to_train(self, namespace: str, skipped: Mapping[int, str]) -> JobOutcome:
        return JobOutcome(
            {
                "namespace": namespace,
                "outcome": "nothing_to_train",
                "version": None,
                "skipped": {str(item_id): reason for item_id, reason in skipped.items()},
            }
        )

    def _outcome(self, namespace: str, consumed_to_id: int, result: dict[str, Any]) -> JobOutcome:
        started = result.pop("started")
        result["timings"] = {**result["timings"], "total_seconds": time.perf_counter() - started}
        settings = self.settings

        def enqueue_follow_up(session: Session) -> None:
            # In the transaction that frees the job's dedupe key: feedback stored while this run
            # trained was deduplicated onto this job, so it needs a run of its own.
            newer = FeedbackRepository(session).pending_since(
                namespace=namespace, after_id=consumed_to_id, limit=1
            )
            if not newer and result["outcome"] != "stale":
                return
            queue_train_job(
                session,
                settings,
                namespace,
                trigger="follow-up",
                run_after=utcnow() + timedelta(seconds=settings.train_debounce_s),
            )

        return JobOutcome(result, on_complete=enqueue_follow_up)
