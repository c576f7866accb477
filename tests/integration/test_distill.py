"""Memory distillation on the tiny model: the student without the memories learns the teacher's
distribution (gap closure on held-out probes, bounded drift) and misaligned pairs are refused."""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path

import pytest
import torch

from training.adapter_store import build_zero_adapter
from training.distill import DistillConfig, DistillResult, MemoryDistiller, plan_distillation
from training.distill_data import MemoryNote, generate_responses, teacher_messages
from training.distill_teacher import DistillAlignmentError, assert_aligned
from training.evaluate import GateConfig, score_candidate
from training.render import render_distillation_pair, render_example
from training.trainer import TrainConfig, TrainingBudgetExceeded, TrainingDiverged, load_base_model

pytestmark = pytest.mark.slow

MEMORIES = [
    MemoryNote("The deploy password for project Kestrel is 7-4-1-9", priority=2),
    MemoryNote("Heron's on-call rotation: Ana, then Bo, then Cy"),
    MemoryNote("The staging database of project Osprey lives on host db-stg-3"),
]
CONVERSATIONS = [
    [
        {"role": "user", "content": "How do I deploy Kestrel tonight?"},
        {"role": "assistant", "content": "Use the Kestrel deploy password: 7-4-1-9."},
        {"role": "user", "content": "And who is on call for Heron?"},
    ],
]
CONFIG = DistillConfig(
    epochs=12,
    batch_size=8,
    learning_rate=3e-3,
    max_new_tokens=12,
    # a random-init model with tied embeddings greedily echoes the prompt's last "\n" forever
    no_repeat_ngram_size=1,
    probe_templates=(
        "What do you know about {topic}?",
        "Tell me about {topic}.",
        "I forgot the details of {topic}. Can you help?",
    ),
    student_retained_turns=1,
    device="cpu",
    seed=0,
)


@pytest.fixture(scope="module")
def tokenizer(tiny_model_dir: Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(tiny_model_dir))


@pytest.fixture(scope="module")
def parent_adapter(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The namespace's current adapter: a v0 zero adapter (the student warm-starts from it)."""
    out = tmp_path_factory.mktemp("parent") / "v0"
    return build_zero_adapter(tiny_model_dir, TrainConfig().lora_config(tiny_model_dir), out)


@pytest.fixture(scope="module")
def plan(tiny_model_dir: Path, tokenizer):
    """Prompts answered by the teacher (base + v0 with the memories in context), greedy and local:
    the caller-filled path the service takes with vLLM responses."""
    plan = plan_distillation(MEMORIES, CONVERSATIONS, CONFIG)
    teacher = load_base_model(tiny_model_dir, device=torch.device("cpu"), dtype=torch.float32)
    views = [teacher_messages(plan.prefix_messages, p) for p in plan.prompts_without_response()]
    responses = generate_responses(
        teacher, tokenizer, views, CONFIG.max_new_tokens, no_repeat_ngram_size=CONFIG.no_repeat_ngram_size
    )
    assert all(r.strip() for r in responses)
    return plan.with_responses(responses)


@pytest.fixture(scope="module")
def distilled(tiny_model_dir, tokenizer, plan, parent_adapter, tmp_path_factory) -> DistillResult:
    progress: list[dict] = []
    result = MemoryDistiller(CONFIG).run(
        base_model=tiny_model_dir,
        tokenizer=tokenizer,
        plan=plan,
        parent_adapter=parent_adapter,
        out_dir=tmp_path_factory.mktemp("distilled") / "v1",
        on_progress=progress.append,
    )
    assert [p["step"] for p in progress] == list(range(1, int(result.metrics["steps"]) + 1))
    return result


def test_gap_closes_on_heldout_probes(distilled: DistillResult):
    metrics = distilled.metrics
    assert distilled.stopped_reason == "completed"
    assert metrics["kl_before"] > 0
    assert metrics["gap_closure"] >= 0.5, metrics
    assert metrics["train_gap_closure"] >= metrics["gap_closure"] - 0.2
    assert metrics["train_tokens"] > 0 and metrics["train_seconds"] > 0
    assert metrics["heldout_pairs"] >= 1


def test_drift_stays_under_the_gate_bound(distilled: DistillResult):
    assert 0 <= distilled.metrics["drift_kl"] <= GateConfig().max_drift_kl


def test_student_without_memories_prefers_the_teachers_answers(
    distilled, plan, tokenizer, tiny_model_dir, parent_adapter
):
    """NLL of the teacher's answers to held-out probes: the teacher (memories in context) vs the
    student without them, before (parent adapter) and after distillation."""
    pairs = [
        render_distillation_pair(
            tokenizer,
            prefix_messages=[*plan.prefix_messages, *prompt.history],
            messages=list(prompt.messages),
            response=prompt.response,
            retained_turns=0,
            config=CONFIG.render,
        )
        for prompt in plan.heldout
    ]
    common = {
        "base_model": tiny_model_dir,
        "candidate_adapter": distilled.adapter_dir,
        "parent_adapter": parent_adapter,
        "device": "cpu",
    }
    teacher = score_candidate(examples=[p.teacher for p in pairs], probes=[pairs[0].teacher], **common)
    student = score_candidate(examples=[p.student for p in pairs], probes=[pairs[0].student], **common)
    teacher_nll, before, after = teacher["nll_before"], student["nll_before"], student["nll_after"]
    assert before > teacher_nll  # without the memories the answers were less likely ...
    assert after < before  # ... distillation makes them more likely ...
    assert before - after >= 0.5 * (before - teacher_nll)  # ... closing at least half of that gap


def test_adapter_is_saved_in_peft_format(distilled: DistillResult, tiny_model_dir: Path):
    from peft import PeftModel

    files = {p.name for p in distilled.adapter_dir.iterdir()}
    assert {"adapter_config.json", "adapter_model.safetensors"} <= files
    assert not [p for p in distilled.adapter_dir.iterdir() if p.is_dir()]  # no second (parent) adapter
    config = json.loads((distilled.adapter_dir / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA"
    base = load_base_model(tiny_model_dir, device=torch.device("cpu"), dtype=torch.float32)
    model = PeftModel.from_pretrained(base, str(distilled.adapter_dir))
    lora_b = [p for name, p in model.named_parameters() if "lora_B" in name]
    assert lora_b and any(p.abs().sum() > 0 for p in lora_b)  # trained away from the zero parent


def test_alignment_assertion_fires_on_a_shifted_student(tokenizer, plan):
    prompt = plan.train[0]
    pair = render_distillation_pair(
        tokenizer,
        prefix_messages=list(plan.prefix_messages),
        messages=list(prompt.messages),
        response=prompt.response,
        retained_turns=0,
        config=CONFIG.render,
    )
    teacher_ids = [t for t in pair.teacher.labels if t != -100]
    assert_aligned(torch.tensor(teacher_ids), [pair.student])
    # shift the student's labels one position left: same tokens, wrong place
    shifted = dataclasses.replace(pair.student, labels=pair.student.labels[1:] + [-100])
    with pytest.raises(DistillAlignmentError):
        assert_aligned(torch.tensor(teacher_ids), [shifted])


@pytest.fixture(scope="module")
def one_epoch(tiny_model_dir, tokenizer, plan):
    """A prepared (model loaded, teacher cached) one-epoch run, for loop-level checks."""
    distiller = MemoryDistiller(dataclasses.replace(CONFIG, epochs=1, feedback_mix=0.5))
    prepared = distiller.prepare(
        base_model=tiny_model_dir, tokenizer=tokenizer, plan=plan, parent_adapter=None
    )
    return distiller, prepared


def trainable(prepared) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in prepared.model.named_parameters() if p.requires_grad}


def test_training_loop_refuses_a_misaligned_batch_before_any_update(one_epoch, tokenizer, plan):
    distiller, prepared = one_epoch
    index = 0
    prompt = next(p for p in plan.train if p.response)
    # the student renders a different response than the one the teacher cache holds
    wrong = render_distillation_pair(
        tokenizer,
        prefix_messages=[*plan.prefix_messages, *prompt.history],
        messages=list(prompt.messages),
        response=prompt.response + " and more",
        retained_turns=0,
        config=CONFIG.render,
    )
    misaligned = dataclasses.replace(
        prepared,
        train_pairs=[
            dataclasses.replace(prepared.train_pairs[index], student=wrong.student),
            *prepared.train_pairs[1:],
        ],
    )
    before = trainable(prepared)
    with pytest.raises(DistillAlignmentError, match="response tokens differ"):
        distiller.train_student(misaligned)
    after = trainable(prepared)
    assert all(torch.equal(before[n], after[n]) for n in before)


def test_nan_guard_raises_training_diverged(one_epoch):
    distiller, prepared = one_epoch
    param = next(p for n, p in prepared.model.named_parameters() if "lora_A" in n)
    saved = param.detach().clone()
    try:
        with torch.no_grad():
            param.fill_(float("nan"))
        with pytest.raises(TrainingDiverged):
            distiller.train_student(prepared)
    finally:
        with torch.no_grad():
            param.copy_(saved)


def test_a_student_run_past_its_time_budget_fails_as_an_online_update_does(one_epoch):
    distiller, prepared = one_epoch
    before = trainable(prepared)
    # the budget rule is the online trainer's (GuardedStep): the whole run from `started` must fit
    with pytest.raises(TrainingBudgetExceeded, match="time budget"):
        distiller.train_student(prepared, started=time.perf_counter() - distiller.config.time_budget_s - 1)
    after = trainable(prepared)
    assert all(torch.equal(before[n], after[n]) for n in before)


def test_feedback_mix_adds_the_online_loss(one_epoch, tokenizer):
    distiller, prepared = one_epoch
    feedback = render_example(
        tokenizer,
        {"messages": [{"role": "user", "content": "Kestrel?"}], "continuation": "Password 7-4-1-9."},
        CONFIG.render,
    )
    progress: list[dict] = []
    result = distiller.train_student(prepared, [feedback], on_progress=progress.append)
    assert result.metrics["steps"] == len(progress) >= 1
    # loss = KL + 0.5 x CE of the feedback continuation (random model: CE ~ log |V| >> KL)
    assert all(p["loss"] > p["kl"] + 1.0 for p in progress)
