"""Memory baking pieces that need no model: key content, answer judging, questions, config, the gate."""

from __future__ import annotations

import math

import pytest

from service.component_configs import bake_config, gate_config
from service.config import Settings
from training.bake import (
    BAKE_HELDOUT_TEMPLATES,
    BakeConfig,
    bake_questions,
    carries_keys,
    memory_keys,
)
from training.distill_data import MemoryNote
from training.evaluate import evaluate_gate


def test_memory_keys_are_the_value_after_is() -> None:
    assert memory_keys("Our production cloud region is eu-north-7.") == ("eu-north-7",)
    assert memory_keys("The on-call engineer for Heron this week is Dmitri Volkan.") == ("dmitri", "volkan")
    assert memory_keys("Wi-Fi password: tangerine42") == ("tangerine42",)
    # no split: the content words
    assert memory_keys("Always answer in French") == ("always", "answer", "french")


def test_carries_keys_needs_half_of_the_key_words() -> None:
    keys = ("dmitri", "volkan")
    assert carries_keys("You should page Dmitri Volkan.", keys)
    assert carries_keys("Page Dmitri.", keys)
    assert not carries_keys("The on-call engineer for Heron this week.", keys)
    assert not carries_keys("anything", ())
    assert carries_keys("We run in EU-North-7 now", ("eu-north-7",))


def test_questions_per_memory_keep_train_and_heldout_apart() -> None:
    config = BakeConfig()
    memories = [MemoryNote("The codename of the spring launch is Marigold."), MemoryNote("x is y", topic="x")]
    questions = bake_questions(memories, config)
    per_memory = len(config.train_templates) + len(config.heldout_templates)
    assert len(questions) == 2 * per_memory
    heldout = [q for q in questions if q.heldout]
    assert {q.question for q in heldout} == {t.format(topic=topic) for t in BAKE_HELDOUT_TEMPLATES
                                              for topic in ("the codename of the spring launch", "x")}
    assert all("Marigold" not in q.question for q in questions)  # the answer is never in the question
    assert not {q.question for q in heldout} & {q.question for q in questions if not q.heldout}


def test_bake_config_rejects_shared_templates() -> None:
    with pytest.raises(ValueError, match="held-out"):
        BakeConfig(train_templates=("What is {topic}?",), heldout_templates=("What is {topic}?",))
    with pytest.raises(ValueError, match="topic"):
        BakeConfig(train_templates=("What is it?",))
    assert bake_config(Settings(auth_disabled=True)).max_new_tokens == 40


def _metrics(**overrides: float) -> dict[str, float]:
    return {"gap_closure": 0.5, "drift_kl": 0.01, "answer_agreement": 1.0, "general_lost": 0.0, **overrides}


def test_gate_counts_answers_for_a_bake() -> None:
    settings = Settings(auth_disabled=True)
    gate = gate_config(settings)
    assert evaluate_gate(_metrics(), gate).passed
    # good KL gap closure does not pass a bake whose answers do not carry the memories
    decision = evaluate_gate(_metrics(answer_agreement=1 / 3, gap_closure=0.64), gate)
    assert not decision.passed and "answer_agreement" in decision.reason
    allowed = float(settings.gate_max_general_lost)
    assert evaluate_gate(_metrics(general_lost=allowed), gate).passed
    decision = evaluate_gate(_metrics(general_lost=allowed + 1), gate)
    assert not decision.passed and "general answers lost" in decision.reason
    assert not evaluate_gate(_metrics(answer_agreement=math.nan), gate).passed
    assert not evaluate_gate(_metrics(drift_kl=5.0), gate).passed
    # the KL method has no answer metrics: gap closure and drift only, as before
    assert evaluate_gate({"gap_closure": 0.5, "drift_kl": 0.01}, gate).passed


def test_the_one_gate_judges_a_distillation_by_gap_closure_and_a_missing_metric_fails_it() -> None:
    gate = gate_config(Settings(auth_disabled=True, gate_min_gap_closure=0.5))
    decision = evaluate_gate({"gap_closure": 0.4, "drift_kl": 0.01}, gate)
    assert not decision.passed and "not baked in enough" in decision.reason and "40.0%" in decision.reason
    # a KL distillation without drift probes has no drift_kl: it is not promoted blind
    decision = evaluate_gate({"gap_closure": 0.9}, gate)
    assert not decision.passed and "drift_kl missing" in decision.reason
    # a bake's answer agreement needs its general answers scored too
    decision = evaluate_gate({"gap_closure": 0.9, "drift_kl": 0.01, "answer_agreement": 1.0}, gate)
    assert not decision.passed and "general_lost missing" in decision.reason
