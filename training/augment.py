"""Surface-form variants of a taught question, so an update learns the fact rather than one string.

Owns `question_variants`: copies of a feedback item whose last user turn is wrapped in a few fixed,
meaning-preserving frames ("Quick question: ...", "... Please answer in one sentence."). Trained
beside the original, they keep the update from keying on the exact token sequence of the question
(measured on the real model: more rephrased questions answered and fewer general answers lost;
README "Learning"). Pure: knows nothing of tokenizers, models or the database.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

__all__ = ["MAX_AUGMENTED_ITEMS", "QUESTION_FRAMES", "question_variants"]

QUESTION_FRAMES: tuple[str, ...] = ("Quick question: {q}", "{q} Please answer in one sentence.")
# Variants triple a run's supervised examples; runs with more new items than this train without
# them (the items' own variety, and the step cost on CPU: Settings.augment_max_items)
MAX_AUGMENTED_ITEMS = 8


def question_variants(item: Mapping[str, Any], target_index: int) -> list[dict[str, Any]]:
    """Items like `item` (chat form, continuation appended or replacing `messages[target_index]`)
    with the user turn right before the target wrapped in each frame; none when that turn is not
    a plain-text user message."""
    messages: Sequence[Mapping[str, Any]] = item.get("messages") or []
    if not 1 <= target_index <= len(messages):
        return []
    asked = messages[target_index - 1]
    question = asked.get("content")
    if asked.get("role") != "user" or not isinstance(question, str) or not question.strip():
        return []
    question = question.strip()
    variants = []
    for frame in QUESTION_FRAMES:
        wrapped = frame.format(q=question)
        prompt = [*messages[: target_index - 1], {**asked, "content": wrapped}]
        variants.append({"messages": [dict(m) for m in prompt], "target_index": len(prompt),
                         "continuation": item["continuation"]})
    return variants
