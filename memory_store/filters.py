"""SQL conditions shared by the repositories and the job queue; knows no table.

`namespace_matches` turns a token's namespace grant (service.api.auth: exact names, or patterns where
`*` matches any run of characters) into one WHERE condition, so list endpoints page through the
namespaces a token may see in the database instead of filtering pages after the fact. Patterns
become anchored regular expressions (`regexp_match`: `~` on PostgreSQL, SQLAlchemy's REGEXP
function on SQLite), which compare case-sensitively on both, as service.api.auth does; SQLite's LIKE
would not.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

from sqlalchemy import ColumnElement, false, or_


def pattern_regex(pattern: str) -> str:
    """`support-*` → `^support\\-.*$`: every character literal but `*`."""
    return "^" + ".*".join(re.escape(part) for part in pattern.split("*")) + "$"


def namespace_matches(column: Any, patterns: Sequence[str]) -> ColumnElement[bool]:
    """`column` equals one of `patterns` (`*`: any run); no pattern at all matches nothing."""
    conditions: list[ColumnElement[bool]] = [
        column.regexp_match(pattern_regex(pattern)) if "*" in pattern else column == pattern
        for pattern in patterns
    ]
    return or_(*conditions) if conditions else false()
