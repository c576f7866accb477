"""Memory distillation (context baking): train an adapter so the model WITHOUT the memories in its
context predicts what it predicts WITH them.

Owns the distillation data (memories -> prefix messages, conversation and probe prompts, held-out
split), teacher response generation, the teacher cache (probabilities computed once, full vocabulary or
top-k plus a rest-mass bucket), the KL loss with its per-batch alignment check, gap closure and the
`MemoryDistiller` recipe. Knows nothing of the database, the queue, HTTP or vLLM: the caller passes
memories, conversations, optional responses and paths, and records the returned metrics.
"""

from __future__ import annotations

import logging
import math
import random
import re
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from training.collate import pad_collate
from training.evaluate import AdapterView, builtin_probe_examples, drift_kl
from training.render import DistillPair, Example, RenderConfig, RenderError, render_distillation_pair
from training.token_nll import IGNORE_INDEX, TokenBatch, supervised_logits, token_nll_sum
from training.trainer import (
    GuardedStep,
    TrainConfig,
    TrainingCancelled,
    load_lora_model,
    resolve_device,
)

__all__ = [
    "DEFAULT_PROBE_TEMPLATES",
    "DistillAlignmentError",
    "DistillConfig",
    "DistillPlan",
    "DistillPrompt",
    "DistillResult",
    "MemoryDistiller",
    "MemoryNote",
    "NothingToDistill",
    "PreparedDistillation",
    "StudentTrainingResult",
    "TeacherTargets",
    "assert_aligned",
    "build_pairs",
    "conversation_prompts",
    "distill_kl_sum",
    "gap_closure",
    "generate_responses",
    "mean_teacher_student_kl",
    "memory_topic",
    "plan_distillation",
    "precompute_teacher",
    "prefix_messages_from_memories",
    "probe_prompts",
    "split_heldout",
    "teacher_messages",
]

log = logging.getLogger(__name__)

DEFAULT_PROBE_TEMPLATES = (
    "What do you know about {topic}?",
    "Tell me about {topic}.",
    "Remind me: {topic}?",
    "I forgot the details of {topic}. Can you help?",
)
MEMORY_HEADER = "Things you remember (use them when relevant):"


class DistillAlignmentError(AssertionError):
    """The response tokens of a teacher/student pair differ or are not where the cache expects them."""


class NothingToDistill(ValueError):
    """No memories, or too few prompts to train and hold out probes: there is no gap to close."""


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
    # LoRA shape when there is no parent adapter to warm-start from
    lora_rank: int = 8
    lora_alpha: int = 16
    lora_dropout: float = 0.0
    lora_target_modules: tuple[str, ...] = (
        "q_proj",
        "k_proj",
        "v_proj",
        "o_proj",
        "gate_proj",
        "up_proj",
        "down_proj",
    )
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


# --------------------------------------------------------------------------------------------------
# Data: memories, prompts, pairs


@dataclass(frozen=True)
class MemoryNote:
    """One active memory as the distiller sees it (the service maps its Memory rows to these)."""

    content: str
    topic: str | None = None  # what probes ask about; derived from the content when None
    priority: int = 0  # higher first in the prefix
    messages: tuple[Mapping[str, str], ...] = ()  # few-shot turns / earlier conversation to keep verbatim


@dataclass(frozen=True)
class DistillPrompt:
    """A turn to answer: `messages` (the current user turn) after `history` (earlier turns of a stored
    conversation). The teacher sees memories + history + messages; the student sees the last
    `student_retained_turns` messages of the history (never a memory) + messages."""

    messages: tuple[Mapping[str, Any], ...]
    response: str | None = None  # None: the teacher generates it
    origin: str = "probe"  # "probe" | "conversation"
    history: tuple[Mapping[str, Any], ...] = ()


def prefix_messages_from_memories(
    memories: Sequence[MemoryNote], *, header: str = MEMORY_HEADER
) -> list[dict[str, Any]]:
    """The teacher's prefix: one system message listing the notes (priority first), then the
    verbatim turns of memories that carry messages."""
    ordered = sorted(memories, key=lambda m: -m.priority)  # stable: equal priorities keep their order
    notes = [m.content.strip() for m in ordered if m.content.strip()]
    prefix: list[dict[str, Any]] = []
    if notes:
        prefix.append({"role": "system", "content": header + "\n" + "\n".join(f"- {n}" for n in notes)})
    for memory in ordered:
        prefix.extend(dict(message) for message in memory.messages)
    return prefix


_TOPIC_SPLIT = re.compile(r"\s+(?:is|are|was|were|equals|means)\s+|\s*[:=]\s+", re.IGNORECASE)


_LEADING_ARTICLES = frozenset({"The", "A", "An", "My", "Our", "Your", "This", "That"})


def memory_topic(content: str, *, max_words: int = 12) -> str:
    """What a note is about: the text before its first ` is `/` are `/`:` ("The deploy password for
    project Kestrel is 7-4-1-9" -> "the deploy password for project Kestrel"), at most `max_words`."""
    head = _TOPIC_SPLIT.split(content.strip(), maxsplit=1)[0].strip().rstrip(".?!")
    words = head.split()[:max_words] or content.split()[:max_words]
    if words and words[0] in _LEADING_ARTICLES:
        words[0] = words[0].lower()
    return " ".join(words)


def probe_prompts(memories: Sequence[MemoryNote], templates: Sequence[str]) -> list[DistillPrompt]:
    """One single-turn user prompt per (memory, template)."""
    prompts = []
    for memory in memories:
        if not memory.content.strip():
            continue
        topic = memory.topic or memory_topic(memory.content)
        for template in templates:
            question = template.format(topic=topic, memory=memory.content.strip())
            prompts.append(DistillPrompt(({"role": "user", "content": question},), None, "probe"))
    return prompts


def conversation_prompts(
    conversations: Sequence[Sequence[Mapping[str, Any]]], *, use_stored_responses: bool = True
) -> list[DistillPrompt]:
    """Every user turn of every stored conversation becomes a prompt, with the turns before it as its
    history. The assistant turn that follows is the response when `use_stored_responses`, otherwise
    the teacher generates one."""
    prompts = []
    for conversation in conversations:
        for index, message in enumerate(conversation):
            if message.get("role") != "user":
                continue
            following = conversation[index + 1] if index + 1 < len(conversation) else None
            stored = None
            if use_stored_responses and following is not None and following.get("role") == "assistant":
                content = following.get("content")
                stored = content if isinstance(content, str) and content.strip() else None
            history = tuple(dict(m) for m in conversation[:index])
            prompts.append(DistillPrompt((dict(message),), stored, "conversation", history))
    return prompts


def split_heldout(
    prompts: Sequence[DistillPrompt], fraction: float, seed: int
) -> tuple[list[DistillPrompt], list[DistillPrompt]]:
    """(train, heldout): a seeded random `fraction` held out, at least one of each when possible."""
    if len(prompts) < 2:
        raise NothingToDistill(f"{len(prompts)} prompt(s): need at least 2 to train and hold out probes")
    order = list(range(len(prompts)))
    random.Random(seed).shuffle(order)
    n_heldout = min(len(prompts) - 1, max(1, round(len(prompts) * fraction)))
    heldout = set(order[:n_heldout])
    return (
        [p for i, p in enumerate(prompts) if i not in heldout],
        [p for i, p in enumerate(prompts) if i in heldout],
    )


def teacher_messages(prefix_messages: Sequence[Mapping[str, Any]], prompt: DistillPrompt) -> list[dict]:
    """What the teacher is asked (e.g. what the caller sends to vLLM): memories, history, turn."""
    return [dict(m) for m in (*prefix_messages, *prompt.history, *prompt.messages)]


def build_pairs(
    tokenizer: Any,
    prefix_messages: Sequence[Mapping[str, Any]],
    prompts: Sequence[DistillPrompt],
    *,
    retained_turns: int,
    render_config: RenderConfig,
) -> list[DistillPair]:
    """Render each prompt with its response as a teacher/student pair. Prompts without a response,
    and those the renderer rejects (too long, response tokenized differently), are left out."""
    pairs = []
    for prompt in prompts:
        if prompt.response is None or not prompt.response.strip():
            continue
        try:
            pair = render_distillation_pair(
                tokenizer,
                prefix_messages=[*prefix_messages, *prompt.history],
                messages=list(prompt.messages),
                response=prompt.response,
                # the student keeps conversation history only, never a memory
                retained_turns=min(retained_turns, len(prompt.history)),
                config=render_config,
            )
        except RenderError as exc:
            log.warning("distillation prompt left out: %s", exc)
            continue
        assert_aligned(_target_ids(pair.teacher), [pair.student])
        pairs.append(pair)
    return pairs


@torch.inference_mode()
def generate_responses(
    model: torch.nn.Module,
    tokenizer: Any,
    prompts: Sequence[Sequence[Mapping[str, Any]]],
    max_new_tokens: int,
    *,
    no_repeat_ngram_size: int = 0,
) -> list[str]:
    """Greedy responses of `model` to each message list (one at a time: no padding effects).
    `no_repeat_ngram_size=1` keeps a random-init model from echoing the prompt's last token forever
    (with tied embeddings its greedy output is "\n\n\n...": an empty response); 0 = plain greedy."""
    device = next(model.parameters()).device
    stop_ids = _stop_token_ids(model, tokenizer)
    responses = []
    for messages in prompts:
        prompt_ids = _prompt_ids(tokenizer, messages)
        input_ids = torch.tensor([prompt_ids], device=device)
        output = model.generate(
            input_ids=input_ids,
            attention_mask=torch.ones_like(input_ids),
            max_new_tokens=max_new_tokens,
            do_sample=False,
            use_cache=True,
            no_repeat_ngram_size=no_repeat_ngram_size,
            eos_token_id=stop_ids or None,
            pad_token_id=tokenizer.pad_token_id
            if tokenizer.pad_token_id is not None
            else (stop_ids or [0])[0],
        )
        new_ids = [t for t in output[0, len(prompt_ids) :].tolist() if t not in stop_ids]
        responses.append(tokenizer.decode(new_ids, skip_special_tokens=True).strip())
    return responses


def _prompt_ids(tokenizer: Any, messages: Sequence[Mapping[str, Any]]) -> list[int]:
    if getattr(tokenizer, "chat_template", None):
        text = tokenizer.apply_chat_template(list(messages), tokenize=False, add_generation_prompt=True)
    else:  # template-free tokenizer: plain text turns
        text = "\n".join(str(m.get("content", "")) for m in messages) + "\n"
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def _stop_token_ids(model: torch.nn.Module, tokenizer: Any) -> list[int]:
    ids = set()
    for candidate in (tokenizer.eos_token_id, getattr(model.generation_config, "eos_token_id", None)):
        if isinstance(candidate, int):
            ids.add(candidate)
        elif isinstance(candidate, list | tuple):
            ids.update(int(c) for c in candidate)
    for token in ("<|im_end|>", "<|eot_id|>", "<|end|>", "</s>"):
        token_id = tokenizer.convert_tokens_to_ids(token)
        if isinstance(token_id, int) and token_id != tokenizer.unk_token_id and token_id >= 0:
            ids.add(token_id)
    return sorted(ids)


# --------------------------------------------------------------------------------------------------
# Alignment, teacher cache, loss


def _target_ids(example: Example) -> torch.Tensor:
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


def _collate(examples: Sequence[Example], pad_token_id: int) -> TokenBatch:
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
            batch = _collate(group, pad_token_id).to(device)
            with torch.inference_mode():
                logits = supervised_logits(model, batch)
            with torch.no_grad():
                logits, targets = logits.clone(), batch.targets.clone()
                offset = 0
                for example in group:
                    n = len(_target_ids(example))
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


def _check_batch(batch: TokenBatch, teacher: Sequence[TeacherTargets], students: Sequence[Example]) -> None:
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
                batch = _collate(group, pad_token_id)
                _check_batch(batch, cached, group)
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


# --------------------------------------------------------------------------------------------------
# The recipe


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
            batch = _collate(students, prepared.pad_token_id)
            _check_batch(batch, teacher, students)  # the per-batch alignment assertion
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
    return [_collate(usable[i : i + batch_size], pad_token_id) for i in range(0, len(usable), batch_size)]
