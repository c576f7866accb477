"""Inference parity (DESIGN "The training example", invariant 1; issue 3): the context tokens of a
rendered training example equal the prompt tokens vLLM itself builds (POST /tokenize with chat
messages and the generation prompt) for `messages[:target_index]`: same template, no double BOS."""

from __future__ import annotations

from typing import Any

import pytest

from deploy.vllm_client import VllmClient
from tests.integration.conftest import VllmServer
from training.render import IGNORE_INDEX, RenderConfig, render_example, resolve_target_index
from training.tokenizer_files import load_tokenizer

pytestmark = [pytest.mark.slow, pytest.mark.integration]

CASES: dict[str, dict[str, Any]] = {
    "append-after-user": {
        "messages": [{"role": "user", "content": "What is the capital of France?"}],
        "continuation": "Paris.",
    },
    "system-and-multi-turn-replace": {
        "messages": [
            {"role": "system", "content": "You are terse."},
            {"role": "user", "content": "Hi"},
            {"role": "assistant", "content": "Hello!"},
            {"role": "user", "content": "Name a prime."},
            {"role": "assistant", "content": "Nine."},
        ],
        "target_index": 4,
        "continuation": "Seven.",
    },
    "replace-an-earlier-turn": {
        "messages": [
            {"role": "user", "content": "2+2?"},
            {"role": "assistant", "content": "5"},
            {"role": "user", "content": "Sure?"},
            {"role": "assistant", "content": "Yes"},
        ],
        "target_index": 1,
        "continuation": "4",
    },
    "unicode-whitespace-and-newlines": {
        "messages": [
            {"role": "system", "content": ""},
            {"role": "user", "content": "  héllo 世界 🚀\n\n tabs\there  "},
        ],
        "continuation": "\nこんにちは 👋 ",
    },
    # ChatML's prompt ends in "\n": a continuation opening with "\n\n" makes one BPE token straddle
    # the context/target boundary in the single pass (the renderer's boundary rule splits it)
    "straddling-newlines": {
        "messages": [
            {"role": "system", "content": "Be terse."},
            {"role": "user", "content": "日本の首都は？ 🙂"},
            {"role": "assistant", "content": "東京。"},
            {"role": "user", "content": "\nAnd France?\n"},
        ],
        "continuation": "\n\nParis.",
    },
}


@pytest.fixture(scope="module")
def tokenizer(vllm_server: VllmServer):
    return load_tokenizer(vllm_server.model_dir)


@pytest.mark.parametrize("case", sorted(CASES))
def test_context_tokens_equal_vllm_prompt_tokens(vllm_server: VllmServer, tokenizer, case: str) -> None:
    item = CASES[case]
    example = render_example(tokenizer, item, RenderConfig(max_seq_len=1024, max_continuation_tokens=256))
    assert example is not None
    first_target = next(i for i, label in enumerate(example.labels) if label != IGNORE_INDEX)
    context = example.input_ids[:first_target]

    index = resolve_target_index(item["messages"], item.get("target_index"))
    with VllmClient(vllm_server.url, timeout=60.0) as client:
        served = client.tokenize(messages=item["messages"][:index], model=vllm_server.base_model_name)
    assert context == served
    bos = tokenizer.bos_token_id
    assert bos is None or served[:2] != [bos, bos]  # no double BOS


def test_raw_context_tokens_equal_vllm_completion_prompt_tokens(vllm_server: VllmServer, tokenizer) -> None:
    """Template-free items: the raw context is tokenized as vLLM tokenizes a completion prompt."""
    context = "The capital of France is"
    example = render_example(tokenizer, {"context": context, "continuation": " Paris."})
    assert example is not None
    first_target = next(i for i, label in enumerate(example.labels) if label != IGNORE_INDEX)
    with VllmClient(vllm_server.url, timeout=60.0) as client:
        served = client.tokenize(prompt=context, model=vllm_server.base_model_name)
    assert example.input_ids[:first_target] == served
