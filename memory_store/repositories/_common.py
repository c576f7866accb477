"""Helpers every repository shares: choice checks, limits and id-cursor pages."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from sqlalchemy import Select

DEFAULT_PAGE_SIZE = 100


def _check_choice(field: str, value: str, allowed: Sequence[str]) -> None:
    if value not in allowed:
        raise ValueError(f"{field} must be one of {', '.join(allowed)}; got {value!r}")


def _positive(limit: int) -> int:
    if limit < 1:
        raise ValueError(f"limit must be >= 1, got {limit}")
    return limit


def _page(stmt: Select[Any], id_column: Any, *, after_id: int | None, limit: int | None) -> Select[Any]:
    if after_id is not None:
        stmt = stmt.where(id_column > after_id)
    stmt = stmt.order_by(id_column)
    if limit is not None:
        if limit < 1:
            raise ValueError(f"limit must be >= 1, got {limit}")
        stmt = stmt.limit(limit)
    return stmt
