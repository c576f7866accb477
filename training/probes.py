"""The built-in general prompts an online update is anchored on and judged by.

Owns two shipped lists (training/data/): `anchor_prompts.json`, everyday prompts whose parent
distribution the recipe's KL term holds in place, and `general_probes.json`, general questions with
the key content a right answer carries, asked of parent and candidate for the behaviour report and
the answer gate. The two lists are disjoint, so the gate judges on prompts the update never saw.
Pure: knows nothing of models, the database or the service.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

from training.generate import user_prompt
from training.render import Example, RenderConfig, RenderError, render_example

__all__ = ["GeneralProbe", "anchor_examples", "anchor_prompts", "general_probes"]

_DATA = Path(__file__).parent / "data"


@dataclass(frozen=True)
class GeneralProbe:
    question: str
    keys: tuple[str, ...]  # a right answer carries one of these (case-insensitive)


@lru_cache(maxsize=1)
def anchor_prompts() -> tuple[str, ...]:
    return tuple(json.loads((_DATA / "anchor_prompts.json").read_text(encoding="utf-8")))


@lru_cache(maxsize=1)
def general_probes() -> tuple[GeneralProbe, ...]:
    rows = json.loads((_DATA / "general_probes.json").read_text(encoding="utf-8"))
    return tuple(GeneralProbe(row["question"], tuple(row["keys"])) for row in rows)


def anchor_examples(
    tokenizer: Any,
    pairs: Sequence[tuple[Sequence[dict[str, Any]], str]],
    config: RenderConfig,
) -> list[Example]:
    """Each (messages, the parent's answer) rendered as an example whose labelled positions are the
    answer's; prompts that do not render (too long, empty answer) are left out."""
    examples = []
    for messages, answer in pairs:
        if not answer.strip():
            continue
        try:
            example = render_example(tokenizer, {"messages": list(messages), "continuation": answer}, config)
        except RenderError:
            continue
        if example is not None and example.num_target_tokens > 0:
            examples.append(example)
    return examples


def prompt_anchor_pairs(answers: Sequence[str]) -> list[tuple[list[dict[str, str]], str]]:
    """(messages, answer) for the built-in anchor prompts, given the parent's answers in order."""
    prompts = anchor_prompts()
    if len(answers) != len(prompts):
        raise ValueError(f"{len(answers)} answers for {len(prompts)} anchor prompts")
    return [(user_prompt(prompt), answer) for prompt, answer in zip(prompts, answers, strict=True)]
