"""training.collate: padding keeps labels aligned, buckets respect budgets."""

from __future__ import annotations

import pytest
import torch

from training.collate import length_bucketed_batches, pad_collate
from training.render import IGNORE_INDEX, Example


def make_example(ids: list[int], first_label: int) -> Example:
    labels = [IGNORE_INDEX] * first_label + ids[first_label:]
    return Example(input_ids=list(ids), labels=labels, attention_mask=[1] * len(ids))


def test_pad_collate_pads_right_and_keeps_labels_aligned():
    short, long = make_example([5, 6, 7], 1), make_example([1, 2, 3, 4, 9], 3)
    batch = pad_collate([short, long], pad_token_id=0)
    assert batch["input_ids"].tolist() == [[5, 6, 7, 0, 0], [1, 2, 3, 4, 9]]
    assert batch["labels"].tolist() == [[-100, 6, 7, -100, -100], [-100, -100, -100, 4, 9]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]]
    assert all(tensor.dtype == torch.long for tensor in batch.values())


def test_pad_collate_rejects_an_empty_batch():
    with pytest.raises(ValueError):
        pad_collate([], pad_token_id=0)


def test_length_buckets_respect_the_token_budget_and_the_seed():
    examples = [make_example(list(range(n)), 0) for n in (3, 50, 4, 48, 5, 47, 6, 120)]
    batches = length_bucketed_batches(examples, batch_tokens=100, seed=1)
    assert sorted(len(e) for batch in batches for e in batch) == sorted(len(e) for e in examples)
    for batch in batches:
        assert len(batch) == 1 or max(len(e) for e in batch) * len(batch) <= 100
        lengths = sorted(len(e) for e in batch)
        assert lengths[-1] - lengths[0] <= 47 or len(batch) == 1  # similar lengths share a batch
    assert [[len(e) for e in b] for b in batches] == [
        [len(e) for e in b] for b in length_bucketed_batches(examples, batch_tokens=100, seed=1)
    ]
    orders = {
        tuple(tuple(len(e) for e in b) for b in length_bucketed_batches(examples, 100, seed))
        for seed in range(6)
    }
    assert len(orders) > 1
