"""Bearer-token authentication with scopes, configured by `Settings.auth_tokens`.

Format: comma-separated entries `TOKEN=scope scope`; TOKEN is either the secret itself or
`sha256:<64 hex>` (its digest, so the secret never sits in the environment). Only sha256
digests are kept in memory, and a presented token is compared against every one of them with
`hmac.compare_digest`. `admin` implies every scope. Knows nothing about routes or the database.
"""

from __future__ import annotations

import hashlib
import hmac
from dataclasses import dataclass

from service.config import SCOPES

ADMIN_SCOPE = "admin"


class TokenConfigError(ValueError):
    """`auth_tokens` cannot be parsed; the message names the entry by position, never the secret."""


@dataclass(frozen=True)
class Principal:
    """Who made a request: the index of the matching token entry and the scopes it grants."""

    token_index: int | None
    scopes: frozenset[str]

    def allows(self, scope: str) -> bool:
        return ADMIN_SCOPE in self.scopes or scope in self.scopes


ANONYMOUS_ADMIN = Principal(token_index=None, scopes=frozenset({ADMIN_SCOPE}))


def token_digest(token: str) -> bytes:
    return hashlib.sha256(token.encode("utf-8")).digest()


def _parse_entry(position: int, entry: str) -> tuple[bytes, frozenset[str]]:
    secret, sep, scope_text = entry.partition("=")
    secret = secret.strip()
    if not sep or not secret:
        raise TokenConfigError(f"auth token entry #{position + 1} must look like `TOKEN=scope scope`")
    scopes = frozenset(scope_text.split())
    if not scopes:
        raise TokenConfigError(f"auth token entry #{position + 1} grants no scope")
    unknown = sorted(scopes - set(SCOPES))
    if unknown:
        raise TokenConfigError(
            f"auth token entry #{position + 1} has unknown scope(s) {unknown}; known: {list(SCOPES)}"
        )
    if secret.startswith("sha256:"):
        hex_digest = secret.removeprefix("sha256:").lower()
        try:
            digest = bytes.fromhex(hex_digest)
        except ValueError:
            digest = b""
        if len(digest) != 32:
            raise TokenConfigError(f"auth token entry #{position + 1}: `sha256:` needs 64 hex digits")
        return digest, scopes
    return token_digest(secret), scopes


class TokenTable:
    """The configured tokens as (sha256 digest, scopes) pairs; `authenticate` looks one up."""

    def __init__(self, entries: list[tuple[bytes, frozenset[str]]]) -> None:
        self._entries = entries

    @classmethod
    def parse(cls, spec: str) -> TokenTable:
        entries = [
            _parse_entry(position, entry)
            for position, entry in enumerate(part for part in spec.split(",") if part.strip())
        ]
        return cls(entries)

    def __len__(self) -> int:
        return len(self._entries)

    def authenticate(self, token: str) -> Principal | None:
        """The principal of `token`, or None. Every entry is compared, so timing says nothing."""
        presented = token_digest(token)
        found: Principal | None = None
        for index, (digest, scopes) in enumerate(self._entries):
            if hmac.compare_digest(presented, digest) and found is None:
                found = Principal(token_index=index, scopes=scopes)
        return found


def bearer_token(authorization: str | None) -> str | None:
    """The token of an `Authorization: Bearer <token>` header (scheme case-insensitive), else None."""
    if not authorization:
        return None
    scheme, _, token = authorization.strip().partition(" ")
    token = token.strip()
    if scheme.lower() != "bearer" or not token:
        return None
    return token
