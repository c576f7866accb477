"""The process cache of the base model's anchor references: keyed on the model object, the
batches, k and the weights' in-place versions; bounded; released with the model."""

from __future__ import annotations

import gc

import torch

from training.reference_cache import BaseReferenceCache
from training.token_nll import TokenBatch
from training.topk_kl import TopK, topk_of


def batch(*ids: int) -> TokenBatch:
    input_ids = torch.tensor([list(ids)])
    return TokenBatch(
        input_ids=input_ids,
        attention_mask=None,
        target_index=torch.arange(len(ids) - 1),
        targets=input_ids[0, 1:],
        num_targets=len(ids) - 1,
        num_tokens=len(ids),
    )


class Counting:
    def __init__(self) -> None:
        self.calls = 0

    def __call__(self) -> list[TopK]:
        self.calls += 1
        return [topk_of(torch.randn(3, 10), 4)]


def test_a_second_lookup_of_the_same_batches_on_the_same_model_is_a_hit() -> None:
    cache, model, compute = BaseReferenceCache(), torch.nn.Linear(2, 2), Counting()
    first, cached = cache.get(model, [batch(1, 2, 3, 4)], 4, compute)
    again, cached_again = cache.get(model, [batch(1, 2, 3, 4)], 4, compute)
    assert (cached, cached_again, compute.calls) == (False, True, 1)
    assert torch.equal(first[0].logprobs, again[0].logprobs)


def test_other_batches_other_k_another_model_or_changed_weights_are_misses() -> None:
    cache, model, compute = BaseReferenceCache(), torch.nn.Linear(2, 2), Counting()
    cache.get(model, [batch(1, 2, 3, 4)], 4, compute)
    assert not cache.get(model, [batch(1, 2, 3, 5)], 4, compute)[1]
    assert not cache.get(model, [batch(1, 2, 3, 4)], 8, compute)[1]
    assert not cache.get(torch.nn.Linear(2, 2), [batch(1, 2, 3, 4)], 4, compute)[1]
    with torch.no_grad():
        model.weight.add_(1.0)  # an in-place write: the references no longer describe this model
    assert not cache.get(model, [batch(1, 2, 3, 4)], 4, compute)[1]
    assert compute.calls == 5


def test_entries_are_bounded_per_model_and_released_with_the_model() -> None:
    cache, model, compute = BaseReferenceCache(per_model=2), torch.nn.Linear(2, 2), Counting()
    for last in (4, 5, 6):
        cache.get(model, [batch(1, 2, 3, last)], 4, compute)
    assert not cache.get(model, [batch(1, 2, 3, 4)], 4, compute)[1], "the oldest set was dropped"
    assert cache.get(model, [batch(1, 2, 3, 6)], 4, compute)[1]
    del model
    gc.collect()
    assert len(cache._by_model) == 0
