"""Parse the arguments of SMTP MAIL and RCPT: the path and its ESMTP parameters.

NAME
    relayd.smtp.address -- strict, fast parser for ``MAIL FROM:`` and ``RCPT TO:``

SYNOPSIS
    path = parse_mail_from("FROM:<user@example.com> SIZE=100", smtputf8_offered=True)
    path = parse_rcpt_to("TO:<user@example.com>", smtputf8=False)
    domain_of(path.address); in_domain(domain, account_domain)
    is_address_literal(path.domain); literal_ip("[IPv6:2001:db8::1]")

DESCRIPTION
    Owns the SMTP path grammar of RFC 5321 section 4.1.2, with the UTF-8
    extensions of RFC 6531, and the ``esmtp-param`` grammar of the MAIL and
    RCPT commands. It replaces aiosmtpd's parser (``email._header_value_parser``),
    which parses RFC 5322 header syntax, accepts things SMTP does not, and was
    a large share of the hot path's CPU (bench/NOTES.md).

    The argument is everything after the verb: ``FROM:<...> [params]`` or
    ``TO:<...> [params]``. The keyword is case-insensitive. Accepted with
    tolerance, as Postfix does: spaces before the keyword, between the colon
    and ``<``, between parameters and at the end of the line. Required
    strictly: the angle brackets, a single path, parameters separated from
    ``>`` by a space.

    Accepted paths:
        ``<local@domain>``       local part a Dot-string or a Quoted-string;
                                 domain LDH labels or an address literal
                                 ``[192.0.2.1]`` / ``[IPv6:2001:db8::1]``
        ``<@a,@b:local@domain>`` a source route, accepted and discarded
        ``<>``                   the null reverse-path (MAIL only)
        ``<Postmaster>``         any case, RCPT only; domain is ""

    Limits (RFC 5321 section 4.5.3.1), counted in UTF-8 octets as written:
    local part 64, domain 255, each domain label 63 (the A-label for a
    U-label), whole path 256 including the angle brackets.

    Non-ASCII (UTF-8) characters in the local part or the domain are allowed
    only under SMTPUTF8: for MAIL, when the SMTPUTF8 parameter is in the same
    command and the server offered it; for RCPT, when the transaction's MAIL
    had it. Even then, C0/C1 controls, surrogates and Unicode space and
    separator characters are refused. A U-label is any label holding a
    non-ASCII character; it is not checked against IDNA2008.

    Parameters: ``esmtp-keyword ["=" esmtp-value]``. Keywords are returned
    upper-cased, values as given (None when there is no ``=value``). A
    duplicate keyword is an error. Known MAIL parameters are checked: SIZE is
    1 to 20 digits, BODY is 7BIT or 8BITMIME, SMTPUTF8 has no value. Unknown
    parameters are returned; the caller decides whether to refuse them
    (``replies.PARAM_UNKNOWN``).

    Every failure raises PathError carrying the reply to send:
        keyword missing or garbled, no address, bad parameters
                                   replies.MAIL_SYNTAX / replies.RCPT_SYNTAX
        bad path syntax or length  replies.BAD_SENDER_SYNTAX / BAD_RECIPIENT_SYNTAX
        non-ASCII without SMTPUTF8 replies.NON_ASCII_ADDRESS
    PathError's message is a fixed description for the log; it never holds
    the client's input.

COST
    Pure, no I/O. The common case (a dot-atom at an LDH domain) is one
    precompiled regular expression match; everything else goes through the
    full parser, linear in the argument's length. No regular expression here
    can backtrack more than linearly.

UNTRUSTED INPUT
    All of it: the argument comes straight from the network. Any ``str``
    (including lone surrogates) either parses or raises PathError.

SETTINGS
    None.

SEE ALSO
    relayd.smtp.replies (the replies), relayd.smtp.server (calls this), relayd.smtp.policy
    (uses domain_of and in_domain for the sender check, is_address_literal
    and literal_ip for recipients and next hops), relayd.delivery.mx (routes a
    literal with literal_ip); RFC 5321, RFC 6531, RFC 1870 (SIZE),
    RFC 6152 (8BITMIME).
"""

from __future__ import annotations

import ipaddress
import re
import unicodedata
from typing import NamedTuple

from relayd.smtp import replies
from relayd.smtp.replies import Reply

__all__ = [
    "IPAddress",
    "Path",
    "PathError",
    "ascii_domain",
    "domain_of",
    "in_domain",
    "is_address_literal",
    "literal_ip",
    "parse_mail_from",
    "parse_rcpt_to",
]


IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


class PathError(Exception):
    """A MAIL or RCPT argument that cannot be accepted, with the reply to send."""

    def __init__(self, reply: Reply, detail: str) -> None:
        super().__init__(detail)
        self.reply = reply
        self.detail = detail


class Path(NamedTuple):
    """A parsed reverse-path or forward-path and its ESMTP parameters.

    ``address`` is ``local@domain`` as written, without source route (""
    for ``<>``); ``local`` and ``domain`` are as written, case preserved
    (``domain`` is "" for ``<>`` and ``<Postmaster>``); ``params`` maps
    upper-cased keywords to values as given, or None when no ``=value``.
    A NamedTuple because it is built on every MAIL and RCPT and costs half
    of a frozen dataclass to create.
    """

    address: str
    local: str
    domain: str
    params: dict[str, str | None]


# --- grammar ------------------------------------------------------------------
# Non-ASCII characters the grammar lets through: no C1 controls, no surrogates
# (they cannot be UTF-8). Space-like characters are removed by _check_unicode.
_U = r"\u00a0-\ud7ff\ue000-\U0010ffff"
# Hyphens escaped: these are spliced into larger character classes.
_ATEXT = r"A-Za-z0-9!#$%&'*+/=?^_`{|}~\-"
_LDH = r"A-Za-z0-9\-"

_ASCII_LABEL = re.compile(r"[A-Za-z0-9]++(?:-++[A-Za-z0-9]++)*+")
_ASCII_DOMAIN = rf"{_ASCII_LABEL.pattern}(?:\.{_ASCII_LABEL.pattern})*+"
_ASCII_DOT_STRING = rf"[{_ATEXT}]++(?:\.[{_ATEXT}]++)*+"

# The common case in one match: keyword, dot-atom@ldh-domain, optional params.
_FAST_MAIL = re.compile(
    rf"[Ff][Rr][Oo][Mm]: *+<({_ASCII_DOT_STRING})@({_ASCII_DOMAIN})>(?: ++(.*))?", re.DOTALL
)
_FAST_RCPT = re.compile(
    rf"[Tt][Oo]: *+<({_ASCII_DOT_STRING})@({_ASCII_DOMAIN})>(?: ++(.*))?", re.DOTALL
)

# Tokens of the full parser (matched at a position, never searched).
_DOT_STRING = re.compile(rf"[{_ATEXT}{_U}]++(?:\.[{_ATEXT}{_U}]++)*+")
_QUOTED_STRING = re.compile(rf'"(?:[ !#-\[\]-~{_U}]++|\\[ -~])*+"')
_DOMAIN_TOKEN = re.compile(rf"[{_LDH}.{_U}]++")
_LITERAL = re.compile(r"\[[!-Z^-~]*+\]")
_IPV4 = re.compile(r"[0-9.]{7,15}")
_IPV6 = re.compile(r"[0-9A-Fa-f:.]{2,45}")
_SOURCE_ROUTE_END = re.compile(r"[,:]")

_PARAM = re.compile(rf"([A-Za-z0-9][A-Za-z0-9-]*+)(?:=([!-<>-~{_U}]++))?")
_SIZE_VALUE = re.compile(r"[0-9]{1,20}")
_BODY_VALUES = frozenset({"7BIT", "8BITMIME"})
# Unicode categories refused even under SMTPUTF8: controls, surrogates, spaces.
_BAD_CATEGORIES = frozenset({"Cc", "Cs", "Zs", "Zl", "Zp"})

_MAX_LOCAL = 64
_MAX_DOMAIN = 255
_MAX_LABEL = 63
_MAX_PATH = 256


def _fast(m: re.Match[str] | None, syntax: Reply) -> Path | None:
    """The path of a common-case match (short ASCII dot-atom and LDH domain), else None."""
    if m is None:
        return None
    local, domain, rest = m.group(1, 2, 3)
    if len(local) > _MAX_LOCAL or len(domain) > _MAX_LABEL or not (rest is None or rest.isascii()):
        return None
    return Path(f"{local}@{domain}", local, domain, _parse_params(rest, syntax) if rest else {})


# --- public API ----------------------------------------------------------------
def parse_mail_from(arg: str, *, smtputf8_offered: bool) -> Path:
    """Parse the argument of MAIL (``FROM:<path> [params]``), or raise PathError."""
    path = _fast(_FAST_MAIL.fullmatch(arg), replies.MAIL_SYNTAX)
    if path is not None:
        if path.params:
            _check_mail_params(path.params)
        return path
    return _parse(arg, "FROM:", mail=True, utf8=smtputf8_offered)


def parse_rcpt_to(arg: str, *, smtputf8: bool) -> Path:
    """Parse the argument of RCPT (``TO:<path> [params]``), or raise PathError."""
    path = _fast(_FAST_RCPT.fullmatch(arg), replies.RCPT_SYNTAX)
    if path is not None:
        return path
    return _parse(arg, "TO:", mail=False, utf8=smtputf8)


def domain_of(address: str) -> str:
    """The lower-cased domain of a parsed address ("" for <> and <Postmaster>)."""
    _, at, domain = address.rpartition("@")
    return domain.lower() if at else ""


def ascii_domain(domain: str) -> str:
    """``domain`` in lower case with its U-labels in A-label form (``bücher`` ->
    ``xn--bcher-kva``), as account domains are stored."""
    if domain.isascii():
        return domain.lower()
    return ".".join(lab.lower() if lab.isascii()
                    else "xn--" + lab.lower().encode("punycode").decode("ascii")
                    for lab in domain.split("."))


def in_domain(address_domain: str, account_domain: str) -> bool:
    """Whether address_domain is account_domain or one of its subdomains (any case; a
    domain written with U-labels is compared in its A-label form)."""
    if not account_domain:
        return False
    a = ascii_domain(address_domain)
    b = ascii_domain(account_domain)
    return a == b or a.endswith("." + b)


def is_address_literal(domain: str) -> bool:
    """Whether a parsed domain is an address literal (``[192.0.2.1]``, ``[IPv6:...]``)."""
    return domain.startswith("[")


def literal_ip(domain: str) -> IPAddress | None:
    """The IP address inside an address literal, or None for a domain name.

    Raises ValueError for a malformed literal (a tag other than ``IPv6:``, an
    IPv4 address under that tag, or not an address at all). Paths from
    ``parse_rcpt_to`` never hold one.
    """
    if not is_address_literal(domain):
        return None
    if not domain.endswith("]"):
        raise ValueError("address literal not closed by ]")
    body = domain[1:-1]
    if body[:5].upper() == "IPV6:":
        return ipaddress.IPv6Address(body[5:])
    return ipaddress.IPv4Address(body)


# --- the full parser -----------------------------------------------------------
def _parse(arg: str, keyword: str, *, mail: bool, utf8: bool) -> Path:
    """Parse any MAIL/RCPT argument; ``utf8`` is the caller's SMTPUTF8 flag.

    Size: one left-to-right scan of the path (keyword, brackets, source route,
    local part, domain or literal, parameters) on the hot path of every MAIL
    and RCPT; each step reads the position the previous one left, which a
    split into functions would have to pass back and forth.
    """
    syntax = replies.MAIL_SYNTAX if mail else replies.RCPT_SYNTAX
    bad = replies.BAD_SENDER_SYNTAX if mail else replies.BAD_RECIPIENT_SYNTAX

    s = arg.strip(" ")
    n = len(keyword)
    head = s[:n]
    if not head.isascii() or head.upper() != keyword:
        raise PathError(syntax, f"keyword {keyword} missing")
    end = len(s)
    pos = n + len(s[n:]) - len(s[n:].lstrip(" "))
    if pos == end:
        raise PathError(syntax, "no path")
    if s[pos] != "<":
        raise PathError(bad, "path not in angle brackets")
    start = pos
    pos += 1

    local = domain = ""
    if s.startswith(">", pos):  # <>
        if not mail:
            raise PathError(bad, "null forward-path")
        pos += 1
    else:
        if s.startswith("@", pos):
            pos = _skip_source_route(s, pos, bad)
        local_start = pos
        if s.startswith('"', pos):
            m = _QUOTED_STRING.match(s, pos)
        else:
            m = _DOT_STRING.match(s, pos)
        if m is None:
            raise PathError(bad, "bad local part")
        pos = m.end()
        local = s[local_start:pos]
        if (
            s.startswith(">", pos)
            and not mail
            and local_start == start + 1
            and (local.isascii() and local.lower() == "postmaster")
        ):
            pos += 1  # <Postmaster>: RFC 5321 4.1.1.3
        else:
            if not s.startswith("@", pos):
                raise PathError(bad, "no @ after local part")
            pos += 1
            domain_start = pos
            if s.startswith("[", pos):
                m = _LITERAL.match(s, pos)
                if m is None:
                    raise PathError(bad, "bad address literal")
                pos = m.end()
                domain = s[domain_start:pos]
                _check_literal(domain, bad)
            else:
                m = _DOMAIN_TOKEN.match(s, pos)
                if m is None:
                    raise PathError(bad, "no domain")
                pos = m.end()
                domain = s[domain_start:pos]
                _check_domain(domain, bad)
            if not s.startswith(">", pos):
                raise PathError(bad, "path not closed by >")
            pos += 1

    path_text = s[start:pos]
    ascii_path = path_text.isascii()
    if not ascii_path:
        _check_unicode(path_text, bad)
    if _octets(local, local.isascii()) > _MAX_LOCAL:
        raise PathError(bad, "local part longer than 64 octets")
    if _octets(domain, domain.isascii()) > _MAX_DOMAIN:
        raise PathError(bad, "domain longer than 255 octets")
    if _octets(path_text, ascii_path) > _MAX_PATH:
        raise PathError(bad, "path longer than 256 octets")

    params: dict[str, str | None] = {}
    if pos < end:
        if s[pos] != " ":
            raise PathError(syntax, "no space after path")
        params = _parse_params(s[pos + 1 :], syntax)
    if mail:
        if params:
            _check_mail_params(params)
        utf8 = utf8 and "SMTPUTF8" in params
    if not utf8:
        if not ascii_path:
            raise PathError(replies.NON_ASCII_ADDRESS, "non-ASCII address without SMTPUTF8")
        if params and not all(v is None or v.isascii() for v in params.values()):
            raise PathError(syntax, "non-ASCII parameter without SMTPUTF8")

    address = f"{local}@{domain}" if domain else local
    return Path(address, local, domain, params)


def _skip_source_route(s: str, pos: int, bad: Reply) -> int:
    """Check the source route ``@a,@b:`` starting at pos; return the index after ':'."""
    while True:
        pos += 1  # the "@"
        m = _DOMAIN_TOKEN.match(s, pos)
        if m is None:
            raise PathError(bad, "bad source route")
        _check_domain(m.group(), bad)
        pos = m.end()
        sep = _SOURCE_ROUTE_END.match(s, pos)
        if sep is None:
            raise PathError(bad, "bad source route")
        pos += 1
        if sep.group() == ":":
            return pos
        if not s.startswith("@", pos):
            raise PathError(bad, "bad source route")


def _check_domain(domain: str, bad: Reply) -> None:
    """Check dot-separated labels: LDH, or U-labels holding non-ASCII characters."""
    for label in domain.split("."):
        if label.isascii():
            if len(label) > _MAX_LABEL or _ASCII_LABEL.fullmatch(label) is None:
                raise PathError(bad, "bad domain label")
        else:
            if label.startswith("-") or label.endswith("-"):
                raise PathError(bad, "bad domain label")
            a_label = label.lower().encode("punycode")
            if len(a_label) + 4 > _MAX_LABEL:  # "xn--" + punycode
                raise PathError(bad, "domain label longer than 63 octets")


def _check_literal(literal: str, bad: Reply) -> None:
    """Check an address literal: ``[IPv4]`` or ``[IPv6:...]`` (no other tag is registered)."""
    body = literal[1:-1]
    try:
        if body[:5].upper() == "IPV6:":
            v6 = body[5:]
            if _IPV6.fullmatch(v6) is None:
                raise PathError(bad, "bad IPv6 address literal")
            ipaddress.IPv6Address(v6)
        elif _IPV4.fullmatch(body) is not None:
            ipaddress.IPv4Address(body)
        else:
            raise PathError(bad, "bad address literal")
    except ValueError:
        raise PathError(bad, "bad address literal") from None


def _check_unicode(text: str, bad: Reply) -> None:
    """Refuse non-ASCII characters that are controls, surrogates or spaces."""
    for ch in text:
        if ch >= "\x80" and unicodedata.category(ch) in _BAD_CATEGORIES:
            raise PathError(bad, "forbidden Unicode character in path")


def _octets(text: str, is_ascii: bool) -> int:
    """Length of text in UTF-8 octets (text holds no surrogates)."""
    return len(text) if is_ascii else len(text.encode("utf-8"))


# --- parameters ----------------------------------------------------------------
def _parse_params(text: str, syntax: Reply) -> dict[str, str | None]:
    """Parse space-separated ``KEYWORD[=value]`` into {KEYWORD: value or None}."""
    params: dict[str, str | None] = {}
    for token in text.split(" "):
        if not token:
            continue  # repeated or trailing spaces
        m = _PARAM.fullmatch(token)
        if m is None:
            raise PathError(syntax, "malformed parameter")
        key = m.group(1).upper()
        if key in params:
            raise PathError(syntax, "duplicate parameter")
        params[key] = m.group(2)
    return params


def _check_mail_params(params: dict[str, str | None]) -> None:
    """Check the values of the MAIL parameters relayd knows: SIZE, BODY, SMTPUTF8."""
    if "SIZE" in params:
        size = params["SIZE"]
        if size is None or _SIZE_VALUE.fullmatch(size) is None:
            raise PathError(replies.MAIL_SYNTAX, "SIZE value not 1 to 20 digits")
    if "BODY" in params:
        body = params["BODY"]
        if body is None or not body.isascii() or body.upper() not in _BODY_VALUES:
            raise PathError(replies.MAIL_SYNTAX, "BODY value not 7BIT or 8BITMIME")
    if "SMTPUTF8" in params and params["SMTPUTF8"] is not None:
        raise PathError(replies.MAIL_SYNTAX, "SMTPUTF8 takes no value")
