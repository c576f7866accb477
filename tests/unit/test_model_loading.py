"""training.model_loading: the resident base model comes back pristine after every job."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from training.model_loading import ResidentBaseModel, attach_lora
from training.trainer import TrainConfig


def _state(model) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items()}


def _no_lora(model) -> bool:
    from peft.tuners.lora import LoraLayer

    return not any(isinstance(m, LoraLayer) for m in model.modules())


def test_lend_keeps_one_load_and_strips_what_a_job_attached(tiny_model_dir: Path) -> None:
    resident = ResidentBaseModel(tiny_model_dir, device="cpu")
    config = TrainConfig(device="cpu")
    with resident.lend() as holder:
        before = _state(holder.model)
        peft_model = attach_lora(holder.model, None, config.lora_config())
        for p in peft_model.parameters():
            if p.requires_grad:
                p.data.add_(1.0)
        holder.model = peft_model
    with resident.lend() as holder:
        assert _no_lora(holder.model)
        after = _state(holder.model)
        assert after.keys() == before.keys()
        assert all(torch.equal(after[k], before[k]) for k in before)
        assert not any(p.requires_grad for p in holder.model.parameters())
    assert resident.loads == 1


def test_a_failed_job_that_left_lora_layers_on_the_base_is_cleaned(tiny_model_dir: Path) -> None:
    resident = ResidentBaseModel(tiny_model_dir, device="cpu")
    with pytest.raises(RuntimeError, match="the job failed"), resident.lend() as holder:
        attach_lora(holder.model, None, TrainConfig(device="cpu").lora_config())  # injected in place
        raise RuntimeError("the job failed")
    with resident.lend() as holder:
        assert _no_lora(holder.model)
    assert resident.loads == 1
