"""service.log_setup: one handler however often it is configured, JSON lines when asked."""

from __future__ import annotations

import json
import logging

import pytest

from service.log_setup import JsonFormatter, configure_logging


def test_configure_logging_is_idempotent_and_sets_the_level() -> None:
    root = logging.getLogger()
    saved_level, saved_handlers = root.level, list(root.handlers)
    try:
        configure_logging("WARNING", json_lines=True)
        configure_logging("DEBUG", json_lines=False)
        ours = [handler for handler in root.handlers if handler.get_name() == "loraloop"]
        assert len(ours) == 1 and not isinstance(ours[0].formatter, JsonFormatter)
        assert root.level == logging.DEBUG
        assert logging.getLogger("uvicorn.access").propagate
    finally:
        for handler in list(root.handlers):
            if handler not in saved_handlers:
                root.removeHandler(handler)
        root.setLevel(saved_level)


def test_json_formatter_writes_one_object_with_extras() -> None:
    record = logging.makeLogRecord(
        {"name": "loraloop.test", "levelname": "INFO", "msg": "stored %d items", "args": (3,), "job_id": 7}
    )
    payload = json.loads(JsonFormatter().format(record))
    assert payload["message"] == "stored 3 items" and payload["level"] == "INFO"
    assert payload["logger"] == "loraloop.test" and payload["job_id"] == 7
    assert payload["time"].endswith("+00:00")


def test_json_formatter_includes_exceptions() -> None:
    try:
        raise ValueError("boom")
    except ValueError:
        import sys

        record = logging.makeLogRecord({"msg": "failed", "exc_info": sys.exc_info()})
    payload = json.loads(JsonFormatter().format(record))
    assert "ValueError: boom" in payload["exc_info"]


@pytest.mark.parametrize("level", ["info", "WARNING"])
def test_level_names_are_case_insensitive(level: str) -> None:
    root = logging.getLogger()
    saved_level, saved_handlers = root.level, list(root.handlers)
    try:
        configure_logging(level)
        assert logging.getLevelName(root.level) == level.upper()
    finally:
        for handler in list(root.handlers):
            if handler not in saved_handlers:
                root.removeHandler(handler)
        root.setLevel(saved_level)
