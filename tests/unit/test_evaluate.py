"""Evaluation: NLL and drift metrics against the model's own forward, probes, and the gate decision."""

from __future__ import annotations

import copy
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from training.evaluate import (
    GENERIC_PROBE_CONVERSATIONS,
    AdapterView,
    GateConfig,
    builtin_probe_examples,
    drift_kl,
    evaluate_gate,
    mean_nll,
    relative_nll_drop,
)
from training.render import RenderConfig, render_example

# --- gate decision (pure) --------------------------------------------------------------------------


def test_gate_passes_when_nll_drops_enough_and_drift_is_small() -> None:
    decision = evaluate_gate({"nll_before": 2.0, "nll_after": 1.0, "drift_kl": 0.1}, GateConfig(0.05, 0.5))
    assert decision.passed
    assert "2.0000 -> 1.0000" in decision.reason and "50.0%" in decision.reason


def test_gate_rejects_too_small_an_nll_drop() -> None:
    decision = evaluate_gate({"nll_before": 2.0, "nll_after": 1.95, "drift_kl": 0.0}, GateConfig(0.05, 0.5))
    assert not decision.passed
    assert "NLL did not drop enough" in decision.reason and "drift" not in decision.reason


def test_gate_rejects_an_nll_increase() -> None:
    assert not evaluate_gate(
        {"nll_before": 2.0, "nll_after": 2.5, "drift_kl": 0.0}, GateConfig(0.0, 0.5)
    ).passed


def test_gate_rejects_drift_above_the_bound() -> None:
    decision = evaluate_gate({"nll_before": 2.0, "nll_after": 0.5, "drift_kl": 0.8}, GateConfig(0.05, 0.5))
    assert not decision.passed
    assert decision.reason.startswith("drift too large") and "0.8000" in decision.reason


def test_gate_names_every_failure() -> None:
    decision = evaluate_gate({"nll_before": 2.0, "nll_after": 2.0, "drift_kl": 3.0}, GateConfig(0.05, 0.5))
    assert not decision.passed
    assert "NLL did not drop" in decision.reason and "drift too large" in decision.reason


@pytest.mark.parametrize("key", ["nll_before", "nll_after", "drift_kl"])
@pytest.mark.parametrize("bad", [math.nan, math.inf])
def test_gate_rejects_non_finite_metrics(key: str, bad: float) -> None:
    metrics = {"nll_before": 2.0, "nll_after": 1.0, "drift_kl": 0.1, key: bad}
    decision = evaluate_gate(metrics, GateConfig())
    assert not decision.passed and key in decision.reason


def test_gate_fails_without_a_metric_it_needs() -> None:
    decision = evaluate_gate({"nll_before": 2.0, "nll_after": 1.0}, GateConfig())
    assert not decision.passed and "drift_kl missing" in decision.reason
    with pytest.raises(ValueError, match="neither"):
        evaluate_gate({"drift_kl": 0.1}, GateConfig())


def test_gate_config_is_validated() -> None:
    with pytest.raises(ValueError, match="max_drift_kl"):
        GateConfig(max_drift_kl=-1.0)
    with pytest.raises(ValueError, match="min_nll_drop"):
        GateConfig(min_nll_drop=1.0)
    with pytest.raises(ValueError, match="min_gap_closure"):
        GateConfig(min_gap_closure=1.5)


def test_relative_nll_drop() -> None:
    assert relative_nll_drop(4.0, 1.0) == pytest.approx(0.75)
    assert relative_nll_drop(0.0, 0.0) == 0.0
    assert relative_nll_drop(0.0, 0.1) == -math.inf


# --- metrics on the tiny model ---------------------------------------------------------------------


@pytest.fixture(autouse=True)
def one_torch_thread():
    """Tiny-model math is fastest on one thread, and robust when other processes share the cores."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="module")
def tokenizer(tiny_model_dir: Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(tiny_model_dir))


def load_base(tiny_model_dir: Path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(tiny_model_dir), dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def examples(tokenizer):
    items = [
        {"messages": [{"role": "user", "content": "Name a colour."}], "continuation": "Teal."},
        {
            "messages": [{"role": "user", "content": "Describe the weather in a long sentence, please."}],
            "continuation": "It is grey and windy, with light rain coming in from the west all afternoon.",
        },
        {"context": "Once upon a time", "continuation": " there was a tiny model."},
    ]
    return [render_example(tokenizer, item, RenderConfig()) for item in items]


@pytest.fixture(scope="module")
def adapters(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A zero adapter and a noisy one (random lora_B), saved as peft folders."""
    from peft import LoraConfig, get_peft_model

    from training.adapter_store import build_zero_adapter

    root = tmp_path_factory.mktemp("eval-adapters")
    config = LoraConfig(
        r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"], init_lora_weights=False
    )
    torch.manual_seed(1)
    noisy = get_peft_model(load_base(tiny_model_dir), config)
    with torch.no_grad():
        for name, param in noisy.named_parameters():
            if "lora_B" in name:
                param.mul_(20.0)  # large enough to move the tiny model's near-uniform outputs
    noisy.save_pretrained(str(root / "noisy"))
    zero = build_zero_adapter(
        tiny_model_dir, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj"]), root / "zero"
    )
    return {"noisy": root / "noisy", "zero": zero}


def reference_nll(model, examples) -> float:
    """Token-mean NLL through the model's own forward and loss, one example at a time."""
    total = count = 0.0
    with torch.inference_mode():
        for example in examples:
            out = model(input_ids=torch.tensor([example.input_ids]), labels=torch.tensor([example.labels]))
            total += out.loss.item() * example.num_target_tokens
            count += example.num_target_tokens
    return total / count


def reference_kl(parent_logits_fn, candidate_logits_fn, examples) -> float:
    total = count = 0.0
    with torch.inference_mode():
        for example in examples:
            input_ids = torch.tensor([example.input_ids])
            positions = [i - 1 for i, label in enumerate(example.labels) if label != -100]
            p = F.log_softmax(parent_logits_fn(input_ids)[0, positions], dim=-1)
            q = F.log_softmax(candidate_logits_fn(input_ids)[0, positions], dim=-1)
            total += (p.exp() * (p - q)).sum().item()
            count += len(positions)
    return total / count


@pytest.mark.parametrize("batch_tokens", [16, 4096])  # one example per batch / all padded together
def test_mean_nll_matches_the_models_own_loss(tiny_model_dir: Path, examples, batch_tokens: int) -> None:
    model = load_base(tiny_model_dir)
    expected = reference_nll(model, examples)
    assert mean_nll(model, examples, batch_tokens) == pytest.approx(expected, rel=1e-5)
    assert not model.training


def test_mean_nll_restores_training_mode(tiny_model_dir: Path, examples) -> None:
    model = load_base(tiny_model_dir).train()
    mean_nll(model, examples)
    assert model.training


def test_drift_kl_is_zero_against_itself_and_against_a_zero_adapter(
    tiny_model_dir, examples, adapters
) -> None:
    from peft import PeftModel

    base = load_base(tiny_model_dir)
    assert drift_kl(base, base, examples) == pytest.approx(0.0, abs=1e-6)
    model = PeftModel.from_pretrained(load_base(tiny_model_dir), str(adapters["zero"]), adapter_name="zero")
    assert drift_kl(AdapterView(model, None), AdapterView(model, "zero"), examples) == pytest.approx(
        0.0, abs=1e-6
    )


def test_drift_kl_between_two_adapters_of_one_model_matches_reference(
    tiny_model_dir, examples, adapters
) -> None:
    from peft import PeftModel

    model = PeftModel.from_pretrained(load_base(tiny_model_dir), str(adapters["zero"]), adapter_name="zero")
    model.load_adapter(str(adapters["noisy"]), adapter_name="noisy")
    model.set_adapter("zero")
    measured = drift_kl(AdapterView(model, None), AdapterView(model, "noisy"), examples, batch_tokens=4096)
    assert model.active_adapter == "zero"  # the view restored the active adapter

    def base_logits(input_ids):
        with model.disable_adapter():
            return model(input_ids=input_ids).logits

    def noisy_logits(input_ids):
        model.set_adapter("noisy")
        try:
            return model(input_ids=input_ids).logits
        finally:
            model.set_adapter("zero")

    expected = reference_kl(base_logits, noisy_logits, examples)
    assert measured > 1e-3
    assert measured == pytest.approx(expected, rel=1e-4)
    # the same numbers with the parent as a separate model object
    separate_parent = load_base(tiny_model_dir)
    assert drift_kl(separate_parent, AdapterView(model, "noisy"), examples) == pytest.approx(
        measured, rel=1e-5
    )
    # and the NLL of one adapter through a view equals the reference
    with torch.inference_mode():
        model.set_adapter("noisy")
        expected_nll = reference_nll(model, examples)
        model.set_adapter("zero")
    assert mean_nll(AdapterView(model, "noisy"), examples) == pytest.approx(expected_nll, rel=1e-5)


def test_metrics_refuse_empty_inputs(tiny_model_dir: Path) -> None:
    model = load_base(tiny_model_dir)
    with pytest.raises(ValueError):
        mean_nll(model, [])
    with pytest.raises(ValueError):
        drift_kl(model, model, [])


def test_builtin_probes_label_exactly_the_replies(tokenizer) -> None:
    probes = builtin_probe_examples(tokenizer)
    assert len(probes) == len(GENERIC_PROBE_CONVERSATIONS)
    for probe, (prompt, reply) in zip(probes, GENERIC_PROBE_CONVERSATIONS):
        labelled = tokenizer.decode([t for t, label in zip(probe.input_ids, probe.labels) if label != -100])
        context = tokenizer.decode([t for t, label in zip(probe.input_ids, probe.labels) if label == -100])
        assert labelled.startswith(reply) and prompt in context and reply not in context


def test_builtin_probes_without_a_chat_template(tokenizer) -> None:
    plain = copy.copy(tokenizer)
    plain.chat_template = None
    probes = builtin_probe_examples(plain)
    assert len(probes) == len(GENERIC_PROBE_CONVERSATIONS)
    first = plain.decode(probes[0].input_ids)
    assert first.startswith("User: ") and "<|im_start|>" not in first
