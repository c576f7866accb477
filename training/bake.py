"""Memory baking judged by answers: the online recipe trained on the teacher's answers about memories.

Owns the bake questions (several phrasings per memory from templates over its topic, train and
held-out kept apart), the key content of a memory (the words after its "X is ..."), the teacher's
greedy answers WITH the memories in context (or given, e.g. from vLLM), and `MemoryBaker`, which
trains the student (no memories) with `LoraTrainer` on those answers (CE + KL anchor to the parent,
stop when learnt, replayed online items mixed in) and scores it on held-out questions by answer
agreement with the teacher, by KL gap closure (top-k teacher cache) and by drift and general
answers. Knows nothing of the database, the queue, HTTP or vLLM.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from training.behaviour import _normalised, behaviour_report
from training.distill_data import MemoryNote, memory_topic, prefix_messages_from_memories
from training.distill_teacher import (
    NothingToDistill,
    TeacherTargets,
    gap_closure,
    mean_teacher_student_kl,
    precompute_teacher,
)
from training.evaluate import AdapterView, drift_kl
from training.generate import greedy_answers, user_prompt
from training.model_loading import strip_adapters
from training.probes import GeneralProbe
from training.render import Example, RenderConfig, RenderError, render_distillation_pair, render_example
from training.trainer import LoraTrainer, TrainConfig

__all__ = [
    "BAKE_HELDOUT_TEMPLATES",
    "BAKE_TRAIN_TEMPLATES",
    "BakeConfig",
    "BakeQuestion",
    "BakeResult",
    "MemoryBaker",
    "bake_questions",
    "carries_keys",
    "memory_keys",
]

BAKE_TRAIN_TEMPLATES = (
    "What is {topic}?",
    "Do you know {topic}?",
    "Tell me {topic}, please.",
    "Quick question: what's {topic}?",
    "I need {topic}. What is it?",
    "Can you remind me of {topic}?",
)
BAKE_HELDOUT_TEMPLATES = (
    "Sorry, I forgot {topic}. What was it again?",
    "Could you tell me {topic}?",
)
_KEY_SPLIT = ("is", "are", "was", "were", "equals", "means")
_STOPWORDS = frozenset({
    "a", "an", "the", "of", "and", "or", "in", "on", "at", "to", "for", "is", "are", "was", "were", "be",
    "by", "with", "this", "that", "these", "those", "it", "its", "our", "your", "my", "their", "his", "her",
    "we", "you", "they", "i", "from", "as", "every", "each", "all",
})


@dataclass(frozen=True)
class BakeConfig:
    """Knobs of one bake (built by the service from Settings `distill_*`)."""

    train_templates: tuple[str, ...] = BAKE_TRAIN_TEMPLATES
    heldout_templates: tuple[str, ...] = BAKE_HELDOUT_TEMPLATES
    max_new_tokens: int = 40  # teacher, parent and candidate answers
    kl_topk: int = 64  # teacher tokens kept per held-out position for gap closure
    teacher_fallback: bool = True  # a teacher answer without the memory's key content -> the memory's text
    render: RenderConfig = field(default_factory=RenderConfig)

    def __post_init__(self) -> None:
        for name in ("train_templates", "heldout_templates"):
            templates = getattr(self, name)
            if not templates or not all("{topic}" in t for t in templates):
                raise ValueError(f"BakeConfig.{name} must be non-empty templates with a {{topic}} field")
        if set(self.train_templates) & set(self.heldout_templates):
            raise ValueError("BakeConfig: held-out templates must differ from the train templates")
        if self.max_new_tokens < 1 or self.kl_topk < 1:
            raise ValueError("BakeConfig.max_new_tokens and kl_topk must be >= 1")


@dataclass(frozen=True)
class BakeQuestion:
    memory: int  # index into the memories
    question: str
    heldout: bool


def memory_keys(content: str) -> tuple[str, ...]:
    """The key content of a memory: the normalised words after its first " is " (or ":"), without
    stop words ("Our production region is eu-west-3" -> ("eu-west-3",)); the whole text's content
    words when it has no such split."""
    words = _normalised(content).split()
    value = words
    for index, word in enumerate(words):
        if word in _KEY_SPLIT and index > 0:
            value = words[index + 1 :]
            break
    if ":" in content and value is words:
        value = _normalised(content.split(":", 1)[1]).split()
    keys = [w for w in value if w not in _STOPWORDS and (len(w) > 1 or w.isdigit())]
    return tuple(dict.fromkeys(keys))


def carries_keys(answer: str, keys: Sequence[str]) -> bool:
    """The answer carries at least half of the keys (normalised words)."""
    if not keys:
        return False
    said = set(_normalised(answer).split())
    return sum(key in said for key in keys) * 2 >= len(keys)


def bake_questions(memories: Sequence[MemoryNote], config: BakeConfig) -> list[BakeQuestion]:
    """Every (memory, template) question; held-out ones come from the held-out templates."""
    questions = []
    for index, memory in enumerate(memories):
        topic = memory.topic or memory_topic(memory.content)
        for heldout, templates in ((False, config.train_templates), (True, config.heldout_templates)):
            questions.extend(BakeQuestion(index, t.format(topic=topic), heldout) for t in templates)
    return questions


@dataclass(frozen=True)
class BakeResult:
    adapter_dir: Path
    metrics: dict[str, float]  # answer_agreement, gap_closure, drift_kl, general_lost, train_*, ...
    report: dict[str, Any]  # behaviour report: teacher, parent and candidate answers side by side
    model: Any  # the trained PeftModel (adapter `default`, parent as `parent`); the caller strips it
    loss_history: tuple[float, ...] = ()  # the student's loss per optimiser step


class MemoryBaker:
    """Recipe: teacher answers (parent + memories in context) -> student trained by the online recipe
    on them -> held-out answer agreement, KL gap closure, drift, general answers -> adapter saved."""

    def __init__(self, config: BakeConfig, train: TrainConfig) -> None:
        self.config = config
        self.train_config = train

    def run(
        self,
        *,
        base: Any,
        base_model: Path,
        tokenizer: Any,
        memories: Sequence[MemoryNote],
        parent_adapter: Path | None,
        out_dir: Path,
        anchors: Sequence[Example] = (),
        replay: Sequence[Example] = (),
        replay_memories: Sequence[MemoryNote] = (),
        drift_probes: Sequence[Example] = (),
        general: Sequence[GeneralProbe] = (),
        parent_general_answers: Sequence[str] | None = None,
        teacher_answers: Callable[[list[list[dict[str, Any]]]], list[str] | None] | None = None,
        on_progress: Callable[[dict[str, Any]], None] | None = None,
        should_stop: Callable[[], bool] | None = None,
    ) -> BakeResult:
        """Bake `memories` into a new adapter in `out_dir`, warm-started from `parent_adapter`.

        `base`: the loaded bare base model (a `ResidentBaseModel`'s). `replay_memories`: memories
        baked earlier that stay in the teacher's context and are replayed (never a retired one).
        `teacher_answers(conversations)`: answers from elsewhere (vLLM) or None to generate here."""
        started = time.perf_counter()
        config = self.config
        tokens = config.max_new_tokens
        progress = on_progress or (lambda _p: None)
        memories = [m for m in memories if m.content.strip()]
        if not memories:
            raise NothingToDistill("no active memory with content: nothing to bake")
        everything = [*memories, *[m for m in replay_memories if m.content.strip()]]
        prefix = prefix_messages_from_memories(everything)
        questions = bake_questions(everything, config)
        keys = [memory_keys(m.content) for m in everything]
        teacher_views = [[*prefix, *user_prompt(q.question)] for q in questions]

        # --- teacher (parent + memories) and parent (no memories) answers, held-out KL before ---
        progress({"phase": "teacher", "questions": len(questions)})
        clock = time.perf_counter()
        teacher = self._with_parent(base, parent_adapter)
        given = teacher_answers(teacher_views) if teacher_answers is not None else None
        source = "given" if given is not None and len(given) == len(questions) else "local"
        if source == "local":
            given = greedy_answers(teacher, tokenizer, teacher_views, max_new_tokens=tokens)
        heldout = [i for i, q in enumerate(questions) if q.heldout and q.memory < len(memories)]
        heldout_prompts = [user_prompt(questions[i].question) for i in heldout]
        parent_answers = greedy_answers(teacher, tokenizer, heldout_prompts, max_new_tokens=tokens)
        targets, fallbacks = [], 0
        for question, answer in zip(questions, given, strict=True):
            wanted = keys[question.memory]
            if config.teacher_fallback and wanted and not carries_keys(answer, wanted):
                answer, fallbacks = everything[question.memory].content.strip(), fallbacks + 1
            targets.append(answer)
        pairs, cache = self._heldout_cache(teacher, tokenizer, prefix, [questions[i] for i in heldout],
                                           [targets[i] for i in heldout])
        pad = self._pad_id(teacher)
        kl_before = mean_teacher_student_kl(teacher, [p.student for p in pairs], cache, temperature=1.0,
                                            pad_token_id=pad) if pairs else math.nan
        teacher_seconds = time.perf_counter() - clock
        base = strip_adapters(teacher)

        # --- student: the online recipe on the teacher's answers (+ replayed memories and items) ---
        examples = [self._example(tokenizer, q.question, t) for q, t in zip(questions, targets, strict=True)
                    if not q.heldout]
        new = [e for e, q in zip(examples, [q for q in questions if not q.heldout], strict=True)
               if e is not None and q.memory < len(memories)]
        old = [e for e, q in zip(examples, [q for q in questions if not q.heldout], strict=True)
               if e is not None and q.memory >= len(memories)]
        if not new:
            raise NothingToDistill("no bake question rendered a training example")
        progress({"phase": "train", "examples": len(new), "replay": len(old) + len(replay)})
        result = LoraTrainer(self.train_config).train(
            base_model=Path(base_model), examples=[*new, *old, *replay], parent_adapter=parent_adapter,
            out_dir=Path(out_dir), anchors=anchors, must_learn=len(new), base=base,
            on_progress=lambda p: progress({"phase": "train", **p}), should_stop=should_stop,
        )
        model = result.model

        # --- evaluation: held-out answers, KL after, drift, general answers ---
        progress({"phase": "evaluate"})
        clock = time.perf_counter()
        kl_after = mean_teacher_student_kl(model, [p.student for p in pairs], cache, temperature=1.0,
                                           pad_token_id=pad) if pairs else math.nan
        parent_name = None
        if parent_adapter is not None:
            model.load_adapter(str(parent_adapter), adapter_name="parent")
            model.set_adapter("default")
            parent_name = "parent"
        candidate_answers = greedy_answers(model, tokenizer, heldout_prompts, max_new_tokens=tokens)
        drift = drift_kl(AdapterView(model, parent_name), AdapterView(model, "default"), drift_probes) \
            if drift_probes else 0.0
        progress({"phase": "report"})
        report = behaviour_report(model, tokenizer, parent_adapter=parent_name, candidate_adapter="default",
                                  taught=[], probes=general, parent_probe_answers=parent_general_answers,
                                  max_new_tokens=tokens)
        rows = []
        for i, before, after in zip(heldout, parent_answers, candidate_answers, strict=True):
            question, memory_keys_ = questions[i], keys[questions[i].memory]
            teacher_said = given[i]
            rows.append({
                "kind": "memory", "memory": question.memory,
                "memory_text": everything[question.memory].content,
                "question": question.question, "keys": list(memory_keys_), "expected": targets[i],
                "teacher": teacher_said, "parent": before, "candidate": after,
                "teacher_right": carries_keys(teacher_said, memory_keys_),
                "parent_right": carries_keys(before, memory_keys_),
                "candidate_right": carries_keys(after, memory_keys_),
            })
        report["taught"] = rows
        summary = report["summary"]
        judged = [row for row in rows if row["teacher_right"]] or rows
        agreement = sum(row["candidate_right"] for row in judged) / len(judged) if judged else 0.0
        parent_agreement = sum(row["parent_right"] for row in judged) / len(judged) if judged else 0.0
        summary.update({
            "taught_total": len(rows), "taught_right": sum(row["candidate_right"] for row in rows),
            "teacher_right": sum(row["teacher_right"] for row in rows),
            "parent_right": sum(row["parent_right"] for row in rows),
            "answer_agreement": round(agreement, 4),
        })
        metrics = {key: float(value) for key, value in result.metrics.items()}
        metrics.update({
            "answer_agreement": agreement, "parent_answer_agreement": parent_agreement,
            "answer_gap_closure": gap_closure(1.0 - parent_agreement, 1.0 - agreement)
            if parent_agreement < 1.0 else 1.0,
            "kl_before": kl_before, "kl_after": kl_after,
            "gap_closure": gap_closure(kl_before, kl_after) if pairs else math.nan,
            "drift_kl": drift, "heldout_questions": float(len(rows)), "train_pairs": float(len(new)),
            "replay_examples": float(len(old) + len(replay)), "teacher_fallbacks": float(fallbacks),
            "teacher_from_given": 1.0 if source == "given" else 0.0,
            "teacher_cache_bytes": float(sum(t.nbytes for t in cache)), "teacher_seconds": teacher_seconds,
            "eval_seconds": time.perf_counter() - clock, "train_seconds": time.perf_counter() - started,
        })
        for key in ("general_right", "general_lost", "general_parent_right", "general_total"):
            metrics[key] = float(summary[key])
        return BakeResult(Path(out_dir), metrics, report, model, tuple(result.loss_history))

    # --- pieces ----------------------------------------------------------------------------------
    def _with_parent(self, base: Any, parent_adapter: Path | None) -> Any:
        """`base` with the parent adapter on it (frozen), or a zero LoRA standing for the base."""
        from peft import PeftModel, get_peft_model

        if parent_adapter is not None:
            model = PeftModel.from_pretrained(base, str(parent_adapter), is_trainable=False)
        else:
            model = get_peft_model(base, self.train_config.lora_config())
        return model.eval()

    @staticmethod
    def _pad_id(model: Any) -> int:
        pad = model.config.pad_token_id
        return 0 if pad is None else pad

    def _example(self, tokenizer: Any, question: str, answer: str) -> Example | None:
        try:
            example = render_example(tokenizer, {"messages": user_prompt(question), "continuation": answer},
                                     self.config.render)
        except RenderError:
            return None
        return example if example is not None and example.num_target_tokens > 0 else None

    def _heldout_cache(
        self,
        teacher: Any,
        tokenizer: Any,
        prefix: Sequence[Mapping[str, Any]],
        questions: Sequence[BakeQuestion],
        answers: Sequence[str],
    ) -> tuple[list[Any], list[TeacherTargets]]:
        """Teacher/student pairs of the held-out questions and the teacher's top-k on them."""
        pairs = []
        for question, answer in zip(questions, answers, strict=True):
            try:
                pairs.append(render_distillation_pair(
                    tokenizer, prefix_messages=list(prefix), messages=user_prompt(question.question),
                    response=answer, config=self.config.render,
                ))
            except RenderError:
                continue
        if not pairs:
            return [], []
        with torch.inference_mode():
            cache = precompute_teacher(teacher, [p.teacher for p in pairs], topk=self.config.kl_topk,
                                       temperature=1.0, pad_token_id=self._pad_id(teacher))
        return pairs, cache
