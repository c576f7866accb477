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
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import torch

from training.token_nll import DEFAULT_LOGITS_CHUNK, TokenBatch, batches_from_groups, token_nll_sum

if TYPE_CHECKING:
    from peft import LoraConfig, PeftModel

    from training.render import Example

__all__ = [
    "DEFAULT_TARGET_MODULES",
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
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


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
        for name in ("max_steps", "warmup_steps"):
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


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise ValueError("TrainConfig.device is 'cuda' but no CUDA device is available")
    return torch.device(device)


def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    if dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return _DTYPES[dtype]


def load_base_model(base_model: Path, *, device: torch.device, dtype: torch.dtype) -> Any:
    """Load a causal LM by path, frozen, in eval mode, on `device`."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(base_model), dtype=dtype, low_cpu_mem_usage=True)
    model.to(device)
    model.requires_grad_(False)
    model.config.use_cache = False
    return model.eval()


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
    """The base model with a trainable LoRA: warm-started from `parent_adapter` (its own rank and
    targets) or freshly initialised from `config`; on `device`, in training mode."""
    from peft import PeftModel, get_peft_model

    base = load_base_model(base_model, device=device, dtype=resolve_dtype(config.dtype, device))
    if config.gradient_checkpointing:
        base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if parent_adapter is not None:
        model = PeftModel.from_pretrained(base, str(parent_adapter), is_trainable=True)
    else:
        model = get_peft_model(base, config.lora_config(base_model))
    model.to(device)
    model.train()
    return model


class LoraTrainer:
    """Recipe: setup (model, adapter, batches, optimizer) -> train loop -> save, in `train()`."""

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
    ) -> TrainResult:
        """Train and save the adapter (peft safetensors) into `out_dir`; raise a `TrainingError`
        (and write nothing) on divergence, time budget or cancellation."""
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
        device = resolve_device(config.device)
        devices = [device.index or 0] if device.type == "cuda" else []
        previous_threads = torch.get_num_threads()
        try:
            if config.num_threads is not None:
                torch.set_num_threads(config.num_threads)
            with torch.random.fork_rng(devices=devices):
                torch.manual_seed(config.seed)
                model = load_lora_model(Path(base_model), parent_adapter, self.config, device)
                batches = self._setup_batches(model, examples, device)
                setup_seconds = time.perf_counter() - started
                metrics, losses = self._run(model, batches, started, on_progress, should_stop)
        finally:
            torch.set_num_threads(previous_threads)
        saving = time.perf_counter()
        self._save_adapter(model, out_dir)
        metrics["setup_seconds"] = setup_seconds
        metrics["save_seconds"] = time.perf_counter() - saving
        metrics["train_seconds"] = time.perf_counter() - started
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
    def _setup_batches(
        self, model: PeftModel, examples: Sequence[Example], device: torch.device
    ) -> list[TokenBatch]:
        from training.collate import length_bucketed_batches

        pad_token_id = model.config.pad_token_id
        if pad_token_id is None:
            pad_token_id = 0  # masked by attention_mask and labels: any id works
        groups = length_bucketed_batches(list(examples), self.config.batch_tokens, self.config.seed)
        return [batch.to(device) for batch in batches_from_groups(groups, pad_token_id)]

    # --- loop ------------------------------------------------------------------------------------
    def _run(
        self,
        model: PeftModel,
        batches: list[TokenBatch],
        started: float,
        on_progress: Callable[[dict[str, Any]], None] | None,
        should_stop: Callable[[], bool] | None,
    ) -> tuple[dict[str, float], list[float]]:
        config = self.config
        params = [p for p in model.parameters() if p.requires_grad]
        if not params:
            raise ValueError("the adapter has no trainable parameter (check target_modules)")
        on_cuda = params[0].device.type == "cuda"
        optimizer = torch.optim.AdamW(
            params,
            lr=config.lr,
            weight_decay=config.weight_decay,
            fused=on_cuda or None,
            foreach=None if on_cuda else True,
        )
        generator = torch.Generator().manual_seed(config.seed)
        plan = _plan_micro_batches(len(batches), config, generator)
        total_steps = len(plan)
        clip_norm = config.max_grad_norm if config.max_grad_norm > 0 else math.inf
        losses: list[float] = []
        target_tokens = input_tokens = 0
        loop_started = time.perf_counter()
        for step, micro in enumerate(plan):
            step_started = time.perf_counter()
            if should_stop is not None and should_stop():
                raise TrainingCancelled(f"cancelled before step {step + 1}/{total_steps}")
            step_targets = sum(batches[i].num_targets for i in micro)
            loss_sum = torch.zeros((), device=params[0].device)
            for i in micro:
                self._check_budget(started, step, total_steps)
                nll = token_nll_sum(model, batches[i], logits_chunk=config.logits_chunk)
                (nll / step_targets).backward()
                loss_sum += nll.detach()
            grad_norm = torch.nn.utils.clip_grad_norm_(params, clip_norm)
            loss = (loss_sum / step_targets).item()  # the one host sync per step
            if not math.isfinite(loss) or not math.isfinite(float(grad_norm)):
                raise TrainingDiverged(
                    f"non-finite loss {loss} or gradient norm {float(grad_norm)} at step {step + 1}",
                    step=step + 1,
                )
            lr = lr_at_step(step, total_steps, config)
            for group in optimizer.param_groups:
                group["lr"] = lr
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            losses.append(loss)
            target_tokens += step_targets
            input_tokens += sum(batches[i].num_tokens for i in micro)
            if on_progress is not None:
                elapsed = time.perf_counter() - loop_started
                on_progress(
                    {
                        "step": step + 1,
                        "total_steps": total_steps,
                        "loss": loss,
                        "lr": lr,
                        "grad_norm": float(grad_norm),
                        "tokens": target_tokens,
                        "tokens_per_s": target_tokens / elapsed if elapsed > 0 else 0.0,
                        "input_tokens_per_s": input_tokens / elapsed if elapsed > 0 else 0.0,
                        "step_seconds": time.perf_counter() - step_started,
                        "elapsed_s": time.perf_counter() - started,
                    }
                )
        self._check_budget(started, total_steps, total_steps)
        if not all(bool(torch.isfinite(p).all()) for p in params):
            raise TrainingDiverged("adapter weights are not finite after the last step", step=total_steps)
        loop_seconds = time.perf_counter() - loop_started
        metrics = {
            "steps": float(total_steps),
            "train_tokens": float(target_tokens),
            "input_tokens": float(input_tokens),
            "final_loss": losses[-1],
            "loop_seconds": loop_seconds,
            "tokens_per_s": target_tokens / loop_seconds if loop_seconds > 0 else 0.0,
            "step_seconds": loop_seconds / total_steps,
            "lora_rank": float(next(iter(model.peft_config.values())).r),
        }
        return metrics, losses

    def _check_budget(self, started: float, step: int, total_steps: int) -> None:
        elapsed = time.perf_counter() - started
        if elapsed > self.config.time_budget_s:
            raise TrainingBudgetExceeded(
                f"time budget {self.config.time_budget_s:g}s exceeded after {elapsed:.1f}s "
                f"(step {step}/{total_steps})"
            )

    def describe(self) -> dict[str, Any]:
        """The config as a JSON-able dict (for logs and the training-run row)."""
        values = asdict(self.config)
        values["target_modules"] = list(values["target_modules"])
        return values
