"""Memory distillation (context baking): train an adapter so the model WITHOUT the memories in its
context predicts what it predicts WITH them.

Owns the run's config (`DistillConfig`), the plan (`plan_distillation`: memories, conversations and
probe prompts split into train and held-out) and the `MemoryDistiller` recipe (prepare: teacher
responses and cache; train the student through the shared guarded step; evaluate gap closure and
drift; save). Its data lives in training.distill_data, the teacher cache and the KL loss in
training.distill_teacher. Knows nothing of the database, the queue, HTTP or vLLM: the caller passes
memories, conversations, optional responses and paths, and records the returned metrics.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from training.distill_data import (
    DEFAULT_PROBE_TEMPLATES,
    DistillPrompt,
    MemoryNote,
    build_pairs,
    conversation_prompts,
    generate_responses,
    prefix_messages_from_memories,
    probe_prompts,
    split_heldout,
    teacher_messages,
)
from training.distill_teacher import (
    NothingToDistill,
    TeacherTargets,
    check_batch_alignment,
    collate_students,
    distill_kl_sum,
    gap_closure,
    mean_teacher_student_kl,
    precompute_teacher,
)
from training.evaluate import AdapterView, builtin_probe_examples, drift_kl
from training.render import DistillPair, Example, RenderConfig
from training.token_nll import TokenBatch, supervised_logits, token_nll_sum
from training.trainer import (
    GuardedStep,
    TrainConfig,
    TrainingCancelled,
    load_lora_model,
    resolve_device,
)

__all__ = [
    "DistillConfig",
    "DistillPlan",
    "DistillResult",
    "MemoryDistiller",
    "PreparedDistillation",
    "StudentTrainingResult",
    "plan_distillation",
]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class DistillConfig:
    """One distillation run. Built by the service from Settings (`distill_*`)."""

    epochs: int = 30
    max_steps: int = 0  # 0 = epochs x batches per epoch
    learning_rate: float = 2e-3
    batch_size: int = 8  # teacher/student pairs per optimiser step
    topk: int = 0  # 0 = KL over the full vocabulary; k > 0 = top-k teacher tokens + one rest-mass bucket
    temperature: float = 1.0  # applied to teacher and student logits; the loss is scaled by T^2
    student_retained_turns: int = 0  # turns of conversation history the student keeps
    feedback_mix: float = 0.0  # weight of the online feedback CE loss added to the KL
    seed: int = 0
    time_budget_s: float = 600.0  # the whole run; past it, it fails (TrainingBudgetExceeded), writes nothing
    device: str = "auto"  # auto | cpu | cuda
    max_new_tokens: int = 64  # teacher responses generated locally (greedy)
    no_repeat_ngram_size: int = 0  # > 0 only for degenerate models (e.g. random-init test models)
    probe_templates: tuple[str, ...] = DEFAULT_PROBE_TEMPLATES  # `{topic}` and `{memory}` fields
    heldout_fraction: float = 0.25  # of the prompts, kept out of training for gap closure
    use_stored_responses: bool = True  # conversation prompts keep their stored assistant reply
    render: RenderConfig = field(default_factory=RenderConfig)

    def __post_init__(self) -> None:
        checks = {
            "epochs": self.epochs >= 1,
            "max_steps": self.max_steps >= 0,
            "learning_rate": self.learning_rate > 0,
            "batch_size": self.batch_size >= 1,
            "topk": self.topk >= 0,
            "temperature": self.temperature > 0,
            "student_retained_turns": self.student_retained_turns >= 0,
            "feedback_mix": self.feedback_mix >= 0,
            "time_budget_s": self.time_budget_s > 0,
            "device": self.device in ("auto", "cpu", "cuda"),
            "max_new_tokens": self.max_new_tokens >= 1,
            "no_repeat_ngram_size": self.no_repeat_ngram_size >= 0,
            "probe_templates": all("{topic}" in t or "{memory}" in t for t in self.probe_templates),
            "heldout_fraction": 0 < self.heldout_fraction < 1,
        }
        bad = [name for name, ok in checks.items() if not ok]
        if bad:
            raise ValueError(f"invalid DistillConfig field(s): {', '.join(bad)}")


@dataclass(frozen=True)
class DistillPlan:
    """What one run distils: the teacher's prefix and the train / held-out prompts."""

    prefix_messages: tuple[Mapping[str, Any], ...]
    train: tuple[DistillPrompt, ...]
    heldout: tuple[DistillPrompt, ...]

    def prompts_without_response(self) -> list[DistillPrompt]:
        return [p for p in (*self.train, *self.heldout) if p.response is None]

    def with_responses(self, responses: Sequence[str | None]) -> DistillPlan:
        """A copy where the prompts of `prompts_without_response()` take `responses`, in that order
        (e.g. the teacher's answers from vLLM to `teacher_messages(plan.prefix_messages, prompt)`)."""
        missing = self.prompts_without_response()
        if len(responses) != len(missing):
            raise ValueError(f"{len(responses)} responses for {len(missing)} prompts without one")
        answers = iter(responses)

        def fill(prompts: tuple[DistillPrompt, ...]) -> tuple[DistillPrompt, ...]:
            return tuple(replace(p, response=next(answers)) if p.response is None else p for p in prompts)

        train = fill(self.train)
        return DistillPlan(self.prefix_messages, train, fill(self.heldout))


def plan_distillation(
    memories: Sequence[MemoryNote],
    conversations: Sequence[Sequence[Mapping[str, Any]]],
    config: DistillConfig,
) -> DistillPlan:
    """Prefix from the memories; prompts from the conversations and the probe templates; a seeded
    held-out split for gap closure. Raises NothingToDistill when there is nothing to bake."""
    prefix = prefix_messages_from_memories(memories)
    if not prefix:
        raise NothingToDistill("no active memory with content: nothing to distil")
    prompts = conversation_prompts(conversations, use_stored_responses=config.use_stored_responses)
    prompts += probe_prompts(memories, config.probe_templates)
    train, heldout = split_heldout(prompts, config.heldout_fraction, config.seed)
    return DistillPlan(tuple(prefix), tuple(train), tuple(heldout))


@dataclass(frozen=True)
class DistillResult:
    adapter_dir: Path
    # gap_closure, kl_before, kl_after (held-out), train_kl_before, train_kl_after, drift_kl,
    # train_tokens, train_seconds, steps, tokens_per_s, teacher_cache_bytes, ...
    metrics: dict[str, float]
    loss_history: tuple[float, ...]
    stopped_reason: str  # "completed": a run past its time budget raises TrainingBudgetExceeded


@dataclass
class PreparedDistillation:
    """A loaded student/teacher model with its rendered pairs and the teacher cache."""

    model: Any
    pad_token_id: int
    train_pairs: list[DistillPair]
    heldout_pairs: list[DistillPair]
    train_teacher: list[TeacherTargets]
    heldout_teacher: list[TeacherTargets]
    stats: dict[str, float]


class MemoryDistiller:
    """Recipe: load base + current adapter (the teacher, with the memories in context), generate the
    missing teacher responses, cache the teacher once, train the same adapter as the student (without
    the memories), evaluate gap closure and drift, save the adapter (peft format) into `out_dir`."""

    def __init__(self, config: DistillConfig, lora: TrainConfig | None = None) -> None:
        self.config = config
        # LoRA shape, dtype, clipping, warm-up and schedule shared with online training; lr, epochs,
        # steps, seed, time budget and device come from the distillation config
        self.train_config = replace(
            lora or TrainConfig(),
            lr=config.learning_rate,
            epochs=config.epochs,
            max_steps=config.max_steps,
            seed=config.seed,
            time_budget_s=config.time_budget_s,
            device=config.device,
        )

    def run(
        self,
        *,
        base_model: Path,
        tokenizer: Any,
        plan: DistillPlan,
        parent_adapter: Path | None,
        out_dir: Path,
        feedback_examples: Sequence[Example] = (),
        drift_probes: Sequence[Example] | None = None,
        on_progress: Callable[[dict[str, Any]], None] | None = None,
        should_stop: Callable[[], bool] | None = None,
    ) -> DistillResult:
        """Distil `plan` into a new adapter in `out_dir`. Raises NothingToDistill, TrainingDiverged,
        TrainingCancelled, TrainingBudgetExceeded (the run did not fit its time budget) or
        DistillAlignmentError, and writes nothing, when the run cannot finish.
        `drift_probes=None` uses the built-in generic probes; `[]` skips drift."""
        started = time.perf_counter()
        out_dir = Path(out_dir)
        if out_dir.exists() and any(out_dir.iterdir()):
            raise FileExistsError(f"out_dir {out_dir} is not empty")
        if self.config.feedback_mix > 0 and not feedback_examples:
            raise ValueError("DistillConfig.feedback_mix > 0 needs feedback_examples")
        device = resolve_device(self.config.device)
        devices = [device.index or 0] if device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices):
            torch.manual_seed(self.config.seed)
            prepared = self.prepare(
                base_model=Path(base_model), tokenizer=tokenizer, plan=plan, parent_adapter=parent_adapter
            )
            model = prepared.model
            kl = {
                "kl_before": self._heldout_kl(prepared),
                "train_kl_before": self._train_kl(prepared),
            }
            loop = self.train_student(
                prepared, feedback_examples, started=started, on_progress=on_progress, should_stop=should_stop
            )
            kl["kl_after"] = self._heldout_kl(prepared)
            kl["train_kl_after"] = self._train_kl(prepared)
            drift = self._drift(model, tokenizer, parent_adapter, drift_probes)
        metrics: dict[str, float] = {
            **kl,
            "gap_closure": gap_closure(kl["kl_before"], kl["kl_after"]),
            "train_gap_closure": gap_closure(kl["train_kl_before"], kl["train_kl_after"]),
            **({"drift_kl": drift} if drift is not None else {}),
            **loop.metrics,
            **prepared.stats,
            "train_pairs": float(len(prepared.train_pairs)),
            "heldout_pairs": float(len(prepared.heldout_pairs)),
            "teacher_cache_bytes": float(
                sum(t.nbytes for t in (*prepared.train_teacher, *prepared.heldout_teacher))
            ),
        }
        if "parent" in model.peft_config:
            model.delete_adapter("parent")
        model.save_pretrained(str(out_dir), safe_serialization=True)
        metrics["train_seconds"] = time.perf_counter() - started
        return DistillResult(out_dir, metrics, loop.losses, loop.stopped_reason)

    # --- setup -----------------------------------------------------------------------------------
    def prepare(
        self, *, base_model: Path, tokenizer: Any, plan: DistillPlan, parent_adapter: Path | None
    ) -> PreparedDistillation:
        """Load the model, fill missing responses by greedy teacher generation, render the pairs and
        cache the teacher's distributions (once, under inference mode, on CPU)."""
        config = self.config
        stats: dict[str, float] = {}
        device = resolve_device(config.device)
        model = load_lora_model(base_model, parent_adapter, self.train_config, device)
        pad_token_id = model.config.pad_token_id if model.config.pad_token_id is not None else 0

        clock = time.perf_counter()
        missing = plan.prompts_without_response()
        if missing:
            model.eval()
            teacher_views = [teacher_messages(plan.prefix_messages, p) for p in missing]
            plan = plan.with_responses(
                generate_responses(
                    model,
                    tokenizer,
                    teacher_views,
                    config.max_new_tokens,
                    no_repeat_ngram_size=config.no_repeat_ngram_size,
                )
            )
            model.train()
        stats["generation_seconds"] = time.perf_counter() - clock

        def pairs_of(prompts: Sequence[DistillPrompt]) -> list[DistillPair]:
            return build_pairs(
                tokenizer,
                plan.prefix_messages,
                prompts,
                retained_turns=config.student_retained_turns,
                render_config=config.render,
            )

        train_pairs, heldout_pairs = pairs_of(plan.train), pairs_of(plan.heldout)
        stats["skipped_prompts"] = float(
            len(plan.train) + len(plan.heldout) - len(train_pairs) - len(heldout_pairs)
        )
        if not train_pairs or not heldout_pairs:
            raise NothingToDistill(
                f"{len(train_pairs)} train / {len(heldout_pairs)} held-out pairs with a non-empty response"
            )
        clock = time.perf_counter()
        cache = {
            "topk": config.topk,
            "temperature": config.temperature,
            "pad_token_id": pad_token_id,
            "batch_size": config.batch_size,
        }
        train_teacher = precompute_teacher(model, [p.teacher for p in train_pairs], **cache)
        heldout_teacher = precompute_teacher(model, [p.teacher for p in heldout_pairs], **cache)
        stats["teacher_seconds"] = time.perf_counter() - clock
        return PreparedDistillation(
            model, pad_token_id, train_pairs, heldout_pairs, train_teacher, heldout_teacher, stats
        )

    # --- loop ------------------------------------------------------------------------------------
    def train_student(
        self,
        prepared: PreparedDistillation,
        feedback_examples: Sequence[Example] = (),
        *,
        started: float | None = None,
        on_progress: Callable[[dict[str, Any]], None] | None = None,
        should_stop: Callable[[], bool] | None = None,
    ) -> StudentTrainingResult:
        """AdamW on KL(teacher || student) over the student sequences (+ feedback_mix x feedback CE),
        through the online recipe's guarded step and time-budget rule (`GuardedStep`: the run,
        counted from `started` (perf_counter), fails with TrainingBudgetExceeded once past
        `time_budget_s`)."""
        config, model = self.config, prepared.model
        started = time.perf_counter() if started is None else started
        generator = torch.Generator().manual_seed(config.seed)
        plan = _pair_batches(len(prepared.train_pairs), config, generator)
        params = [p for p in model.parameters() if p.requires_grad]
        guard = GuardedStep(params, self.train_config, total_steps=len(plan), started=started)
        device = guard.params[0].device
        feedback: list[TokenBatch] = []
        if config.feedback_mix > 0:
            feedback = _feedback_batches(feedback_examples, prepared.pad_token_id, config.batch_size)
        losses: list[float] = []
        tokens = 0
        loop_started = time.perf_counter()
        model.train()
        for step, indices in enumerate(plan):
            if should_stop is not None and should_stop():
                raise TrainingCancelled(f"cancelled before step {step + 1}/{len(plan)}")
            guard.check_budget(step)
            students = [prepared.train_pairs[i].student for i in indices]
            teacher = [prepared.train_teacher[i] for i in indices]
            batch = collate_students(students, prepared.pad_token_id)
            check_batch_alignment(batch, teacher, students)  # the per-batch alignment assertion
            batch = batch.to(device)
            kl = (
                distill_kl_sum(supervised_logits(model, batch), teacher, config.temperature)
                / batch.num_targets
            )
            loss = kl
            if feedback:
                fb = feedback[step % len(feedback)].to(device)
                loss = kl + config.feedback_mix * token_nll_sum(model, fb) / fb.num_targets
            loss.backward()
            value = float(loss.detach())
            guard.step(step, {"loss": value})
            losses.append(value)
            tokens += batch.num_targets
            if on_progress is not None:
                elapsed = time.perf_counter() - loop_started
                on_progress(
                    {
                        "step": step + 1,
                        "total_steps": len(plan),
                        "loss": value,
                        "kl": float(kl.detach()),
                        "tokens": tokens,
                        "tokens_per_s": tokens / elapsed if elapsed > 0 else 0.0,
                        "elapsed_s": time.perf_counter() - started,
                    }
                )
        guard.check_budget(len(losses))
        guard.check_weights(len(losses))
        loop_seconds = time.perf_counter() - loop_started
        metrics = {
            "steps": float(len(losses)),
            "train_tokens": float(tokens),
            "loop_seconds": loop_seconds,
            "tokens_per_s": tokens / loop_seconds if loop_seconds > 0 else 0.0,
            "final_loss": losses[-1],
        }
        return StudentTrainingResult(metrics, tuple(losses), "completed")

    # --- evaluation ------------------------------------------------------------------------------
    def _heldout_kl(self, prepared: PreparedDistillation) -> float:
        return mean_teacher_student_kl(
            prepared.model,
            [p.student for p in prepared.heldout_pairs],
            prepared.heldout_teacher,
            temperature=self.config.temperature,
            pad_token_id=prepared.pad_token_id,
            batch_size=self.config.batch_size,
        )

    def _train_kl(self, prepared: PreparedDistillation) -> float:
        return mean_teacher_student_kl(
            prepared.model,
            [p.student for p in prepared.train_pairs],
            prepared.train_teacher,
            temperature=self.config.temperature,
            pad_token_id=prepared.pad_token_id,
            batch_size=self.config.batch_size,
        )

    def _drift(
        self, model: Any, tokenizer: Any, parent_adapter: Path | None, probes: Sequence[Example] | None
    ) -> float | None:
        """Mean KL(parent || student) on generic probes (the usual drift bound of the gate)."""
        if probes is None:
            probes = builtin_probe_examples(tokenizer, self.config.render)
        if not probes:
            return None
        trained = model.active_adapter
        if parent_adapter is not None:
            model.load_adapter(str(parent_adapter), adapter_name="parent")
            model.set_adapter(trained)
        parent = AdapterView(model, "parent" if parent_adapter is not None else None)
        return drift_kl(parent, AdapterView(model, trained), probes, batch_tokens=4096)


@dataclass(frozen=True)
class StudentTrainingResult:
    metrics: dict[str, float]
    losses: tuple[float, ...]
    stopped_reason: str


def _pair_batches(num_pairs: int, config: DistillConfig, generator: torch.Generator) -> list[list[int]]:
    """Pair indices per optimiser step: a fresh seeded order each epoch, `batch_size` pairs a step."""
    needed = config.max_steps or config.epochs * math.ceil(num_pairs / config.batch_size)
    steps: list[list[int]] = []
    while len(steps) < needed:
        order = torch.randperm(num_pairs, generator=generator).tolist()
        steps.extend(order[i : i + config.batch_size] for i in range(0, num_pairs, config.batch_size))
    return steps[:needed]


def _feedback_batches(examples: Sequence[Example], pad_token_id: int, batch_size: int) -> list[TokenBatch]:
    usable = [e for e in examples if e.num_target_tokens > 0]
    return [collate_students(usable[i : i + batch_size], pad_token_id) for i in range(0, len(usable), batch_size)]
