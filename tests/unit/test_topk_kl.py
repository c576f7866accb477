"""training.topk_kl: the coarse-grained KL against a reference kept as top-k + tail."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from training.topk_kl import topk_kl, topk_of


def test_zero_when_the_model_is_the_reference() -> None:
    logits = torch.randn(5, 50)
    assert float(topk_kl(logits, topk_of(logits, 8))) < 1e-5


def test_full_vocabulary_reference_equals_the_exact_kl() -> None:
    reference, model = torch.randn(4, 30), torch.randn(4, 30)
    exact = F.kl_div(F.log_softmax(model, -1), F.log_softmax(reference, -1), log_target=True, reduction="sum") / 4
    assert torch.allclose(topk_kl(model, topk_of(reference, 30)), exact, atol=1e-5)


def test_lower_bounds_the_exact_kl_and_grows_with_the_difference() -> None:
    reference = torch.randn(6, 40)
    near, far = reference + 0.1 * torch.randn(6, 40), torch.randn(6, 40) * 3
    ref = topk_of(reference, 5)
    exact_far = F.kl_div(F.log_softmax(far, -1), F.log_softmax(reference, -1), log_target=True,
                         reduction="sum") / 6
    assert float(topk_kl(near, ref)) < float(topk_kl(far, ref)) <= float(exact_far) + 1e-5


def test_differentiable_and_pulls_towards_the_reference() -> None:
    reference = torch.randn(3, 20)
    ref = topk_of(reference, 4)
    logits = torch.zeros(3, 20, requires_grad=True)
    before = float(topk_kl(logits, ref))
    optimizer = torch.optim.SGD([logits], lr=1.0)
    for _ in range(50):
        optimizer.zero_grad()
        topk_kl(logits, ref).backward()
        optimizer.step()
    assert float(topk_kl(logits, ref)) < before / 10


def test_reference_is_small() -> None:
    ref = topk_of(torch.randn(100, 49152), 64)
    assert ref.nbytes() == 100 * 64 * 8  # int32 ids + float32 log-probs
