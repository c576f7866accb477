"""The one guarded optimizer step of every recipe: clip, finite check, scheduled lr, budget rule."""

from __future__ import annotations

import math
import time

import pytest
import torch

from training.trainer import GuardedStep, TrainConfig, TrainingBudgetExceeded, TrainingDiverged


def _param(value: float = 1.0) -> torch.nn.Parameter:
    return torch.nn.Parameter(torch.full((4,), value))


def test_a_step_applies_the_scheduled_rate_and_clears_the_gradient() -> None:
    param = _param()
    config = TrainConfig(lr=0.1, warmup_steps=1, lr_schedule="linear", max_grad_norm=1.0)
    guard = GuardedStep([param], config, total_steps=3, started=time.perf_counter())
    (param * 100.0).sum().backward()
    lr, grad_norm = guard.step(0, {"loss": 1.0})
    assert lr == pytest.approx(0.05)  # warm-up: lr x 1/2 on the first of 1 warm-up step
    assert grad_norm == pytest.approx(200.0)  # the norm before clipping is reported
    assert param.grad is None and not torch.equal(param.detach(), torch.ones(4))


NON_FINITE = [
    ({"loss": math.nan}, 1.0),
    ({"loss": 1.0, "anchor KL": math.inf}, 1.0),
    ({"loss": 1.0}, math.nan),
]


@pytest.mark.parametrize("terms, gradient", NON_FINITE)
def test_a_non_finite_term_or_gradient_applies_nothing(terms: dict[str, float], gradient: float) -> None:
    param = _param()
    guard = GuardedStep([param], TrainConfig(lr=0.1), total_steps=5, started=time.perf_counter())
    (param * gradient).sum().backward()
    with pytest.raises(TrainingDiverged, match="non-finite values at step 3") as error:
        guard.step(2, terms)
    assert error.value.step == 3 and "gradient norm" in str(error.value)
    assert torch.equal(param.detach(), torch.ones(4)) and param.grad is None


def test_the_budget_counts_the_whole_run_from_its_start() -> None:
    config = TrainConfig(time_budget_s=5.0)
    GuardedStep([_param()], config, total_steps=2, started=time.perf_counter()).check_budget(0)
    late = GuardedStep([_param()], config, total_steps=2, started=time.perf_counter() - 6.0)
    with pytest.raises(TrainingBudgetExceeded, match=r"time budget 5s exceeded .*\(step 1/2\)"):
        late.check_budget(1)


def test_non_finite_weights_and_no_parameters_are_refused() -> None:
    guard = GuardedStep([_param(math.nan)], TrainConfig(), total_steps=1, started=time.perf_counter())
    with pytest.raises(TrainingDiverged, match="not finite"):
        guard.check_weights(1)
    with pytest.raises(ValueError, match="no trainable parameter"):
        GuardedStep([], TrainConfig(), total_steps=1, started=time.perf_counter())
