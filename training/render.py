"""From a stored feedback item to a context-frozen training example (input_ids, labels, attention_mask).

Owns the invariants of DESIGN.md "The training example": inference parity of the context, an exact
loss mask (target text plus the template's end-of-turn marker), one tokenization pass attributed by
offset mapping, left truncation, empty targets, templates that rewrite history. Pure: knows nothing
about the database, the API, models or training.

Rules (each one is tested in tests/unit/test_render*.py):

* BOS. Chat paths encode the rendered template text with `add_special_tokens=False`, exactly like
  `apply_chat_template(..., tokenize=True)` and vLLM's chat endpoint: the template alone decides
  whether BOS appears, so a template that emits BOS never gets a second one. The raw
  `context`+`continuation` path prepends the tokenizer's BOS id once when the tokenizer adds BOS by
  default (like a completion request) and the context does not already start with the BOS text.
* Context boundary. The end of the inference prompt is always a token boundary and the tokens before
  it are exactly the encoding of the prompt text alone. When the single pass over the full text has a
  token crossing that boundary (e.g. ChatML's trailing "\\n" merged with a continuation that starts with
  "\\n"), the prompt is encoded on its own and the crossing token's remainder after the boundary is
  encoded on its own; everything after it keeps the single pass's tokens.
* Majority rule (every other boundary, and segments). A token is labelled iff at least half of its
  characters are target text (the continuation, a selected message body or a labelled segment) or
  end-of-turn marker. So Llama-2's "▁Tokyo" (template space + target) after "[/INST]" is labelled (the
  model has to emit it), a tool body's last token "}\n" (body + wrap newline) is labelled, and
  SentencePiece's "▁good" (a labelled segment's trailing space + a masked word) is not.
* End-of-turn marker. For an assistant target, the characters from the end of its text through the
  first special token that follows it are labelled: "<|im_end|>", "<|eot_id|>", " </s>", "<|end|>".
  A template that closes a turn only with the next turn's header (GLM-style) is rendered with one more
  user turn, and that header token is labelled as the stop signal. No special token after the text
  at all is a RenderError. Tool bodies (`target_roles=["tool"]`) are labelled without any wrap.
* History rewrite. When a target's inference prompt is not a prefix of the full render (or the
  template renders a target's text differently, e.g. stripping earlier <think> reasoning), the example
  is built in the inference view of the LAST assistant target only: its exact prompt, the template's
  scaffold, its text and marker. Earlier targets become unlabelled context as the template renders it;
  `Example.history_rewritten` is True.
* Truncation. Context is cut from the left (a leading BOS is kept) until the sequence fits
  `max_seq_len`; the span from the last target's first token to the end is never cut: if it alone does
  not fit, or a target exceeds `max_continuation_tokens`, ContinuationTooLong names the field.
* Empty targets. An empty or whitespace-only continuation / body / labelled text yields None.
"""

from __future__ import annotations

import bisect
import re
import unicodedata
import weakref
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from jinja2 import TemplateError
from transformers import PreTrainedTokenizerBase

IGNORE_INDEX = -100
MESSAGE_ROLES = frozenset({"system", "developer", "user", "assistant", "tool"})
TARGET_ROLES = frozenset({"assistant", "tool"})
# Private-use code points: never produced by real text, so the probe render can locate a message body.
_PROBE = "\ue000loraloop-probe\ue001"


@dataclass(frozen=True)
class RenderConfig:
    max_seq_len: int = 1024
    max_continuation_tokens: int = 512

    def __post_init__(self) -> None:
        if self.max_seq_len < 2:
            raise ValueError(f"max_seq_len must be >= 2, got {self.max_seq_len}")
        if self.max_continuation_tokens < 1:
            raise ValueError(f"max_continuation_tokens must be >= 1, got {self.max_continuation_tokens}")


@dataclass
class Example:
    """One training sequence. labels[i] is the token id at i when it is supervised, else -100
    (unshifted, as transformers' causal LM losses expect)."""

    input_ids: list[int]
    labels: list[int]
    attention_mask: list[int]
    context_tokens_dropped: int = 0
    history_rewritten: bool = False

    @property
    def num_target_tokens(self) -> int:
        return sum(1 for label in self.labels if label != IGNORE_INDEX)

    def __len__(self) -> int:
        return len(self.input_ids)


@dataclass(frozen=True)
class DistillPair:
    teacher: Example
    student: Example


class RenderError(ValueError):
    """An item that cannot become a training example; `field` names the offending input field."""

    def __init__(self, field: str, reason: str) -> None:
        super().__init__(f"{field}: {reason}")
        self.field = field
        self.reason = reason


class ContinuationTooLong(RenderError):
    """The target (with its end-of-turn marker) does not fit the configured limits."""


class DistillationMisaligned(RenderError):
    """Teacher and student render the response to different token ids."""


# ---------------------------------------------------------------------------------------------- public


def render_example(
    tokenizer: PreTrainedTokenizerBase, item: Mapping[str, Any], config: RenderConfig | None = None
) -> Example | None:
    """The training example for a feedback item, or None when it has no supervised token.

    Item shapes: {"messages", "target_index"?, "continuation"} (main path), optionally with
    "target_roles"/"target_content_pattern" (multi-turn targets; "continuation" then optional),
    {"context", "continuation"} (raw text), {"segments": [{"text", "label"}]} (template-free).
    """
    config = config or RenderConfig()
    if not isinstance(item, Mapping):
        raise RenderError("item", "must be an object")
    if "segments" in item:
        plan = _plan_segments(item["segments"])
    elif "messages" in item:
        plan = _plan_conversation(tokenizer, item)
    elif "context" in item:
        plan = _plan_raw(tokenizer, item)
    else:
        raise RenderError("messages", "an item needs messages (+ continuation), context + continuation, "
                                      "or segments")
    if plan is None:
        return None
    return _build_example(tokenizer, plan, config)


def validate_feedback(
    tokenizer: PreTrainedTokenizerBase, item: Mapping[str, Any], config: RenderConfig | None = None
) -> Example:
    """Render `item` as the worker will, raising RenderError (naming the field) when it cannot train.

    Used at ingestion: an empty target is rejected here, although render_example returns None for it.
    """
    example = render_example(tokenizer, item, config)
    if example is None:
        field_name = "segments" if "segments" in item else "continuation"
        raise RenderError(field_name, "empty or whitespace-only target: nothing to train on")
    return example


def resolve_target_index(messages: Sequence[Mapping[str, Any]], target_index: int | None) -> int:
    """The index of the assistant turn the continuation replaces.

    None: the last message when it is an assistant turn (replace it), else len(messages) (append a
    new assistant turn). An explicit index must leave at least one message of context and, unless
    it appends, point at an assistant turn.
    """
    if target_index is None:
        if len(messages) > 1 and messages[-1].get("role") == "assistant":
            return len(messages) - 1
        return len(messages)
    if isinstance(target_index, bool) or not isinstance(target_index, int):
        raise RenderError("target_index", "must be an integer or null")
    if not 1 <= target_index <= len(messages):
        raise RenderError("target_index", f"must be between 1 and {len(messages)} (the number of messages); "
                                          f"got {target_index}")
    if target_index < len(messages) and messages[target_index].get("role") != "assistant":
        raise RenderError("target_index", f"messages[{target_index}] is a "
                                          f"{messages[target_index].get('role')!r} turn, not an assistant turn")
    return target_index


def render_distillation_pair(
    tokenizer: PreTrainedTokenizerBase,
    *,
    prefix_messages: Sequence[Mapping[str, Any]],
    messages: Sequence[Mapping[str, Any]],
    response: str,
    retained_turns: int = 0,
    config: RenderConfig | None = None,
) -> DistillPair:
    """Teacher = prefix_messages + messages -> response; student = the last `retained_turns` prefix
    messages + messages -> response. The response's labelled token ids are identical in both."""
    if retained_turns < 0:
        raise RenderError("retained_turns", "must be >= 0")
    if not isinstance(response, str) or not response.strip():
        raise RenderError("response", "empty or whitespace-only response: nothing to distil")
    prefix = list(prefix_messages)
    kept = prefix[len(prefix) - retained_turns:] if retained_turns else []
    teacher_messages = [*prefix, *messages]
    student_messages = [*kept, *messages]
    if not student_messages:
        raise RenderError("messages", "the student sees no message: keep at least one")
    teacher = render_example(tokenizer, {"messages": teacher_messages, "target_index": len(teacher_messages),
                                         "continuation": response}, config)
    student = render_example(tokenizer, {"messages": student_messages, "target_index": len(student_messages),
                                         "continuation": response}, config)
    assert teacher is not None and student is not None  # response is not blank
    teacher_targets = [t for t, label in zip(teacher.input_ids, teacher.labels) if label != IGNORE_INDEX]
    student_targets = [t for t, label in zip(student.input_ids, student.labels) if label != IGNORE_INDEX]
    if teacher_targets != student_targets:
        raise DistillationMisaligned("response", "teacher and student tokenize the response differently "
                                                 f"({len(teacher_targets)} vs {len(student_targets)} tokens)")
    return DistillPair(teacher=teacher, student=student)


def normalise_messages(messages: Any, field_name: str = "messages") -> list[dict[str, Any]]:
    """Plain dict copies with a string `content` (None -> "", text parts joined by newlines) and no
    None-valued keys (what apply_chat_template does), roles checked."""
    if isinstance(messages, (str, bytes)) or not isinstance(messages, Sequence) or not messages:
        raise RenderError(field_name, "must be a non-empty list of messages")
    normalised = []
    for index, message in enumerate(messages):
        where = f"{field_name}[{index}]"
        if not isinstance(message, Mapping):
            raise RenderError(where, "must be an object with role and content")
        role = message.get("role")
        if role not in MESSAGE_ROLES:
            raise RenderError(f"{where}.role", f"must be one of {sorted(MESSAGE_ROLES)}, got {role!r}")
        plain = {key: value for key, value in message.items() if value is not None}
        plain["content"] = _content_text(message.get("content"), f"{where}.content")
        normalised.append(plain)
    return normalised


# ---------------------------------------------------------------------------------------------- plans


@dataclass(frozen=True)
class _Span:
    """Characters [start, end) of the rendered text that are supervised."""

    start: int
    end: int
    field: str


@dataclass
class _Plan:
    text: str
    spans: list[_Span]
    protected_from: int  # left truncation never drops a token ending after this character
    context_end: int | None = None  # end of the inference prompt (a hard token boundary)
    prepend_bos: bool = False
    trim_after_last_target: bool = False
    limit_target_tokens: bool = True
    history_rewritten: bool = False


def _plan_segments(segments: Any) -> _Plan | None:
    if isinstance(segments, (str, bytes)) or not isinstance(segments, Sequence) or not segments:
        raise RenderError("segments", "must be a non-empty list of {text, label}")
    pieces, spans, position = [], [], 0
    for index, segment in enumerate(segments):
        if not isinstance(segment, Mapping):
            raise RenderError(f"segments[{index}]", "must be an object with text and label")
        text, label = segment.get("text"), segment.get("label")
        if not isinstance(text, str):
            raise RenderError(f"segments[{index}].text", "must be a string")
        if not isinstance(label, bool):
            raise RenderError(f"segments[{index}].label", "must be true or false")
        if label and text:
            spans.append(_Span(position, position + len(text), f"segments[{index}].text"))
        pieces.append(text)
        position += len(text)
    text = "".join(pieces)
    if not any(text[span.start:span.end].strip() for span in spans):
        return None
    merged = _merge_adjacent(spans)
    return _Plan(text=text, spans=merged, protected_from=merged[-1].start, limit_target_tokens=False)


def _plan_raw(tokenizer: PreTrainedTokenizerBase, item: Mapping[str, Any]) -> _Plan | None:
    context, continuation = item.get("context"), item.get("continuation")
    if not isinstance(context, str):
        raise RenderError("context", "must be a string")
    if not isinstance(continuation, str):
        raise RenderError("continuation", "must be a string")
    if not continuation.strip():
        return None
    profile = _profile(tokenizer)
    bos_text = tokenizer.bos_token
    prepend_bos = profile.adds_bos and not (bos_text and context.startswith(bos_text))
    text = context + continuation
    return _Plan(text=text, spans=[_Span(len(context), len(text), "continuation")],
                 protected_from=len(context), context_end=len(context), prepend_bos=prepend_bos)


def _plan_conversation(tokenizer: PreTrainedTokenizerBase, item: Mapping[str, Any]) -> _Plan | None:
    if not tokenizer.chat_template:
        raise RenderError("messages", "the tokenizer has no chat template: send context + continuation "
                                      "or segments instead")
    messages = normalise_messages(item["messages"])
    tools = item.get("tools")
    roles = _target_roles(item.get("target_roles"))
    pattern = _content_pattern(item.get("target_content_pattern"))
    continuation = item.get("continuation")
    replaced = None
    if continuation is not None:
        if not isinstance(continuation, str):
            raise RenderError("continuation", "must be a string")
        replaced = resolve_target_index(messages, item.get("target_index"))
        messages = [*messages[:replaced], {"role": "assistant", "content": continuation}]
        if roles is None and pattern is None:
            candidates = [replaced]
        else:
            candidates = _select_targets(messages, roles or frozenset({"assistant"}), pattern)
    elif roles is None and pattern is None:
        raise RenderError("continuation", "required unless target_roles or target_content_pattern is given")
    else:
        candidates = _select_targets(messages, roles or frozenset({"assistant"}), pattern)
    targets = [index for index in candidates
               if index > 0 and messages[index]["content"].strip()]
    if not targets:
        return None

    def field_of(index: int) -> str:
        return "continuation" if index == replaced else f"messages[{index}].content"

    full = _render(tokenizer, messages, tools, generation_prompt=False)
    spans: list[_Span] = []
    context_end = None
    for position, index in enumerate(targets):
        is_last = position == len(targets) - 1
        role = messages[index]["role"]
        prompt = _render(tokenizer, messages[:index], tools, generation_prompt=role == "assistant")
        if not full.startswith(prompt):
            return _plan_rewritten(tokenizer, messages, targets, tools, field_of)
        located = None
        if role == "assistant":
            expected_at = len(prompt) + len(_profile(tokenizer).generation_scaffold(tokenizer))
            located = _locate_verbatim(full, expected_at, messages[index]["content"])
        if located is None:
            located = _locate_body(tokenizer, messages, index, full, tools)
        if located is None or located[0] < len(prompt) or (spans and located[0] < spans[-1].end):
            return _plan_rewritten(tokenizer, messages, targets, tools, field_of)
        start, end = located
        if role == "assistant":
            full, end = _with_end_marker(tokenizer, messages, tools, full, end, is_last, field_of(index))
        if context_end is None:
            context_end = len(prompt)
        spans.append(_Span(start, end, field_of(index)))
    return _Plan(text=full, spans=spans, protected_from=len(prompt), context_end=context_end,
                 trim_after_last_target=True)


def _plan_rewritten(tokenizer: PreTrainedTokenizerBase, messages: list[dict[str, Any]], targets: list[int],
                    tools: Any, field_of: Callable[[int], str]) -> _Plan:
    """The documented strategy for templates that rewrite history: the inference view of the last
    assistant target (its exact prompt + the template's scaffold + its text + end marker)."""
    assistants = [index for index in targets if messages[index]["role"] == "assistant"]
    if not assistants:
        raise RenderError("target_roles", "the chat template rewrites earlier turns, and only assistant targets "
                                          "can then be rendered in their inference view")
    index = assistants[-1]
    view = messages[: index + 1]
    prompt = _render(tokenizer, messages[:index], tools, generation_prompt=True)
    full = _render(tokenizer, view, tools, generation_prompt=False)
    located = _locate_body(tokenizer, view, index, full, tools)
    if located is None:
        raise RenderError(field_of(index), "the chat template does not render this text verbatim, so its "
                                           "tokens cannot be located")
    start, end = located
    full, end = _with_end_marker(tokenizer, view, tools, full, end, True, field_of(index))
    scaffold = _profile(tokenizer).generation_scaffold(tokenizer)
    head = prompt + scaffold if full[:start].endswith(scaffold) else prompt
    text = head + full[start:end]
    return _Plan(text=text, spans=[_Span(len(head), len(text), field_of(index))], protected_from=len(prompt),
                 context_end=len(prompt), trim_after_last_target=True, history_rewritten=True)


def _locate_verbatim(full: str, at: int, body: str) -> tuple[int, int] | None:
    """Fast path: the body rendered verbatim (or stripped) right where the template's scaffold puts it."""
    for text in (body, body.strip()):
        if full.startswith(text, at):
            return at, at + len(text)
    return None


def _locate_body(tokenizer: PreTrainedTokenizerBase, messages: list[dict[str, Any]], index: int, full: str,
                 tools: Any) -> tuple[int, int] | None:
    """Character range of messages[index]'s text inside `full`, found by rendering the same
    conversation with a probe string as that body: the text before and after the probe must frame
    `full`. None when the template renders the body other than verbatim (or stripped)."""
    probe = [*messages[:index], {**messages[index], "content": _PROBE}, *messages[index + 1:]]
    rendered = _render(tokenizer, probe, tools, generation_prompt=False)
    at = rendered.find(_PROBE)
    if at < 0:
        return None
    head, tail = rendered[:at], rendered[at + len(_PROBE):]
    if len(head) + len(tail) > len(full) or not (full.startswith(head) and full.endswith(tail)):
        return None
    start, end = len(head), len(full) - len(tail)
    body = messages[index]["content"]
    if full[start:end] not in (body, body.strip()):
        return None
    return start, end


def _with_end_marker(tokenizer: PreTrainedTokenizerBase, messages: list[dict[str, Any]], tools: Any, full: str,
                     end: int, is_last: bool, field_name: str) -> tuple[str, int]:
    """(text, end of the end-of-turn marker after position `end`)."""
    match = _profile(tokenizer).marker_pattern.search(full, end)
    if match is None and is_last:
        extended = _render(tokenizer, [*messages, {"role": "user", "content": _PROBE}], tools,
                           generation_prompt=False)
        if extended.startswith(full[:end]):
            match = _profile(tokenizer).marker_pattern.search(extended, end)
            if match is not None:
                full = extended
    if match is None:
        raise RenderError(field_name, "the chat template emits no special token after this turn: there is no "
                                      "end-of-turn marker to train the model to stop")
    return full, match.end()


# ------------------------------------------------------------------------------------- tokenization


def _build_example(tokenizer: PreTrainedTokenizerBase, plan: _Plan, config: RenderConfig) -> Example:
    ids, offsets = _tokenize(tokenizer, plan)
    labels = _label(ids, offsets, plan.spans)
    if plan.trim_after_last_target:
        last = max(i for i, label in enumerate(labels) if label != IGNORE_INDEX)
        del ids[last + 1:], labels[last + 1:], offsets[last + 1:]
    if plan.limit_target_tokens:
        _check_target_sizes(offsets, plan.spans, config)
    ids, labels, dropped = _truncate_left(tokenizer, ids, labels, offsets, plan, config)
    return Example(input_ids=ids, labels=labels, attention_mask=[1] * len(ids),
                   context_tokens_dropped=dropped, history_rewritten=plan.history_rewritten)


def _encode(tokenizer: PreTrainedTokenizerBase, text: str) -> tuple[list[int], list[tuple[int, int]]]:
    """Token ids and character offsets of `text`, no special tokens added. Calls the Rust tokenizer
    directly (what the tokenizer's __call__ does, minus its Python wrapping) unless the backend is
    configured to truncate or pad."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None and backend.truncation is None and backend.padding is None:
        encoding = backend.encode(text, add_special_tokens=False)
        return encoding.ids, encoding.offsets
    encoding = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    return list(encoding["input_ids"]), [tuple(pair) for pair in encoding["offset_mapping"]]


def _tokenize(tokenizer: PreTrainedTokenizerBase, plan: _Plan) -> tuple[list[int], list[tuple[int, int]]]:
    ids, offsets = _encode(tokenizer, plan.text)
    boundary = plan.context_end
    if boundary is not None and 0 < boundary < len(plan.text):
        crossing = next((i for i, (start, end) in enumerate(offsets) if start < boundary < end), None)
        if crossing is not None:
            ids, offsets = _split_at_context_boundary(tokenizer, plan.text, boundary, ids, offsets, crossing)
    if plan.prepend_bos:
        ids.insert(0, tokenizer.bos_token_id)
        offsets.insert(0, (-1, -1))  # belongs to no character: never labelled
    return ids, offsets


def _split_at_context_boundary(tokenizer: PreTrainedTokenizerBase, text: str, boundary: int, ids: list[int],
                               offsets: list[tuple[int, int]], crossing: int
                               ) -> tuple[list[int], list[tuple[int, int]]]:
    """The context-boundary rule: prompt encoded alone + the crossing token's remainder encoded alone."""
    prompt_ids, prompt_offsets = _encode(tokenizer, text[:boundary])
    remainder_end, resume = offsets[crossing][1], crossing + 1
    # byte-level tokens of one multi-byte character share its offsets: take them all
    while resume < len(offsets) and offsets[resume][0] < remainder_end:
        remainder_end = max(remainder_end, offsets[resume][1])
        resume += 1
    remainder = text[boundary:remainder_end]
    expected = _nfc(tokenizer.decode(prompt_ids, clean_up_tokenization_spaces=False) + remainder)
    for anchor in ("", "\n"):
        # SentencePiece prepends a word-start "▁" to a text it encodes on its own; encoding the
        # remainder after an anchor newline and dropping the anchor's tokens gives mid-word pieces.
        piece_ids, piece_offsets = _encode(tokenizer, anchor + remainder)
        kept = [i for i, (start, _) in enumerate(piece_offsets) if start >= len(anchor)]
        if any(start < len(anchor) < end for start, end in piece_offsets):
            continue
        remainder_ids = [piece_ids[i] for i in kept]
        decoded = tokenizer.decode(prompt_ids + remainder_ids, clean_up_tokenization_spaces=False)
        if _nfc(decoded) == expected:
            shift = boundary - len(anchor)
            shifted = [(piece_offsets[i][0] + shift, piece_offsets[i][1] + shift) for i in kept]
            return ([*prompt_ids, *remainder_ids, *ids[resume:]],
                    [*prompt_offsets, *shifted, *offsets[resume:]])
    raise RenderError("continuation", "its first characters merge with the end of the prompt into a token "
                                      "that cannot be split at the prompt's end")


def _nfc(text: str) -> str:
    return unicodedata.normalize("NFC", text)


def _label(ids: list[int], offsets: list[tuple[int, int]], spans: list[_Span]) -> list[int]:
    """The majority rule: a token is labelled iff at least half of its characters are target
    characters (a zero-width token counts as the character at its position)."""
    labels = [IGNORE_INDEX] * len(ids)
    starts = [start for start, _ in offsets]
    ends = [end for _, end in offsets]
    for span in spans:
        # tokens that can touch the span: ending after its start, starting before its end
        first = bisect.bisect_left(ends, span.start)
        stop = bisect.bisect_left(starts, span.end)
        for index in range(first, stop):
            start, end = offsets[index]
            if start < 0:
                continue
            if span.start <= start and end <= span.end or _target_share_is_majority(start, end, spans):  # inside (zero-width tokens included)
                labels[index] = ids[index]
    return labels


def _target_share_is_majority(start: int, end: int, spans: list[_Span]) -> bool:
    end = max(end, start + 1)
    covered = sum(max(0, min(end, span.end) - max(start, span.start)) for span in spans)
    return 2 * covered >= end - start


def _check_target_sizes(offsets: list[tuple[int, int]], spans: list[_Span], config: RenderConfig) -> None:
    starts = [start for start, _ in offsets]
    ends = [end for _, end in offsets]
    for span in spans:
        count = bisect.bisect_left(starts, span.end) - bisect.bisect_right(ends, span.start)
        if count > config.max_continuation_tokens:
            raise ContinuationTooLong(span.field, f"{count} tokens with the end-of-turn marker; "
                                                  f"max_continuation_tokens is {config.max_continuation_tokens}")


def _truncate_left(tokenizer: PreTrainedTokenizerBase, ids: list[int], labels: list[int],
                   offsets: list[tuple[int, int]], plan: _Plan, config: RenderConfig
                   ) -> tuple[list[int], list[int], int]:
    """Drop context from the left (keeping a leading BOS) so the sequence fits max_seq_len; the tokens
    from `plan.protected_from` on (the last target's generated region) are never dropped."""
    excess = len(ids) - config.max_seq_len
    if excess <= 0:
        return ids, labels, 0
    protected = bisect.bisect_right([end for _, end in offsets], plan.protected_from)
    needed = len(ids) - protected
    if needed > config.max_seq_len:
        raise ContinuationTooLong(plan.spans[-1].field, f"the target needs {needed} tokens (with its "
                                                        f"end-of-turn marker); max_seq_len is {config.max_seq_len}")
    keep_bos = tokenizer.bos_token_id is not None and ids[0] == tokenizer.bos_token_id and protected > excess
    if keep_bos:
        return [ids[0], *ids[excess + 1:]], [labels[0], *labels[excess + 1:]], excess
    return ids[excess:], labels[excess:], excess


# ------------------------------------------------------------------------------------------ helpers


def _render(tokenizer: PreTrainedTokenizerBase, messages: list[dict[str, Any]], tools: Any, *,
            generation_prompt: bool) -> str:
    try:
        return tokenizer.apply_chat_template(messages, tools=tools, tokenize=False,
                                             add_generation_prompt=generation_prompt)
    except TemplateError as error:
        raise RenderError("messages", f"the chat template rejected the conversation: {error}") from error


def _content_text(content: Any, where: str) -> str:
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, Sequence):
        texts = []
        for index, part in enumerate(content):
            if not (isinstance(part, Mapping) and part.get("type") == "text" and isinstance(part.get("text"), str)):
                raise RenderError(f"{where}[{index}]", "only text parts ({type: text, text}) are supported")
            texts.append(part["text"])
        return "\n".join(texts)
    raise RenderError(where, "must be a string, a list of text parts, or null")


def _target_roles(value: Any) -> frozenset[str] | None:
    if value is None:
        return None
    if isinstance(value, str) or not isinstance(value, Sequence) or not value:
        raise RenderError("target_roles", "must be a non-empty list of roles")
    roles = frozenset(value)
    if not roles <= TARGET_ROLES:
        raise RenderError("target_roles", f"supported target roles are {sorted(TARGET_ROLES)}, "
                                          f"got {sorted(map(str, roles))}")
    return roles


def _content_pattern(value: Any) -> re.Pattern[str] | None:
    if value is None:
        return None
    if not isinstance(value, str):
        raise RenderError("target_content_pattern", "must be a regular expression string")
    try:
        return re.compile(value)
    except re.error as error:
        raise RenderError("target_content_pattern", f"invalid regular expression: {error}") from error


def _select_targets(messages: list[dict[str, Any]], roles: frozenset[str], pattern: re.Pattern[str] | None
                    ) -> list[int]:
    return [index for index, message in enumerate(messages)
            if message["role"] in roles and (pattern is None or pattern.search(message["content"]))]


def _merge_adjacent(spans: list[_Span]) -> list[_Span]:
    merged: list[_Span] = []
    for span in spans:
        if merged and merged[-1].end == span.start:
            merged[-1] = _Span(merged[-1].start, span.end, merged[-1].field)
        else:
            merged.append(span)
    return merged


class _TokenizerProfile:
    """Per-tokenizer facts the renderer needs repeatedly (cached; keyed on the chat template)."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase) -> None:
        self.chat_template = tokenizer.chat_template
        markers = sorted({token.content for token in tokenizer.added_tokens_decoder.values() if token.special}
                         | set(tokenizer.all_special_tokens), key=len, reverse=True)
        self.marker_pattern = re.compile("|".join(map(re.escape, markers))) if markers else re.compile(r"(?!x)x")
        with_special = tokenizer("x").input_ids
        without = tokenizer("x", add_special_tokens=False).input_ids
        self.adds_bos = (tokenizer.bos_token_id is not None and len(with_special) > len(without)
                         and with_special[0] == tokenizer.bos_token_id)
        self._scaffold: str | None = None

    def generation_scaffold(self, tokenizer: PreTrainedTokenizerBase) -> str:
        """Text the template puts between its generation prompt and an assistant body (Llama-2: " ")."""
        if self._scaffold is None:
            question = [{"role": "user", "content": "x"}]
            prompt = _render(tokenizer, question, None, generation_prompt=True)
            answered = _render(tokenizer, [*question, {"role": "assistant", "content": _PROBE}], None,
                               generation_prompt=False)
            at = answered.find(_PROBE)
            self._scaffold = answered[len(prompt):at] if at >= len(prompt) and answered.startswith(prompt) else ""
        return self._scaffold


_PROFILES: weakref.WeakKeyDictionary[PreTrainedTokenizerBase, _TokenizerProfile] = weakref.WeakKeyDictionary()


def _profile(tokenizer: PreTrainedTokenizerBase) -> _TokenizerProfile:
    profile = _PROFILES.get(tokenizer)
    if profile is None or profile.chat_template != tokenizer.chat_template:
        profile = _TokenizerProfile(tokenizer)
        _PROFILES[tokenizer] = profile
    return profile
