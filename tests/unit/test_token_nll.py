"""Supervised-token NLL: the fused LM-head cross-entropy and the supervised-position indexing."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from training.token_nll import IGNORE_INDEX, LinearCrossEntropy, TokenBatch


@pytest.mark.parametrize("weight_requires_grad", [False, True])
def test_linear_cross_entropy_matches_autograd(weight_requires_grad: bool) -> None:
    generator = torch.Generator().manual_seed(0)
    hidden = torch.randn(7, 16, generator=generator, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(50, 16, generator=generator, dtype=torch.float64, requires_grad=weight_requires_grad)
    targets = torch.randint(0, 50, (7,), generator=generator)
    targets[3] = targets[2]  # repeated targets must still get one -1 each

    fused = LinearCrossEntropy.apply(hidden, weight, targets)
    (fused * 0.5).backward()
    fused_grads = [hidden.grad.clone()] + ([weight.grad.clone()] if weight_requires_grad else [])
    hidden.grad = None
    weight.grad = None

    reference = F.cross_entropy(hidden @ weight.t(), targets, reduction="sum")
    (reference * 0.5).backward()
    reference_grads = [hidden.grad] + ([weight.grad] if weight_requires_grad else [])

    assert fused.item() == pytest.approx(reference.item(), rel=1e-10)
    for got, expected in zip(fused_grads, reference_grads):
        assert torch.allclose(got, expected, rtol=1e-9, atol=1e-12)


def test_token_batch_indexes_the_next_token_positions_of_supervised_labels() -> None:
    padded = {
        "input_ids": torch.tensor([[5, 6, 7, 8], [9, 10, 0, 0]]),
        "labels": torch.tensor(
            [[IGNORE_INDEX, IGNORE_INDEX, 7, 8], [IGNORE_INDEX, 10, IGNORE_INDEX, IGNORE_INDEX]]
        ),
        "attention_mask": torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0]]),
    }
    batch = TokenBatch.from_padded(padded)
    # flattened [B * (T - 1)] positions: row 0 predicts 7 at 1 and 8 at 2; row 1 predicts 10 at 3 + 0
    assert batch.target_index.tolist() == [1, 2, 3]
    assert batch.targets.tolist() == [7, 8, 10]
    assert batch.num_targets == 3 and batch.num_tokens == 6
    assert batch.attention_mask is not None


def test_unpadded_batch_drops_the_attention_mask() -> None:
    padded = {
        "input_ids": torch.tensor([[5, 6, 7]]),
        "labels": torch.tensor([[IGNORE_INDEX, 6, 7]]),
        "attention_mask": torch.ones(1, 3, dtype=torch.long),
    }
    assert TokenBatch.from_padded(padded).attention_mask is None


def _batch(rows: list[list[int]], supervised_from: list[int]) -> TokenBatch:
    """Right-padded rows; each row's labels from `supervised_from[i]` on."""
    width = max(len(row) for row in rows)
    input_ids = torch.zeros(len(rows), width, dtype=torch.long)
    labels = torch.full((len(rows), width), IGNORE_INDEX)
    attention = torch.zeros(len(rows), width, dtype=torch.long)
    for i, (row, start) in enumerate(zip(rows, supervised_from, strict=True)):
        input_ids[i, : len(row)] = torch.tensor(row)
        attention[i, : len(row)] = 1
        labels[i, start : len(row)] = torch.tensor(row[start:])
    return TokenBatch.from_padded({"input_ids": input_ids, "labels": labels, "attention_mask": attention})


def test_the_shared_prefix_is_the_leading_tokens_every_row_has_before_any_supervised_one() -> None:
    from training.token_nll import shared_prefix_length

    prefix = [1, 2, 3, 4, 5]
    batch = _batch([prefix + [6, 7, 8], prefix + [9, 10], prefix + [6, 11, 12, 13]], [6, 6, 7])
    assert shared_prefix_length(batch) == 5  # rows part at position 5
    # a supervised token inside the common part cuts it: hidden state 3 predicts token 4
    assert shared_prefix_length(_batch([prefix + [6], prefix + [7]], [4, 6])) == 3
    assert shared_prefix_length(_batch([prefix + [6]], [5])) == 0  # one row: nothing to share
    # a padded position is never shared, even where the pad id equals the tokens
    assert shared_prefix_length(_batch([[0, 0, 0, 1], [0, 0]], [3, 1])) == 0
