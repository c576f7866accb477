"""Greedy answers of a local model to chat prompts, and the check of an answer against key content.

Owns prompt encoding for generation (the chat template with the generation prompt, encoded without
added special tokens: the same prompt tokens vLLM's chat endpoint builds), batched left-padded
greedy decoding with `transformers.generate`, and `answer_has_keys`. Used for the behaviour report,
the anchor answers of the recipe and the learning benches. Knows nothing of the database or vLLM.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch

__all__ = ["answer_has_keys", "greedy_answers", "prompt_ids", "user_prompt"]


def user_prompt(question: str) -> list[dict[str, str]]:
    """A one-turn conversation asking `question` (the template adds its default system turn)."""
    return [{"role": "user", "content": question}]


def prompt_ids(tokenizer: Any, messages: Sequence[Mapping[str, Any]]) -> list[int]:
    """Token ids of the inference prompt of `messages` (chat template + generation prompt)."""
    text = tokenizer.apply_chat_template(list(messages), tokenize=False, add_generation_prompt=True)
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def _stop_ids(tokenizer: Any) -> list[int]:
    ids = {tokenizer.eos_token_id}
    for token in ("<|im_end|>", "<|eot_id|>", "<|end|>"):
        token_id = tokenizer.convert_tokens_to_ids(token)
        if isinstance(token_id, int) and token_id != tokenizer.unk_token_id and token_id >= 0:
            ids.add(token_id)
    return sorted(i for i in ids if i is not None)


def greedy_answers(
    model: Any,
    tokenizer: Any,
    conversations: Sequence[Sequence[Mapping[str, Any]]],
    *,
    max_new_tokens: int = 48,
    batch_size: int = 16,
) -> list[str]:
    """The greedy continuation of each conversation's prompt, decoded without special tokens.

    `model` is any causal LM (a `PeftModel` generates with its active adapter). Prompts are
    sorted by length and left-padded in batches; the order of the answers is the order given."""
    if not conversations:
        return []
    encoded = [prompt_ids(tokenizer, messages) for messages in conversations]
    order = sorted(range(len(encoded)), key=lambda i: len(encoded[i]))
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else _stop_ids(tokenizer)[0]
    stops = _stop_ids(tokenizer)
    device = next(model.parameters()).device
    answers: list[str] = [""] * len(encoded)
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            for start in range(0, len(order), batch_size):
                chunk = order[start : start + batch_size]
                width = max(len(encoded[i]) for i in chunk)
                input_ids = torch.full((len(chunk), width), pad_id, dtype=torch.long)
                attention = torch.zeros((len(chunk), width), dtype=torch.long)
                for row, i in enumerate(chunk):
                    ids = encoded[i]
                    input_ids[row, width - len(ids) :] = torch.tensor(ids)
                    attention[row, width - len(ids) :] = 1
                output = model.generate(
                    input_ids=input_ids.to(device),
                    attention_mask=attention.to(device),
                    max_new_tokens=max_new_tokens,
                    do_sample=False,
                    num_beams=1,
                    use_cache=True,
                    eos_token_id=stops,
                    pad_token_id=pad_id,
                    temperature=None,
                    top_p=None,
                    top_k=None,
                )
                for row, i in enumerate(chunk):
                    answers[i] = tokenizer.decode(output[row, width:], skip_special_tokens=True).strip()
    finally:
        model.train(was_training)
    return answers


def answer_has_keys(answer: str, keys: Sequence[str]) -> bool:
    """True when the answer carries any of the key strings (case-insensitive)."""
    lowered = answer.lower()
    return any(key.lower() in lowered for key in keys)
