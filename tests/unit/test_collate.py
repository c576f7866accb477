"""training.collate: padding keeps labels aligned, packing isolates examples, buckets respect budgets."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

from training.collate import PackingError, greedy_packs, length_bucketed_batches, pack_examples, pad_collate
from training.render import IGNORE_INDEX, Example, render_example


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


def test_pack_resets_positions_and_masks_each_first_label():
    first, second = make_example([5, 6, 7], 0), make_example([8, 9], 0)
    pack = pack_examples([first, second], max_tokens=8)
    assert pack["input_ids"].tolist() == [[5, 6, 7, 8, 9]]
    assert pack["position_ids"].tolist() == [[0, 1, 2, 0, 1]]
    assert pack["labels"].tolist() == [[-100, 6, 7, -100, 9]]
    assert "attention_mask" not in pack  # an all-ones mask would disable the packed-sequence mask
    with pytest.raises(PackingError):
        pack_examples([first, second], max_tokens=4)


def test_packed_examples_never_attend_to_each_other(tiny_model_dir, tokenizer_for):
    tokenizer = tokenizer_for("qwen2")
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, attn_implementation="sdpa").eval()
    examples = [
        render_example(tokenizer, {"messages": [{"role": "user", "content": "Hi"}], "continuation": "Hello!"}),
        render_example(tokenizer, {"context": "One two three", "continuation": " four five"}),
    ]
    pack = pack_examples(examples, max_tokens=4096)
    with torch.no_grad():
        packed = model(input_ids=pack["input_ids"], position_ids=pack["position_ids"], use_cache=False).logits[0]
        alone = [model(input_ids=torch.tensor([e.input_ids])).logits[0] for e in examples]
    torch.testing.assert_close(packed, torch.cat(alone), atol=1e-5, rtol=1e-4)


def test_greedy_packs_fill_without_overflow():
    examples = [make_example(list(range(n)), 0) for n in (5, 3, 3, 2, 7, 1)]
    packs = greedy_packs(examples, max_tokens=8)
    assert sorted(len(e) for pack in packs for e in pack) == [1, 2, 3, 3, 5, 7]
    assert all(sum(len(e) for e in pack) <= 8 for pack in packs)
    assert len(packs) == 3
    with pytest.raises(PackingError):
        greedy_packs([make_example(list(range(9)), 0)], max_tokens=8)


def test_length_buckets_respect_the_token_budget_and_the_seed():
    examples = [make_example(list(range(n)), 0) for n in (3, 50, 4, 48, 5, 47, 6, 120)]
    batches = length_bucketed_batches(examples, batch_tokens=100, seed=1)
    assert sorted(len(e) for batch in batches for e in batch) == sorted(len(e) for e in examples)
    for batch in batches:
        assert len(batch) == 1 or max(len(e) for e in batch) * len(batch) <= 100
        lengths = sorted(len(e) for e in batch)
        assert lengths[-1] - lengths[0] <= 47 or len(batch) == 1  # similar lengths share a batch
    assert [[len(e) for e in b] for b in batches] == [
        [len(e) for e in b] for b in length_bucketed_batches(examples, batch_tokens=100, seed=1)]
    orders = {tuple(tuple(len(e) for e in b) for b in length_bucketed_batches(examples, 100, seed))
              for seed in range(6)}
    assert len(orders) > 1
