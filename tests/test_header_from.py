"""The header From / Sender check (relayd.smtp.headerfrom, policy.header_from_allowed): which
mailboxes a header section names, and which messages an account of example.com may send."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from relayd.directory.accounts import Account, Domain
from relayd.smtp import policy, replies
from relayd.smtp.headerfrom import FieldError, check, field_domains, header_fields
from relayd.store.directory import SqliteDirectory
from relayd.store.schema import SCHEMA_VERSION
from relayd.store.spool import Spool
from tests.conftest import spool_at_schema

NOT_ALLOWED = replies.HEADER_FROM_NOT_ALLOWED
NO_FROM = replies.NO_HEADER_FROM


def msg(*headers: str, body: str = "Hello.\r\n") -> bytes:
    """A message with these header lines (CRLF ends) and a body."""
    return ("".join(h + "\r\n" for h in headers) + "\r\n" + body).encode("utf-8")


def verdict(*headers: str, body: str = "Hello.\r\n") -> str | None:
    reply = check(msg(*headers, body=body), "example.com")
    return None if reply is None else reply.reason


@pytest.mark.parametrize("value, domains", [
    ("app@example.com", ["example.com"]),
    ("App <app@example.com>", ["example.com"]),
    ("<app@Mail.Example.COM>", ["mail.example.com"]),
    ('"Doe, John" <john@example.com>', ["example.com"]),
    ('"ceo@bank.example <ceo@bank.example>" <app@example.com>', ["example.com"]),
    ('"a@b <c>"@evil.test', ["evil.test"]),
    ("app@example.com (CEO <ceo@bank.example>)", ["example.com"]),
    ("(first (nested \\) comment)) app@example.com", ["example.com"]),
    ("=?utf-8?q?J=C3=B6rg?= <jorg@example.com>", ["example.com"]),
    ("=?utf-8?b?w6lsw6huZQ==?= <e@example.com>", ["example.com"]),
    ("a@example.com, B <b@sub.example.com>", ["example.com", "sub.example.com"]),
    ("<@relay.test,@other.test:app@example.com>", ["example.com"]),
    ("team: a@example.com, b@evil.test;", ["example.com", "evil.test"]),
    ("undisclosed-recipients:;", []),
    ("Jörg <jörg@bücher.example>", ["xn--bcher-kva.example"]),
    ("user@[192.0.2.1]", ["[192.0.2.1]"]),
    ("", []),
])
def test_mailbox_domains(value: str, domains: list[str]) -> None:
    """Every mailbox's domain, lower-cased (U-labels as A-labels), groups opened up."""
    assert field_domains(value) == domains


@pytest.mark.parametrize("value", [
    "ceo@bank.example <app@example.com>",  # '@' unquoted in a display name
    "Doe, John <john@example.com>",  # ',' unquoted: "Doe" is no mailbox
    '"unclosed <app@example.com>',
    "app@example.com (unclosed comment",
    "App <app@example.com",
    "App <app@example.com> <ceo@bank.example>",
    "app@",
    "app",
    "a@b@example.com",
    "app@example.com;",
    "group: app@example.com",
    'app@"example.com"',
    "app@example .com",
    "back\\slash@example.com",
])
def test_malformed_lists_are_errors(value: str) -> None:
    """What is not an address list is an error (the caller refuses the message)."""
    with pytest.raises(FieldError):
        field_domains(value)


def test_fields_are_unfolded_and_only_from_the_header_section() -> None:
    """Continuation lines are joined; a From in the body is not a header; names any case."""
    data = msg("Subject: hi", "FROM: App", "\t<app@example.com>", "To: x@y.test",
               "sender :s@example.com", body="From: ceo@bank.example\r\n")
    assert header_fields(data) == [("from", " App\t<app@example.com>"),
                                   ("sender", "s@example.com")]


def test_other_fields_that_contain_from_are_not_from() -> None:
    """Resent-From, X-From, a folded line starting "From:" of another field: not From."""
    assert verdict("Resent-From: ceo@bank.example", "X-Original-From: ceo@bank.example",
                   "Subject: a", " From: ceo@bank.example", "From: app@example.com") is None


def test_leading_crlf_offset() -> None:
    """The session's data starts with a CRLF: ``start`` skips it; an empty header section
    (an empty line first) has no From."""
    assert check(b"\r\n" + msg("From: app@example.com"), "example.com", 2) is None
    assert check(b"\r\n\r\nFrom: app@example.com\r\n", "example.com", 2) is NO_FROM


@pytest.mark.parametrize("headers, reason", [
    (["From: app@example.com"], None),
    (["From: App <app@mail.example.com>"], None),
    (["From: app@EXAMPLE.com"], None),
    (["From: ceo@bank.example"], "header_from_not_allowed"),
    (["From: app@notexample.com"], "header_from_not_allowed"),
    (["From: app@example.com.evil.test"], "header_from_not_allowed"),
    (["From: a@example.com, b@evil.test"], "header_from_not_allowed"),
    (["From: a@example.com", "From: ceo@bank.example"], "header_from_not_allowed"),
    (["From: app@example.com", "Sender: ceo@bank.example"], "header_from_not_allowed"),
    (["From: app@example.com", "Sender: s@sub.example.com"], None),
    (["From: app@example.com", "Sender:"], "header_from_not_allowed"),
    (["From: ceo@bank.example <app@example.com>"], "header_from_not_allowed"),
    (["Subject: no from"], "no_header_from"),
    (["From:"], "no_header_from"),
    (["From: undisclosed:;"], "no_header_from"),
    (["Sender: app@example.com"], "no_header_from"),
    ([], "no_header_from"),
])
def test_check(headers: list[str], reason: str | None) -> None:
    """Every mailbox of From (and Sender) in example.com or a subdomain; no From: 5.6.0."""
    assert verdict(*headers) == reason


def test_replies_are_the_semantics() -> None:
    """The two refusals' wire text and reasons (SEMANTICS §6)."""
    assert NOT_ALLOWED == ("550 5.7.1 From header address not allowed for this account",
                           "header_from_not_allowed")
    assert NO_FROM == ("550 5.6.0 Message has no From header", "no_header_from")
    assert {"header_from_not_allowed", "no_header_from"} <= set(replies.REJECTION_REASONS)


def test_policy_follows_the_domain_switch_and_null_sender() -> None:
    """The check is the domain's: off, anything goes; the null sender passes MAIL."""
    dom = Domain(1, "example.com", "s1")
    acct = Account(1, "u", dom, "h")
    data = msg("From: ceo@bank.example")
    assert policy.header_from_allowed(acct, data) is NOT_ALLOWED
    dom.check_header_from = False
    assert policy.header_from_allowed(acct, data) is None
    assert policy.header_from_allowed(acct, msg("Subject: x")) is None
    assert policy.sender_allowed(acct, "", null=True) is None
    assert policy.sender_allowed(acct, "") is replies.SENDER_NOT_ALLOWED


def test_cost_is_linear_in_the_header_size() -> None:
    """A header section of many fields, and one long folded From, take time in proportion
    (no backtracking blow-up): 16x the size stays well under 64x the time."""
    def timed(n: int) -> float:
        headers = [f"X-H{i}: " + "v" * 60 for i in range(n)]
        folded = "From: " + ",\r\n ".join(f"u{i}@example.com" for i in range(n))
        data = msg(*headers, folded, '"' + "q" * n * 60)  # an unclosed quote line too
        best = float("inf")
        for _ in range(5):
            t = time.perf_counter()
            check(data, "example.com")
            best = min(best, time.perf_counter() - t)
        return best
    small, large = timed(200), timed(3200)
    assert large < small * 64


async def test_schema_5_database_migrates_with_the_check_on(tmp_path: Path) -> None:
    """An old spool (schema 5) opens at schema 6; its domains have the check on, and the
    switch is stored."""
    path = tmp_path / "spool.db"
    spool_at_schema(path, 5, "INSERT INTO domains(name, selector, algorithm, created_at)"
                    " VALUES ('example.com', 's1', 'rsa', 1.0)")
    spool = Spool(str(path))
    await spool.open()
    try:
        store = SqliteDirectory(spool)
        [dom] = await store.domains()
        assert dom.check_header_from is True
        await store.set_check_header_from(dom.id, False)
        again = await store.domain(dom.id)
        version = await spool.fetchone("PRAGMA user_version")
    finally:
        await spool.close()
    assert again is not None and again.check_header_from is False
    assert version[0] == SCHEMA_VERSION


@pytest.mark.parametrize("value", [
    "app@example.com", " App <app@example.com> ", '"Doe, John" <j@Sub.Example.com>',
    "J. R. Doe <jr@example.com>", "=?utf-8?q?J=C3=B6rg?= <jorg@example.com>",
    "<app@example.com>", "a@b.c, d@e.f", "app@example.com>", "App app@example.com>",
])
def test_fast_path_agrees_with_the_tokenizer(value: str,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    """The one-regex path for the usual shapes gives what the full grammar gives."""
    import re

    from relayd.smtp import headerfrom
    try:
        fast: list[str] | str = field_domains(value)
    except FieldError:
        fast = "error"
    monkeypatch.setattr(headerfrom, "_SIMPLE", re.compile(r"(?!)"))
    try:
        full: list[str] | str = field_domains(value)
    except FieldError:
        full = "error"
    assert fast == full
