"""Invariant checks for rendered chat examples, shared by the example-based and property-based tests.

Each check compares a training.render.Example against an independent reference: the tokenizer's own
apply_chat_template(..., tokenize=True) for the context, and decoded text for the labelled tokens.
"""

from __future__ import annotations

import unicodedata

from training.render import IGNORE_INDEX, Example, normalise_messages


def normalised(tokenizer, text: str) -> str:
    """`text` in NFC, as Qwen2's normalizer and decoding return it (compatibility ideographs map)."""
    return unicodedata.normalize("NFC", text)


def special_ids(tokenizer) -> set[int]:
    ids = {i for i, token in tokenizer.added_tokens_decoder.items() if token.special}
    return ids | set(tokenizer.all_special_ids)


def template_prompt_ids(tokenizer, messages) -> list[int]:
    """The inference prompt as transformers builds it (the parity reference)."""
    encoded = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    return list(encoded["input_ids"])


def labelled_positions(example: Example) -> list[int]:
    return [i for i, label in enumerate(example.labels) if label != IGNORE_INDEX]


def text_of_tokens(tokenizer, ids: list[int], start: int, stop: int) -> str:
    """The characters tokens ids[start:stop] add to the decoded text of ids[:start]."""
    before = tokenizer.decode(ids[:start], clean_up_tokenization_spaces=False)
    through = tokenizer.decode(ids[:stop], clean_up_tokenization_spaces=False)
    assert through.startswith(before), (before, through)
    return through[len(before):]


def check_main_path(tokenizer, messages, target_index, continuation, example: Example) -> None:
    """Invariants 1-3 and 5 for a {messages, target_index, continuation} item (no truncation)."""
    context_messages = normalise_messages(messages)[:target_index]
    prompt_ids = template_prompt_ids(tokenizer, context_messages)
    # 1. inference parity: the context is byte-identical to the template's tokenized prompt
    assert example.input_ids[: len(prompt_ids)] == prompt_ids
    assert example.labels == [IGNORE_INDEX if label == IGNORE_INDEX else token
                              for token, label in zip(example.input_ids, example.labels)]
    positions = labelled_positions(example)
    assert positions, "no supervised token"
    assert positions[0] >= len(prompt_ids), "a context token is labelled"
    # the labelled tokens form one contiguous run that ends the sequence
    assert positions == list(range(positions[0], len(example.input_ids)))
    # no double BOS
    bos = tokenizer.bos_token_id
    assert bos is None or example.input_ids[:2] != [bos, bos], "double BOS"
    # 2/3/5. labelled tokens = (template whitespace merged into the first token) + continuation + marker
    specials = special_ids(tokenizer)
    labelled_ids = [example.input_ids[i] for i in positions]
    assert labelled_ids[-1] in specials, "the stop token is not trained"
    assert not [t for t in labelled_ids[:-1] if t in specials], "a template special token is labelled"
    text = normalised(tokenizer, text_of_tokens(tokenizer, example.input_ids, positions[0], len(example.input_ids)))
    marker = tokenizer.convert_ids_to_tokens(labelled_ids[-1])
    assert text.endswith(marker)
    body = text[: -len(marker)]
    continuation = normalised(tokenizer, continuation)
    rendered = continuation if continuation in body else continuation.strip()
    assert rendered in body, (rendered, body)
    lead, _, trail = body.partition(rendered)
    assert not lead.strip() and not trail.strip(), (lead, trail)
    # none of our templates puts anything but whitespace between the generation prompt and the body
    scaffold = text_of_tokens(tokenizer, example.input_ids, len(prompt_ids), positions[0])
    assert not scaffold.strip(), scaffold
