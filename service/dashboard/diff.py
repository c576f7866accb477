"""Word-level differences between two answers, as escaped HTML with `<mark>` around what changed.
Knows nothing about reports, the database or HTTP."""

from __future__ import annotations

import difflib
import re
from html import escape

_TOKENS = re.compile(r"\s+|\w+|[^\w\s]", re.UNICODE)


def _tokens(text: str) -> list[str]:
    return _TOKENS.findall(text)


def highlight_pair(before: str, after: str) -> tuple[str, str]:
    """(before, after) as HTML: every word only in one side is wrapped in `<mark>`; all text escaped."""
    left, right = _tokens(before or ""), _tokens(after or "")
    out_left: list[str] = []
    out_right: list[str] = []
    matcher = difflib.SequenceMatcher(a=left, b=right, autojunk=False)
    for op, i1, i2, j1, j2 in matcher.get_opcodes():
        a_text, b_text = escape("".join(left[i1:i2])), escape("".join(right[j1:j2]))
        if op == "equal":
            out_left.append(a_text)
            out_right.append(b_text)
            continue
        if a_text:
            out_left.append(f'<mark class="del">{a_text}</mark>')
        if b_text:
            out_right.append(f'<mark class="ins">{b_text}</mark>')
    return "".join(out_left), "".join(out_right)
