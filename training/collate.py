"""Batching of rendered examples: right padding, packing with per-example position ids, and
length-bucketed batches. Labels are built upstream (training.render) and only carried along here.
Knows nothing about tokenizers, templates or models.
"""

from __future__ import annotations

import random
from collections.abc import Sequence

import torch

from training.render import IGNORE_INDEX, Example


class PackingError(ValueError):
    """An example is longer than the pack it should go into."""


def pad_collate(examples: Sequence[Example], pad_token_id: int) -> dict[str, torch.Tensor]:
    """Right-pad to the longest example: input_ids with pad_token_id, labels with -100,
    attention_mask with 0."""
    if not examples:
        raise ValueError("pad_collate needs at least one example")
    width = max(len(example.input_ids) for example in examples)
    input_ids = torch.full((len(examples), width), pad_token_id, dtype=torch.long)
    labels = torch.full((len(examples), width), IGNORE_INDEX, dtype=torch.long)
    attention_mask = torch.zeros((len(examples), width), dtype=torch.long)
    for row, example in enumerate(examples):
        length = len(example.input_ids)
        input_ids[row, :length] = torch.tensor(example.input_ids, dtype=torch.long)
        labels[row, :length] = torch.tensor(example.labels, dtype=torch.long)
        attention_mask[row, :length] = torch.tensor(example.attention_mask, dtype=torch.long)
    return {"input_ids": input_ids, "labels": labels, "attention_mask": attention_mask}


def pack_examples(examples: Sequence[Example], max_tokens: int) -> dict[str, torch.Tensor]:
    """Concatenate examples into one row of at most max_tokens (no padding).

    Returns input_ids, labels and position_ids, which restart at 0 for every example, and NO
    attention_mask: given position_ids without an attention mask, transformers builds a block-diagonal
    causal mask from the restarts, so one example never attends to another (an all-ones mask, or a
    KV cache, switches that off: call the model with use_cache=False). Each example's first label is -100: it would otherwise be predicted from the
    previous example's last token.
    """
    if not examples:
        raise ValueError("pack_examples needs at least one example")
    total = sum(len(example.input_ids) for example in examples)
    if total > max_tokens:
        raise PackingError(f"{total} tokens do not fit in a pack of {max_tokens}")
    input_ids: list[int] = []
    labels: list[int] = []
    position_ids: list[int] = []
    for example in examples:
        input_ids.extend(example.input_ids)
        labels.append(IGNORE_INDEX)
        labels.extend(example.labels[1:])
        position_ids.extend(range(len(example.input_ids)))
    return {
        "input_ids": torch.tensor([input_ids], dtype=torch.long),
        "labels": torch.tensor([labels], dtype=torch.long),
        "position_ids": torch.tensor([position_ids], dtype=torch.long),
    }


def greedy_packs(examples: Sequence[Example], max_tokens: int) -> list[list[Example]]:
    """First-fit-decreasing grouping of examples into packs of at most max_tokens tokens."""
    packs: list[list[Example]] = []
    room: list[int] = []
    for example in sorted(examples, key=len, reverse=True):
        if len(example) > max_tokens:
            raise PackingError(f"an example of {len(example)} tokens exceeds the pack size {max_tokens}")
        for index, free in enumerate(room):
            if len(example) <= free:
                packs[index].append(example)
                room[index] -= len(example)
                break
        else:
            packs.append([example])
            room.append(max_tokens - len(example))
    return packs


def length_bucketed_batches(examples: Sequence[Example], batch_tokens: int, seed: int) -> list[list[Example]]:
    """Batches of similar-length examples whose padded size (rows x longest) stays within
    batch_tokens (a single longer example gets a batch of its own); batch order shuffled by seed."""
    if batch_tokens < 1:
        raise ValueError("batch_tokens must be >= 1")
    rng = random.Random(seed)
    order = list(examples)
    rng.shuffle(order)  # ties between equal lengths are broken by the seed, not by input order
    order.sort(key=len)
    batches: list[list[Example]] = []
    current: list[Example] = []
    for example in order:
        longest = max(len(example), *(len(other) for other in current)) if current else len(example)
        if current and longest * (len(current) + 1) > batch_tokens:
            batches.append(current)
            current = []
        current.append(example)
    if current:
        batches.append(current)
    rng.shuffle(batches)
    return batches
