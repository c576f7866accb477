"""Per-token negative log-likelihood on supervised positions only (labels != -100).

Owns `TokenBatch` (a padded batch with the flat indices of its supervised positions precomputed) and
the forward that runs the decoder once and applies the LM head only where a label exists: with a
150k-token vocabulary that is most of the cost of a full-logits forward. Rows that open with the
same tokens (every chat row opens with its template's system prompt) run that prefix once: a
quarter of the tokens of an anchor batch on the default model. Knows nothing of rendering,
optimisers or adapters' files.
"""

from __future__ import annotations

import inspect
from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from training.render import IGNORE_INDEX  # the one label of an unsupervised position

__all__ = [
    "IGNORE_INDEX",
    "LinearCrossEntropy",
    "TokenBatch",
    "batches_from_groups",
    "causal_lm_of",
    "shared_prefix_length",
    "supervised_logits",
    "token_nll_sum",
]

# above this many supervised positions the LM head + loss run in checkpointed chunks (bounded memory)
DEFAULT_LOGITS_CHUNK = 4096
# config keys of models that rescale their logits after the LM head: those go through the model's own
# forward (full logits), which is always right; softcapping is applied on the fast path
# a shared prefix of fewer tokens than this is not worth the second decoder call
MIN_SHARED_PREFIX = 8
_LOGIT_POSTPROCESSING_KEYS = ("logit_scale", "logits_scaling", "output_multiplier", "lm_head_multiplier")


@dataclass(frozen=True)
class TokenBatch:
    """A padded batch ready for the device. `target_index` indexes the flattened `[B * (T - 1)]`
    next-token positions whose label is supervised; `targets` are those labels."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor | None  # None when nothing is padded (lets SDPA take its causal path)
    target_index: torch.Tensor
    targets: torch.Tensor
    num_targets: int
    num_tokens: int

    @classmethod
    def from_padded(cls, padded: dict[str, torch.Tensor]) -> TokenBatch:
        """Build from `collate.pad_collate` output (labels aligned with input_ids, HF convention)."""
        input_ids = padded["input_ids"].long()
        labels = padded["labels"].long()
        attention_mask = padded.get("attention_mask")
        if labels.shape != input_ids.shape:
            raise ValueError(f"labels {tuple(labels.shape)} and input_ids {tuple(input_ids.shape)} differ")
        shifted = labels[:, 1:].reshape(-1)
        target_index = torch.nonzero(shifted != IGNORE_INDEX, as_tuple=True)[0]
        num_tokens = int(attention_mask.sum()) if attention_mask is not None else input_ids.numel()
        if attention_mask is not None and bool(attention_mask.all()):
            attention_mask = None
        return cls(
            input_ids=input_ids,
            attention_mask=attention_mask,
            target_index=target_index,
            targets=shifted[target_index],
            num_targets=int(target_index.numel()),
            num_tokens=num_tokens,
        )

    def to(self, device: torch.device | str) -> TokenBatch:
        def move(tensor: torch.Tensor | None) -> torch.Tensor | None:
            return None if tensor is None else tensor.to(device, non_blocking=True)

        return TokenBatch(
            input_ids=move(self.input_ids),
            attention_mask=move(self.attention_mask),
            target_index=move(self.target_index),
            targets=move(self.targets),
            num_targets=self.num_targets,
            num_tokens=self.num_tokens,
        )


def causal_lm_of(model: torch.nn.Module) -> Any:
    """The transformers causal LM inside `model` (a peft model or the LM itself)."""
    get_base_model = getattr(model, "get_base_model", None)
    return get_base_model() if callable(get_base_model) else model


def _needs_full_forward(config: Any) -> bool:
    return any(getattr(config, key, None) not in (None, 1, 1.0) for key in _LOGIT_POSTPROCESSING_KEYS)


def shared_prefix_length(batch: TokenBatch) -> int:
    """How many leading positions hold the same (unpadded) token in every row of `batch` and predict
    no supervised token: the part of the forward that is the same for every row (a chat template's
    system prompt). 0 for a single row."""
    input_ids = batch.input_ids
    rows, width = input_ids.shape
    if rows < 2 or width < 2:
        return 0
    same = (input_ids == input_ids[:1]).all(dim=0)
    if batch.attention_mask is not None:
        same &= batch.attention_mask.bool().all(dim=0)
    length = int(same.long().cumprod(dim=0).sum())
    if batch.num_targets:  # hidden state p predicts token p + 1: a prefix position is never one of them
        length = min(length, int((batch.target_index % (width - 1)).min()))
    return length


def _supervised_hidden(model: torch.nn.Module, batch: TokenBatch) -> torch.Tensor:
    causal_lm = causal_lm_of(model)
    backbone = causal_lm.base_model
    prefix = shared_prefix_length(batch)
    if prefix >= MIN_SHARED_PREFIX and not getattr(backbone, "is_gradient_checkpointing", False):
        cache_argument = _cache_argument(type(backbone))
        if cache_argument is not None:
            return _hidden_after_shared_prefix(backbone, batch, prefix, cache_argument)
    return _full_hidden(backbone, batch)


def _full_hidden(backbone: Any, batch: TokenBatch) -> torch.Tensor:
    outputs = backbone(input_ids=batch.input_ids, attention_mask=batch.attention_mask, use_cache=False)
    hidden = outputs[0][:, :-1, :]
    return hidden.reshape(-1, hidden.shape[-1]).index_select(0, batch.target_index)


@lru_cache(maxsize=64)
def _cache_argument(backbone_class: type) -> str | None:
    """The name under which this decoder's forward takes a key/value cache (`cache` in recent
    transformers, `past_key_values` before), or None (then every row runs in full)."""
    try:
        parameters = inspect.signature(backbone_class.forward).parameters
    except (AttributeError, TypeError, ValueError):
        return None
    return next((name for name in ("cache", "past_key_values") if name in parameters), None)


def _plain_attention_cache(cache: Any) -> bool:
    """A key/value cache of full-attention layers only, which repeating along the batch extends exactly."""
    layers = getattr(cache, "layers", None)
    return bool(layers) and all(type(layer).__name__ == "DynamicLayer" for layer in layers)


def _hidden_after_shared_prefix(backbone: Any, batch: TokenBatch, prefix: int, cache_argument: str) -> torch.Tensor:
    """The supervised hidden states of `batch` with its shared prefix run once: one row's prefix
    fills the key/value cache, repeated for every row (gradients flow back through the repeat), and
    the rest of each row attends to it. The same numbers as one full forward, up to float rounding.
    A cache with other than full-attention layers (recurrent, windowed) falls back to the full forward."""
    rows, width = batch.input_ids.shape
    head = backbone(input_ids=batch.input_ids[:1, :prefix], use_cache=True)
    cache = head[cache_argument] if cache_argument in head else head[1]
    if not _plain_attention_cache(cache):
        return _full_hidden(backbone, batch)
    cache.batch_repeat_interleave(rows)
    outputs = backbone(
        input_ids=batch.input_ids[:, prefix:],
        attention_mask=batch.attention_mask,  # covers the cached prefix and the rest: the full width
        use_cache=True,
        **{cache_argument: cache},
    )
    hidden = outputs[0][:, :-1, :]
    row, position = batch.target_index // (width - 1), batch.target_index % (width - 1)
    index = row * (width - 1 - prefix) + position - prefix
    return hidden.reshape(-1, hidden.shape[-1]).index_select(0, index)


def _head_logits(causal_lm: Any, hidden: torch.Tensor) -> torch.Tensor:
    logits = causal_lm.get_output_embeddings()(hidden).float()
    softcap = getattr(causal_lm.config, "final_logit_softcapping", None)
    if softcap:
        logits = torch.tanh(logits / softcap) * softcap
    return logits


def supervised_logits(model: torch.nn.Module, batch: TokenBatch) -> torch.Tensor:
    """Float32 logits `[num_targets, vocab]` predicting each supervised token (no loss, for eval/KL)."""
    causal_lm = causal_lm_of(model)
    if _needs_full_forward(causal_lm.config):
        logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, use_cache=False).logits
        logits = logits[:, :-1, :].reshape(-1, logits.shape[-1]).index_select(0, batch.target_index)
        return logits.float()
    return _head_logits(causal_lm, _supervised_hidden(model, batch))


class LinearCrossEntropy(torch.autograd.Function):
    """`sum_i -log softmax(hidden_i @ weight.T)[targets_i]` for a bias-free LM head.

    Keeps one float32 `[N, vocab]` logits tensor and turns it into the gradient in place during
    backward (softmax minus one-hot), instead of autograd's log-softmax output, zero-filled NLL
    gradient and log-softmax backward: three fewer passes over the largest tensor of the step.
    """

    @staticmethod
    def forward(ctx: Any, hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        logits = hidden @ weight.t()
        logits = logits.to(torch.promote_types(logits.dtype, torch.float32))  # bf16 -> fp32 softmax
        logits.sub_(logits.amax(dim=-1, keepdim=True))  # shifted: max 0 per row
        target_logits = logits.gather(1, targets.unsqueeze(1)).squeeze(1)
        unnormalized = logits.exp_()  # in place: the only [N, vocab] tensor kept for backward
        normalizer = unnormalized.sum(dim=-1)
        ctx.save_for_backward(hidden, weight, targets, unnormalized, normalizer)
        return (normalizer.log() - target_logits).sum()

    @staticmethod
    def backward(ctx: Any, grad_output: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        hidden, weight, targets, unnormalized, normalizer = ctx.saved_tensors
        # d loss / d logits = grad * (softmax - one_hot), built in place
        grad_logits = unnormalized.mul_((grad_output / normalizer).unsqueeze(1))
        rows = torch.arange(targets.shape[0], device=targets.device)
        grad_logits[rows, targets] -= grad_output
        grad_hidden = grad_weight = None
        if ctx.needs_input_grad[0]:
            grad_hidden = (grad_logits.to(weight.dtype) @ weight).to(hidden.dtype)
        if ctx.needs_input_grad[1]:
            grad_weight = (grad_logits.t().to(hidden.dtype) @ hidden).to(weight.dtype)
        return grad_hidden, grad_weight, None


def _chunk_nll_sum(causal_lm: Any, hidden: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    head = causal_lm.get_output_embeddings()
    plain_head = type(head) is torch.nn.Linear and head.bias is None
    if plain_head and not getattr(causal_lm.config, "final_logit_softcapping", None):
        return LinearCrossEntropy.apply(hidden, head.weight, targets)
    return F.cross_entropy(_head_logits(causal_lm, hidden), targets, reduction="sum")


def token_nll_sum(
    model: torch.nn.Module, batch: TokenBatch, *, logits_chunk: int = DEFAULT_LOGITS_CHUNK
) -> torch.Tensor:
    """Sum over supervised positions of -log p(label) (float32 scalar; divide by the token count).

    Above `logits_chunk` positions, the head and loss are evaluated chunk by chunk under activation
    checkpointing, so at most `logits_chunk x vocab` logits live at once (forward and backward).
    """
    causal_lm = causal_lm_of(model)
    if _needs_full_forward(causal_lm.config):
        return F.cross_entropy(supervised_logits(model, batch), batch.targets, reduction="sum")
    hidden = _supervised_hidden(model, batch)
    if hidden.shape[0] <= logits_chunk:
        return _chunk_nll_sum(causal_lm, hidden, batch.targets)
    total = hidden.new_zeros((), dtype=torch.float32)
    for start in range(0, hidden.shape[0], logits_chunk):
        part = slice(start, start + logits_chunk)
        if torch.is_grad_enabled():
            total = total + checkpoint(
                _chunk_nll_sum, causal_lm, hidden[part], batch.targets[part], use_reentrant=False
            )
        else:
            total = total + _chunk_nll_sum(causal_lm, hidden[part], batch.targets[part])
    return total


def batches_from_groups(groups: Sequence[Sequence[Any]], pad_token_id: int) -> list[TokenBatch]:
    """Collate each group of `render.Example`s with `collate.pad_collate` into a `TokenBatch`."""
    from training.collate import pad_collate

    return [TokenBatch.from_padded(pad_collate(list(group), pad_token_id)) for group in groups]
