"""The base model's top-k distributions at the anchor positions, computed once per loaded base model.

Anchored to the base (`TrainConfig.anchor_reference="base"`), every update pulls towards the same
distributions: the base model's, adapter off, at the positions of the same built-in anchor batches.
A worker keeps one base model loaded between jobs (`ResidentBaseModel`), so recomputing them for each
job was a full forward pass over every anchor (a quarter of an update's time on a 2-core CPU).
`BaseReferenceCache` keeps them per base model object (weakly: they go when the model does) and
per fingerprint of the anchor batches, the reference's k and the base weights' storage and in-place
version counters (a LoRA's own weights left out), so a different anchor set, another k, or a base
whose weights were changed in place is recomputed. Knows nothing of data sources, training or the
service.
"""

from __future__ import annotations

import hashlib
import threading
import weakref
from collections import OrderedDict
from collections.abc import Callable, Sequence
from typing import Any

from training.token_nll import TokenBatch
from training.topk_kl import TopK

__all__ = ["BASE_REFERENCES", "BaseReferenceCache"]


def _fingerprint(base: Any, batches: Sequence[TokenBatch], k: int) -> str:
    digest = hashlib.sha256(f"k={k};batches={len(batches)}".encode())
    for batch in batches:
        for tensor in (batch.input_ids, batch.attention_mask, batch.target_index, batch.targets):
            if tensor is None:
                digest.update(b"none")
                continue
            digest.update(f"{tuple(tensor.shape)}{tensor.dtype}".encode())
            digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    # the base's own weights (a LoRA put on it has its own, changing every step): where they live
    # and their version counters, which every in-place write bumps
    weights = [p for name, p in base.named_parameters() if "lora_" not in name]
    digest.update(
        f"weights={len(weights)};{sum(p.data_ptr() for p in weights)};"
        f"{sum(p._version for p in weights)}".encode()
    )
    return digest.hexdigest()


class BaseReferenceCache:
    """`get(base, batches, k, compute)`: the cached references of these batches on `base`, or
    `compute()`'s, stored. At most `per_model` anchor sets are kept per base model (least recently
    used first out). Thread-safe; `hits` and `misses` count lookups."""

    def __init__(self, *, per_model: int = 4) -> None:
        self.per_model = per_model
        self._by_model: weakref.WeakKeyDictionary[Any, OrderedDict[str, list[TopK]]] = (
            weakref.WeakKeyDictionary()
        )
        self._lock = threading.Lock()
        self.hits = 0
        self.misses = 0

    def get(
        self, base: Any, batches: Sequence[TokenBatch], k: int, compute: Callable[[], list[TopK]]
    ) -> tuple[list[TopK], bool]:
        """(references, whether they came from the cache)."""
        key = _fingerprint(base, batches, k)
        with self._lock:
            entries = self._by_model.get(base)
            if entries is not None and key in entries:
                entries.move_to_end(key)
                self.hits += 1
                return entries[key], True
        references = compute()
        with self._lock:
            self.misses += 1
            entries = self._by_model.setdefault(base, OrderedDict())
            entries[key] = list(references)
            while len(entries) > self.per_model:
                entries.popitem(last=False)
        return references, False


BASE_REFERENCES = BaseReferenceCache()
"""The process's cache, used by `LoraTrainer` when the anchor reference is the base model."""
