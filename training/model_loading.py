"""Loading the base model on a device, once per process, and putting LoRA adapters on and off it.

Owns device/dtype resolution, `load_base_model` (by path, frozen, eval mode), `attach_lora` (a
trainable LoRA on a loaded base: warm-started from a parent adapter folder or fresh) and
`ResidentBaseModel`, which keeps one loaded base between jobs and hands it out pristine: every
adapter a job put on it is stripped when the job gives it back. Knows nothing of data or training.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from peft import LoraConfig, PeftModel

__all__ = ["ResidentBaseModel", "attach_lora", "load_base_model", "resolve_device", "resolve_dtype"]

logger = logging.getLogger(__name__)
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


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


def attach_lora(base: Any, parent_adapter: Path | None, lora_config: LoraConfig, *,
                gradient_checkpointing: bool = False) -> PeftModel:
    """A trainable LoRA (adapter name `default`) on `base`: the parent adapter's weights, rank and
    targets when given, else fresh from `lora_config`; in training mode."""
    from peft import PeftModel, get_peft_model

    if gradient_checkpointing:
        base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if parent_adapter is not None:
        model = PeftModel.from_pretrained(base, str(parent_adapter), is_trainable=True)
    else:
        model = get_peft_model(base, lora_config)
    model.to(next(base.parameters()).device)
    model.train()
    return model


def strip_adapters(model: Any) -> Any:
    """The base model of `model` without any LoRA layer: a `PeftModel` is unloaded, and LoRA layers
    injected into a plain model (a run that failed before it returned its `PeftModel`) are replaced
    by the layers they wrap."""
    from peft import PeftModel
    from peft.tuners.lora import LoraLayer

    base = model.unload() if isinstance(model, PeftModel) else model
    for name, module in list(base.named_modules()):
        if isinstance(module, LoraLayer) and name:
            parent_name, _, child = name.rpartition(".")
            parent = base.get_submodule(parent_name) if parent_name else base
            setattr(parent, child, module.get_base_layer())
    if any(isinstance(module, LoraLayer) for module in base.modules()):
        raise RuntimeError("LoRA layers are left on the base model after unloading")
    if getattr(base, "is_gradient_checkpointing", False):
        base.gradient_checkpointing_disable()
    for attribute in ("peft_config", "_hf_peft_config_loaded"):
        base.__dict__.pop(attribute, None)
    base.requires_grad_(False)
    return base.eval()


class ResidentBaseModel:
    """One loaded base model for a process's jobs (the worker keeps it between jobs).

    `lend()` yields the plain base model; whatever adapters the job attached are stripped when the
    block ends, and a base that cannot be restored is dropped (reloaded on the next lend). One job
    at a time holds it."""

    def __init__(self, path: Path, *, device: str = "auto", dtype: str = "auto") -> None:
        self.path = Path(path)
        self.device = resolve_device(device)
        self.dtype = resolve_dtype(dtype, self.device)
        self._model: Any = None
        self._lock = threading.Lock()
        self.loads = 0

    @property
    def loaded(self) -> bool:
        return self._model is not None

    def _ensure_loaded(self) -> Any:
        if self._model is None:
            self._model = load_base_model(self.path, device=self.device, dtype=self.dtype)
            self.loads += 1
        return self._model

    @contextmanager
    def lend(self) -> Iterator[Any]:
        with self._lock:
            base = self._ensure_loaded()
            holder = _Holder(base)
            try:
                yield holder
            finally:
                try:
                    self._model = strip_adapters(holder.model)
                except Exception:
                    logger.exception("the resident base model could not be restored: reloading it next time")
                    self._model = None


class _Holder:
    """What `lend()` yields: `.model` is the base, and the job stores its PeftModel back here so the
    adapters are stripped from the right object."""

    def __init__(self, model: Any) -> None:
        self.model = model
