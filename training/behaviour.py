"""The behaviour report of a version: what a person asking parent and candidate would see.

Owns `behaviour_report`: greedy answers of the parent and the candidate (two adapters of one
`PeftModel`, or the base for a parent without adapter) to each taught question (the prompt of a
feedback item), the rephrasings of it when there are any, and the general probes, side by side
with whether each answer is right (the taught continuation's text, a probe's key content); plus the
counts the gate reads. Knows nothing of the database, the registry or vLLM.
"""

from __future__ import annotations

import re
import time
from collections.abc import Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

from training.generate import answer_has_keys, greedy_answers, user_prompt
from training.probes import GeneralProbe

__all__ = ["TaughtItem", "answer_reproduces", "behaviour_report"]

_WORDS = re.compile(r"\w+(?:[.-]\w+)*", re.UNICODE)


@dataclass(frozen=True)
class TaughtItem:
    """One taught target: the prompt it answers and the text taught; `rephrasings` are other
    wordings of the prompt's last user turn."""

    id: int | None
    messages: Sequence[Mapping[str, Any]]
    continuation: str
    rephrasings: Sequence[str] = field(default_factory=tuple)


def _normalised(text: str) -> str:
    return " ".join(_WORDS.findall(text.lower()))


def answer_reproduces(answer: str, continuation: str) -> bool:
    """The answer says what was taught: it starts with the taught text (words compared case- and
    punctuation-insensitively), so a longer answer that begins with the target counts."""
    target = _normalised(continuation)
    return bool(target) and _normalised(answer).startswith(target)


def _distinct_words(continuation: str, prompt: str) -> list[str]:
    """Words of the taught text that the question does not contain: its new content."""
    asked = set(_normalised(prompt).split())
    return [word for word in _normalised(continuation).split() if word not in asked and len(word) > 2]


def carries_content(answer: str, continuation: str, prompt: str) -> bool:
    """A rephrased question is answered right when the answer carries most of the taught text's new
    words (those the question does not contain)."""
    words = _distinct_words(continuation, prompt)
    if not words:
        return answer_reproduces(answer, continuation)
    said = set(_normalised(answer).split())
    return sum(word in said for word in words) * 2 >= len(words)


@contextmanager
def _active(model: Any, adapter: str | None):
    """Generate with `adapter` active (None: adapters disabled, the bare base)."""
    if adapter is None:
        with model.disable_adapter():
            yield model
        return
    previous = model.active_adapter
    model.set_adapter(adapter)
    try:
        yield model
    finally:
        model.set_adapter(previous)


def behaviour_report(
    model: Any,
    tokenizer: Any,
    *,
    parent_adapter: str | None,
    candidate_adapter: str,
    taught: Sequence[TaughtItem],
    probes: Sequence[GeneralProbe],
    parent_probe_answers: Sequence[str] | None = None,
    max_new_tokens: int = 40,
) -> dict[str, Any]:
    """Parent's and candidate's greedy answers, side by side, with a summary.

    `parent_probe_answers`: the parent's answers to `probes` when already known (they were the
    candidate's in the parent's own report), so only the candidate answers them here."""
    started = time.perf_counter()
    prompts: list[list[Mapping[str, Any]]] = []
    kinds: list[tuple[str, int, str]] = []  # (kind, item index, question)
    for index, item in enumerate(taught):
        prompts.append(list(item.messages))
        kinds.append(("taught", index, _last_user_text(item.messages)))
        for rephrasing in item.rephrasings:
            prompts.append([*item.messages[:-1], {"role": "user", "content": rephrasing}])
            kinds.append(("rephrased", index, rephrasing))
    probe_prompts = [user_prompt(probe.question) for probe in probes]
    reuse_parent = parent_probe_answers is not None and len(parent_probe_answers) == len(probes)
    with _active(model, parent_adapter):
        parent_answers = greedy_answers(
            model, tokenizer, prompts + ([] if reuse_parent else probe_prompts), max_new_tokens=max_new_tokens
        )
    with _active(model, candidate_adapter):
        candidate_answers = greedy_answers(model, tokenizer, prompts + probe_prompts, max_new_tokens=max_new_tokens)
    parent_probes = list(parent_probe_answers) if reuse_parent else parent_answers[len(prompts):]
    rows: list[dict[str, Any]] = []
    for (kind, index, question), before, after in zip(kinds, parent_answers, candidate_answers, strict=False):
        item = taught[index]
        judge = answer_reproduces if kind == "taught" else (
            lambda answer, text, q=question: carries_content(answer, text, q)
        )
        rows.append({
            "kind": kind, "feedback_id": item.id, "question": question, "expected": item.continuation,
            "parent": before, "candidate": after,
            "parent_right": judge(before, item.continuation), "candidate_right": judge(after, item.continuation),
        })
    general = []
    for probe, before, after in zip(probes, parent_probes, candidate_answers[len(prompts):], strict=True):
        general.append({
            "kind": "general", "question": probe.question, "keys": list(probe.keys),
            "parent": before, "candidate": after,
            "parent_right": answer_has_keys(first_sentence(before), probe.keys),
            "candidate_right": answer_has_keys(first_sentence(after), probe.keys),
        })
    taught_rows = [row for row in rows if row["kind"] == "taught"]
    rephrased_rows = [row for row in rows if row["kind"] == "rephrased"]
    summary = {
        "taught_total": len(taught_rows),
        "taught_right": sum(row["candidate_right"] for row in taught_rows),
        "rephrased_total": len(rephrased_rows),
        "rephrased_right": sum(row["candidate_right"] for row in rephrased_rows),
        "general_total": len(general),
        "general_parent_right": sum(row["parent_right"] for row in general),
        "general_right": sum(row["candidate_right"] for row in general),
        "general_lost": sum(row["parent_right"] and not row["candidate_right"] for row in general),
        "report_seconds": round(time.perf_counter() - started, 3),
    }
    return {"summary": summary, "taught": rows, "general": general}


def first_sentence(text: str) -> str:
    """Up to the first sentence end or line break: where a right general answer must say it."""
    head = text.strip().split("\n", 1)[0]
    match = re.search(r"[.!?](\s|$)", head)
    return head[: match.start() + 1] if match else head


def _last_user_text(messages: Sequence[Mapping[str, Any]]) -> str:
    for message in reversed(messages):
        if message.get("role") == "user" and isinstance(message.get("content"), str):
            return message["content"]
    return ""
