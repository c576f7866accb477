"""The dashboard's session cookie and CSRF tokens (signing, expiry, tampering), and the throttle
on failed logins.

A cookie is `<sha256 hex of the bearer token>.<expiry unix seconds>.<HMAC-SHA256 hex>`, signed with
a secret generated per process (a restart logs every operator out). The token itself is never in
the cookie; the digest is checked against the token table on every request, so a removed token
stops working at once. The CSRF token of a form is an HMAC of the cookie value. `LoginThrottle`
counts failed logins per client in a sliding window and refuses a client that failed too often
until its oldest failure leaves the window. Knows nothing about HTTP, routes or the token table.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
import threading
import time
from collections import OrderedDict, deque

COOKIE_NAME = "loraloop_session"
DEFAULT_TTL_S = 8 * 3600


class SessionSigner:
    """Issues and verifies session cookies and their CSRF tokens under one secret."""

    def __init__(self, secret: bytes | None = None, *, ttl_s: int = DEFAULT_TTL_S) -> None:
        self._secret = secret if secret is not None else secrets.token_bytes(32)
        self.ttl_s = ttl_s

    def _sign(self, message: str) -> str:
        return hmac.new(self._secret, message.encode("ascii"), hashlib.sha256).hexdigest()

    def issue(self, token_digest: bytes, *, now: float | None = None) -> str:
        """A cookie value for the token of sha256 `token_digest`, valid `ttl_s` from `now`."""
        expires = int((time.time() if now is None else now) + self.ttl_s)
        payload = f"{token_digest.hex()}.{expires}"
        return f"{payload}.{self._sign('session:' + payload)}"

    def verify(self, value: str | None, *, now: float | None = None) -> bytes | None:
        """The token digest of a valid, unexpired cookie; None for anything else."""
        if not value:
            return None
        try:
            digest_hex, expires_text, signature = value.split(".")
            expires = int(expires_text)
            digest = bytes.fromhex(digest_hex)
            payload = f"{digest_hex}.{expires_text}"
            expected = self._sign("session:" + payload)
        except (ValueError, UnicodeEncodeError):
            return None
        if len(digest) != 32 or not hmac.compare_digest(expected, signature):
            return None
        if expires <= (time.time() if now is None else now):
            return None
        return digest

    def csrf_token(self, cookie_value: str) -> str:
        return self._sign("csrf:" + cookie_value)

    def check_csrf(self, cookie_value: str, presented: str | None) -> bool:
        return bool(presented) and hmac.compare_digest(self.csrf_token(cookie_value), presented or "")


class LoginThrottle:
    """At most `max_failures` failed logins per client in any `window_s` seconds; a success clears
    the client's count. Bounded memory: the `max_clients` most recently seen clients are tracked."""

    def __init__(self, *, max_failures: int, window_s: float, max_clients: int = 10_000) -> None:
        if max_failures < 1 or window_s <= 0 or max_clients < 1:
            raise ValueError("LoginThrottle needs max_failures >= 1, window_s > 0 and max_clients >= 1")
        self.max_failures = max_failures
        self.window_s = window_s
        self.max_clients = max_clients
        self._failures: OrderedDict[str, deque[float]] = OrderedDict()
        self._lock = threading.Lock()

    def _recent(self, client: str, now: float) -> deque[float]:
        failures = self._failures.get(client)
        if failures is None:
            return deque()
        while failures and failures[0] <= now - self.window_s:
            failures.popleft()
        if not failures:
            del self._failures[client]
        return failures

    def retry_after(self, client: str, *, now: float | None = None) -> float:
        """Seconds until `client` may try again: 0 while it has failures left in the window."""
        now = time.monotonic() if now is None else now
        with self._lock:
            failures = self._recent(client, now)
            if len(failures) < self.max_failures:
                return 0.0
            return max(0.0, failures[-self.max_failures] + self.window_s - now)

    def failed(self, client: str, *, now: float | None = None) -> None:
        now = time.monotonic() if now is None else now
        with self._lock:
            failures = self._recent(client, now)
            self._failures[client] = failures
            self._failures.move_to_end(client)
            failures.append(now)
            while len(failures) > self.max_failures:
                failures.popleft()
            while len(self._failures) > self.max_clients:
                self._failures.popitem(last=False)

    def succeeded(self, client: str) -> None:
        with self._lock:
            self._failures.pop(client, None)
