"""The evaluation gate: does a candidate adapter learn what it was taught without drifting from its parent?

Owns the metrics (mean NLL of supervised tokens, mean per-token KL(parent || candidate) on probe
positions), the built-in generic probe conversations and the one gate decision (`evaluate_gate`) of
online updates and distillations alike. Models are scored as given:
a plain model, or one adapter of a multi-adapter `PeftModel` (`AdapterView`), so parent and candidate can
share one copy of the base weights. It knows nothing of the database, the registry or how runs are started.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F

from training.token_nll import TokenBatch, batches_from_groups, causal_lm_of, supervised_logits, token_nll_sum

if TYPE_CHECKING:
    from training.render import Example, RenderConfig

__all__ = [
    "GENERIC_PROBE_CONVERSATIONS",
    "AdapterView",
    "GateConfig",
    "GateDecision",
    "builtin_probe_examples",
    "drift_kl",
    "evaluate_gate",
    "mean_nll",
    "relative_nll_drop",
    "score_candidate",
    "score_views",
]

# Varied, short, unrelated to any namespace's feedback: (user prompt, reference assistant reply).
GENERIC_PROBE_CONVERSATIONS: tuple[tuple[str, str], ...] = (
    ("What is the capital of France?", "The capital of France is Paris."),
    (
        "Write a haiku about autumn rain.",
        "Cold rain on red leaves,\nthe gutter hums a slow song,\nlamps glow in puddles.",
    ),
    (
        "How do I reverse a list in Python?",
        "Use `items.reverse()` to reverse in place, or `items[::-1]` for a reversed copy.",
    ),
    (
        "Explain photosynthesis in one sentence.",
        "Plants use sunlight to turn water and carbon dioxide into sugar, releasing oxygen.",
    ),
    ("Translate 'good morning' into Spanish.", '"Good morning" in Spanish is "buenos días".'),
    ("What is 17 multiplied by 6?", "17 multiplied by 6 is 102."),
    (
        "Give me three tips for better sleep.",
        "1. Keep a regular schedule.\n2. Avoid screens an hour before bed.\n3. Keep the bedroom cool and dark.",
    ),
    (
        "Summarize the plot of Romeo and Juliet briefly.",
        (
            "Two young lovers from feuding families marry in secret, and a chain of misunderstandings ends in "
            "both of their deaths, which finally reconciles the families."
        ),
    ),
    ("What does HTTP status code 404 mean?", "404 Not Found: the server cannot find the requested resource."),
    ("Suggest a name for a grey cat.", "How about Pebble, Smokey or Ash?"),
    (
        "Why is the sky blue?",
        (
            "Air molecules scatter short blue wavelengths of sunlight much more than red ones, so blue light "
            "reaches our eyes from all directions."
        ),
    ),
    ("Write a SQL query that counts rows in the table users.", "SELECT COUNT(*) FROM users;"),
)


@dataclass(frozen=True)
class AdapterView:
    """Score `model` (a `PeftModel`) with adapter `adapter` active, or with adapters disabled (None)."""

    model: Any
    adapter: str | None


@dataclass(frozen=True)
class GateConfig:
    min_nll_drop: float = 0.05  # required relative drop of the feedback NLL: (before - after) / before
    max_drift_kl: float = 0.5  # mean per-token KL(parent || candidate) on the probes, in nats
    # general probe questions the parent answered right and the candidate does not (behaviour report)
    max_general_lost: int = 0
    # distillation: held-out KL gap to the teacher closed, and (a bake) answers carrying its key content
    min_gap_closure: float = 0.3
    min_answer_agreement: float = 0.6

    def __post_init__(self) -> None:
        if not (math.isfinite(self.min_nll_drop) and self.min_nll_drop < 1):
            raise ValueError(f"GateConfig.min_nll_drop must be finite and < 1, got {self.min_nll_drop!r}")
        if not (math.isfinite(self.max_drift_kl) and self.max_drift_kl >= 0):
            raise ValueError(f"GateConfig.max_drift_kl must be finite and >= 0, got {self.max_drift_kl!r}")
        if not isinstance(self.max_general_lost, int) or self.max_general_lost < 0:
            raise ValueError(f"GateConfig.max_general_lost must be an int >= 0, got {self.max_general_lost!r}")
        for name in ("min_gap_closure", "min_answer_agreement"):
            value = getattr(self, name)
            if not (math.isfinite(value) and 0 <= value <= 1):
                raise ValueError(f"GateConfig.{name} must be in [0, 1], got {value!r}")


@dataclass(frozen=True)
class GateDecision:
    passed: bool
    reason: str


@contextmanager
def _scoring(model: torch.nn.Module | AdapterView) -> Iterator[torch.nn.Module]:
    """Activate the view's adapter, switch to eval mode and no-grad; restore everything afterwards."""
    module = model.model if isinstance(model, AdapterView) else model
    was_training = module.training
    module.eval()
    try:
        with torch.inference_mode():
            if not isinstance(model, AdapterView):
                yield module
            elif model.adapter is None:
                with module.disable_adapter():
                    yield module
            else:
                previous = module.active_adapter
                module.set_adapter(model.adapter)
                try:
                    yield module
                finally:
                    module.set_adapter(previous)
    finally:
        module.train(was_training)


def _device_of(model: torch.nn.Module | AdapterView) -> torch.device:
    module = model.model if isinstance(model, AdapterView) else model
    return next(module.parameters()).device


def _scoring_batches(
    model: torch.nn.Module | AdapterView, examples: Sequence[Example], batch_tokens: int
) -> list[TokenBatch]:
    from training.collate import length_bucketed_batches

    module = model.model if isinstance(model, AdapterView) else model
    pad_token_id = causal_lm_of(module).config.pad_token_id
    groups = length_bucketed_batches(list(examples), batch_tokens, 0)
    device = _device_of(model)
    return [
        batch.to(device) for batch in batches_from_groups(groups, 0 if pad_token_id is None else pad_token_id)
    ]


def mean_nll(
    model: torch.nn.Module | AdapterView, examples: Sequence[Example], batch_tokens: int = 4096
) -> float:
    """Token-mean negative log-likelihood (nats) of every supervised token of `examples`."""
    if not examples:
        raise ValueError("mean_nll needs at least one example")
    batches = _scoring_batches(model, examples, batch_tokens)
    total = torch.zeros((), dtype=torch.float64, device=_device_of(model))
    count = 0
    with _scoring(model) as module:
        for batch in batches:
            total += token_nll_sum(module, batch).double()
            count += batch.num_targets
    if count == 0:
        raise ValueError("mean_nll: the examples have no supervised token")
    return float(total) / count


def drift_kl(
    parent: torch.nn.Module | AdapterView,
    candidate: torch.nn.Module | AdapterView,
    probes: Sequence[Example],
    batch_tokens: int = 4096,
) -> float:
    """Mean over probe positions (labels != -100) of KL(parent || candidate) of the next-token
    distributions, in nats. Parent and candidate may be two models or two views of one `PeftModel`."""
    if not probes:
        raise ValueError("drift_kl needs at least one probe example")
    batches = _scoring_batches(candidate, probes, batch_tokens)
    total = torch.zeros((), dtype=torch.float64, device=_device_of(candidate))
    count = 0
    for batch in batches:
        with _scoring(parent) as module:
            parent_logp = F.log_softmax(supervised_logits(module, batch.to(_device_of(parent))), dim=-1)
        with _scoring(candidate) as module:
            candidate_logp = F.log_softmax(supervised_logits(module, batch), dim=-1)
        parent_logp = parent_logp.to(candidate_logp.device)
        kl = F.kl_div(candidate_logp, parent_logp, log_target=True, reduction="sum")
        total += kl.double()
        count += batch.num_targets
    if count == 0:
        raise ValueError("drift_kl: the probes have no supervised position")
    return float(total) / count


def builtin_probe_examples(tokenizer: Any, config: RenderConfig | None = None) -> list[Example]:
    """The generic probe conversations rendered for `tokenizer` (chat template when it has one,
    plain `User:`/`Assistant:` text otherwise); the labelled positions are the replies."""
    from training.render import RenderConfig, render_example

    config = config or RenderConfig()
    has_template = bool(getattr(tokenizer, "chat_template", None))
    probes = []
    for prompt, reply in GENERIC_PROBE_CONVERSATIONS:
        if has_template:
            item: dict[str, Any] = {"messages": [{"role": "user", "content": prompt}], "continuation": reply}
        else:
            item = {"context": f"User: {prompt}\nAssistant:", "continuation": f" {reply}"}
        example = render_example(tokenizer, item, config)
        if example is not None:
            probes.append(example)
    return probes


def score_candidate(
    *,
    base_model: Path,
    candidate_adapter: Path,
    parent_adapter: Path | None,
    examples: Sequence[Example],
    probes: Sequence[Example] | None = None,
    tokenizer: Any | None = None,
    device: str = "auto",
    dtype: str = "auto",
    batch_tokens: int = 4096,
) -> dict[str, float]:
    """Load the base once with the candidate (and parent) adapters and compute the gate metrics:
    `nll_before` (parent), `nll_after` (candidate), `nll_drop` (relative), `drift_kl`, `eval_seconds`.
    `parent_adapter=None` means the parent is the base model. `probes=None` uses the built-in ones,
    rendered with `tokenizer` (default: the one saved with the base model)."""
    from peft import PeftModel

    from training.model_loading import load_base_model, resolve_device, resolve_dtype

    started = time.perf_counter()
    torch_device = resolve_device(device)
    base = load_base_model(Path(base_model), device=torch_device, dtype=resolve_dtype(dtype, torch_device))
    model = PeftModel.from_pretrained(base, str(candidate_adapter), adapter_name="candidate")
    if parent_adapter is not None:
        model.load_adapter(str(parent_adapter), adapter_name="parent")
    model.to(torch_device)
    if probes is None:
        if tokenizer is None:
            from transformers import AutoTokenizer

            tokenizer = AutoTokenizer.from_pretrained(str(base_model))
        probes = builtin_probe_examples(tokenizer)
    parent = AdapterView(model, "parent" if parent_adapter is not None else None)
    metrics = score_views(parent, AdapterView(model, "candidate"), examples, probes, batch_tokens)
    metrics["eval_seconds"] = time.perf_counter() - started
    del model, base
    if torch_device.type == "cuda":
        torch.cuda.empty_cache()
    return metrics


def score_views(
    parent: torch.nn.Module | AdapterView,
    candidate: torch.nn.Module | AdapterView,
    examples: Sequence[Example],
    probes: Sequence[Example],
    batch_tokens: int = 4096,
) -> dict[str, float]:
    """The gate's NLL and drift metrics of two already loaded models (or adapter views):
    `nll_before`, `nll_after`, `nll_drop`, `drift_kl`."""
    nll_before = mean_nll(parent, examples, batch_tokens)
    nll_after = mean_nll(candidate, examples, batch_tokens)
    return {
        "nll_before": nll_before,
        "nll_after": nll_after,
        "nll_drop": relative_nll_drop(nll_before, nll_after),
        "drift_kl": drift_kl(parent, candidate, probes, batch_tokens),
    }


def relative_nll_drop(nll_before: float, nll_after: float) -> float:
    """(before - after) / before; 0 when the parent's NLL is already ~0 and did not get worse."""
    if nll_before <= 1e-9:
        return 0.0 if nll_after <= nll_before + 1e-9 else -math.inf
    return (nll_before - nll_after) / nll_before


def evaluate_gate(metrics: Mapping[str, float], config: GateConfig) -> GateDecision:
    """The one gate of every candidate version, online update or distillation. What the candidate
    had to learn is judged by the metric it carries: a distillation's held-out `gap_closure` (>=
    `min_gap_closure`; a bake's also its `answer_agreement` with the teacher, >=
    `min_answer_agreement`), else an online update's feedback NLL drop (>= `min_nll_drop`,
    relative). Every candidate: `drift_kl` at most `max_drift_kl` and, when the behaviour report
    was scored (`general_lost`), at most `max_general_lost` general answers lost. A metric the
    decision needs that is missing or not finite fails it. The reason names the numbers either way."""
    distilled = "gap_closure" in metrics
    if not distilled and not {"nll_before", "nll_after"} & set(metrics):
        raise ValueError("evaluate_gate: metrics carry neither nll_before/nll_after nor gap_closure")
    needed = ["gap_closure"] if distilled else ["nll_before", "nll_after"]
    needed.append("drift_kl")
    if "answer_agreement" in metrics:
        needed += ["answer_agreement", "general_lost"]
    elif "general_lost" in metrics:
        needed.append("general_lost")
    values = {key: float(metrics.get(key, math.nan)) for key in needed}
    unusable = [key for key, value in values.items() if not math.isfinite(value)]
    if unusable:
        return GateDecision(False, "non-finite metrics: " + ", ".join(
            f"{key} {'missing' if key not in metrics else values[key]}" for key in unusable))
    failures = []
    if distilled:
        learnt_text = f"gap_closure {values['gap_closure']:.1%} (required {config.min_gap_closure:.1%})"
        if values["gap_closure"] < config.min_gap_closure:
            failures.append(f"memories not baked in enough: {learnt_text}")
    else:
        nll_before, nll_after = values["nll_before"], values["nll_after"]
        drop = relative_nll_drop(nll_before, nll_after)
        learnt_text = (
            f"nll {nll_before:.4f} -> {nll_after:.4f} (drop {drop:.1%}, required {config.min_nll_drop:.1%})"
        )
        if nll_before <= 1e-9 and drop == 0.0:
            pass  # the parent already predicts the feedback perfectly and the candidate kept it
        elif drop < config.min_nll_drop:
            failures.append(f"feedback NLL did not drop enough: {learnt_text}")
    kl = values["drift_kl"]
    kl_text = f"drift_kl {kl:.4f} (max {config.max_drift_kl:g})"
    if kl > config.max_drift_kl:
        failures.append(f"drift too large: {kl_text}")
    answers_text = ""
    if "answer_agreement" in values:
        agreement = values["answer_agreement"]
        answers_text += f"; answer_agreement {agreement:.1%}"
        if agreement < config.min_answer_agreement:
            failures.append(f"memories not answered: answer_agreement {agreement:.1%} "
                            f"(required {config.min_answer_agreement:.1%})")
    if "general_lost" in values:
        lost = int(values["general_lost"])
        answers_text += f"; general answers lost {lost} (max {config.max_general_lost})"
        if lost > config.max_general_lost:
            failures.append(f"general answers lost: {lost} of {int(metrics.get('general_parent_right', 0))} "
                            f"the parent got right (max {config.max_general_lost})")
    if failures:
        return GateDecision(False, "; ".join(failures))
    return GateDecision(True, f"passed: {learnt_text}; {kl_text}{answers_text}")
