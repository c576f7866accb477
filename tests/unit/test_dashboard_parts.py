"""The dashboard's pure parts: the session cookie (signing, expiry, tampering, CSRF), the failed-login
throttle, the SVG plot builder and the answer diff highlighter."""

from __future__ import annotations

import hashlib
import re

import pytest

from service.dashboard.diff import highlight_pair
from service.dashboard.plots import line_chart
from service.dashboard.session import LoginThrottle, SessionSigner

DIGEST = hashlib.sha256(b"a-token").digest()


def test_a_cookie_verifies_until_it_expires_and_never_holds_the_token() -> None:
    signer = SessionSigner(b"k" * 32, ttl_s=60)
    cookie = signer.issue(DIGEST, now=1000)
    assert "a-token" not in cookie
    assert signer.verify(cookie, now=1000) == DIGEST
    assert signer.verify(cookie, now=1059) == DIGEST
    assert signer.verify(cookie, now=1060) is None
    assert SessionSigner(b"j" * 32).verify(cookie, now=1000) is None  # another process's secret


def test_a_tampered_cookie_is_refused() -> None:
    signer = SessionSigner(b"k" * 32, ttl_s=60)
    digest, expires, signature = signer.issue(DIGEST, now=1000).split(".")
    other = hashlib.sha256(b"admin").hexdigest()
    for forged in (
        f"{digest}.{int(expires) + 999}.{signature}",
        f"{other}.{expires}.{signature}",
        f"{digest}.{expires}.{signature[:-1]}{'0' if signature[-1] != '0' else '1'}",
        f"{digest}.{expires}",
        f"{digest[:10]}.{expires}.{signature}",
        "",
        None,
        "a.b.c",
        "é.1.2",
    ):
        assert signer.verify(forged, now=1000) is None, forged


def test_csrf_tokens_belong_to_one_session() -> None:
    signer = SessionSigner(b"k" * 32)
    first, second = signer.issue(DIGEST, now=1), signer.issue(DIGEST, now=2)
    token = signer.csrf_token(first)
    assert signer.check_csrf(first, token)
    assert not signer.check_csrf(second, token)
    assert not signer.check_csrf(first, None) and not signer.check_csrf(first, "")


def test_line_chart_draws_each_series_and_escapes_labels() -> None:
    svg = line_chart("<b>title</b>", {"a<script>": [(0, 1.0), (1, 2.0), (2, None)], "b": [(0, 3.0)]})
    assert svg.startswith("<svg") and svg.endswith("</svg>")
    assert "<b>" not in svg and "&lt;b&gt;title&lt;/b&gt;" in svg
    assert "<script>" not in svg and "a&lt;script&gt;" in svg
    assert svg.count("<polyline") == 2 and svg.count("<circle") == 3  # None skipped


def test_line_chart_without_points_says_so() -> None:
    assert "no data yet" in line_chart("t", {"a": [(0, None), (1, float("nan"))]})
    assert "<polyline" in line_chart("t", {"a": [(5, 2.0)]})  # one point: no division by zero


def test_highlight_marks_only_the_changed_words_and_escapes() -> None:
    before, after = highlight_pair("The capital is Lyon.", "The capital is Paris.")
    assert before == 'The capital is <mark class="del">Lyon</mark>.'
    assert after == 'The capital is <mark class="ins">Paris</mark>.'
    same, _ = highlight_pair("same", "same")
    assert "<mark" not in same
    _, hostile = highlight_pair("", '<script>alert(1)</script>"><img onerror=x>')
    assert "<script>" not in hostile and "<img" not in hostile
    assert (
        re.sub(r"</?mark[^>]*>", "", hostile)
        == "&lt;script&gt;alert(1)&lt;/script&gt;&quot;&gt;&lt;img onerror=x&gt;"
    )


def test_login_throttle_refuses_a_client_after_too_many_failures_in_the_window() -> None:
    throttle = LoginThrottle(max_failures=3, window_s=60)
    for second in (0, 10, 20):
        assert throttle.retry_after("10.0.0.1", now=second) == 0
        throttle.failed("10.0.0.1", now=second)
    assert throttle.retry_after("10.0.0.1", now=30) == 30  # until the failure at 0 leaves the window
    assert throttle.retry_after("10.0.0.2", now=30) == 0  # another client is not affected
    assert throttle.retry_after("10.0.0.1", now=60) == 0  # the sliding window moved on
    throttle.failed("10.0.0.1", now=61)
    assert throttle.retry_after("10.0.0.1", now=62) == pytest.approx(8)  # failures at 10, 20, 61


def test_a_successful_login_clears_the_count_and_memory_is_bounded() -> None:
    throttle = LoginThrottle(max_failures=2, window_s=60, max_clients=2)
    throttle.failed("a", now=0)
    throttle.succeeded("a")
    throttle.failed("a", now=1)
    assert throttle.retry_after("a", now=2) == 0  # one failure since the success
    for client in ("b", "c"):
        throttle.failed(client, now=3)
        throttle.failed(client, now=3)
    assert throttle.retry_after("c", now=4) > 0
    assert throttle.retry_after("a", now=4) == 0  # evicted: the oldest of more than max_clients
    with pytest.raises(ValueError):
        LoginThrottle(max_failures=0, window_s=60)
