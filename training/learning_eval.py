"""Measuring what an online update teaches and what it breaks, on a real model, by greedy answers.

Owns the fact-set format (a taught question and answer, rephrasings never trained on, the key
content a right answer carries; general questions with keys), `LearningHarness`, which trains one
update with a given `TrainConfig` on a resident base (optionally warm-started from an earlier
update, with replayed items) and scores exact / rephrased / general accuracy plus drift, and the
base model's anchor answers. Used by bench/learning.py and the slow learning tests; knows nothing
of the database or the service.
"""

from __future__ import annotations

import json
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from training.anchor_cache import anchor_answers
from training.augment import MAX_AUGMENTED_ITEMS, question_variants
from training.bake import BakeConfig, MemoryBaker
from training.behaviour import first_sentence
from training.distill_data import MemoryNote
from training.evaluate import AdapterView, builtin_probe_examples, drift_kl
from training.generate import answer_has_keys, greedy_answers, user_prompt
from training.model_loading import ResidentBaseModel
from training.probes import anchor_examples, prompt_anchor_pairs
from training.render import Example, RenderConfig, render_example
from training.trainer import LoraTrainer, TrainConfig

__all__ = [
    "BakeScore",
    "Fact",
    "GeneralQuestion",
    "LearningHarness",
    "MemoryCase",
    "UpdateScore",
    "load_fact_set",
    "load_memory_set",
]


@dataclass(frozen=True)
class Fact:
    question: str
    answer: str
    rephrasings: tuple[str, ...]
    keys: tuple[str, ...]


@dataclass(frozen=True)
class GeneralQuestion:
    question: str
    keys: tuple[str, ...]


def load_fact_set(path: Path) -> tuple[list[Fact], list[GeneralQuestion]]:
    data = json.loads(Path(path).read_text(encoding="utf-8"))
    facts = [Fact(f["question"], f["answer"], tuple(f["rephrasings"]), tuple(f["keys"])) for f in data["facts"]]
    general = [GeneralQuestion(g["question"], tuple(g["keys"])) for g in data["general"]]
    return facts, general


@dataclass(frozen=True)
class MemoryCase:
    """A memory, questions about it phrased unlike its text, and the key content of a right answer."""

    content: str
    questions: tuple[str, ...]
    keys: tuple[str, ...]


def load_memory_set(path: Path) -> list[MemoryCase]:
    data = json.loads(Path(path).read_text(encoding="utf-8"))
    return [MemoryCase(m["content"], tuple(m["questions"]), tuple(m["keys"])) for m in data["memories"]]


@dataclass
class BakeScore:
    """Answers WITHOUT the memories in context after a bake: per memory, whether most of its
    questions were answered right; general answers kept; the bake's own metrics."""

    memories_right: int
    memories_total: int
    questions_right: int
    questions_total: int
    general: int
    general_total: int
    metrics: dict[str, float]
    answers: dict[str, str] = field(default_factory=dict)
    report: dict[str, Any] = field(default_factory=dict)

    def row(self) -> dict[str, Any]:
        m = self.metrics
        return {
            "memories": f"{self.memories_right}/{self.memories_total}",
            "questions": f"{self.questions_right}/{self.questions_total}",
            "general": f"{self.general}/{self.general_total}",
            "answer_agreement": round(m.get("answer_agreement", float("nan")), 3),
            "gap_closure": round(m.get("gap_closure", float("nan")), 3), "drift_kl": round(m["drift_kl"], 4),
            "steps": int(m["steps"]), "seconds": round(m["train_seconds"], 1),
            "cache_kb": round(m["teacher_cache_bytes"] / 1024, 1),
        }


@dataclass
class UpdateScore:
    exact: int
    rephrased: int
    general: int
    exact_total: int
    rephrased_total: int
    general_total: int
    drift_kl: float
    train_seconds: float
    steps: int
    answers: dict[str, str] = field(default_factory=dict)

    def row(self) -> dict[str, Any]:
        return {
            "exact": f"{self.exact}/{self.exact_total}", "rephrased": f"{self.rephrased}/{self.rephrased_total}",
            "general": f"{self.general}/{self.general_total}", "drift_kl": round(self.drift_kl, 4),
            "train_s": round(self.train_seconds, 1), "steps": self.steps,
        }


class LearningHarness:
    """One resident base model, its tokenizer and the base's anchor answers, for many updates."""

    def __init__(self, model_dir: Path, *, device: str = "cpu") -> None:
        from transformers import AutoTokenizer

        self.model_dir = Path(model_dir)
        self.tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
        self.resident = ResidentBaseModel(self.model_dir, device=device)
        self.render_config = RenderConfig()
        self._anchor_answers: list[str] | None = None
        self._general_base: dict[str, str] = {}

    # --- data ------------------------------------------------------------------------------------
    def example(self, question: str, answer: str) -> Example:
        example = render_example(self.tokenizer, {"messages": user_prompt(question), "continuation": answer},
                                 self.render_config)
        if example is None:
            raise ValueError(f"empty target for {question!r}")
        return example

    def anchors(self) -> list[Example]:
        if self._anchor_answers is None:
            with self.resident.lend() as holder:
                self._anchor_answers = anchor_answers(self.model_dir, lambda: holder.model, self.tokenizer)
        return anchor_examples(self.tokenizer, prompt_anchor_pairs(self._anchor_answers), self.render_config)

    def base_right(self, general: Sequence[GeneralQuestion]) -> list[GeneralQuestion]:
        """The general questions the base model answers right in its first sentence."""
        missing = [g.question for g in general if g.question not in self._general_base]
        if missing:
            with self.resident.lend() as holder:
                answers = greedy_answers(holder.model, self.tokenizer, [user_prompt(q) for q in missing],
                                         max_new_tokens=32)
            self._general_base.update(zip(missing, answers, strict=True))
        return [g for g in general if answer_has_keys(first_sentence(self._general_base[g.question]), g.keys)]

    # --- one update -----------------------------------------------------------------------------
    def update(
        self,
        config: TrainConfig,
        new: Sequence[Fact],
        *,
        out_dir: Path,
        parent_adapter: Path | None = None,
        replay: Sequence[Fact] = (),
        judge: Sequence[Fact] | None = None,
        general: Sequence[GeneralQuestion] = (),
        use_anchors: bool = True,
        augment: bool = True,
        ask_rephrasings: bool = True,
    ) -> UpdateScore:
        """Train `new` (+ its framed question variants when `augment`, + `replay`) from
        `parent_adapter` into `out_dir`, then score on `judge` (default: `new`; their rephrasings
        too unless `ask_rephrasings` is off) and `general`; drift is KL(base || update) on the
        built-in probes."""
        examples = [self.example(f.question, f.answer) for f in new]
        if augment and len(new) <= MAX_AUGMENTED_ITEMS:
            for fact in new:
                item = {"messages": user_prompt(fact.question), "continuation": fact.answer}
                examples += [render_example(self.tokenizer, v, self.render_config) for v in question_variants(item, 1)]
        must_learn = len(examples)
        examples += [self.example(f.question, f.answer) for f in replay]
        anchors = self.anchors() if use_anchors and config.anchor_weight > 0 else []
        judge = list(new if judge is None else judge)
        with self.resident.lend() as holder:
            started = time.perf_counter()
            with tempfile.TemporaryDirectory() as scratch:
                result = LoraTrainer(config).train(
                    base_model=self.model_dir, examples=examples, parent_adapter=parent_adapter,
                    out_dir=Path(scratch) / "adapter", anchors=anchors, must_learn=must_learn, base=holder.model,
                )
                model = holder.model = result.model
                train_seconds = time.perf_counter() - started
                out_dir.parent.mkdir(parents=True, exist_ok=True)
                model.save_pretrained(str(out_dir), safe_serialization=True)
            asked = [f for f in judge if ask_rephrasings]
            prompts = [f.question for f in judge] + [r for f in asked for r in f.rephrasings]
            prompts += [g.question for g in general]
            answers = greedy_answers(model, self.tokenizer, [user_prompt(q) for q in prompts], max_new_tokens=40)
            probes = builtin_probe_examples(self.tokenizer, self.render_config)
            drift = drift_kl(AdapterView(model, None), AdapterView(model, "default"), probes)
        by_question = dict(zip(prompts, answers, strict=True))
        exact = sum(answer_has_keys(by_question[f.question], f.keys) for f in judge)
        rephrased = sum(answer_has_keys(by_question[r], f.keys) for f in asked for r in f.rephrasings)
        general_right = sum(answer_has_keys(first_sentence(by_question[g.question]), g.keys) for g in general)
        return UpdateScore(
            exact=exact, rephrased=rephrased, general=general_right, exact_total=len(judge),
            rephrased_total=sum(len(f.rephrasings) for f in asked), general_total=len(general),
            drift_kl=drift, train_seconds=train_seconds, steps=int(result.metrics["steps"]), answers=by_question,
        )

    # --- one bake -------------------------------------------------------------------------------
    def bake(
        self,
        config: TrainConfig,
        cases: Sequence[MemoryCase],
        *,
        out_dir: Path,
        bake_config: BakeConfig | None = None,
        parent_adapter: Path | None = None,
        replay_memories: Sequence[MemoryCase] = (),
        judge: Sequence[MemoryCase] | None = None,
        general: Sequence[GeneralQuestion] = (),
        use_anchors: bool = True,
    ) -> BakeScore:
        """Bake `cases`' memories (teacher: the parent with them in context) from `parent_adapter`
        into `out_dir`, then ask `judge` (default: `cases`) questions and `general` ones WITHOUT
        the memories. A memory counts as answered when at least half its questions are right."""
        anchors = self.anchors() if use_anchors and config.anchor_weight > 0 else []
        judge = list(cases if judge is None else judge)
        probes = builtin_probe_examples(self.tokenizer, self.render_config)
        with self.resident.lend() as holder:
            result = MemoryBaker(bake_config or BakeConfig(), config).run(
                base=holder.model, base_model=self.model_dir, tokenizer=self.tokenizer,
                memories=[MemoryNote(c.content) for c in cases], parent_adapter=parent_adapter,
                out_dir=out_dir,
                anchors=anchors, replay_memories=[MemoryNote(c.content) for c in replay_memories],
                drift_probes=probes,
            )
            model = holder.model = result.model
            model.set_adapter("default")
            prompts = [q for c in judge for q in c.questions] + [g.question for g in general]
            answers = greedy_answers(model, self.tokenizer, [user_prompt(q) for q in prompts],
                                     max_new_tokens=40)
        by_question = dict(zip(prompts, answers, strict=True))
        per_memory = [sum(answer_has_keys(by_question[q], c.keys) for q in c.questions) for c in judge]
        return BakeScore(
            memories_right=sum(right * 2 >= len(c.questions)
                               for right, c in zip(per_memory, judge, strict=True)),
            memories_total=len(judge), questions_right=sum(per_memory),
            questions_total=sum(len(c.questions) for c in judge),
            general=sum(answer_has_keys(first_sentence(by_question[g.question]), g.keys) for g in general),
            general_total=len(general), metrics=result.metrics, answers=by_question, report=result.report,
        )
