"""The LoRA training recipe on the tiny model: learning, guards, warm start, determinism, gate."""

from __future__ import annotations

import dataclasses
import hashlib
import random
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from training import trainer as trainer_module
from training.adapter_store import AdapterStore
from training.evaluate import (
    AdapterView,
    GateConfig,
    builtin_probe_examples,
    evaluate_gate,
    mean_nll,
    score_candidate,
)
from training.render import RenderConfig, render_example
from training.trainer import (
    LoraTrainer,
    TrainConfig,
    TrainingBudgetExceeded,
    TrainingCancelled,
    TrainingDiverged,
)

FEEDBACK = {
    "messages": [
        {"role": "user", "content": "Where is the team offsite this year?"},
        {"role": "assistant", "content": "I am not sure."},
    ],
    "continuation": "It is in Lisbon, in May.",
}
OTHER_FEEDBACK = {
    "messages": [{"role": "user", "content": "Which editor does the build team use?"}],
    "continuation": "They use Helix.",
}
# settings that learn one short continuation on the tiny random model in a few dozen steps; one thread:
# a tiny model gains little from two, and loses 10x when the cores are shared with other processes
FAST = {"lr": 1e-2, "rank": 8, "alpha": 16, "device": "cpu", "seed": 0, "num_threads": 1}


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


@pytest.fixture(scope="module")
def example(tokenizer):
    return render_example(tokenizer, FEEDBACK, RenderConfig())


@pytest.fixture(scope="module")
def other_example(tokenizer):
    return render_example(tokenizer, OTHER_FEEDBACK, RenderConfig())


@pytest.fixture(scope="module")
def probes(tokenizer):
    return builtin_probe_examples(tokenizer)


@pytest.fixture(scope="module")
def learned(tiny_model_dir: Path, example, tmp_path_factory: pytest.TempPathFactory):
    """One online update on FEEDBACK (shared by the tests that only read its result)."""
    progress: list[dict] = []
    result = LoraTrainer(TrainConfig(max_steps=40, **FAST)).train(
        base_model=tiny_model_dir,
        examples=[example],
        parent_adapter=None,
        out_dir=tmp_path_factory.mktemp("learned") / "adapter",
        on_progress=progress.append,
        should_stop=lambda: False,
    )
    return result, progress


def split_context_target(example) -> tuple[list[int], list[int]]:
    supervised = [i for i, label in enumerate(example.labels) if label != -100]
    assert supervised == list(range(supervised[0], supervised[-1] + 1)), "one contiguous target span"
    return example.input_ids[: supervised[0]], [example.input_ids[i] for i in supervised]


def load_with_adapter(tiny_model_dir: Path, adapter_dir: Path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir), dtype=torch.float32)
    return PeftModel.from_pretrained(base, str(adapter_dir)).eval()


def weights_of(adapter_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(str(adapter_dir / "adapter_model.safetensors"))


def folder_digest(folder: Path) -> str:
    digest = hashlib.sha256()
    for path in sorted(folder.rglob("*")):
        if path.is_file():
            digest.update(path.name.encode() + path.read_bytes())
    return digest.hexdigest()


def test_one_online_update_learns_the_continuation_without_drifting(
    tiny_model_dir: Path, example, probes, learned, tokenizer
) -> None:
    result, progress = learned
    context, target = split_context_target(example)
    model = load_with_adapter(tiny_model_dir, result.adapter_dir)
    with torch.inference_mode():
        generated = model.generate(
            torch.tensor([context]), max_new_tokens=len(target), do_sample=False, pad_token_id=0
        )[0, len(context) :].tolist()
    assert tokenizer.decode(generated) == tokenizer.decode(target)  # "It is in Lisbon, in May.<|im_end|>"
    assert generated == target

    metrics = score_candidate(
        base_model=tiny_model_dir,
        candidate_adapter=result.adapter_dir,
        parent_adapter=None,
        examples=[example],
        probes=probes,
        device="cpu",
    )
    gate = GateConfig()
    assert metrics["drift_kl"] < gate.max_drift_kl
    assert metrics["nll_after"] < metrics["nll_before"]
    assert evaluate_gate(metrics, gate).passed, evaluate_gate(metrics, gate).reason

    assert [p["step"] for p in progress] == list(range(1, 41))
    assert all(p["total_steps"] == 40 and p["tokens_per_s"] > 0 for p in progress)
    assert progress[-1]["loss"] < progress[0]["loss"]
    assert result.metrics["steps"] == 40
    assert result.metrics["train_tokens"] == 40 * example.num_target_tokens
    assert result.metrics["final_loss"] == progress[-1]["loss"] == result.loss_history[-1]
    assert result.metrics["train_seconds"] > 0


def test_base_weights_stay_frozen_and_only_lora_weights_change(
    tiny_model_dir: Path, example, tmp_path: Path, monkeypatch
) -> None:
    from transformers import AutoModelForCausalLM

    base_digest = folder_digest(tiny_model_dir)
    loaded = []
    real_load = trainer_module.load_base_model

    def keep_reference(*args, **kwargs):
        loaded.append(real_load(*args, **kwargs))
        return loaded[-1]

    monkeypatch.setattr(trainer_module, "load_base_model", keep_reference)
    result = LoraTrainer(TrainConfig(max_steps=3, **FAST)).train(
        base_model=tiny_model_dir, examples=[example], out_dir=tmp_path / "out"
    )
    pristine = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir), dtype=torch.float32).state_dict()
    trained_base = {
        name.replace(".base_layer", ""): tensor
        for name, tensor in loaded[0].state_dict().items()
        if "lora_" not in name
    }
    assert trained_base.keys() == pristine.keys()
    assert all(torch.equal(trained_base[name], pristine[name]) for name in pristine)
    assert folder_digest(tiny_model_dir) == base_digest

    weights = weights_of(result.adapter_dir)
    assert weights and all("lora_A" in key or "lora_B" in key for key in weights)
    lora_b = [tensor for key, tensor in weights.items() if "lora_B" in key]
    assert all(torch.count_nonzero(tensor) > 0 for tensor in lora_b)  # moved away from the zero init
    config = (result.adapter_dir / "adapter_config.json").read_text()
    assert str(tiny_model_dir) in config


def test_warm_start_continues_from_the_parent(
    tiny_model_dir: Path, example, other_example, learned, tmp_path: Path
) -> None:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    parent_dir = learned[0].adapter_dir
    parent = PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(str(tiny_model_dir), dtype=torch.float32), str(parent_dir)
    )
    parent_nll_on_new = mean_nll(AdapterView(parent, "default"), [other_example])
    parent_nll_on_old = mean_nll(AdapterView(parent, "default"), [example])

    progress: list[dict] = []
    child = LoraTrainer(TrainConfig(max_steps=4, **{**FAST, "rank": 2})).train(
        base_model=tiny_model_dir,
        examples=[other_example, example],  # new feedback plus a replayed old item
        parent_adapter=parent_dir,
        out_dir=tmp_path / "child",
        on_progress=progress.append,
    )
    assert child.metrics["lora_rank"] == 8  # the parent's rank, not the config's
    parent_loss = (
        parent_nll_on_new * other_example.num_target_tokens + parent_nll_on_old * example.num_target_tokens
    ) / (other_example.num_target_tokens + example.num_target_tokens)
    assert progress[0]["loss"] == pytest.approx(
        parent_loss, rel=1e-5
    )  # step 1 starts from the parent's weights
    child_weights, parent_weights = weights_of(child.adapter_dir), weights_of(parent_dir)
    assert child_weights.keys() == parent_weights.keys()
    assert any(not torch.equal(child_weights[k], parent_weights[k]) for k in child_weights)

    # the gate compares the child with its parent adapter (both loaded into one model), not the base
    metrics = score_candidate(
        base_model=tiny_model_dir,
        candidate_adapter=child.adapter_dir,
        parent_adapter=parent_dir,
        examples=[other_example],
        probes=[example],
        device="cpu",
    )
    assert metrics["nll_before"] == pytest.approx(parent_nll_on_new, rel=1e-5)
    assert metrics["nll_after"] < metrics["nll_before"]
    assert 0 < metrics["drift_kl"] < GateConfig().max_drift_kl


def test_warm_start_from_the_zero_v0_adapter(tiny_model_dir: Path, example, tmp_path: Path) -> None:
    config = TrainConfig(max_steps=3, **FAST)
    store = AdapterStore(tmp_path / "adapters")
    v0 = store.write_zero_adapter("ns", base_model=tiny_model_dir, lora_config=config.lora_config())
    result = LoraTrainer(config).train(
        base_model=tiny_model_dir, examples=[example], parent_adapter=v0.path, out_dir=tmp_path / "v1"
    )
    assert all(torch.count_nonzero(t) > 0 for k, t in weights_of(result.adapter_dir).items() if "lora_B" in k)
    store.verify("ns", 0, v0.sha256)  # training never touches the parent's folder


def test_gradient_accumulation_matches_one_big_batch(
    tiny_model_dir: Path, example, other_example, tmp_path
) -> None:
    one_batch = LoraTrainer(TrainConfig(max_steps=1, batch_tokens=4096, **FAST)).train(
        base_model=tiny_model_dir, examples=[example, other_example], out_dir=tmp_path / "a"
    )
    tight = max(len(example.input_ids), len(other_example.input_ids))  # one example per micro-batch
    accumulated = LoraTrainer(TrainConfig(max_steps=1, batch_tokens=tight, grad_accum_steps=2, **FAST)).train(
        base_model=tiny_model_dir, examples=[example, other_example], out_dir=tmp_path / "b"
    )
    assert one_batch.loss_history[0] == pytest.approx(accumulated.loss_history[0], rel=1e-5)
    a, b = weights_of(one_batch.adapter_dir), weights_of(accumulated.adapter_dir)
    assert all(torch.allclose(a[k], b[k], atol=1e-6, rtol=1e-4) for k in a)


def test_same_seed_same_adapter_other_seed_other_adapter(
    tiny_model_dir: Path, example, other_example, tmp_path
) -> None:
    def run(seed: int, name: str) -> dict[str, torch.Tensor]:
        config = TrainConfig(max_steps=3, batch_tokens=64, **{**FAST, "seed": seed})
        result = LoraTrainer(config).train(
            base_model=tiny_model_dir, examples=[example, other_example], out_dir=tmp_path / name
        )
        return weights_of(result.adapter_dir)

    first, again, other = run(7, "first"), run(7, "again"), run(8, "other")
    assert all(torch.equal(first[k], again[k]) for k in first)
    assert any(not torch.equal(first[k], other[k]) for k in first)


def test_inf_in_the_parent_adapter_diverges_and_writes_nothing(
    tiny_model_dir: Path, example, learned, tmp_path: Path
) -> None:
    poisoned = tmp_path / "poisoned"
    poisoned.mkdir()
    (poisoned / "adapter_config.json").write_bytes(
        (learned[0].adapter_dir / "adapter_config.json").read_bytes()
    )
    weights = weights_of(learned[0].adapter_dir)
    first_b = next(k for k in sorted(weights) if "lora_B" in k)
    weights[first_b][0, 0] = float("inf")
    save_file(weights, str(poisoned / "adapter_model.safetensors"))
    out_dir = tmp_path / "out"
    with pytest.raises(TrainingDiverged) as error:
        LoraTrainer(TrainConfig(max_steps=3, **FAST)).train(
            base_model=tiny_model_dir, examples=[example], parent_adapter=poisoned, out_dir=out_dir
        )
    assert error.value.step == 1
    assert not out_dir.exists()


def test_inf_gradient_with_finite_loss_diverges(
    tiny_model_dir: Path, example, tmp_path: Path, monkeypatch
) -> None:
    class InfiniteGradient(torch.autograd.Function):
        @staticmethod
        def forward(ctx, value):
            return value.clone()

        @staticmethod
        def backward(ctx, grad):
            return grad * float("inf")

    real_nll = trainer_module.token_nll_sum
    monkeypatch.setattr(
        trainer_module, "token_nll_sum", lambda *a, **k: InfiniteGradient.apply(real_nll(*a, **k))
    )
    with pytest.raises(TrainingDiverged, match="gradient norm"):
        LoraTrainer(TrainConfig(max_steps=2, **FAST)).train(
            base_model=tiny_model_dir, examples=[example], out_dir=tmp_path / "out"
        )
    assert not (tmp_path / "out").exists()


def test_absurd_learning_rate_never_yields_a_passing_version(
    tiny_model_dir: Path, example, probes, tmp_path
) -> None:
    out_dir = tmp_path / "out"
    try:
        result = LoraTrainer(TrainConfig(max_steps=10, **{**FAST, "lr": 1e6})).train(
            base_model=tiny_model_dir, examples=[example], out_dir=out_dir
        )
    except TrainingDiverged:
        assert not out_dir.exists()
        return
    metrics = score_candidate(
        base_model=tiny_model_dir,
        candidate_adapter=result.adapter_dir,
        parent_adapter=None,
        examples=[example],
        probes=probes,
        device="cpu",
    )
    assert not evaluate_gate(metrics, GateConfig()).passed


def test_corrupted_labels_are_rejected_by_the_gate(
    tiny_model_dir: Path, example, probes, tmp_path: Path
) -> None:
    rng = random.Random(0)
    vocab = 150_000
    corrupted = dataclasses.replace(
        example, labels=[label if label == -100 else rng.randrange(vocab) for label in example.labels]
    )
    result = LoraTrainer(TrainConfig(max_steps=15, **FAST)).train(
        base_model=tiny_model_dir, examples=[corrupted], out_dir=tmp_path / "out"
    )
    assert result.loss_history[-1] < result.loss_history[0]  # it did fit the corrupted targets
    metrics = score_candidate(  # the gate scores the feedback as it really is
        base_model=tiny_model_dir,
        candidate_adapter=result.adapter_dir,
        parent_adapter=None,
        examples=[example],
        probes=probes,
        device="cpu",
    )
    decision = evaluate_gate(metrics, GateConfig())
    assert not decision.passed and "NLL did not drop enough" in decision.reason


def test_time_budget_stops_without_writing(tiny_model_dir: Path, example, tmp_path: Path) -> None:
    with pytest.raises(TrainingBudgetExceeded, match="time budget"):
        LoraTrainer(TrainConfig(max_steps=100_000, time_budget_s=1.0, **FAST)).train(
            base_model=tiny_model_dir, examples=[example], out_dir=tmp_path / "out"
        )
    assert not (tmp_path / "out").exists()


def test_should_stop_cancels_without_writing(tiny_model_dir: Path, example, tmp_path: Path) -> None:
    seen: list[dict] = []
    with pytest.raises(TrainingCancelled):
        LoraTrainer(TrainConfig(max_steps=50, **FAST)).train(
            base_model=tiny_model_dir,
            examples=[example],
            out_dir=tmp_path / "out",
            on_progress=seen.append,
            should_stop=lambda: len(seen) >= 2,
        )
    assert len(seen) == 2
    assert not (tmp_path / "out").exists()


def test_bad_inputs_are_refused(tiny_model_dir: Path, example, tmp_path: Path) -> None:
    trainer = LoraTrainer(TrainConfig(max_steps=1, **FAST))
    with pytest.raises(ValueError, match="at least one example"):
        trainer.train(base_model=tiny_model_dir, examples=[], out_dir=tmp_path / "a")
    unsupervised = dataclasses.replace(example, labels=[-100] * len(example.labels))
    with pytest.raises(ValueError, match="no supervised token"):
        trainer.train(base_model=tiny_model_dir, examples=[unsupervised], out_dir=tmp_path / "b")
    (tmp_path / "c").mkdir()
    (tmp_path / "c" / "stale.txt").write_text("x")
    with pytest.raises(FileExistsError):
        trainer.train(base_model=tiny_model_dir, examples=[example], out_dir=tmp_path / "c")


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("rank", 0),
        ("lr", -1.0),
        ("lr", float("nan")),
        ("dropout", 1.0),
        ("grad_accum_steps", 0),
        ("device", "tpu"),
        ("dtype", "float16"),
        ("target_modules", ()),
        ("time_budget_s", 0.0),
    ],
)
def test_config_errors_name_the_field(field: str, value) -> None:
    with pytest.raises(ValueError, match=f"TrainConfig.{field}"):
        TrainConfig(**{field: value})


def test_lr_schedule() -> None:
    config = TrainConfig(lr=1.0, warmup_steps=3, lr_schedule="linear")
    rates = [trainer_module.lr_at_step(step, 13, config) for step in range(13)]
    assert rates[:3] == pytest.approx([0.25, 0.5, 0.75])
    assert rates[3] == pytest.approx(1.0) and rates[-1] == pytest.approx(0.1)
    assert trainer_module.lr_at_step(10, 13, TrainConfig(lr=0.5)) == 0.5


def test_gradient_checkpointing_gives_the_same_updates(tiny_model_dir: Path, example, tmp_path: Path) -> None:
    plain = LoraTrainer(TrainConfig(max_steps=2, **FAST)).train(
        base_model=tiny_model_dir, examples=[example], out_dir=tmp_path / "plain"
    )
    checkpointed = LoraTrainer(TrainConfig(max_steps=2, gradient_checkpointing=True, **FAST)).train(
        base_model=tiny_model_dir, examples=[example], out_dir=tmp_path / "checkpointed"
    )
    assert checkpointed.loss_history == pytest.approx(plain.loss_history, rel=1e-6)
    a, b = weights_of(plain.adapter_dir), weights_of(checkpointed.adapter_dir)
    assert all(torch.allclose(a[k], b[k], atol=1e-7) for k in a)


@pytest.mark.parametrize("reference", ["parent", "base"])
def test_the_anchor_pulls_towards_the_chosen_reference(
    tiny_model_dir: Path, example, other_example, learned, tmp_path: Path, reference: str
) -> None:
    """Warm-started from a parent that learnt `example`, anchored on `example`: step 1's anchor KL is
    zero against the parent itself (the model is still the parent) and positive against the base
    (adapter off), which never learnt it; so over many updates the base reference cannot drift."""
    progress: list[dict] = []
    config = TrainConfig(max_steps=1, anchor_weight=1.0, anchor_reference=reference, **{**FAST, "lr": 1e-6})
    LoraTrainer(config).train(
        base_model=tiny_model_dir,
        examples=[other_example],
        parent_adapter=learned[0].adapter_dir,
        out_dir=tmp_path / "child",
        on_progress=progress.append,
        anchors=[example],
    )
    from training.token_nll import batches_from_groups, supervised_logits
    from training.topk_kl import topk_kl, topk_of

    parent = load_with_adapter(tiny_model_dir, learned[0].adapter_dir)
    batch = batches_from_groups([[example]], pad_token_id=0)[0]
    with torch.inference_mode():
        parent_logits = supervised_logits(parent, batch)
        with parent.disable_adapter():
            base_logits = supervised_logits(parent, batch)
        base_vs_parent = float(topk_kl(parent_logits, topk_of(base_logits, config.anchor_topk)))
    assert base_vs_parent > 0
    expected = 0.0 if reference == "parent" else base_vs_parent
    assert progress[0]["anchor_kl"] == pytest.approx(expected, rel=1e-3, abs=1e-7)


def test_anchor_reference_must_be_base_or_parent() -> None:
    with pytest.raises(ValueError, match="TrainConfig.anchor_reference"):
        TrainConfig(anchor_reference="teacher")  # type: ignore[arg-type]


def test_base_references_are_computed_once_per_resident_base_and_the_updates_stay_the_same(
    tiny_model_dir: Path, example, other_example, probes, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Anchored to the base, a second job on the same resident base reuses the first job's anchor
    references and trains the same adapter; another anchor set, or the parent reference, computes its own."""
    from training.model_loading import ResidentBaseModel
    from training.reference_cache import BaseReferenceCache

    cache = BaseReferenceCache()
    monkeypatch.setattr(trainer_module, "BASE_REFERENCES", cache)
    resident = ResidentBaseModel(tiny_model_dir, device="cpu")
    config = TrainConfig(max_steps=3, anchor_weight=1.0, anchors_per_step=2, **FAST)

    def run(name: str, anchors, run_config: TrainConfig = config, parent: Path | None = None):
        with resident.lend() as holder:
            result = LoraTrainer(run_config).train(
                base_model=tiny_model_dir, examples=[example], out_dir=tmp_path / name,
                anchors=anchors, base=holder.model, parent_adapter=parent,
            )
            holder.model = result.model
        return result

    first, second = run("first", probes), run("second", probes)
    assert (first.metrics["anchor_references_cached"], second.metrics["anchor_references_cached"]) == (0.0, 1.0)
    assert (cache.misses, cache.hits) == (1, 1)
    assert second.loss_history == first.loss_history
    first_weights, second_weights = weights_of(first.adapter_dir), weights_of(second.adapter_dir)
    assert all(torch.equal(first_weights[name], second_weights[name]) for name in first_weights)
    warm = run("warm", probes, parent=first.adapter_dir)  # a warm start: same base, same references
    assert warm.metrics["anchor_references_cached"] == 1.0

    other = run("other", [other_example, *probes[:2]])
    assert other.metrics["anchor_references_cached"] == 0.0 and cache.misses == 2
    parent_reference = run("parent", probes, dataclasses.replace(config, anchor_reference="parent"))
    assert parent_reference.metrics["anchor_references_cached"] == 0.0
    assert (cache.misses, cache.hits) == (2, 2), "the parent reference is never cached"
    assert resident.loads == 1


def test_references_warmed_on_the_plain_base_are_the_first_update_s_and_train_the_same_adapter(
    tiny_model_dir: Path, example, probes, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`warm_base_references` on the plain resident base stores what the first anchored update would
    compute with its adapter switched off: that update finds them (no forward of its own) and trains
    the adapter a cold run trains, bit for bit."""
    from training.model_loading import ResidentBaseModel
    from training.reference_cache import BaseReferenceCache

    config = TrainConfig(max_steps=3, anchor_weight=1.0, anchors_per_step=2, **FAST)

    def first_update(name: str, *, warm: bool):
        cache = BaseReferenceCache()
        monkeypatch.setattr(trainer_module, "BASE_REFERENCES", cache)
        resident = ResidentBaseModel(tiny_model_dir, device="cpu")
        with resident.lend() as holder:
            if warm:
                assert LoraTrainer(config).warm_base_references(holder.model, probes) is False
                assert LoraTrainer(config).warm_base_references(holder.model, probes) is True
            result = LoraTrainer(config).train(
                base_model=tiny_model_dir, examples=[example], out_dir=tmp_path / name,
                anchors=probes, base=holder.model,
            )
            holder.model = result.model
        return result, cache

    cold, cold_cache = first_update("cold", warm=False)
    warmed, warm_cache = first_update("warmed", warm=True)
    assert cold.metrics["anchor_references_cached"] == 0.0 and cold_cache.misses == 1
    assert warmed.metrics["anchor_references_cached"] == 1.0
    assert (warm_cache.misses, warm_cache.hits) == (1, 2)
    assert warmed.loss_history == cold.loss_history
    cold_weights, warm_weights = weights_of(cold.adapter_dir), weights_of(warmed.adapter_dir)
    assert all(torch.equal(cold_weights[name], warm_weights[name]) for name in cold_weights)


def test_warming_is_a_no_op_without_a_base_anchor(tiny_model_dir: Path, probes) -> None:
    from training.model_loading import load_base_model

    base = load_base_model(tiny_model_dir, device=torch.device("cpu"), dtype=torch.float32)
    for config in (TrainConfig(anchor_weight=0.0, **FAST),
                   TrainConfig(anchor_weight=1.0, anchor_reference="parent", **FAST)):
        assert LoraTrainer(config).warm_base_references(base, probes) is False
    assert LoraTrainer(TrainConfig(anchor_weight=1.0, **FAST)).warm_base_references(base, []) is False


def test_running_the_shared_prefix_once_gives_the_full_forward_s_logits_and_gradients(
    tiny_model_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Rows with a common system-prompt-like prefix (right-padded, of different lengths): the
    decoder runs the prefix once for all rows; logits and LoRA gradients match one full forward."""
    from training import token_nll
    from training.model_loading import attach_lora, load_base_model
    from training.token_nll import TokenBatch, shared_prefix_length, supervised_logits

    base = load_base_model(tiny_model_dir, device=torch.device("cpu"), dtype=torch.float32)
    model = attach_lora(base, None, TrainConfig(**FAST).lora_config())
    generator = torch.Generator().manual_seed(3)
    for name, parameter in model.named_parameters():
        if "lora_B" in name:  # a non-zero adapter, so its gradients through the prefix count
            parameter.data.normal_(0.0, 0.05, generator=generator)
    vocab = model.config.vocab_size
    prefix = torch.randint(1, vocab, (12,), generator=generator).tolist()
    lengths, starts = [7, 3, 11], [2, 1, 5]
    width = 12 + max(lengths)
    input_ids = torch.zeros(3, width, dtype=torch.long)
    labels = torch.full((3, width), -100)
    attention = torch.zeros(3, width, dtype=torch.long)
    for row, (length, start) in enumerate(zip(lengths, starts, strict=True)):
        tokens = prefix + torch.randint(1, vocab, (length,), generator=generator).tolist()
        input_ids[row, : len(tokens)] = torch.tensor(tokens)
        attention[row, : len(tokens)] = 1
        labels[row, 12 + start : len(tokens)] = input_ids[row, 12 + start : len(tokens)]
    batch = TokenBatch.from_padded({"input_ids": input_ids, "labels": labels, "attention_mask": attention})
    assert shared_prefix_length(batch) >= 12

    calls: list[tuple[int, ...]] = []
    backbone = token_nll.causal_lm_of(model).base_model
    hook = backbone.register_forward_pre_hook(
        lambda module, args, kwargs: calls.append(tuple(kwargs["input_ids"].shape)), with_kwargs=True
    )

    def logits_and_grads(shared: bool):
        monkeypatch.setattr(token_nll, "MIN_SHARED_PREFIX", 8 if shared else 10**9)
        model.zero_grad()
        calls.clear()
        logits = supervised_logits(model, batch)
        (logits.logsumexp(-1) - logits[:, 0]).sum().backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        return logits.detach(), grads, list(calls)

    full_logits, full_grads, full_calls = logits_and_grads(shared=False)
    shared_logits, shared_grads, shared_calls = logits_and_grads(shared=True)
    hook.remove()
    prefix_length = shared_prefix_length(batch)
    assert full_calls == [(3, width)]
    assert shared_calls == [(1, prefix_length), (3, width - prefix_length)]  # the prefix ran once
    assert shared_logits.shape == full_logits.shape == (batch.num_targets, vocab)
    assert torch.allclose(shared_logits, full_logits, rtol=1e-4, atol=1e-5)
    assert full_grads.keys() == shared_grads.keys() and any("lora_A" in name for name in full_grads)
    for name, grad in full_grads.items():
        assert torch.allclose(shared_grads[name], grad, rtol=1e-3, atol=1e-7), name
