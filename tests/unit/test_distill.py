"""Distillation building blocks: prompts from memories, the KL (full and top-k), alignment, gap closure."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from training.distill import DistillConfig, DistillPlan, plan_distillation
from training.distill_data import (
    DistillPrompt,
    MemoryNote,
    conversation_prompts,
    memory_topic,
    prefix_messages_from_memories,
    probe_prompts,
    split_heldout,
    teacher_messages,
)
from training.distill_teacher import (
    DistillAlignmentError,
    NothingToDistill,
    TeacherTargets,
    assert_aligned,
    distill_kl_sum,
    gap_closure,
)
from training.distill_teacher import _teacher_rows as teacher_rows
from training.render import Example

KESTREL = MemoryNote("The deploy password for project Kestrel is 7-4-1-9", priority=1)
HERON = MemoryNote("Heron's on-call rotation: Ana, then Bo, then Cy")


def example(input_ids: list[int], labels: list[int]) -> Example:
    return Example(input_ids=input_ids, labels=labels, attention_mask=[1] * len(input_ids))


def test_prefix_lists_notes_by_priority_then_verbatim_turns():
    few_shot = MemoryNote(
        "", messages=({"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"})
    )
    prefix = prefix_messages_from_memories([HERON, KESTREL, few_shot])
    assert prefix[0]["role"] == "system"
    body = prefix[0]["content"].splitlines()
    assert body[1:] == [f"- {KESTREL.content}", f"- {HERON.content}"]
    assert prefix[1:] == [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]
    assert prefix_messages_from_memories([]) == []


def test_topics_and_probe_prompts():
    assert memory_topic(KESTREL.content) == "the deploy password for project Kestrel"
    assert memory_topic(HERON.content) == "Heron's on-call rotation"
    probes = probe_prompts([KESTREL, MemoryNote("x is y", topic="the thing")], ["Q: {topic}?", "{memory}!"])
    assert [p.messages[0]["content"] for p in probes] == [
        "Q: the deploy password for project Kestrel?",
        f"{KESTREL.content}!",
        "Q: the thing?",
        "x is y!",
    ]
    assert all(p.response is None and p.origin == "probe" for p in probes)


def test_conversation_prompts_keep_history_and_stored_replies():
    conversation = [
        {"role": "system", "content": "be brief"},
        {"role": "user", "content": "a"},
        {"role": "assistant", "content": "b"},
        {"role": "user", "content": "c"},
    ]
    prompts = conversation_prompts([conversation])
    assert [p.messages for p in prompts] == [
        ({"role": "user", "content": "a"},),
        ({"role": "user", "content": "c"},),
    ]
    assert [len(p.history) for p in prompts] == [1, 3]
    assert [p.response for p in prompts] == ["b", None]
    assert [p.response for p in conversation_prompts([conversation], use_stored_responses=False)] == [
        None,
        None,
    ]


def test_teacher_messages_are_memories_then_history_then_turn():
    prefix = prefix_messages_from_memories([KESTREL])
    prompt = conversation_prompts(
        [[{"role": "system", "content": "be brief"}, {"role": "user", "content": "pw?"}]]
    )[0]
    assert teacher_messages(prefix, prompt) == [
        *prefix,
        {"role": "system", "content": "be brief"},
        {"role": "user", "content": "pw?"},
    ]


def test_split_and_plan():
    prompts = [DistillPrompt(({"role": "user", "content": str(i)},)) for i in range(10)]
    train, heldout = split_heldout(prompts, 0.25, seed=3)
    assert len(heldout) == 2 and len(train) == 8 and not set(map(id, train)) & set(map(id, heldout))
    assert split_heldout(prompts, 0.25, seed=3) == (train, heldout)
    with pytest.raises(NothingToDistill):
        split_heldout(prompts[:1], 0.25, seed=0)
    with pytest.raises(NothingToDistill):
        plan_distillation([], [], DistillConfig())
    plan = plan_distillation([KESTREL, HERON], [], DistillConfig(probe_templates=("A {topic}", "B {topic}")))
    assert len(plan.train) + len(plan.heldout) == 4
    filled = plan.with_responses([f"r{i}" for i in range(4)])
    assert [p.response for p in (*filled.train, *filled.heldout)] == ["r0", "r1", "r2", "r3"]
    assert isinstance(filled, DistillPlan) and not filled.prompts_without_response()


def test_config_names_bad_fields():
    with pytest.raises(ValueError, match="topk.*temperature|temperature"):
        DistillConfig(topk=-1, temperature=0)
    with pytest.raises(ValueError, match="probe_templates"):
        DistillConfig(probe_templates=("no field",))


def reference_kl(teacher_logits: torch.Tensor, student_logits: torch.Tensor) -> float:
    p = F.softmax(teacher_logits, -1)
    return float((p * (F.log_softmax(teacher_logits, -1) - F.log_softmax(student_logits, -1))).sum())


def test_full_vocabulary_kl_matches_the_definition_and_is_zero_for_equal_models():
    torch.manual_seed(0)
    teacher_logits, student_logits = torch.randn(5, 50), torch.randn(5, 50)
    cached = teacher_rows(teacher_logits, torch.arange(5), topk=0, temperature=1.0)
    assert math.isclose(
        float(distill_kl_sum(student_logits, [cached], 1.0)),
        reference_kl(teacher_logits, student_logits),
        rel_tol=1e-5,
    )
    assert abs(float(distill_kl_sum(teacher_logits, [cached], 1.0))) < 1e-5
    hot = teacher_rows(teacher_logits, torch.arange(5), topk=0, temperature=2.0)
    expected = 4.0 * reference_kl(teacher_logits / 2, student_logits / 2)
    assert math.isclose(float(distill_kl_sum(student_logits, [hot], 2.0)), expected, rel_tol=1e-5)


def test_topk_kl_is_exact_at_full_k_and_a_lower_bound_below():
    torch.manual_seed(1)
    teacher_logits, student_logits = torch.randn(4, 40) * 3, torch.randn(4, 40)
    full = reference_kl(teacher_logits, student_logits)
    at_vocab = teacher_rows(teacher_logits, torch.arange(4), topk=40, temperature=1.0)
    assert math.isclose(float(distill_kl_sum(student_logits, [at_vocab], 1.0)), full, rel_tol=1e-4)
    top5 = teacher_rows(teacher_logits, torch.arange(4), topk=5, temperature=1.0)
    assert top5.probs.shape == (4, 5) and top5.token_ids.shape == (4, 5) and top5.rest_prob.shape == (4,)
    bucketed = float(distill_kl_sum(student_logits, [top5], 1.0))
    assert 0 < bucketed <= full + 1e-5  # merging outcomes into one bucket can only lower a KL
    assert abs(float(distill_kl_sum(teacher_logits, [top5], 1.0))) < 1e-5
    student = student_logits.clone().requires_grad_(True)
    distill_kl_sum(student, [top5], 1.0).backward()
    assert torch.isfinite(student.grad).all() and student.grad.abs().sum() > 0


def test_alignment_accepts_identical_response_tokens():
    teacher = example([1, 2, 3, 4, 9, 8, 7], [-100, -100, -100, -100, 9, 8, 7])
    student = example([3, 4, 9, 8, 7], [-100, -100, 9, 8, 7])
    assert_aligned([torch.tensor([9, 8, 7])], [student])
    assert_aligned(torch.tensor([9, 8, 7]), [student])
    del teacher


@pytest.mark.parametrize(
    ("input_ids", "labels", "reason"),
    [
        ([3, 4, 9, 8, 6], [-100, -100, 9, 8, 6], "response tokens differ"),
        ([3, 4, 4, 9, 8], [-100, -100, 4, 9, 8], "response tokens differ"),  # window shifted by one
        ([3, 4, 9, 8, 7], [-100, -100, -100, 9, 8], "labels differ"),  # labels shifted by one
        ([3, 4, 9, 8, 7, 7], [-100, -100, 9, 8, 7, 7], "response tokens differ"),  # one token more
        ([3, 4, 9, 8, 7], [-100, -100, 9, 8, 5], "labels differ"),
        ([3, 9, 4, 8, 7], [-100, 9, -100, 8, 7], "not contiguous"),
        ([3, 4, 9, 8, 7], [-100] * 5, "no predictable"),
    ],
)
def test_alignment_fires_on_misaligned_pairs(input_ids, labels, reason):
    with pytest.raises(DistillAlignmentError, match=reason):
        assert_aligned([torch.tensor([9, 8, 7])], [example(input_ids, labels)])


def test_alignment_assertion_is_not_stripped_by_python_O():
    assert issubclass(DistillAlignmentError, AssertionError)
    cached = TeacherTargets(torch.tensor([1]), torch.zeros(1, 3), torch.zeros(1))
    with pytest.raises(DistillAlignmentError):
        assert_aligned([cached.target_ids], [])


def test_gap_closure():
    assert gap_closure(2.0, 0.5) == 0.75
    assert gap_closure(2.0, 3.0) == -0.5
    with pytest.raises(NothingToDistill):
        gap_closure(0.0, 0.0)
    with pytest.raises(ValueError):
        gap_closure(math.nan, 1.0)


def test_cached_teacher_can_be_a_loss_target_after_inference_mode():
    """The teacher runs under inference mode; its cache must still work as a target with autograd."""
    from training.distill_teacher import precompute_teacher

    class Head(torch.nn.Module):  # a causal-LM-shaped stub: supervised_logits needs config + backbone
        def __init__(self) -> None:
            super().__init__()
            self.config = type("Config", (), {})()
            self.embed = torch.nn.Embedding(20, 8)
            self.lm_head = torch.nn.Linear(8, 20, bias=False)
            self.base_model = lambda input_ids, attention_mask, use_cache: (self.embed(input_ids),)

        def get_output_embeddings(self):
            return self.lm_head

    torch.manual_seed(0)
    model = Head()
    teacher = example([1, 2, 3, 4, 5], [-100, -100, 3, 4, 5])
    cached = precompute_teacher(model, [teacher], topk=0, temperature=1.0, pad_token_id=0)
    assert cached[0].probs.shape == (3, 20) and not cached[0].probs.is_inference()
    student_logits = torch.randn(3, 20, requires_grad=True)
    distill_kl_sum(student_logits, cached, 1.0).backward()
    assert student_logits.grad is not None
