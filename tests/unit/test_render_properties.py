"""Property-based tests of training.render on every real tokenizer family: random conversations with
unicode, emoji, CJK, leading/trailing whitespace, newlines at boundaries, empty system messages and
tool calls must keep inference parity, the exact mask and the stop token."""

from __future__ import annotations

import json

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.unit.render_checks import check_main_path, labelled_positions, normalised, text_of_tokens
from training.render import IGNORE_INDEX, RenderConfig, render_example

PROPERTY_SETTINGS = settings(max_examples=30, deadline=None, derandomize=True,
                             suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])

_PIECES = ["hello", "Hello", " world", "🙂", "👩‍💻", "日本語", "中文字符", "ÿüß", "café", "\n", "\n\n", " ", "  ",
           "\t", "1234", "{\"a\": 1}", "?", "!", ".", "é", "Привет", "مرحبا", "<b>", "->"]
_letters = st.characters(codec="utf-8", exclude_categories=("Cs", "Co", "Cn", "Cc"))
_fragment = st.one_of(st.sampled_from(_PIECES), st.text(_letters, min_size=1, max_size=6))
text = st.lists(_fragment, min_size=0, max_size=8).map("".join)
non_blank = text.filter(lambda value: bool(value.strip()))


@st.composite
def conversations(draw):
    """(messages, target_index, continuation) with an assistant turn to replace or append."""
    messages = []
    if draw(st.booleans()):
        messages.append({"role": "system", "content": draw(st.sampled_from(["", " ", "Be brief."]) | text)})
    for turn in range(draw(st.integers(1, 3))):
        messages.append({"role": "user", "content": draw(non_blank)})
        if draw(st.integers(0, 4)) == 0:
            call = {"type": "function", "function": {"name": "lookup", "arguments": {"q": draw(text)}}}
            messages.append({"role": "assistant", "content": None, "tool_calls": [call]})
            messages.append({"role": "tool", "content": draw(non_blank), "tool_call_id": "call_1"})
        messages.append({"role": "assistant", "content": draw(text)})
    continuation = draw(non_blank)
    if draw(st.booleans()):
        target_index = len(messages) - 1  # replace the last assistant turn
    else:
        messages.append({"role": "user", "content": draw(non_blank)})
        target_index = None  # default: append after the trailing user turn
    return messages, target_index, continuation


@PROPERTY_SETTINGS
@given(case=conversations())
def test_random_conversations_hold_every_invariant(chat_family_tokenizer, case):
    _, tokenizer = chat_family_tokenizer
    messages, target_index, continuation = case
    item = {"messages": messages, "target_index": target_index, "continuation": continuation}
    example = render_example(tokenizer, item, RenderConfig(max_seq_len=100_000, max_continuation_tokens=100_000))
    assert example is not None
    resolved = target_index if target_index is not None else len(messages)
    check_main_path(tokenizer, messages, resolved, continuation, example)


@PROPERTY_SETTINGS
@given(blank=st.text(st.sampled_from(" \t\n\r\u3000\u00a0"), max_size=5))
def test_whitespace_only_continuations_give_no_example(chat_family_tokenizer, blank):
    _, tokenizer = chat_family_tokenizer
    item = {"messages": [{"role": "user", "content": "hi"}], "continuation": blank}
    assert render_example(tokenizer, item) is None


@PROPERTY_SETTINGS
@given(segments=st.lists(st.tuples(text, st.booleans()), min_size=1, max_size=6))
def test_segments_label_exactly_the_labelled_text(family_tokenizer, segments):
    _, tokenizer = family_tokenizer
    item = {"segments": [{"text": t, "label": label} for t, label in segments]}
    example = render_example(tokenizer, item)
    labelled_text = "".join(t for t, label in segments if label)
    if not labelled_text.strip():
        assert example is None
        return
    assert example is not None
    whole = "".join(t for t, _ in segments)
    expected = tokenizer(whole, add_special_tokens=False)["input_ids"]
    assert example.input_ids == expected  # one pass, nothing added
    # the majority rule, checked against a per-character mask built independently of the renderer
    labelled_char = [label for t, label in segments for _ in t]
    offsets = tokenizer(whole, add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"]
    for token, label, (start, end) in zip(example.input_ids, example.labels, offsets):
        chars = labelled_char[start:end] if end > start else labelled_char[start:start + 1]
        assert label == (token if 2 * sum(chars) >= len(chars) else IGNORE_INDEX)


@PROPERTY_SETTINGS
@given(context=text, continuation=non_blank)
def test_raw_context_continuation(family_tokenizer, context, continuation):
    _, tokenizer = family_tokenizer
    example = render_example(tokenizer, {"context": context, "continuation": continuation})
    assert example is not None
    with_specials = tokenizer(context, add_special_tokens=True)["input_ids"] if context else []
    bos = tokenizer.bos_token_id
    if bos is not None and with_specials[:1] == [bos] and not context.startswith(tokenizer.bos_token):
        assert example.input_ids[0] == bos and example.labels[0] == IGNORE_INDEX
    assert example.input_ids[:2] != [bos, bos]
    positions = labelled_positions(example)
    assert positions == list(range(positions[0], len(example.input_ids)))
    assert normalised(tokenizer, text_of_tokens(tokenizer, example.input_ids, positions[0],
                                                len(example.input_ids))).strip() \
        == normalised(tokenizer, continuation).strip()


@PROPERTY_SETTINGS
@given(args=text)
def test_tool_call_context_is_rendered_like_the_template(chat_family_tokenizer, args):
    _, tokenizer = chat_family_tokenizer
    call = {"type": "function", "function": {"name": "search", "arguments": json.dumps({"q": args})}}
    messages = [{"role": "user", "content": "find it"},
                {"role": "assistant", "content": "", "tool_calls": [call]},
                {"role": "tool", "content": args or "none", "tool_call_id": "c1"}]
    example = render_example(tokenizer, {"messages": messages, "continuation": "Found it."})
    check_main_path(tokenizer, messages, 3, "Found it.", example)


pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")
