"""Token parsing, hashing and scope checks of service.api.auth."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest

from memory_store.filters import pattern_regex
from service.api.auth import ADMIN_SCOPE, TokenConfigError, TokenSource, TokenTable, bearer_token


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
        ("tok=feedback:read ns:", "namespace pattern"),
        ("tok=feedback:read ns:../etc", "namespace pattern"),
        ("tok=feedback:read label:", "label"),
        ("tok=feedback:read label:a,tok2=admin label:a", "unique"),
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


def test_namespace_words_bind_a_token_exact_names_and_patterns() -> None:
    table = TokenTable.parse("tok=feedback:write ns:team-a ns:support-* label:team-a-agent,all=feedback:read")
    bound = table.authenticate("tok")
    assert bound is not None and bound.label == "team-a-agent" and bound.scopes == {"feedback:write"}
    assert bound.allows_namespace("team-a") and bound.allows_namespace("support-eu")
    assert bound.allows_namespace("support-")  # `*` matches the empty run too
    for other in ("team-b", "team-a2", "Team-a", "support", "xsupport-eu", "Support-eu", None):
        assert not bound.allows_namespace(other), other
    everywhere = table.authenticate("all")
    assert everywhere is not None and everywhere.namespaces is None and everywhere.allows_namespace("team-b")
    assert everywhere.label == "token-2"  # default label: the entry's position


def test_admin_is_global_whatever_namespaces_it_names() -> None:
    admin = TokenTable.parse("root=admin ns:team-a").authenticate("root")
    assert admin is not None and admin.namespaces is None and admin.allows_namespace("team-b")


@pytest.mark.parametrize(
    ("pattern", "matches", "misses"),
    [
        ("team.a", ["team.a"], ["teamxa"]),  # `.` is literal, in SQL as in Python
        ("a_b*", ["a_b", "a_b-c"], ["axb"]),  # `_` too (LIKE would treat it as a wildcard)
        ("*-prod", ["eu-prod", "-prod"], ["eu-prod2"]),
        ("a*b*c", ["abc", "a-b-c"], ["acb"]),
    ],
)
def test_patterns_treat_every_character_but_star_literally(
    pattern: str, matches: list[str], misses: list[str]
) -> None:
    import re

    regex = re.compile(pattern_regex(pattern))
    principal = TokenTable.parse(f"t=feedback:read ns:{pattern}").authenticate("t")
    assert principal is not None
    for name in matches:
        assert regex.fullmatch(name) and principal.allows_namespace(name), name
    for name in misses:
        assert not regex.fullmatch(name) and not principal.allows_namespace(name), name


def digest_entry(token: str, grant: str) -> str:
    return f"sha256:{hashlib.sha256(token.encode()).hexdigest()}={grant}"


def test_token_file_takes_digests_only_and_reloads_on_change(tmp_path: Path) -> None:
    path = tmp_path / "tokens"
    path.write_text("secret-in-clear=admin\n")
    with pytest.raises(TokenConfigError, match="line 1.*digest") as caught:
        TokenSource("", path)
    assert "secret-in-clear" not in str(caught.value)

    path.write_text(f"# team A\n\n{digest_entry('one', 'feedback:read ns:team-a')}  # the agent\n")
    source = TokenSource("env-token=admin", path, check_interval_s=0)
    assert source.authenticate("env-token") is not None  # settings entries stay beside the file's
    one = source.authenticate("one")
    assert one is not None and one.namespaces == ("team-a",) and one.label == "token-2"

    path.write_text(digest_entry("two", "feedback:read label:two") + "\n")
    assert source.authenticate("one") is None and source.authenticate("two") is not None

    path.write_text("garbage\n")  # a broken edit keeps the last good table and says why
    assert source.authenticate("two") is not None and "line 1" in (source.last_error or "")
    path.unlink()
    assert source.authenticate("two") is not None and "does not exist" in (source.last_error or "")
