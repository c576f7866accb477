"""training.example_view: the token table, its coloured rendering and the --json form."""

from __future__ import annotations

import json

import pytest
from rich.console import Console

from training.example_view import inspect_item, render_table, token_table
from training.render import IGNORE_INDEX, RenderError, render_example

ITEM = {"messages": [{"role": "user", "content": "Capital of France?"}], "continuation": "Paris."}


def test_token_table_has_one_row_per_token(tokenizer_for):
    tokenizer = tokenizer_for("qwen2")
    example = render_example(tokenizer, ITEM)
    rows = token_table(tokenizer, example)
    assert [row.token_id for row in rows] == example.input_ids
    assert [row.label for row in rows] == example.labels
    assert "".join(row.piece for row in rows if row.trained) == "Paris.<|im_end|>"
    assert rows[0].piece == "<|im_start|>" and not rows[0].trained


def test_render_table_marks_masked_and_trained_tokens(tokenizer_for):
    tokenizer = tokenizer_for("qwen2")
    example = render_example(tokenizer, ITEM)
    console = Console(record=True, width=120, color_system="truecolor")
    render_table(console, tokenizer, example)
    styled = console.export_text(styles=True, clear=False)
    text = console.export_text()
    assert "masked" in text and str(tokenizer.convert_tokens_to_ids("<|im_end|>")) in text
    assert f"{len(example.input_ids)} tokens, {example.num_target_tokens} trained" in text
    assert "\x1b[" in styled  # coloured


def test_inspect_item_json_form(tokenizer_for):
    tokenizer = tokenizer_for("llama3")
    inspected = inspect_item(tokenizer, ITEM)
    assert set(inspected) == {"input_ids", "labels"}
    assert len(inspected["input_ids"]) == len(inspected["labels"])
    assert IGNORE_INDEX in inspected["labels"]
    json.dumps(inspected)
    with pytest.raises(RenderError):
        inspect_item(tokenizer, {**ITEM, "continuation": "  "})
