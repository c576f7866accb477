"""Batching of rendered examples: right padding and length-bucketed batches. Labels are built
upstream (training.render) and only carried along here.
Knows nothing about tokenizers, templates or models.
"""

from __future__ import annotations

import random
from collections.abc import Sequence

import torch

from training.render import IGNORE_INDEX, Example


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
