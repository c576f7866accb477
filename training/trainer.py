"""The online LoRA training recipe: rendered examples in, a peft adapter folder out.

`LoraTrainer(TrainConfig).train(...)` loads the base model by path, creates a LoRA (or warm-starts from
the parent adapter folder), runs a plain seeded AdamW loop over pre-collated, length-bucketed batches
with gradient accumulation and saves the adapter only when every step was finite, within the time
budget and not cancelled. It knows nothing of the database, the registry layout or vLLM.
"""

from __future__ import annotations

import math
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import torch

from training.model_loading import attach_lora, load_base_model, resolve_device, resolve_dtype
from training.reference_cache import BASE_REFERENCES
from training.token_nll import (
    DEFAULT_LOGITS_CHUNK,
    TokenBatch,
    batches_from_groups,
    supervised_logits,
    token_nll_sum,
)
from training.topk_kl import TopK, topk_kl, topk_of

if TYPE_CHECKING:
    from peft import LoraConfig, PeftModel

    from training.render import Example

__all__ = [
    "DEFAULT_TARGET_MODULES",
    "GuardedStep",
    "LoraTrainer",
    "TrainConfig",
    "TrainResult",
    "TrainingBudgetExceeded",
    "TrainingCancelled",
    "TrainingDiverged",
    "TrainingError",
    "load_base_model",
    "load_lora_model",
    "lr_at_step",
    "resolve_device",
    "resolve_dtype",
]

DEFAULT_TARGET_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
_DTYPES = ("float32", "bfloat16")


class TrainingError(Exception):
    """Base class: the run ended without an adapter (nothing was written to `out_dir`)."""


class TrainingDiverged(TrainingError):
    """A loss or gradient norm was NaN/inf, or the trained weights were not finite."""

    def __init__(self, message: str, *, step: int) -> None:
        super().__init__(message)
        self.step = step


class TrainingBudgetExceeded(TrainingError):
    """The run took longer than `TrainConfig.time_budget_s`."""


class TrainingCancelled(TrainingError):
    """`should_stop()` answered True."""


@dataclass(frozen=True)
class TrainConfig:
    """Knobs of one online LoRA update (built from `service.config.Settings`)."""

    rank: int = field(default=8, metadata={"help": "LoRA rank r (ignored on warm start: the parent's rank)"})
    alpha: int = field(default=16, metadata={"help": "LoRA alpha; the update is scaled by alpha / r"})
    dropout: float = field(default=0.0, metadata={"help": "dropout on the LoRA input"})
    target_modules: tuple[str, ...] = field(
        default=DEFAULT_TARGET_MODULES, metadata={"help": "module names that get a LoRA"}
    )
    lr: float = field(default=2e-3, metadata={"help": "AdamW peak learning rate"})
    epochs: int = field(default=8, metadata={"help": "passes over the examples (when max_steps == 0)"})
    max_steps: int = field(default=0, metadata={"help": "optimizer steps; 0 = derived from epochs"})
    batch_tokens: int = field(default=4096, metadata={"help": "padded tokens per micro-batch (bucketing)"})
    grad_accum_steps: int = field(default=1, metadata={"help": "micro-batches per optimizer step"})
    gradient_checkpointing: bool = field(default=False, metadata={"help": "recompute activations"})
    seed: int = field(default=0, metadata={"help": "seeds LoRA init, batch order and dropout"})
    time_budget_s: float = field(default=600.0, metadata={"help": "wall-clock limit of train()"})
    device: Literal["auto", "cpu", "cuda"] = field(default="auto", metadata={"help": "auto = cuda if any"})
    dtype: Literal["auto", "float32", "bfloat16"] = field(
        default="auto", metadata={"help": "base weights dtype; auto = bfloat16 on GPU, float32 on CPU"}
    )
    max_grad_norm: float = field(default=1.0, metadata={"help": "clip threshold; 0 = no clipping"})
    warmup_steps: int = field(default=0, metadata={"help": "linear warm-up steps"})
    lr_schedule: Literal["constant", "linear", "cosine"] = field(
        default="constant", metadata={"help": "after warm-up: constant, linear or cosine decay to 0"}
    )
    weight_decay: float = field(default=0.0, metadata={"help": "AdamW weight decay"})
    num_threads: int | None = field(
        default=None,
        metadata={"help": "torch CPU threads during train(), restored after; None = leave as is"},
    )
    logits_chunk: int = field(default=DEFAULT_LOGITS_CHUNK, metadata={"help": "LM-head chunk (positions)"})
    anchor_weight: float = field(
        default=0.0,
        metadata={"help": "weight of KL(reference || model) on the anchor examples' positions; 0 = off"},
    )
    anchor_topk: int = field(default=64, metadata={"help": "reference tokens kept per anchor position"})
    anchor_reference: Literal["base", "parent"] = field(
        default="base",
        metadata={"help": "whose distribution the anchor KL pulls towards: the parent (the warm-start "
                          "adapter) or the base model (adapter off), which does not drift over updates"},
    )
    anchors_per_step: int = field(default=8, metadata={"help": "anchor examples in each optimizer step"})
    stop_when_learnt: bool = field(
        default=False,
        metadata={"help": "stop once greedy decoding of every must-learn target reproduces it "
                          "(teacher-forced argmax = label at every position), after `learnt_extra_steps`"},
    )
    learnt_extra_steps: int = field(default=2, metadata={"help": "steps kept after every target is learnt"})

    def __post_init__(self) -> None:
        positive = {
            "rank": self.rank,
            "alpha": self.alpha,
            "epochs": self.epochs,
            "batch_tokens": self.batch_tokens,
            "grad_accum_steps": self.grad_accum_steps,
            "logits_chunk": self.logits_chunk,
        }
        for name, value in positive.items():
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"TrainConfig.{name} must be an int >= 1, got {value!r}")
        if not (math.isfinite(self.anchor_weight) and self.anchor_weight >= 0):
            raise ValueError(f"TrainConfig.anchor_weight must be finite and >= 0, got {self.anchor_weight!r}")
        if self.anchor_reference not in ("base", "parent"):
            raise ValueError(f"TrainConfig.anchor_reference must be 'base' or 'parent', got {self.anchor_reference!r}")
        for name in ("anchor_topk", "anchors_per_step"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"TrainConfig.{name} must be an int >= 1, got {value!r}")
        for name in ("max_steps", "warmup_steps", "learnt_extra_steps"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise ValueError(f"TrainConfig.{name} must be an int >= 0, got {value!r}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"TrainConfig.dropout must be in [0, 1), got {self.dropout!r}")
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise ValueError(f"TrainConfig.lr must be a finite number > 0, got {self.lr!r}")
        if not self.time_budget_s > 0:
            raise ValueError(f"TrainConfig.time_budget_s must be > 0, got {self.time_budget_s!r}")
        if not self.max_grad_norm >= 0:
            raise ValueError(f"TrainConfig.max_grad_norm must be >= 0, got {self.max_grad_norm!r}")
        if self.weight_decay < 0:
            raise ValueError(f"TrainConfig.weight_decay must be >= 0, got {self.weight_decay!r}")
        if self.device not in ("auto", "cpu", "cuda"):
            raise ValueError(f"TrainConfig.device must be auto, cpu or cuda, got {self.device!r}")
        if self.dtype != "auto" and self.dtype not in _DTYPES:
            raise ValueError(f"TrainConfig.dtype must be auto, float32 or bfloat16, got {self.dtype!r}")
        if self.lr_schedule not in ("constant", "linear", "cosine"):
            raise ValueError(
                f"TrainConfig.lr_schedule must be constant, linear or cosine, got {self.lr_schedule!r}"
            )
        if self.num_threads is not None and self.num_threads < 1:
            raise ValueError(f"TrainConfig.num_threads must be >= 1 or None, got {self.num_threads!r}")
        if isinstance(self.target_modules, str) or not self.target_modules:
            raise ValueError("TrainConfig.target_modules must be a non-empty sequence of module names")
        object.__setattr__(self, "target_modules", tuple(self.target_modules))

    def lora_config(self, base_model: Path | str | None = None) -> LoraConfig:
        """The peft `LoraConfig` of a fresh adapter (also used for the v0 zero adapter)."""
        from peft import LoraConfig

        return LoraConfig(
            r=self.rank,
            lora_alpha=self.alpha,
            lora_dropout=self.dropout,
            target_modules=list(self.target_modules),
            bias="none",
            task_type="CAUSAL_LM",
            base_model_name_or_path=None if base_model is None else str(base_model),
        )


@dataclass(frozen=True)
class TrainResult:
    adapter_dir: Path
    metrics: dict[str, float]  # train_tokens, train_seconds, final_loss, steps, tokens_per_s, ...
    loss_history: tuple[float, ...]
    model: Any = None  # the trained PeftModel, only when train() was given a loaded `base`


def lr_at_step(step: int, total_steps: int, config: TrainConfig) -> float:
    """Learning rate for optimizer step `step` (0-based): linear warm-up, then the schedule."""
    if step < config.warmup_steps:
        return config.lr * (step + 1) / (config.warmup_steps + 1)
    if config.lr_schedule == "constant":
        return config.lr
    decay_steps = max(1, total_steps - config.warmup_steps)
    progress = min(1.0, (step - config.warmup_steps) / decay_steps)
    if config.lr_schedule == "linear":
        return config.lr * (1.0 - progress)
    return config.lr * 0.5 * (1.0 + math.cos(math.pi * progress))


class GuardedStep:
    """The one optimizer step of every recipe (online update, bake, KL distillation) and its one
    time-budget rule.

    AdamW over the adapter's trainable parameters; each `step()` clips the gradient, checks that
    the step's loss terms and the gradient norm are finite (else TrainingDiverged, nothing applied),
    sets the scheduled learning rate (`lr_at_step`), steps and clears the gradients.
    `check_budget()` is the budget rule: the whole run, counted from `started`, must fit in
    `config.time_budget_s`; past it the run fails with TrainingBudgetExceeded and writes nothing."""

    def __init__(
        self, params: Sequence[torch.nn.Parameter], config: TrainConfig, *, total_steps: int, started: float
    ) -> None:
        if not params:
            raise ValueError("the adapter has no trainable parameter (check target_modules)")
        self.params = list(params)
        self.config = config
        self.total_steps = total_steps
        self.started = started
        self.clip_norm = config.max_grad_norm if config.max_grad_norm > 0 else math.inf
        on_cuda = self.params[0].device.type == "cuda"
        self.optimizer = torch.optim.AdamW(
            self.params,
            lr=config.lr,
            weight_decay=config.weight_decay,
            fused=on_cuda or None,
            foreach=None if on_cuda else True,
        )

    def check_budget(self, steps_done: int) -> None:
        elapsed = time.perf_counter() - self.started
        if elapsed > self.config.time_budget_s:
            raise TrainingBudgetExceeded(
                f"time budget {self.config.time_budget_s:g}s exceeded after {elapsed:.1f}s "
                f"(step {steps_done}/{self.total_steps})"
            )

    def step(self, step: int, terms: Mapping[str, float]) -> tuple[float, float]:
        """Apply step `step` (0-based) of the gradients accumulated so far; `terms` names the loss
        values of the step for the finite check. Returns (learning rate, gradient norm)."""
        grad_norm = float(torch.nn.utils.clip_grad_norm_(self.params, self.clip_norm))
        values = {**terms, "gradient norm": grad_norm}
        if not all(math.isfinite(value) for value in values.values()):
            self.optimizer.zero_grad(set_to_none=True)
            shown = ", ".join(f"{name} {value}" for name, value in values.items())
            raise TrainingDiverged(f"non-finite values at step {step + 1}: {shown}", step=step + 1)
        lr = lr_at_step(step, self.total_steps, self.config)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return lr, grad_norm

    def check_weights(self, steps_done: int) -> None:
        if not all(bool(torch.isfinite(p).all()) for p in self.params):
            raise TrainingDiverged("adapter weights are not finite after the last step", step=steps_done)


def _plan_micro_batches(num_batches: int, config: TrainConfig, generator: torch.Generator) -> list[list[int]]:
    """Indices of pre-collated batches for each optimizer step (a fresh seeded order per epoch)."""
    if config.max_steps:
        needed = config.max_steps * config.grad_accum_steps
    else:
        needed = config.epochs * num_batches
    order: list[int] = []
    while len(order) < needed:
        order.extend(torch.randperm(num_batches, generator=generator).tolist())
    order = order[:needed]
    return [order[i : i + config.grad_accum_steps] for i in range(0, len(order), config.grad_accum_steps)]


def load_lora_model(
    base_model: Path, parent_adapter: Path | None, config: TrainConfig, device: torch.device
) -> PeftModel:
    """The base model loaded from `base_model` with a trainable LoRA (see `attach_lora`)."""
    base = load_base_model(base_model, device=device, dtype=resolve_dtype(config.dtype, device))
    return attach_lora(base, parent_adapter, config.lora_config(base_model),
                       gradient_checkpointing=config.gradient_checkpointing)


@contextmanager
def _torch_threads(count: int | None) -> Iterator[None]:
    """torch's CPU threads set to `count` inside the block (None: left as is), restored after."""
    previous = torch.get_num_threads()
    try:
        if count is not None:
            torch.set_num_threads(count)
        yield
    finally:
        torch.set_num_threads(previous)


def _reference_topk(model: Any, batches: Sequence[TokenBatch], k: int, *, adapter_off: bool) -> list[TopK]:
    """`model`'s top-k at every supervised position of `batches`, in eval mode and without grad;
    `adapter_off`: with the PeftModel's adapter switched off (the base model's distribution)."""
    was_training = model.training
    model.eval()
    try:
        reference_model = model.disable_adapter() if adapter_off else nullcontext()
        with torch.inference_mode(), reference_model:
            return [topk_of(supervised_logits(model, batch), k) for batch in batches]
    finally:
        model.train(was_training)


class LoraTrainer:
    """Recipe: setup (model, adapter, batches, anchors, optimizer) -> train loop -> save, in `train()`.

    The loss of a step is the mean NLL of its supervised tokens plus, when `anchor_weight > 0`,
    `anchor_weight` x the mean KL(reference || model) on a rotating slice of the anchor examples, the
    reference's distribution (the base model's, or the parent's: `anchor_reference`) taken (top-k)
    before the first step. With `stop_when_learnt` the run
    ends `learnt_extra_steps` after every must-learn example is reproduced by greedy decoding
    (checked on the training forward itself), capped by max_steps / epochs."""

    def __init__(self, config: TrainConfig) -> None:
        self.config = config

    def train(
        self,
        *,
        base_model: Path,
        examples: Sequence[Example],
        parent_adapter: Path | None = None,
        out_dir: Path,
        on_progress: Callable[[dict[str, Any]], None] | None = None,
        should_stop: Callable[[], bool] | None = None,
        anchors: Sequence[Example] = (),
        must_learn: int | None = None,
        base: Any | None = None,
    ) -> TrainResult:
        """Train and save the adapter (peft safetensors) into `out_dir`; raise a `TrainingError`
        (and write nothing) on divergence, time budget or cancellation.

        `must_learn`: the first N examples are the ones `stop_when_learnt` waits for (default: all;
        replayed items follow them). `base`: an already loaded base model (e.g. a
        `ResidentBaseModel`'s) to put the LoRA on instead of loading `base_model`; the trained
        `PeftModel` is then returned in `TrainResult.model` for scoring, and the caller strips it."""
        started = time.perf_counter()
        config = self.config
        out_dir = Path(out_dir)
        if out_dir.exists() and any(out_dir.iterdir()):
            raise FileExistsError(f"out_dir {out_dir} is not empty")
        if not examples:
            raise ValueError("train() needs at least one example")
        empty = [i for i, example in enumerate(examples) if example.num_target_tokens == 0]
        if empty:
            raise ValueError(f"examples {empty[:10]} have no supervised token (labels all -100)")
        learn_count = len(examples) if must_learn is None else max(0, min(must_learn, len(examples)))
        device = resolve_device(config.device) if base is None else next(base.parameters()).device
        devices = [device.index or 0] if device.type == "cuda" else []
        with _torch_threads(config.num_threads), torch.random.fork_rng(devices=devices):
            torch.manual_seed(config.seed)
            if base is None:
                model = load_lora_model(Path(base_model), parent_adapter, self.config, device)
            else:
                model = attach_lora(base, parent_adapter, config.lora_config(base_model),
                                    gradient_checkpointing=config.gradient_checkpointing)
            batches, learn_rows = self._setup_batches(model, examples, learn_count, device)
            anchor_set, references_cached = self._setup_anchors(model, anchors, device)
            setup_seconds = time.perf_counter() - started
            metrics, losses = self._run(model, batches, learn_rows, anchor_set, started, on_progress,
                                        should_stop)
        saving = time.perf_counter()
        self._save_adapter(model, out_dir)
        metrics["setup_seconds"] = setup_seconds
        metrics["anchor_references_cached"] = float(references_cached)
        metrics["save_seconds"] = time.perf_counter() - saving
        metrics["train_seconds"] = time.perf_counter() - started
        if base is not None:
            return TrainResult(adapter_dir=out_dir, metrics=metrics, loss_history=tuple(losses), model=model)
        del model
        if device.type == "cuda":
            torch.cuda.empty_cache()
        return TrainResult(adapter_dir=out_dir, metrics=metrics, loss_history=tuple(losses))

    @staticmethod
    def _save_adapter(model: PeftModel, out_dir: Path) -> None:
        """peft files into a sibling temp folder, renamed to `out_dir`: never a half-written adapter."""
        out_dir.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}-", dir=out_dir.parent))
        try:
            model.save_pretrained(str(staging), safe_serialization=True)
            if out_dir.exists():
                out_dir.rmdir()  # checked empty at the start of train()
            os.replace(staging, out_dir)
        finally:
            shutil.rmtree(staging, ignore_errors=True)

    # --- setup -----------------------------------------------------------------------------------
    @staticmethod
    def _pad_id(model: PeftModel) -> int:
        pad_token_id = model.config.pad_token_id
        return 0 if pad_token_id is None else pad_token_id  # masked by attention_mask and labels

    def _setup_batches(
        self, model: PeftModel, examples: Sequence[Example], learn_count: int, device: torch.device
    ) -> tuple[list[TokenBatch], list[torch.Tensor]]:
        """Length-bucketed batches, and for each the boolean rows that must be learnt."""
        from training.collate import length_bucketed_batches

        must = {id(example) for example in examples[:learn_count]}
        groups = length_bucketed_batches(list(examples), self.config.batch_tokens, self.config.seed)
        batches = [batch.to(device) for batch in batches_from_groups(groups, self._pad_id(model))]
        rows = [torch.tensor([id(example) in must for example in group], device=device) for group in groups]
        return batches, rows

    def _anchor_batches(self, anchors: Sequence[Example], pad_id: int, device: torch.device) -> list[TokenBatch]:
        """The anchor examples with a supervised token, `anchors_per_step` to a batch, in order."""
        anchors = [example for example in anchors if example.num_target_tokens > 0]
        size = self.config.anchors_per_step
        groups = [anchors[i : i + size] for i in range(0, len(anchors), size)]
        return [batch.to(device) for batch in batches_from_groups(groups, pad_id)]

    def _setup_anchors(
        self, model: PeftModel, anchors: Sequence[Example], device: torch.device
    ) -> tuple[list[tuple[TokenBatch, TopK]], bool]:
        """Anchor batches with the reference's top-k at each position: the parent (the model before
        any step) or, with `anchor_reference="base"`, the base model with the adapter switched off,
        computed once per loaded base model and anchor set (`training/reference_cache.py`); and
        whether the references came from that cache."""
        config = self.config
        if config.anchor_weight <= 0:
            return [], False
        batches = self._anchor_batches(anchors, self._pad_id(model), device)
        if not batches:
            return [], False
        if config.anchor_reference == "base":  # the same for every job on this base: computed once
            references, cached = BASE_REFERENCES.get(
                model.get_base_model(), batches, config.anchor_topk,
                lambda: _reference_topk(model, batches, config.anchor_topk, adapter_off=True),
            )
        else:
            references, cached = _reference_topk(model, batches, config.anchor_topk, adapter_off=False), False
        return list(zip(batches, references, strict=True)), cached

    def warm_base_references(self, base: Any, anchors: Sequence[Example]) -> bool:
        """Put the plain `base` model's references at the positions of `anchors` into the process
        cache, exactly what the first `train(base=base, anchors=anchors)` would compute there, so
        that run finds them; returns whether they were cached already. Nothing to do (False) when
        this recipe has no base-model anchor."""
        config = self.config
        if config.anchor_weight <= 0 or config.anchor_reference != "base":
            return False
        batches = self._anchor_batches(anchors, self._pad_id(base), next(base.parameters()).device)
        if not batches:
            return False
        with _torch_threads(config.num_threads):
            _, cached = BASE_REFERENCES.get(
                base, batches, config.anchor_topk,
                lambda: _reference_topk(base, batches, config.anchor_topk, adapter_off=False),
            )
        return cached

    # --- loop ------------------------------------------------------------------------------------
    def _run(
        self,
        model: PeftModel,
        batches: list[TokenBatch],
        learn_rows: list[torch.Tensor],
        anchors: list[tuple[TokenBatch, TopK]],
        started: float,
        on_progress: Callable[[dict[str, Any]], None] | None,
        should_stop: Callable[[], bool] | None,
    ) -> tuple[dict[str, float], list[float]]:
        config = self.config
        generator = torch.Generator().manual_seed(config.seed)
        plan = _plan_micro_batches(len(batches), config, generator)
        total_steps = len(plan)
        params = [p for p in model.parameters() if p.requires_grad]
        guard = GuardedStep(params, config, total_steps=total_steps, started=started)
        device = guard.params[0].device
        # per batch: rows that must be learnt and are not reproduced yet (by the latest forward)
        unlearnt = [rows.clone() for rows in learn_rows]
        learnt_at: int | None = None
        losses: list[float] = []
        target_tokens = input_tokens = 0
        anchor_kl_sum = 0.0
        loop_started = time.perf_counter()
        steps_done = 0
        for step, micro in enumerate(plan):
            step_started = time.perf_counter()
            if should_stop is not None and should_stop():
                raise TrainingCancelled(f"cancelled before step {step + 1}/{total_steps}")
            step_targets = sum(batches[i].num_targets for i in micro)
            loss_sum = torch.zeros((), device=device)
            for i in micro:
                guard.check_budget(step)
                nll, mismatched = self._nll_and_mismatch(model, batches[i])
                (nll / step_targets).backward()
                loss_sum += nll.detach()
                if mismatched is not None:
                    unlearnt[i] = learn_rows[i] & mismatched
            anchor_kl = 0.0
            if anchors:
                anchor_batch, reference = anchors[step % len(anchors)]
                kl = topk_kl(supervised_logits(model, anchor_batch), reference)
                (config.anchor_weight * kl).backward()
                anchor_kl = float(kl.detach())
                anchor_kl_sum += anchor_kl
            loss = (loss_sum / step_targets).item()  # the one host sync per step
            lr, grad_norm = guard.step(step, {"loss": loss, "anchor KL": anchor_kl})
            losses.append(loss)
            steps_done = step + 1
            target_tokens += step_targets
            input_tokens += sum(batches[i].num_tokens for i in micro)
            remaining = int(sum(int(rows.sum()) for rows in unlearnt))
            if learnt_at is None and remaining == 0 and config.stop_when_learnt:
                learnt_at = step + 1
            if on_progress is not None:
                elapsed = time.perf_counter() - loop_started
                on_progress(
                    {
                        "step": step + 1,
                        "total_steps": total_steps,
                        "loss": loss,
                        "anchor_kl": anchor_kl,
                        "unlearnt": remaining,
                        "lr": lr,
                        "grad_norm": grad_norm,
                        "tokens": target_tokens,
                        "tokens_per_s": target_tokens / elapsed if elapsed > 0 else 0.0,
                        "input_tokens_per_s": input_tokens / elapsed if elapsed > 0 else 0.0,
                        "step_seconds": time.perf_counter() - step_started,
                        "elapsed_s": time.perf_counter() - started,
                    }
                )
            if learnt_at is not None and step + 1 >= learnt_at + config.learnt_extra_steps:
                break
        guard.check_budget(steps_done)
        guard.check_weights(steps_done)
        loop_seconds = time.perf_counter() - loop_started
        metrics = {
            "steps": float(steps_done),
            "max_steps": float(total_steps),
            "learnt_at_step": float(learnt_at) if learnt_at is not None else -1.0,
            "train_tokens": float(target_tokens),
            "input_tokens": float(input_tokens),
            "final_loss": losses[-1],
            "anchor_kl_mean": anchor_kl_sum / steps_done if anchors else 0.0,
            "loop_seconds": loop_seconds,
            "tokens_per_s": target_tokens / loop_seconds if loop_seconds > 0 else 0.0,
            "step_seconds": loop_seconds / steps_done,
            "lora_rank": float(next(iter(model.peft_config.values())).r),
        }
        return metrics, losses

    def _nll_and_mismatch(self, model: PeftModel, batch: TokenBatch) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Summed NLL of the batch's targets and, when the stop rule needs it and the batch is small
        enough for full logits, the rows whose teacher-forced argmax misses a label."""
        if not self.config.stop_when_learnt or batch.num_targets > self.config.logits_chunk:
            return token_nll_sum(model, batch, logits_chunk=self.config.logits_chunk), None
        logits = supervised_logits(model, batch)
        nll = torch.nn.functional.cross_entropy(logits.float(), batch.targets, reduction="sum")
        width = batch.input_ids.shape[1] - 1
        rows = torch.div(batch.target_index, width, rounding_mode="floor")
        wrong = (logits.detach().argmax(-1) != batch.targets).long()
        per_row = torch.zeros(batch.input_ids.shape[0], dtype=torch.long, device=wrong.device)
        per_row.index_add_(0, rows, wrong)
        return nll, per_row > 0
