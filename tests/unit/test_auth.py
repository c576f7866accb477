"""Token parsing, hashing and scope checks of service.auth."""

from __future__ import annotations

import hashlib

import pytest

from service.auth import ADMIN_SCOPE, TokenConfigError, TokenTable, bearer_token


def test_plain_and_hashed_tokens_authenticate_with_their_scopes() -> None:
    digest = hashlib.sha256(b"s3cret-two").hexdigest()
    table = TokenTable.parse(f"s3cret-one=feedback:write feedback:read, sha256:{digest}=adapters:read")
    one = table.authenticate("s3cret-one")
    two = table.authenticate("s3cret-two")
    assert one is not None and one.scopes == {"feedback:write", "feedback:read"}
    assert two is not None and two.scopes == {"adapters:read"}
    assert one.allows("feedback:write") and not one.allows("adapters:read")
    assert two.allows("adapters:read") and not two.allows("feedback:write")


def test_unknown_token_and_prefix_of_a_token_are_refused() -> None:
    table = TokenTable.parse("abcdef=admin")
    assert table.authenticate("abcde") is None
    assert table.authenticate("abcdefg") is None
    assert table.authenticate("") is None
    # the digest itself is not a credential
    assert table.authenticate("sha256:" + hashlib.sha256(b"abcdef").hexdigest()) is None


def test_admin_implies_every_scope() -> None:
    principal = TokenTable.parse("root=admin").authenticate("root")
    assert principal is not None
    for scope in ("feedback:write", "feedback:read", "adapters:read", "adapters:write", ADMIN_SCOPE):
        assert principal.allows(scope)


def test_only_digests_are_kept_in_memory() -> None:
    table = TokenTable.parse("plain-secret-value=admin")
    assert "plain-secret-value" not in repr(vars(table))
    assert b"plain-secret-value" not in b"".join(entry.digest for entry in table.entries)


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("no-equals-sign", "TOKEN=scope"),
        ("tok=", "grants no scope"),
        ("tok=feedback:write everything", "unknown scope"),
        ("sha256:abc=admin", "64 hex"),
        ("sha256:" + "zz" * 32 + "=admin", "64 hex"),
        ("=admin", "TOKEN=scope"),
    ],
)
def test_bad_token_specs_fail_without_echoing_the_secret(spec: str, message: str) -> None:
    with pytest.raises(TokenConfigError, match=message) as caught:
        TokenTable.parse(spec)
    assert "no-equals-sign" not in str(caught.value)


@pytest.mark.parametrize(
    ("header", "token"),
    [
        ("Bearer abc", "abc"),
        ("bearer  abc ", "abc"),
        ("Basic abc", None),
        ("Bearer", None),
        ("Bearer ", None),
        (None, None),
        ("", None),
    ],
)
def test_bearer_token_parsing(header: str | None, token: str | None) -> None:
    assert bearer_token(header) == token
