"""training.render: the invariants of DESIGN.md "The training example" on every real tokenizer family,
plus the explicit rules (BOS, context boundary, majority, end marker, history rewrite, truncation)."""

from __future__ import annotations

from pathlib import Path

import pytest

import training.render as render_module
from tests.unit.render_checks import (
    check_main_path,
    labelled_positions,
    special_ids,
    template_prompt_ids,
    text_of_tokens,
)
from training.render import (
    IGNORE_INDEX,
    ContinuationTooLong,
    RenderConfig,
    RenderError,
    render_distillation_pair,
    render_example,
    resolve_target_index,
    validate_feedback,
)

CONVERSATION = [
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": "What is the capital of France?"},
    {"role": "assistant", "content": "Paris, obviously."},
    {"role": "user", "content": "And of Japan? 日本の首都は？"},
    {"role": "assistant", "content": "Kyoto."},
]
CONTINUATIONS = ["Tokyo (東京). 🙂", "\n\nTokyo.\n", "  Tokyo  ", "Tokyo</b> -> yes\n\n"]


def labelled_text(tokenizer, example) -> str:
    positions = labelled_positions(example)
    return text_of_tokens(tokenizer, example.input_ids, positions[0], positions[-1] + 1)


# --- the main path on every family -------------------------------------------------------------------


@pytest.mark.parametrize("continuation", CONTINUATIONS)
def test_main_path_invariants(chat_family_tokenizer, continuation):
    _, tokenizer = chat_family_tokenizer
    item = {"messages": CONVERSATION, "target_index": 4, "continuation": continuation}
    example = render_example(tokenizer, item, RenderConfig())
    check_main_path(tokenizer, CONVERSATION, 4, continuation, example)
    assert example.context_tokens_dropped == 0 and not example.history_rewritten
    assert example.attention_mask == [1] * len(example.input_ids)


def test_default_target_replaces_a_trailing_assistant_turn_or_appends(chat_family_tokenizer):
    _, tokenizer = chat_family_tokenizer
    replaced = render_example(tokenizer, {"messages": CONVERSATION, "continuation": "Tokyo."})
    appended = render_example(tokenizer, {"messages": CONVERSATION[:4], "continuation": "Tokyo."})
    assert replaced.input_ids == appended.input_ids
    assert replaced.labels == appended.labels
    check_main_path(tokenizer, CONVERSATION, 4, "Tokyo.", replaced)


def test_messages_without_a_chat_template_are_refused(tokenizer_for):
    with pytest.raises(RenderError) as error:
        render_example(tokenizer_for("gpt2"), {"messages": CONVERSATION, "continuation": "Tokyo."})
    assert error.value.field == "messages"


def test_mistral_context_matches_mistral_common(tokenizer_for):
    """mistral_common is Mistral's reference renderer: our template fixture must agree with it."""
    import mistral_common
    from mistral_common.protocol.instruct.messages import AssistantMessage, SystemMessage, UserMessage
    from mistral_common.protocol.instruct.request import ChatCompletionRequest
    from mistral_common.tokens.tokenizers.mistral import MistralTokenizer

    model = Path(mistral_common.__file__).parent / "data" / "mistral_instruct_tokenizer_240323.model.v3"
    reference = MistralTokenizer.from_file(str(model))
    request = ChatCompletionRequest(messages=[
        SystemMessage(content="You are terse."), UserMessage(content="What is the capital of France?"),
        AssistantMessage(content="Paris, obviously."), UserMessage(content="And of Japan? 日本の首都は？"),
    ])
    expected = reference.encode_chat_completion(request).tokens
    example = render_example(tokenizer_for("mistral"), {"messages": CONVERSATION, "continuation": "Tokyo."})
    assert example.input_ids[: len(expected)] == expected
    assert example.input_ids[len(expected):] == [t for t in example.labels if t != IGNORE_INDEX]


# --- BOS rule -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("family", ["llama2", "phi3", "llama3", "mistral"])
def test_templates_that_emit_bos_get_exactly_one(tokenizer_for, family):
    tokenizer = tokenizer_for(family)
    example = render_example(tokenizer, {"messages": CONVERSATION[1:2], "continuation": "Paris."})
    assert example.input_ids[0] == tokenizer.bos_token_id
    assert example.input_ids[1] != tokenizer.bos_token_id


def test_raw_path_prepends_bos_once_when_the_tokenizer_adds_it(tokenizer_for):
    llama2, qwen2 = tokenizer_for("llama2"), tokenizer_for("qwen2")
    plain = render_example(llama2, {"context": "The capital of France is", "continuation": " Paris."})
    assert plain.input_ids[0] == llama2.bos_token_id and plain.input_ids[1] != llama2.bos_token_id
    assert plain.input_ids == llama2("The capital of France is Paris.")["input_ids"]
    explicit = render_example(llama2, {"context": "<s>The capital of France is", "continuation": " Paris."})
    assert explicit.input_ids.count(llama2.bos_token_id) == 1
    no_bos = render_example(qwen2, {"context": "The capital of France is", "continuation": " Paris."})
    assert no_bos.input_ids == qwen2("The capital of France is Paris.")["input_ids"]
    assert labelled_text(qwen2, no_bos) == " Paris."


# --- one pass, context boundary and majority rules ----------------------------------------------------


def test_one_tokenization_pass_when_no_token_crosses_the_prompt_end(tokenizer_for, monkeypatch):
    tokenizer = tokenizer_for("qwen2")
    render_example(tokenizer, {"messages": CONVERSATION, "continuation": "warm-up"})
    calls = []
    original = render_module._encode
    monkeypatch.setattr(render_module, "_encode", lambda tok, text: calls.append(text) or original(tok, text))
    render_example(tokenizer, {"messages": CONVERSATION, "continuation": "Tokyo."})
    assert len(calls) == 1 and calls[0].endswith("Tokyo.<|im_end|>\n")


def test_a_token_crossing_the_prompt_end_is_split_there(tokenizer_for):
    """ChatML's generation prompt ends in "\\n"; a continuation starting with "\\n\\n" merges with it
    into one "\\n\\n\\n" token in a single pass. The rule: the prompt keeps its own tokens (parity) and
    the rest of the crossing token is encoded on its own and labelled."""
    tokenizer = tokenizer_for("qwen2")
    messages = CONVERSATION[:4]
    prompt = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    full = prompt + "\n\nTokyo.<|im_end|>"
    offsets = tokenizer(full, add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"]
    assert any(start < len(prompt) < end for start, end in offsets)  # the straddle really happens
    example = render_example(tokenizer, {"messages": messages, "continuation": "\n\nTokyo."})
    prompt_ids = template_prompt_ids(tokenizer, messages)
    assert example.input_ids[: len(prompt_ids)] == prompt_ids
    assert labelled_positions(example)[0] == len(prompt_ids)
    assert labelled_text(tokenizer, example) == "\n\nTokyo.<|im_end|>"


def test_majority_rule_labels_a_token_merging_template_space_with_the_target(tokenizer_for):
    """Llama-2 renders ' ' + answer after [/INST]; SentencePiece makes '▁Tokyo' one token carrying
    the template's space: it is labelled (the model must emit it), and nothing before it is."""
    tokenizer = tokenizer_for("llama2")
    example = render_example(tokenizer, {"messages": CONVERSATION[:4], "continuation": "Tokyo."})
    first = labelled_positions(example)[0]
    assert tokenizer.convert_ids_to_tokens(example.input_ids[first]) == "▁Tokyo"
    assert tokenizer.convert_ids_to_tokens(example.input_ids[first - 1]).endswith("]")
    assert labelled_text(tokenizer, example).strip() == "Tokyo. </s>"


def test_context_boundary_inside_a_word_keeps_both_sides_exact(tokenizer_for):
    for family in ("llama2", "qwen2"):
        tokenizer = tokenizer_for(family)
        example = render_example(tokenizer, {"context": "The capital of Fra", "continuation": "nce is Paris"})
        context_ids = tokenizer("The capital of Fra")["input_ids"]
        assert example.input_ids[: len(context_ids)] == context_ids
        assert labelled_text(tokenizer, example) == "nce is Paris"


# --- end-of-turn marker ---------------------------------------------------------------------------------

NEXT_HEADER_TEMPLATE = (  # GLM-style: an assistant turn is closed only by the next turn's header
    "{% for m in messages %}{% if m.role == 'user' %}{{ '<|user|>\n' + m.content }}"
    "{% elif m.role == 'assistant' %}{{ '<|assistant|>\n' + m.content }}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% endif %}"
)


def test_a_turn_closed_only_by_the_next_header_labels_that_header(tokenizer_for, monkeypatch):
    glm_like = tokenizer_for("phi3")
    monkeypatch.setattr(glm_like, "chat_template", NEXT_HEADER_TEMPLATE)
    example = render_example(glm_like, {"messages": CONVERSATION[1:4], "continuation": "Tokyo."})
    labelled = [example.input_ids[i] for i in labelled_positions(example)]
    assert labelled[-1] == glm_like.convert_tokens_to_ids("<|user|>")
    assert labelled_text(glm_like, example).strip().startswith("Tokyo.")


def test_a_template_without_any_end_marker_is_refused(tokenizer_for, monkeypatch):
    plain = tokenizer_for("qwen2")
    monkeypatch.setattr(plain, "chat_template",
                        "{% for m in messages %}{{ m.role + ': ' + m.content + '\n' }}{% endfor %}"
                        "{% if add_generation_prompt %}assistant: {% endif %}")
    with pytest.raises(RenderError) as error:
        render_example(plain, {"messages": CONVERSATION[1:2], "continuation": "Paris."})
    assert error.value.field == "continuation"
    assert "end-of-turn" in error.value.reason


def test_no_scaffold_token_is_ever_labelled(chat_family_tokenizer):
    _, tokenizer = chat_family_tokenizer
    item = {"messages": CONVERSATION, "target_roles": ["assistant"]}
    example = render_example(tokenizer, item)
    specials = special_ids(tokenizer)
    labelled = [example.input_ids[i] for i in labelled_positions(example)]
    end_markers = {t for t in labelled if t in specials}
    assert len(end_markers) == 1  # the one end-of-turn token, nothing else from the template
    for role_text in ("user", "system", "assistant", "What is the capital"):
        assert role_text not in tokenizer.decode(labelled)


# --- multi-turn targets ---------------------------------------------------------------------------------


def test_target_roles_assistant_trains_every_assistant_turn(tokenizer_for):
    tokenizer = tokenizer_for("qwen2")
    example = render_example(tokenizer, {"messages": CONVERSATION, "target_roles": ["assistant"]})
    labelled = tokenizer.decode([example.input_ids[i] for i in labelled_positions(example)])
    assert labelled == "Paris, obviously.<|im_end|>Kyoto.<|im_end|>"
    first_prompt = template_prompt_ids(tokenizer, CONVERSATION[:2])
    assert example.input_ids[: len(first_prompt)] == first_prompt
    assert not example.history_rewritten


def test_target_content_pattern_selects_matching_turns(tokenizer_for):
    tokenizer = tokenizer_for("llama3")
    example = render_example(tokenizer, {"messages": CONVERSATION, "target_content_pattern": r"^Par"})
    labelled = tokenizer.decode([example.input_ids[i] for i in labelled_positions(example)])
    assert labelled == "Paris, obviously.<|eot_id|>"
    assert render_example(tokenizer, {"messages": CONVERSATION, "target_content_pattern": "nowhere"}) is None


TOOL_CONVERSATION = [
    {"role": "user", "content": "Weather in Paris?"},
    {"role": "assistant", "content": "", "tool_calls": [
        {"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Paris"}}}]},
    {"role": "tool", "content": "{\"sky\": \"sunny\", \"temp\": 21}", "tool_call_id": "call_0"},
    {"role": "assistant", "content": "Sunny, 21 °C."},
]


def test_tool_bodies_are_labelled_without_their_wrap(tokenizer_for):
    tokenizer = tokenizer_for("qwen3-reasoning")
    example = render_example(tokenizer, {"messages": TOOL_CONVERSATION, "target_roles": ["tool"]})
    labelled = tokenizer.decode([example.input_ids[i] for i in labelled_positions(example)])
    # the body's last token "}\n" also carries the wrap's newline: the majority rule labels it
    assert labelled == "{\"sky\": \"sunny\", \"temp\": 21}\n"
    assert "<tool_response>" in tokenizer.decode(example.input_ids)
    assert example.input_ids[-1] in example.labels  # the sequence ends with the last target token


def test_tool_call_context_has_parity(chat_family_tokenizer):
    _, tokenizer = chat_family_tokenizer
    example = render_example(tokenizer, {"messages": TOOL_CONVERSATION, "continuation": "It is sunny."})
    check_main_path(tokenizer, TOOL_CONVERSATION, 3, "It is sunny.", example)


# --- history rewrite ------------------------------------------------------------------------------------

REASONING_CONVERSATION = [
    {"role": "user", "content": "2+2?"},
    {"role": "assistant", "content": "<think>2 plus 2 is 4.</think>\n4"},
    {"role": "user", "content": "3+3?"},
    {"role": "assistant", "content": "<think>3 plus 3 is 6.</think>\n6"},
]


def test_history_rewrite_is_detected_and_rendered_in_the_last_turns_inference_view(tokenizer_for):
    tokenizer = tokenizer_for("qwen3-reasoning")
    full = tokenizer.apply_chat_template(REASONING_CONVERSATION, tokenize=False)
    prompt = tokenizer.apply_chat_template(REASONING_CONVERSATION[:2], tokenize=False, add_generation_prompt=True)
    assert not full.startswith(prompt)  # the template strips the first turn's reasoning later on
    example = render_example(tokenizer, {"messages": REASONING_CONVERSATION, "target_roles": ["assistant"]})
    assert example.history_rewritten
    check_main_path(tokenizer, REASONING_CONVERSATION, 3, "<think>3 plus 3 is 6.</think>\n6", example)


COUNTING_TEMPLATE = (  # rewrites history on every turn: its header counts the messages
    "{{ '<|im_start|>system\nturns=' ~ messages|length ~ '<|im_end|>\n' }}"
    "{% for m in messages %}{{ '<|im_start|>' + m.role + '\n' + m.content + '<|im_end|>\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def test_main_path_rewrite_keeps_the_exact_inference_prompt(tokenizer_for, monkeypatch):
    counting = tokenizer_for("qwen2")
    monkeypatch.setattr(counting, "chat_template", COUNTING_TEMPLATE)
    example = render_example(counting, {"messages": CONVERSATION[:4], "continuation": "Tokyo."})
    assert example.history_rewritten
    check_main_path(counting, CONVERSATION[:4], 4, "Tokyo.", example)


# --- truncation and limits ------------------------------------------------------------------------------


@pytest.mark.parametrize("family", ["qwen2", "llama2", "llama3"])
def test_context_is_truncated_from_the_left_never_the_continuation(tokenizer_for, family):
    tokenizer = tokenizer_for(family)
    long_history = [{"role": "user", "content": "filler " * 300}, {"role": "assistant", "content": "ok"},
                    {"role": "user", "content": "And of Japan?"}]
    full = render_example(tokenizer, {"messages": long_history, "continuation": "Tokyo is the capital."})
    cut = render_example(tokenizer, {"messages": long_history, "continuation": "Tokyo is the capital."},
                         RenderConfig(max_seq_len=64))
    assert len(cut.input_ids) == 64
    assert cut.context_tokens_dropped == len(full.input_ids) - 64
    assert cut.input_ids[-20:] == full.input_ids[-20:] and cut.labels[-20:] == full.labels[-20:]
    assert cut.num_target_tokens == full.num_target_tokens
    if full.input_ids[0] == tokenizer.bos_token_id:
        assert cut.input_ids[0] == tokenizer.bos_token_id  # a leading BOS survives truncation


def test_too_long_continuation_is_rejected_naming_the_field(tokenizer_for):
    tokenizer = tokenizer_for("qwen2")
    item = {"messages": CONVERSATION[:4], "continuation": "word " * 200}
    with pytest.raises(ContinuationTooLong) as error:
        render_example(tokenizer, item, RenderConfig(max_continuation_tokens=50))
    assert error.value.field == "continuation"
    with pytest.raises(ContinuationTooLong) as error:
        validate_feedback(tokenizer, item, RenderConfig(max_seq_len=100, max_continuation_tokens=512))
    assert error.value.field == "continuation" and "max_seq_len" in error.value.reason
    raw = {"context": "x", "continuation": "word " * 200}
    with pytest.raises(ContinuationTooLong):
        render_example(tokenizer, raw, RenderConfig(max_seq_len=64))


# --- empty targets, validation ----------------------------------------------------------------------


@pytest.mark.parametrize("blank", ["", " ", "\n\t  \n"])
def test_blank_targets_produce_no_example(tokenizer_for, blank):
    tokenizer = tokenizer_for("qwen2")
    assert render_example(tokenizer, {"messages": CONVERSATION, "continuation": blank}) is None
    assert render_example(tokenizer, {"context": "abc", "continuation": blank}) is None
    assert render_example(tokenizer, {"segments": [{"text": "abc", "label": False},
                                                   {"text": blank, "label": True}]}) is None
    with pytest.raises(RenderError) as error:
        validate_feedback(tokenizer, {"messages": CONVERSATION, "continuation": blank})
    assert error.value.field == "continuation"


@pytest.mark.parametrize(("item", "field"), [
    ({"messages": CONVERSATION, "target_index": 1, "continuation": "x"}, "target_index"),
    ({"messages": CONVERSATION, "target_index": 0, "continuation": "x"}, "target_index"),
    ({"messages": CONVERSATION, "target_index": 9, "continuation": "x"}, "target_index"),
    ({"messages": CONVERSATION, "target_index": True, "continuation": "x"}, "target_index"),
    ({"messages": [], "continuation": "x"}, "messages"),
    ({"messages": [{"role": "robot", "content": "x"}], "continuation": "x"}, "messages[0].role"),
    ({"messages": [{"role": "user", "content": 3}], "continuation": "x"}, "messages[0].content"),
    ({"messages": CONVERSATION, "continuation": 42}, "continuation"),
    ({"messages": CONVERSATION}, "continuation"),
    ({"messages": CONVERSATION, "target_roles": ["user"]}, "target_roles"),
    ({"messages": CONVERSATION, "target_content_pattern": "("}, "target_content_pattern"),
    ({"segments": [{"text": "a", "label": "yes"}]}, "segments[0].label"),
    ({"segments": [{"label": True}]}, "segments[0].text"),
    ({"context": 1, "continuation": "x"}, "context"),
    ({"continuation": "x"}, "messages"),
])
def test_invalid_items_name_the_field(tokenizer_for, item, field):
    with pytest.raises(RenderError) as error:
        render_example(tokenizer_for("qwen2"), item)
    assert error.value.field == field


def test_resolve_target_index():
    assert resolve_target_index(CONVERSATION, None) == 4
    assert resolve_target_index(CONVERSATION[:4], None) == 4
    assert resolve_target_index(CONVERSATION, 2) == 2
    assert resolve_target_index(CONVERSATION, 5) == 5


def test_content_parts_and_null_content_are_normalised(tokenizer_for):
    tokenizer = tokenizer_for("qwen2")
    parts = [{"role": "user", "content": [{"type": "text", "text": "Hello"}, {"type": "text", "text": "there"}]}]
    example = render_example(tokenizer, {"messages": parts, "continuation": "Hi."})
    assert "Hello\nthere" in tokenizer.decode(example.input_ids)


# --- segments ---------------------------------------------------------------------------------------


def test_segments_follow_the_axolotl_example(tokenizer_for):
    tokenizer = tokenizer_for("llama2")
    segments = [{"text": "<s>Hello\n", "label": True}, {"text": "hi there!. ", "label": True},
                {"text": "goodbye ", "label": False}, {"text": "farewell</s>", "label": True}]
    example = render_example(tokenizer, {"segments": segments})
    assert example.input_ids == tokenizer("<s>Hello\nhi there!. goodbye farewell</s>",
                                          add_special_tokens=False)["input_ids"]
    assert example.input_ids.count(tokenizer.bos_token_id) == 1
    masked = tokenizer.decode([t for t, label in zip(example.input_ids, example.labels) if label == IGNORE_INDEX])
    assert masked.strip() == "goodbye"  # "▁good" carries the labelled segment's space: 1 of 5 characters
    assert example.labels[-1] == tokenizer.eos_token_id


# --- distillation pairs -----------------------------------------------------------------------------


def test_distillation_pair_targets_are_identical_and_aligned(chat_family_tokenizer):
    _, tokenizer = chat_family_tokenizer
    prefix = [{"role": "system", "content": "Facts: the deploy password is 7-4-1-9."},
              {"role": "user", "content": "Remember it."}, {"role": "assistant", "content": "Noted."}]
    messages = [{"role": "user", "content": "What is the deploy password?"}]
    pair = render_distillation_pair(tokenizer, prefix_messages=prefix, messages=messages,
                                    response="It is 7-4-1-9.", retained_turns=0, config=RenderConfig())
    teacher_positions, student_positions = labelled_positions(pair.teacher), labelled_positions(pair.student)
    assert len(teacher_positions) == len(student_positions) > 0
    assert [pair.teacher.input_ids[i] for i in teacher_positions] == \
        [pair.student.input_ids[i] for i in student_positions]
    assert len(pair.teacher.input_ids) > len(pair.student.input_ids)
    kept = render_distillation_pair(tokenizer, prefix_messages=prefix, messages=messages,
                                    response="It is 7-4-1-9.", retained_turns=2)
    assert "Remember it." in tokenizer.decode(kept.student.input_ids)
    assert "7-4-1-9." not in tokenizer.decode(kept.student.input_ids[: labelled_positions(kept.student)[0]])
    with pytest.raises(RenderError):
        render_distillation_pair(tokenizer, prefix_messages=prefix, messages=messages, response=" ")
