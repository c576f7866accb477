"""Feedback items and stored conversations as training examples and drift probes (pure).

Owns rendering a run's feedback items into examples (each failure kept with its reason), the
question a chat item teaches (for the behaviour report), stored conversations as drift probes
(their last assistant turn as the target; the ones a run's feedback corrects left out, since their
answer must change) and the fallback to the built-in probes. Knows nothing of the database, the
queue or how a run is started: the train and distill jobs hand it plain items and messages.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from training.behaviour import TaughtItem
from training.evaluate import builtin_probe_examples
from training.render import Example, RenderConfig, RenderError, render_example, resolve_target_index

__all__ = [
    "RenderedFeedback",
    "conversation_probes",
    "conversations_not_taught",
    "drift_probes",
    "render_feedback",
    "taught_item",
]


def taught_item(item_id: int, item: Mapping[str, Any]) -> TaughtItem | None:
    """The question a chat feedback item teaches (its prompt) and the taught text, for the
    behaviour report; None for template-free items (raw context, segments)."""
    messages = item.get("messages")
    if not isinstance(messages, list) or not messages:
        return None
    try:
        index = resolve_target_index(messages, item.get("target_index"))
    except (RenderError, ValueError, TypeError):
        return None
    prompt = list(messages[:index])
    if not prompt or prompt[-1].get("role") != "user":
        return None
    return TaughtItem(id=item_id, messages=prompt, continuation=str(item.get("continuation", "")))


@dataclass(frozen=True)
class RenderedFeedback:
    examples: list[Example]
    example_ids: list[int]  # feedback id of each example
    skipped: dict[int, str]  # feedback id -> why it produced no example


def render_feedback(
    tokenizer: Any, items: Sequence[tuple[int, Mapping[str, Any]]], config: RenderConfig
) -> RenderedFeedback:
    """Render each `(feedback id, item)`; an item that fails to render or has an empty target is
    skipped with the reason."""
    examples: list[Example] = []
    ids: list[int] = []
    skipped: dict[int, str] = {}
    for item_id, item in items:
        try:
            example = render_example(tokenizer, item, config)
        except RenderError as error:
            skipped[item_id] = f"{error.field}: {error.reason}"
            continue
        if example is None or example.num_target_tokens == 0:
            skipped[item_id] = "empty target: no supervised token"
            continue
        examples.append(example)
        ids.append(item_id)
    return RenderedFeedback(examples, ids, skipped)


def conversation_probes(
    tokenizer: Any, conversations: Sequence[Sequence[Mapping[str, Any]]], config: RenderConfig
) -> list[Example]:
    """Drift probes from stored conversations: each one's last non-empty assistant turn as the target."""
    probes = []
    for messages in conversations:
        index = next(
            (
                i
                for i in range(len(messages) - 1, -1, -1)
                if messages[i].get("role") == "assistant"
                and isinstance(messages[i].get("content"), str)
                and messages[i]["content"].strip()
            ),
            None,
        )
        if index is None or index == 0:
            continue
        item = {
            "messages": list(messages[: index + 1]),
            "target_index": index,
            "continuation": messages[index]["content"],
        }
        try:
            example = render_example(tokenizer, item, config)
        except RenderError:
            continue
        if example is not None and example.num_target_tokens > 0:
            probes.append(example)
    return probes


def conversations_not_taught(
    conversations: Sequence[Sequence[Mapping[str, Any]]], items: Sequence[tuple[int, Mapping[str, Any]]]
) -> list[Sequence[Mapping[str, Any]]]:
    """The conversations whose prompt (everything before their last assistant turn) is not the prompt
    of an item being taught: an answer the feedback corrects must change, so it is no drift probe."""
    taught = set()
    for item_id, item in items:
        found = taught_item(item_id, item)
        if found is not None:
            taught.add(json.dumps(_plain(found.messages), sort_keys=True))
    kept = []
    for messages in conversations:
        last = max((i for i, m in enumerate(messages) if m.get("role") == "assistant"), default=None)
        prompt = list(messages[:last]) if last is not None else list(messages)
        if json.dumps(_plain(prompt), sort_keys=True) not in taught:
            kept.append(messages)
    return kept


def _plain(messages: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    return [{"role": m.get("role"), "content": m.get("content")} for m in messages]


def drift_probes(
    tokenizer: Any, conversations: Sequence[Sequence[Mapping[str, Any]]], config: RenderConfig
) -> tuple[list[Example], str]:
    """(probes, source): the stored conversations rendered as probes, else the built-in prompts."""
    probes = conversation_probes(tokenizer, conversations, config)
    if probes:
        return probes, "conversations"
    return builtin_probe_examples(tokenizer, config), "builtin"
