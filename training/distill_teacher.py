"""The teacher side of memory distillation: what the student is trained towards, and how far it is.

Owns the alignment check of teacher and student response tokens, the teacher cache
(`precompute_teacher`: the teacher's probabilities computed once, full vocabulary or top-k plus a
rest-mass bucket), the KL loss with its per-batch alignment check, the mean teacher-student KL,
gap closure, and the two errors of a distillation that cannot run. Knows nothing of memories,
prompts, the recipe, the database or vLLM.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from training.collate import pad_collate
from training.render import Example
from training.token_nll import IGNORE_INDEX, TokenBatch, supervised_logits

__all__ = [
    "DistillAlignmentError",
    "NothingToDistill",
    "TeacherTargets",
    "assert_aligned",
    "check_batch_alignment",
    "collate_students",
    "distill_kl_sum",
    "gap_closure",
    "mean_teacher_student_kl",
    "precompute_teacher",
    "response_target_ids",
]


class DistillAlignmentError(AssertionError):
    """The response tokens of a teacher/student pair differ or are not where the cache expects them."""


class NothingToDistill(ValueError):
    """No memories, or too few prompts to train and hold out probes: there is no gap to close."""


def response_target_ids(example: Example) -> torch.Tensor:
    labels = torch.tensor(example.labels[1:], dtype=torch.long)
    return labels[labels != IGNORE_INDEX]


def assert_aligned(
    teacher_target_ids: torch.Tensor | Sequence[torch.Tensor], students: Sequence[Example]
) -> None:
    """Raise DistillAlignmentError unless each student's response tokens are exactly the teacher's:
    same ids in the same order, each label equal to the input token it sits on, one contiguous span."""
    expected = (
        [teacher_target_ids] if isinstance(teacher_target_ids, torch.Tensor) else list(teacher_target_ids)
    )
    if len(expected) != len(students):
        raise DistillAlignmentError(f"{len(expected)} teacher targets for {len(students)} students")
    for index, (teacher_ids, student) in enumerate(zip(expected, students, strict=True)):
        labels = student.labels
        positions = [t for t, label in enumerate(labels) if label != IGNORE_INDEX]
        if not positions or positions[0] == 0:
            raise DistillAlignmentError(f"pair {index}: the student has no predictable response token")
        if positions != list(range(positions[0], positions[-1] + 1)):
            raise DistillAlignmentError(f"pair {index}: the student's response span is not contiguous")
        if any(labels[t] != student.input_ids[t] for t in positions):
            raise DistillAlignmentError(f"pair {index}: student labels differ from the tokens they sit on")
        student_ids = torch.tensor([labels[t] for t in positions], dtype=torch.long)
        if student_ids.shape != teacher_ids.shape or not torch.equal(student_ids, teacher_ids.cpu()):
            raise DistillAlignmentError(
                f"pair {index}: response tokens differ (teacher {teacher_ids.numel()} tokens "
                f"{teacher_ids[:8].tolist()}..., student {student_ids.numel()} tokens {student_ids[:8].tolist()}...)"
            )


@dataclass(frozen=True)
class TeacherTargets:
    """The teacher's next-token distribution at each response token of one pair, cached on CPU.

    Full vocabulary: `probs` is `[n, V]`. Top-k: `probs` is `[n, k]` over `token_ids` `[n, k]` and
    `rest_prob` `[n]` is the mass outside the top-k. `neg_entropy` `[n]` is sum(p log p) over the
    same buckets, so KL = neg_entropy - sum(p log q) needs no teacher log/exp per training step."""

    target_ids: torch.Tensor  # [n] the response tokens these rows predict
    probs: torch.Tensor
    neg_entropy: torch.Tensor
    token_ids: torch.Tensor | None = None
    rest_prob: torch.Tensor | None = None

    @property
    def num_tokens(self) -> int:
        return int(self.target_ids.numel())

    @property
    def nbytes(self) -> int:
        tensors = (self.target_ids, self.probs, self.neg_entropy, self.token_ids, self.rest_prob)
        return sum(t.numel() * t.element_size() for t in tensors if t is not None)


def collate_students(examples: Sequence[Example], pad_token_id: int) -> TokenBatch:
    return TokenBatch.from_padded(pad_collate(list(examples), pad_token_id))


def _teacher_rows(
    logits: torch.Tensor, targets: torch.Tensor, topk: int, temperature: float
) -> TeacherTargets:
    logprobs = torch.log_softmax(logits.float() / temperature, dim=-1)
    probs = logprobs.exp()
    if topk == 0:
        neg_entropy = torch.xlogy(probs, probs).sum(-1)
        return TeacherTargets(targets.cpu().clone(), probs.cpu(), neg_entropy.cpu())
    top_probs, top_ids = probs.topk(min(topk, probs.shape[-1]), dim=-1)
    rest = (1.0 - top_probs.sum(-1)).clamp_min(0.0)
    neg_entropy = torch.xlogy(top_probs, top_probs).sum(-1) + torch.xlogy(rest, rest)
    return TeacherTargets(targets.cpu(), top_probs.cpu(), neg_entropy.cpu(), top_ids.cpu(), rest.cpu())


def precompute_teacher(
    model: torch.nn.Module,
    teachers: Sequence[Example],
    *,
    topk: int,
    temperature: float,
    pad_token_id: int,
    batch_size: int = 8,
) -> list[TeacherTargets]:
    """Run the teacher once (inference mode) over every teacher sequence and keep its response-token
    distributions on CPU, as ordinary tensors (inference tensors cannot be loss targets later)."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    cached: list[TeacherTargets] = []
    try:
        for start in range(0, len(teachers), batch_size):
            group = teachers[start : start + batch_size]
            batch = collate_students(group, pad_token_id).to(device)
            with torch.inference_mode():
                logits = supervised_logits(model, batch)
            with torch.no_grad():
                logits, targets = logits.clone(), batch.targets.clone()
                offset = 0
                for example in group:
                    n = len(response_target_ids(example))
                    rows = slice(offset, offset + n)
                    cached.append(_teacher_rows(logits[rows], targets[rows], topk, temperature))
                    offset += n
    finally:
        model.train(was_training)
    return cached


def distill_kl_sum(
    student_logits: torch.Tensor, teacher: Sequence[TeacherTargets], temperature: float
) -> torch.Tensor:
    """Sum over response tokens of KL(teacher || student), times T^2 (float32 scalar).

    `student_logits` rows follow `teacher` (pair after pair). Full vocabulary when the teacher rows are
    `[n, V]` (a soft-target cross-entropy minus the teacher's entropy); otherwise the teacher's top-k
    tokens plus one bucket holding the rest of the mass, compared with the student's mass on the same
    buckets. Works pair by pair on the cached tensors: no per-step copy of the whole cache."""
    device = student_logits.device
    scaled = student_logits.float() / temperature
    total = torch.zeros((), device=device)
    offset = 0
    for cached in teacher:
        rows = scaled[offset : offset + cached.num_tokens]
        offset += cached.num_tokens
        probs = cached.probs.to(device, torch.float32, non_blocking=True)
        total = total + cached.neg_entropy.to(device).sum()
        if cached.token_ids is None:
            total = total + F.cross_entropy(rows, probs, reduction="sum")
            continue
        ids = cached.token_ids.to(device)
        student = torch.log_softmax(rows, dim=-1)
        # a finite fill keeps an empty rest bucket (k = V) at 0 x finite instead of 0 x -inf = nan
        student_rest = student.scatter(-1, ids, -1e30).logsumexp(-1)
        rest = cached.rest_prob.to(device, torch.float32)
        total = total - (probs * student.gather(-1, ids)).sum() - (rest * student_rest).sum()
    if offset != student_logits.shape[0]:
        raise DistillAlignmentError(
            f"{student_logits.shape[0]} student rows for {offset} cached teacher rows"
        )
    return total * temperature**2


def check_batch_alignment(batch: TokenBatch, teacher: Sequence[TeacherTargets], students: Sequence[Example]) -> None:
    assert_aligned([t.target_ids for t in teacher], students)
    expected = torch.cat([t.target_ids for t in teacher])
    if not torch.equal(batch.targets.cpu(), expected):
        raise DistillAlignmentError("collated student targets do not line up with the teacher cache")


def mean_teacher_student_kl(
    model: torch.nn.Module,
    students: Sequence[Example],
    teacher: Sequence[TeacherTargets],
    *,
    temperature: float,
    pad_token_id: int,
    batch_size: int = 8,
) -> float:
    """Mean per response token of KL(teacher || model on the student sequences)."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    total, tokens = 0.0, 0
    try:
        with torch.inference_mode():
            for start in range(0, len(students), batch_size):
                group, cached = students[start : start + batch_size], teacher[start : start + batch_size]
                batch = collate_students(group, pad_token_id)
                check_batch_alignment(batch, cached, group)
                batch = batch.to(device)
                total += float(distill_kl_sum(supervised_logits(model, batch), cached, temperature))
                tokens += batch.num_targets
    finally:
        model.train(was_training)
    return total / max(tokens, 1)


def gap_closure(kl_before: float, kl_after: float) -> float:
    """1 - KL(teacher || student_after) / KL(teacher || student_before): 1 = the student without the
    memories matches the teacher, 0 = no better than before, < 0 = worse."""
    if not math.isfinite(kl_before) or not math.isfinite(kl_after):
        raise ValueError(f"non-finite KL (before {kl_before}, after {kl_after})")
    if kl_before <= 0.0:
        raise NothingToDistill("KL(teacher || student) is 0 before training: the memories change nothing")
    return 1.0 - kl_after / kl_before
