"""Tests of relayd.smtp.address: the MAIL/RCPT argument parser (RFC 5321 4.1.2, RFC 6531)."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from relayd.smtp import replies
from relayd.smtp.address import (
    Path,
    PathError,
    _parse,
    domain_of,
    in_domain,
    parse_mail_from,
    parse_rcpt_to,
)


def mail(arg: str, *, offered: bool = True) -> Path:
    return parse_mail_from(arg, smtputf8_offered=offered)


def rcpt(arg: str, *, utf8: bool = False) -> Path:
    return parse_rcpt_to(arg, smtputf8=utf8)


def mail_error(arg: str, *, offered: bool = True) -> replies.Reply:
    with pytest.raises(PathError) as info:
        mail(arg, offered=offered)
    return info.value.reply


def rcpt_error(arg: str, *, utf8: bool = False) -> replies.Reply:
    with pytest.raises(PathError) as info:
        rcpt(arg, utf8=utf8)
    return info.value.reply


# --- valid forms ------------------------------------------------------------------
def test_plain_sender() -> None:
    """A plain dot-atom sender parses into address, local part, domain and no params."""
    assert mail("FROM:<user.name@example.com>") == Path(
        "user.name@example.com", "user.name", "example.com", {}
    )


def test_plain_recipient() -> None:
    """A plain recipient parses the same way after TO:."""
    assert rcpt("TO:<user@example.com>") == Path("user@example.com", "user", "example.com", {})


def test_keyword_is_case_insensitive() -> None:
    """from: and tO: are accepted like FROM: and TO:."""
    assert mail("from:<a@b.example>").address == "a@b.example"
    assert rcpt("tO:<a@b.example>").address == "a@b.example"


def test_spaces_after_colon_are_tolerated() -> None:
    """Spaces between the colon and < are accepted, as Postfix does."""
    assert mail("FROM:   <a@b.example>").address == "a@b.example"
    assert rcpt("TO: <a@b.example>").address == "a@b.example"


def test_leading_and_trailing_spaces_are_tolerated() -> None:
    """Spaces before the keyword and at the end of the line are ignored."""
    assert mail(" FROM:<a@b.example>  ").address == "a@b.example"


def test_case_is_preserved() -> None:
    """Neither the local part nor the domain is lower-cased by the parser."""
    path = mail("FROM:<John.Doe@Example.COM>")
    assert (path.local, path.domain) == ("John.Doe", "Example.COM")


def test_all_atext_characters_in_local_part() -> None:
    """Every RFC 5322 atext character is allowed in a dot-string local part."""
    local = "a!#$%&'*+/=?^_`{|}~-z"
    assert mail(f"FROM:<{local}@example.com>").local == local


def test_quoted_local_part() -> None:
    """A quoted local part with spaces, @, > and quoted-pairs is kept as written."""
    path = mail(r'FROM:<"john \"j\" doe@x>y"@example.com>')
    assert path.local == r'"john \"j\" doe@x>y"'
    assert path.domain == "example.com"
    assert path.address == r'"john \"j\" doe@x>y"@example.com'


def test_ipv4_address_literal() -> None:
    """An IPv4 address literal is accepted as the domain."""
    assert mail("FROM:<u@[192.0.2.1]>").domain == "[192.0.2.1]"


def test_ipv6_address_literal() -> None:
    """An IPv6 address literal with the IPv6: tag is accepted as the domain."""
    assert rcpt("TO:<u@[IPv6:2001:db8::1]>").domain == "[IPv6:2001:db8::1]"


def test_ipv6_literal_with_embedded_ipv4() -> None:
    """An IPv6 literal ending in dotted IPv4 is accepted."""
    assert rcpt("TO:<u@[IPv6:::ffff:192.0.2.1]>").domain == "[IPv6:::ffff:192.0.2.1]"


def test_source_route_is_discarded() -> None:
    """A source route is accepted and left out of the address."""
    path = rcpt("TO:<@relay.example,@b.example:user@example.com>")
    assert path == Path("user@example.com", "user", "example.com", {})


def test_postmaster_without_domain() -> None:
    """RCPT TO:<Postmaster> in any case is valid with an empty domain."""
    assert rcpt("TO:<PostMaster>") == Path("PostMaster", "PostMaster", "", {})


def test_null_reverse_path() -> None:
    """MAIL FROM:<> is the null reverse-path with an empty address."""
    assert mail("FROM:<>") == Path("", "", "", {})


def test_null_reverse_path_with_params() -> None:
    """Parameters may follow the null reverse-path."""
    assert mail("FROM:<> BODY=7BIT").params == {"BODY": "7BIT"}


def test_params_upper_cased_keywords_values_as_given() -> None:
    """Keywords are upper-cased, values kept as given, None when there is no value."""
    path = mail("FROM:<a@b.example> size=100 body=8bitmime smtputf8 x-Custom=Va-lue")
    assert path.params == {
        "SIZE": "100",
        "BODY": "8bitmime",
        "SMTPUTF8": None,
        "X-CUSTOM": "Va-lue",
    }


def test_repeated_spaces_between_params_are_tolerated() -> None:
    """Several spaces between parameters are accepted."""
    assert mail("FROM:<a@b.example>  SIZE=1   BODY=7BIT").params == {"SIZE": "1", "BODY": "7BIT"}


def test_unknown_params_are_returned() -> None:
    """Unknown parameters are returned for the caller to judge."""
    assert rcpt("TO:<a@b.example> NOTIFY=NEVER ORCPT=rfc822;a+40b").params == {
        "NOTIFY": "NEVER",
        "ORCPT": "rfc822;a+40b",
    }


def test_params_after_slow_path_address() -> None:
    """Parameters are parsed after an address that needs the full parser."""
    assert mail('FROM:<"a b"@[192.0.2.1]> SIZE=5').params == {"SIZE": "5"}


# --- errors: keyword and command syntax -------------------------------------------------
@pytest.mark.parametrize(
    "arg",
    [
        "",
        "FROM",
        "FROM<a@b.example>",
        "FRM:<a@b.example>",
        "FROM :<a@b.example>",
        "TO:<a@b.example>",
        "FROM:",
    ],
)
def test_garbled_mail_keyword(arg: str) -> None:
    """A missing or garbled FROM: keyword, or no path at all, is MAIL_SYNTAX."""
    assert mail_error(arg) == replies.MAIL_SYNTAX


@pytest.mark.parametrize("arg", ["", "TO", "TO<a@b.example>", "FROM:<a@b.example>", "TO:  "])
def test_garbled_rcpt_keyword(arg: str) -> None:
    """A missing or garbled TO: keyword, or no path at all, is RCPT_SYNTAX."""
    assert rcpt_error(arg) == replies.RCPT_SYNTAX


def test_non_ascii_keyword_lookalike() -> None:
    """A keyword spelled with non-ASCII lookalikes is refused."""
    assert rcpt_error("\u0422O:<a@b.example>") == replies.RCPT_SYNTAX


@pytest.mark.parametrize(
    "rest",
    ["SIZE=", "=1", "-X=1", "X_Y=1", "X=a=b", "X=\x01", "X=1\tY=2", "X==", "SIZE=1 size=2"],
)
def test_malformed_params(rest: str) -> None:
    """Malformed or duplicate parameters are MAIL_SYNTAX."""
    assert mail_error(f"FROM:<a@b.example> {rest}") == replies.MAIL_SYNTAX


def test_malformed_rcpt_params() -> None:
    """Malformed RCPT parameters are RCPT_SYNTAX."""
    assert rcpt_error("TO:<a@b.example> NOTIFY=") == replies.RCPT_SYNTAX


def test_text_glued_to_path() -> None:
    """Text right after > without a space is a command syntax error."""
    assert mail_error("FROM:<a@b.example>SIZE=1") == replies.MAIL_SYNTAX
    assert mail_error("FROM:<a@b.example>>") == replies.MAIL_SYNTAX


@pytest.mark.parametrize("value", ["", "=abc", "=12a", "=-1", "=123456789012345678901"])
def test_bad_size(value: str) -> None:
    """SIZE needs 1 to 20 digits."""
    assert mail_error(f"FROM:<a@b.example> SIZE{value}") == replies.MAIL_SYNTAX


@pytest.mark.parametrize("value", ["", "=BINARYMIME", "=8BIT", "=8BITMIME8"])
def test_bad_body(value: str) -> None:
    """BODY must be 7BIT or 8BITMIME."""
    assert mail_error(f"FROM:<a@b.example> BODY{value}") == replies.MAIL_SYNTAX


def test_body_with_unicode_case_trick() -> None:
    """A BODY value that only upper-cases to 8BITMIME through Unicode is refused."""
    assert mail_error("FROM:<a@b.example> SMTPUTF8 BODY=8BITM\u0131ME") == replies.MAIL_SYNTAX


def test_smtputf8_takes_no_value() -> None:
    """SMTPUTF8=anything is MAIL_SYNTAX."""
    assert mail_error("FROM:<a@b.example> SMTPUTF8=yes") == replies.MAIL_SYNTAX


def test_size_digits_must_be_ascii() -> None:
    """SIZE with non-ASCII digits is refused."""
    assert mail_error("FROM:<a@b.example> SMTPUTF8 SIZE=\u0661\u0662") == replies.MAIL_SYNTAX


def test_rcpt_does_not_check_mail_params() -> None:
    """On RCPT, SIZE and BODY are unknown parameters returned as given."""
    assert rcpt("TO:<a@b.example> SIZE=x").params == {"SIZE": "x"}


# --- errors: address syntax ---------------------------------------------------------
@pytest.mark.parametrize(
    "path",
    [
        "a@b.example",  # no angle brackets
        "<a@b.example",  # not closed
        "<<a@b.example>>",
        "<a>",  # no domain
        "<@b.example>",
        "<a@>",
        "<.a@b.example>",
        "<a.@b.example>",
        "<a..b@b.example>",
        "<a b@b.example>",
        "<a(c)@b.example>",
        "<a@b@c.example>",
        "<a@-b.example>",
        "<a@b-.example>",
        "<a@b..example>",
        "<a@.b.example>",
        "<a@b.example.>",
        "<a@b_c.example>",
        '<"a@b.example>',
        '<"a"b@c.example>',
        '<"a\x01"@b.example>',
        '<"a\\\x01"@b.example>',
        "<a@[192.0.2.256]>",
        "<a@[192.0.2]>",
        "<a@[01.2.3.4]>",
        "<a@[IPv6:2001:db8::g]>",
        "<a@[IPv6:fe80::1%eth0]>",
        "<a@[IPv6:1.2.3.4]>",
        "<a@[x-tag:stuff]>",
        "<a@[192.0.2.1>",
        "<@:a@b.example>",
        "<@a.example:>",
        "<@a.example,b.example:a@b.example>",
        "<@a.example;a@b.example>",
        "<@[192.0.2.1]:a@b.example>",
        "<Postmaster>",  # MAIL may not use the bare form
        "<a\x00@b.example>",
    ],
)
def test_bad_sender_syntax(path: str) -> None:
    """A malformed MAIL address is BAD_SENDER_SYNTAX."""
    assert mail_error(f"FROM:{path}") == replies.BAD_SENDER_SYNTAX


@pytest.mark.parametrize(
    "path",
    [
        "<>",
        "a@b.example",
        "<a@b.example",
        "<a..b@b.example>",
        "<@r.example:Postmaster>",
        '<"Postmaster">',
        "<postmaster.x>",
    ],
)
def test_bad_recipient_syntax(path: str) -> None:
    """A malformed RCPT address, including the null path, is BAD_RECIPIENT_SYNTAX."""
    assert rcpt_error(f"TO:{path}") == replies.BAD_RECIPIENT_SYNTAX


def test_path_error_message_has_no_client_input() -> None:
    """The PathError message is a fixed description, never the client's text."""
    with pytest.raises(PathError) as info:
        mail("FROM:<secret-token..x@b.example>")
    assert "secret" not in str(info.value)


# --- length limits ----------------------------------------------------------------
def test_local_part_of_64_octets() -> None:
    """A 64-octet local part is accepted."""
    assert len(mail(f"FROM:<{'a' * 64}@b.example>").local) == 64


def test_local_part_of_65_octets() -> None:
    """A 65-octet local part is refused."""
    assert mail_error(f"FROM:<{'a' * 65}@b.example>") == replies.BAD_SENDER_SYNTAX


def test_quoted_local_part_length_counts_quotes() -> None:
    """The quotes of a quoted local part count towards the 64 octets."""
    assert mail_error(f'FROM:<"{"a" * 63}"@b.example>') == replies.BAD_SENDER_SYNTAX


def test_label_of_63_octets() -> None:
    """A 63-octet domain label is accepted."""
    assert rcpt(f"TO:<a@{'b' * 63}.example>").domain.startswith("b" * 63)


def test_label_of_64_octets() -> None:
    """A 64-octet domain label is refused."""
    assert rcpt_error(f"TO:<a@{'b' * 64}.example>") == replies.BAD_RECIPIENT_SYNTAX


def test_path_of_256_octets() -> None:
    """A path of exactly 256 octets including the brackets is accepted."""
    domain = ".".join(["d" * 63, "d" * 63, "d" * 63, "d" * 56])  # 248 octets
    path = f"<{'a' * 5}@{domain}>"
    assert len(path) == 256
    assert rcpt(f"TO:{path}").domain == domain


def test_path_of_257_octets() -> None:
    """A path of 257 octets is refused."""
    domain = ".".join(["d" * 63, "d" * 63, "d" * 63, "d" * 56])
    assert rcpt_error(f"TO:<{'a' * 6}@{domain}>") == replies.BAD_RECIPIENT_SYNTAX


def test_domain_over_255_octets() -> None:
    """A domain longer than 255 octets is refused."""
    domain = ".".join(["d" * 63] * 4 + ["e"])  # 256 octets
    assert rcpt_error(f"TO:<a@{domain}>") == replies.BAD_RECIPIENT_SYNTAX


def test_source_route_counts_towards_path_length() -> None:
    """The source route is part of the path's 256 octets."""
    route = ",".join(["@" + "r" * 60] * 4)
    assert rcpt_error(f"TO:<{route}:a@b.example>") == replies.BAD_RECIPIENT_SYNTAX


def test_utf8_length_is_counted_in_octets() -> None:
    """Local part limits count UTF-8 octets, not characters."""
    assert mail(f"FROM:<{'é' * 32}@b.example> SMTPUTF8").local == "é" * 32
    assert mail_error(f"FROM:<{'é' * 33}@b.example> SMTPUTF8") == replies.BAD_SENDER_SYNTAX


def test_u_label_length_uses_a_label() -> None:
    """A U-label whose A-label exceeds 63 octets is refused."""
    label = "".join(chr(0x4E00 + i * 37) for i in range(30))
    assert rcpt_error(f"TO:<a@{label}.example>", utf8=True) == replies.BAD_RECIPIENT_SYNTAX


# --- UTF-8 -----------------------------------------------------------------------------
def test_utf8_sender_with_smtputf8() -> None:
    """A UTF-8 local part and U-label domain are accepted with SMTPUTF8 offered and used."""
    path = mail("FROM:<jörg@bücher.example> SMTPUTF8")
    assert (path.local, path.domain) == ("jörg", "bücher.example")


def test_utf8_sender_without_smtputf8_param() -> None:
    """A UTF-8 sender without the SMTPUTF8 parameter is NON_ASCII_ADDRESS."""
    assert mail_error("FROM:<jörg@example.com>") == replies.NON_ASCII_ADDRESS


def test_utf8_sender_when_smtputf8_not_offered() -> None:
    """SMTPUTF8 in MAIL does not help when the server did not offer it."""
    assert mail_error("FROM:<jörg@example.com> SMTPUTF8", offered=False) == (
        replies.NON_ASCII_ADDRESS
    )


def test_smtputf8_param_returned_when_not_offered() -> None:
    """SMTPUTF8 on an ASCII sender is returned even if not offered; the caller decides."""
    assert mail("FROM:<a@b.example> SMTPUTF8", offered=False).params == {"SMTPUTF8": None}


def test_utf8_domain_without_smtputf8() -> None:
    """A U-label domain without SMTPUTF8 is NON_ASCII_ADDRESS."""
    assert rcpt_error("TO:<a@bücher.example>") == replies.NON_ASCII_ADDRESS


def test_utf8_recipient_with_smtputf8() -> None:
    """A UTF-8 recipient is accepted when the transaction has SMTPUTF8."""
    assert rcpt("TO:<用户@例子.广告>", utf8=True).address == "用户@例子.广告"


def test_utf8_in_quoted_local_part() -> None:
    """UTF-8 is allowed inside a quoted local part under SMTPUTF8."""
    assert rcpt('TO:<"jö rg"@b.example>', utf8=True).local == '"jö rg"'


def test_utf8_quoted_pair_is_refused() -> None:
    """A backslash before a non-ASCII character is not a valid quoted-pair."""
    assert rcpt_error('TO:<"j\\ö"@b.example>', utf8=True) == replies.BAD_RECIPIENT_SYNTAX


@pytest.mark.parametrize("char", ["\u00a0", "\u2028", "\u3000", "\u0085", "\ud800", "\x7f"])
def test_unicode_controls_and_spaces_refused(char: str) -> None:
    """Controls, surrogates and Unicode spaces are refused even under SMTPUTF8."""
    assert rcpt_error(f"TO:<a{char}b@b.example>", utf8=True) == replies.BAD_RECIPIENT_SYNTAX


def test_u_label_with_edge_hyphen_refused() -> None:
    """A U-label may not start or end with a hyphen."""
    assert rcpt_error("TO:<a@-bü.example>", utf8=True) == replies.BAD_RECIPIENT_SYNTAX


def test_utf8_param_value_with_smtputf8() -> None:
    """A UTF-8 parameter value is accepted under SMTPUTF8."""
    assert rcpt("TO:<a@b.example> X=é", utf8=True).params == {"X": "é"}


def test_utf8_param_value_without_smtputf8() -> None:
    """A UTF-8 parameter value without SMTPUTF8 is a command syntax error."""
    assert rcpt_error("TO:<a@b.example> X=é") == replies.RCPT_SYNTAX
    assert mail_error("FROM:<a@b.example> X=é") == replies.MAIL_SYNTAX


# --- domain_of and in_domain -----------------------------------------------------------
def test_domain_of_lower_cases() -> None:
    """domain_of returns the domain lower-cased."""
    assert domain_of("User@Example.COM") == "example.com"


def test_domain_of_quoted_at() -> None:
    """domain_of takes the part after the last @, so a quoted @ does not confuse it."""
    assert domain_of('"a@evil.example"@Example.com') == "example.com"


def test_domain_of_without_domain() -> None:
    """domain_of is empty for the null path and for Postmaster."""
    assert (domain_of(""), domain_of("Postmaster")) == ("", "")


@pytest.mark.parametrize(
    ("address_domain", "account_domain"),
    [
        ("example.com", "example.com"),
        ("EXAMPLE.com", "example.COM"),
        ("mail.example.com", "example.com"),
        ("a.b.example.com", "Example.Com"),
        ("b\u00fccher.example", "xn--bcher-kva.example"),  # U-labels in A-label form
        ("mail.B\u00dcCHER.example", "xn--bcher-kva.example"),
    ],
)
def test_in_domain_matches(address_domain: str, account_domain: str) -> None:
    """The domain itself and its subdomains match, in any case."""
    assert in_domain(address_domain, account_domain)


@pytest.mark.parametrize(
    ("address_domain", "account_domain"),
    [
        ("evil-example.com", "example.com"),
        ("example.com.evil.org", "example.com"),
        ("xexample.com", "example.com"),
        ("example.co", "example.com"),
        ("com", "example.com"),
        ("", "example.com"),
        ("example.com", ""),
    ],
)
def test_in_domain_refuses(address_domain: str, account_domain: str) -> None:
    """Look-alike, suffix-sharing, parent and empty domains do not match."""
    assert not in_domain(address_domain, account_domain)


# --- properties ----------------------------------------------------------------------
_ATEXT = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789!#$%&'*+/=?^_`{|}~-"
_ALNUM = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789"

atoms = st.text(st.sampled_from(_ATEXT), min_size=1, max_size=10)
local_parts = st.lists(atoms, min_size=1, max_size=4).map(".".join)
labels = st.builds(
    lambda a, mid, b: a + mid + b if mid or b else a,
    st.sampled_from(_ALNUM),
    st.text(st.sampled_from(_ALNUM + "-"), max_size=20),
    st.sampled_from(_ALNUM),
) | st.sampled_from(_ALNUM)
domains = st.lists(labels, min_size=1, max_size=5).map(".".join)


@given(local_parts, domains)
def test_valid_addresses_round_trip(local: str, domain: str) -> None:
    """Any dot-atom at an LDH domain parses back to the same address."""
    addr = f"{local}@{domain}"
    assert mail(f"FROM:<{addr}>").address == addr
    assert rcpt(f"TO:<{addr}>").address == addr


_anything = st.text(st.characters(codec=None, exclude_categories=()), max_size=80)
_prefixes = st.sampled_from(
    ["", "FROM:", "FROM:<", "TO:", "TO:<", "FROM:<a@", 'TO:<"', "FROM:<a@b.example> ", "TO:<a@["]
)


@settings(max_examples=300)
@given(_prefixes, _anything, st.booleans())
def test_arbitrary_text_raises_only_path_error(prefix: str, text: str, flag: bool) -> None:
    """Arbitrary input either parses or raises PathError, never anything else."""
    for parse in (
        lambda a: parse_mail_from(a, smtputf8_offered=flag),
        lambda a: parse_rcpt_to(a, smtputf8=flag),
    ):
        try:
            path = parse(prefix + text)
        except PathError as e:
            assert e.reply.code in (501, 553)
        else:
            assert isinstance(path, Path)


keywords = st.builds(
    lambda a, rest: a + rest,
    st.sampled_from(_ALNUM),
    st.text(st.sampled_from(_ALNUM + "-"), max_size=12),
).filter(lambda k: k.upper() not in {"SIZE", "BODY", "SMTPUTF8"})
values = st.none() | st.text(
    st.characters(min_codepoint=33, max_codepoint=126, exclude_characters="="),
    min_size=1,
    max_size=20,
)
param_lists = st.lists(st.tuples(keywords, values), max_size=6, unique_by=lambda kv: kv[0].upper())


@given(param_lists)
def test_valid_params_round_trip(params: list[tuple[str, str | None]]) -> None:
    """Any parameters built from the esmtp-param grammar come back upper-cased with their values."""
    text = " ".join(k if v is None else f"{k}={v}" for k, v in params)
    arg = f"<a@b.example> {text}" if text else "<a@b.example>"
    expected = {k.upper(): v for k, v in params}
    assert mail(f"FROM:{arg}").params == expected
    assert rcpt(f"TO:{arg}").params == expected


@given(local_parts, domains, param_lists, st.booleans())
def test_fast_path_agrees_with_full_parser(
    local: str, domain: str, params: list[tuple[str, str | None]], utf8: bool
) -> None:
    """The precompiled fast path and the full parser give the same result."""
    text = "".join(f" {k}" if v is None else f" {k}={v}" for k, v in params)
    for keyword, mail_ in (("FROM:", True), ("TO:", False)):
        arg = f"{keyword}<{local}@{domain}>{text}"
        try:
            fast: Path | str = (
                parse_mail_from(arg, smtputf8_offered=utf8)
                if mail_
                else parse_rcpt_to(arg, smtputf8=utf8)
            )
        except PathError as e:
            fast = e.reply.text
        try:
            full: Path | str = _parse(arg, keyword, mail=mail_, utf8=utf8)
        except PathError as e:
            full = e.reply.text
        assert fast == full
