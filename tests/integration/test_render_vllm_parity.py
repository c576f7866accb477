"""Inference parity against a REAL vLLM: the context tokens of a rendered training example equal what
vLLM's own `POST /tokenize` builds for the same messages with the generation prompt (chat), and for
the same text (raw context, special tokens added as in a completion request)."""

from __future__ import annotations

import pytest
from transformers import AutoTokenizer

from deploy.vllm_client import VllmClient
from tests.integration.conftest import VllmServer
from training.render import IGNORE_INDEX, render_example

pytestmark = [pytest.mark.slow, pytest.mark.integration]

CONVERSATIONS = [
    [{"role": "user", "content": "What is the capital of France?"}],
    [{"role": "system", "content": ""}, {"role": "user", "content": "  leading and trailing  \n"}],
    [{"role": "system", "content": "Be terse."}, {"role": "user", "content": "日本の首都は？ 🙂"},
     {"role": "assistant", "content": "東京。"}, {"role": "user", "content": "\nAnd France?\n"}],
]


def context_ids(example) -> list[int]:
    first = next(i for i, label in enumerate(example.labels) if label != IGNORE_INDEX)
    return example.input_ids[:first]


@pytest.mark.parametrize("messages", CONVERSATIONS)
@pytest.mark.parametrize("continuation", ["Paris.", "\n\nParis."])
def test_chat_context_equals_vllm_tokenize(vllm_server: VllmServer, messages, continuation):
    tokenizer = AutoTokenizer.from_pretrained(vllm_server.model_dir)
    example = render_example(tokenizer, {"messages": messages, "continuation": continuation})
    with VllmClient(vllm_server.url, timeout=120.0, retries=2) as client:
        expected = client.tokenize(messages=messages, model=vllm_server.base_model_name)
    assert context_ids(example) == expected


def test_raw_context_equals_vllm_tokenize(vllm_server: VllmServer):
    tokenizer = AutoTokenizer.from_pretrained(vllm_server.model_dir)
    context = "The capital of France is"
    example = render_example(tokenizer, {"context": context, "continuation": " Paris."})
    with VllmClient(vllm_server.url, timeout=120.0, retries=2) as client:
        expected = client.tokenize(prompt=context, model=vllm_server.base_model_name)
    assert context_ids(example) == expected
