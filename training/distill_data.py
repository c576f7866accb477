"""The data of memory distillation: memories -> the teacher's prefix, prompts, pairs.

Owns the memory notes and prompts, the teacher's memory prefix, the probe questions asked about
each memory, stored conversations as prompts, the seeded held-out split, teacher/student pairs
(each checked for alignment) and local generation of the teacher's missing responses. Pure data
and one generation loop; knows nothing of the recipe, the database, the queue, HTTP or vLLM.
"""

from __future__ import annotations

import logging
import random
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from training.distill_teacher import NothingToDistill, assert_aligned, response_target_ids
from training.render import DistillPair, RenderConfig, RenderError, render_distillation_pair

__all__ = [
    "DEFAULT_PROBE_TEMPLATES",
    "MEMORY_HEADER",
    "DistillPrompt",
    "MemoryNote",
    "build_pairs",
    "conversation_prompts",
    "generate_responses",
    "memory_topic",
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
        assert_aligned(response_target_ids(pair.teacher), [pair.student])
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
