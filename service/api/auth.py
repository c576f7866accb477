"""Bearer-token authentication: scopes, the namespaces a token may touch, and rotation.

Entry format (comma-separated in `Settings.auth_tokens`, one per line in `auth_tokens_file`):
`TOKEN=scope scope [ns:PATTERN ...] [label:NAME]`. TOKEN is the secret itself or `sha256:<64 hex>`
(its digest, so the secret never sits in the environment; the token file accepts digests only).
`ns:` words bind the token to namespaces, by exact name or a `*` pattern (`ns:support-*`); an
entry without one may touch every namespace, and `admin` is global whatever it names. `label:`
names the entry in audit records (default `token-<position>`); the secret is never recorded.
`ensure_may_write` (403 naming the namespace) and `ensure_may_see` (the 404 of a missing row)
apply a grant where a request names a namespace or reaches a namespaced record.

Only sha256 digests are kept in memory, and a presented token is compared against every one of
them with `hmac.compare_digest`. `TokenSource` re-reads the token file when it changes (checked at
most every `RELOAD_CHECK_S`), so a removed token is refused within a second without a restart; a
file that no longer parses keeps the last good table and is reported. Knows nothing about routes or
tables.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import os
import re
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from memory_store.errors import NotFound
from memory_store.filters import pattern_regex
from service.api.errors import Forbidden
from service.config import SCOPES

ADMIN_SCOPE = "admin"
NAMESPACE_WORD = "ns:"
LABEL_WORD = "label:"
RELOAD_CHECK_S = 0.25
_PATTERN_RE = re.compile(r"^[A-Za-z0-9*][A-Za-z0-9._*-]{0,63}$")
_LABEL_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._@-]{0,63}$")

logger = logging.getLogger(__name__)


class TokenConfigError(ValueError):
    """A token entry cannot be parsed; the message names it by position, never the secret."""


def namespace_pattern_regex(pattern: str) -> re.Pattern[str]:
    """`*` matches any run of characters; everything else matches itself (as in SQL listings)."""
    return re.compile(pattern_regex(pattern))


@dataclass(frozen=True)
class Principal:
    """Who made a request: its token entry (position and label), scopes and namespace grant.

    `namespaces` is None when the token may touch every namespace (no `ns:` word, or admin).
    """

    token_index: int | None
    scopes: frozenset[str]
    label: str | None = None
    namespaces: tuple[str, ...] | None = None
    _regexes: tuple[re.Pattern[str], ...] = field(default=(), compare=False, repr=False)

    def __post_init__(self) -> None:
        if self.namespaces is not None and ADMIN_SCOPE in self.scopes:
            object.__setattr__(self, "namespaces", None)
        if self.namespaces is not None:
            regexes = tuple(namespace_pattern_regex(pattern) for pattern in self.namespaces)
            object.__setattr__(self, "_regexes", regexes)

    def allows(self, scope: str) -> bool:
        return ADMIN_SCOPE in self.scopes or scope in self.scopes

    @property
    def all_namespaces(self) -> bool:
        return self.namespaces is None

    def allows_namespace(self, namespace: str | None) -> bool:
        """Whether the token may touch `namespace` (None: a record of no namespace, admin only)."""
        if self.namespaces is None:
            return True
        if namespace is None:
            return False
        return any(regex.fullmatch(namespace) for regex in self._regexes)


def ensure_may_write(principal: Principal, namespace: str, *, field: str = "namespace") -> None:
    """A write that names `namespace` outside the token's grant: 403 naming the namespace."""
    if not principal.allows_namespace(namespace):
        raise Forbidden(f"the token may not write to namespace {namespace!r}", field=field)


def ensure_may_see(principal: Principal, namespace: str | None, entity: str, key: object) -> None:
    """A record of a namespace outside the token's grant reads as absent: the same 404 as no row."""
    if not principal.allows_namespace(namespace):
        raise NotFound(entity, key)


ANONYMOUS_ADMIN = Principal(token_index=None, scopes=frozenset({ADMIN_SCOPE}), label="anonymous")


def token_digest(token: str) -> bytes:
    return hashlib.sha256(token.encode("utf-8")).digest()


@dataclass(frozen=True)
class TokenEntry:
    digest: bytes
    scopes: frozenset[str]
    label: str
    namespaces: tuple[str, ...] | None


def _parse_secret(where: str, secret: str, *, hashed_only: bool) -> bytes:
    if secret.startswith("sha256:"):
        try:
            digest = bytes.fromhex(secret.removeprefix("sha256:").lower())
        except ValueError:
            digest = b""
        if len(digest) != 32:
            raise TokenConfigError(f"{where}: `sha256:` needs 64 hex digits")
        return digest
    if hashed_only:
        raise TokenConfigError(f"{where}: store the token's digest (`sha256:<64 hex>`), not the secret")
    return token_digest(secret)


def parse_entry(where: str, position: int, entry: str, *, hashed_only: bool = False) -> TokenEntry:
    secret, sep, grant_text = entry.partition("=")
    secret = secret.strip()
    if not sep or not secret:
        raise TokenConfigError(f"{where} must look like `TOKEN=scope scope`")
    scopes: set[str] = set()
    namespaces: list[str] = []
    label = f"token-{position + 1}"
    for word in grant_text.split():
        if word.startswith(NAMESPACE_WORD):
            pattern = word.removeprefix(NAMESPACE_WORD)
            if not _PATTERN_RE.fullmatch(pattern) or ".." in pattern:
                raise TokenConfigError(
                    f"{where}: namespace pattern {pattern!r} must be a namespace name, `*` for any run"
                )
            namespaces.append(pattern)
        elif word.startswith(LABEL_WORD):
            label = word.removeprefix(LABEL_WORD)
            if not _LABEL_RE.fullmatch(label):
                raise TokenConfigError(f"{where}: label {label!r} must match {_LABEL_RE.pattern}")
        else:
            scopes.add(word)
    if not scopes:
        raise TokenConfigError(f"{where} grants no scope")
    unknown = sorted(scopes - set(SCOPES))
    if unknown:
        raise TokenConfigError(f"{where} has unknown scope(s) {unknown}; known: {list(SCOPES)}")
    digest = _parse_secret(where, secret, hashed_only=hashed_only)
    return TokenEntry(digest, frozenset(scopes), label, tuple(namespaces) if namespaces else None)


class TokenTable:
    """The configured token entries; `authenticate` looks one up."""

    def __init__(self, entries: list[TokenEntry]) -> None:
        self._entries = entries
        labels = [entry.label for entry in entries]
        duplicated = sorted({label for label in labels if labels.count(label) > 1})
        if duplicated:
            raise TokenConfigError(f"token labels must be unique; repeated: {duplicated}")

    @classmethod
    def parse(cls, spec: str) -> TokenTable:
        """Entries of `Settings.auth_tokens` (comma-separated)."""
        parts = [part for part in spec.split(",") if part.strip()]
        return cls(
            [
                parse_entry(f"auth token entry #{position + 1}", position, part)
                for position, part in enumerate(parts)
            ]
        )

    @classmethod
    def parse_file_text(cls, text: str, *, first_position: int = 0, path: str = "token file") -> list[TokenEntry]:
        """Entries of a token file: one per line, `#` comments and blank lines ignored, digests only."""
        entries: list[TokenEntry] = []
        for line_number, line in enumerate(text.splitlines(), start=1):
            line = line.split("#", 1)[0].strip()
            if not line:
                continue
            position = first_position + len(entries)
            entries.append(parse_entry(f"{path} line {line_number}", position, line, hashed_only=True))
        return entries

    @property
    def entries(self) -> list[TokenEntry]:
        return list(self._entries)

    def __len__(self) -> int:
        return len(self._entries)

    def authenticate(self, token: str) -> Principal | None:
        """The principal of `token`, or None. Every entry is compared, so timing says nothing."""
        return self.authenticate_digest(token_digest(token))

    def authenticate_digest(self, presented: bytes) -> Principal | None:
        """The principal of the token whose sha256 digest is `presented` (the dashboard's session
        cookie carries the digest, never the token), or None."""
        found: Principal | None = None
        for index, entry in enumerate(self._entries):
            if hmac.compare_digest(presented, entry.digest) and found is None:
                found = Principal(
                    token_index=index, scopes=entry.scopes, label=entry.label, namespaces=entry.namespaces
                )
        return found


class TokenSource:
    """The current `TokenTable`: the settings' entries plus the token file's, re-read on change."""

    def __init__(self, spec: str, path: Path | None, *, check_interval_s: float = RELOAD_CHECK_S) -> None:
        self._static = TokenTable.parse(spec).entries
        self._path = path
        self._check_interval_s = check_interval_s
        self._lock = threading.Lock()
        self._stamp: tuple[int, int, int] | None = None
        self._next_check = 0.0
        self.last_error: str | None = None
        self._table = TokenTable(self._static)
        if path is not None:
            self._table = self._read(strict=True)

    def _file_stamp(self) -> tuple[int, int, int] | None:
        assert self._path is not None
        try:
            stat = os.stat(self._path)
        except FileNotFoundError:
            return None
        return (stat.st_mtime_ns, stat.st_size, stat.st_ino)

    def _read(self, *, strict: bool) -> TokenTable:
        assert self._path is not None
        stamp = self._file_stamp()
        try:
            if stamp is None:
                raise TokenConfigError(f"token file {self._path} does not exist")
            text = self._path.read_text(encoding="utf-8")
            table = TokenTable(
                self._static
                + TokenTable.parse_file_text(text, first_position=len(self._static), path=str(self._path))
            )
        except (OSError, UnicodeDecodeError, TokenConfigError) as error:
            if strict:
                raise TokenConfigError(str(error)) from error
            self.last_error = str(error)
            self._stamp = stamp
            logger.error("token file not reloaded, the previous tokens stay in force", extra={"error": str(error)})
            return self._table
        self._stamp = stamp
        self.last_error = None
        return table

    def table(self) -> TokenTable:
        if self._path is None:
            return self._table
        now = time.monotonic()
        if now < self._next_check:
            return self._table
        with self._lock:
            if now >= self._next_check:
                self._next_check = now + self._check_interval_s
                if self._file_stamp() != self._stamp:
                    previous = len(self._table)
                    self._table = self._read(strict=False)
                    if self.last_error is None:
                        logger.info("token file reloaded", extra={"entries": len(self._table), "before": previous})
        return self._table

    def authenticate(self, token: str) -> Principal | None:
        return self.table().authenticate(token)

    def authenticate_digest(self, digest: bytes) -> Principal | None:
        return self.table().authenticate_digest(digest)

    def __len__(self) -> int:
        return len(self.table())


def bearer_token(authorization: str | None) -> str | None:
    """The token of an `Authorization: Bearer <token>` header (scheme case-insensitive), else None."""
    if not authorization:
        return None
    scheme, _, token = authorization.strip().partition(" ")
    token = token.strip()
    if scheme.lower() != "bearer" or not token:
        return None
    return token
