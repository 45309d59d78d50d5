"""The author of a message: the domains of its header ``From:`` and ``Sender:`` mailboxes.

Owns: finding the ``From`` and ``Sender`` fields in the header section of
message data (up to the first empty line; continuation lines unfolded), the
RFC 5322 address-list grammar needed to pull each mailbox's domain out of them
(display names, quoted strings, comments, encoded words as atoms, angle
addresses with an obsolete route, groups), and the check of SEMANTICS.md §6:
every mailbox of every ``From`` (and of ``Sender``, when present) is in the
account's domain or a subdomain (``relayd.smtp.address.in_domain``); no
mailbox in ``From`` at all is ``NO_HEADER_FROM``. A domain written with
U-labels (RFC 6532 UTF-8 headers) is compared in its A-label form.

Interface cost: linear in the header section's size: one search for its end,
one regular expression scan for the two fields, and a tokenizer over their
values only (no ``email`` package parse). No regular expression here
backtracks more than linearly. It runs on the event loop once per message.

Untrusted input: all of it (message data from the client; CRLF line ends only,
checked before by ``policy.data_violation``). Non-UTF-8 octets are replaced and
can never match a domain. Settings read: none.
See also: relayd.smtp.policy (``header_from_allowed``), relayd.smtp.server (calls it).
"""

from __future__ import annotations

import re

from relayd.smtp import replies
from relayd.smtp.address import ascii_domain, in_domain
from relayd.smtp.replies import Reply

__all__ = ["FieldError", "check", "field_domains", "header_fields"]

# A From or Sender field and its continuation lines, after a line end. The literal
# CRLF first (no IGNORECASE) lets the engine skip ahead to each line start.
_NAME_VALUE = (rb"([Ff][Rr][Oo][Mm]|[Ss][Ee][Nn][Dd][Ee][Rr])[ \t]*+:"
               rb"([^\r\n]*+(?:\r\n[ \t][^\r\n]*+)*+)")
_FIELD = re.compile(rb"\r\n" + _NAME_VALUE)
_FIRST_FIELD = re.compile(_NAME_VALUE)
# The common values, whose meaning needs no tokenizer: ``local@domain`` or
# ``[phrase] <local@domain>`` with a phrase of atoms or one simple quoted string.
_ATEXT = r"A-Za-z0-9!#$%&'*+/=?^_`{|}~\-"
_SIMPLE = re.compile(
    rf'[ \t]*+(?:(?:[{_ATEXT} \t.]*+|"[^"\\]*+"[ \t]*+)<)?'
    rf"[{_ATEXT}]++(?:\.[{_ATEXT}]++)*+@((?:[A-Za-z0-9\-]++\.)*+[A-Za-z0-9\-]++)"
    r"(>)?[ \t]*+")
# One token of an address list: white space, a quoted string, a domain literal,
# a special, an atom (dots, encoded words and UTF-8 included), or a comment start.
_TOKEN = re.compile(r'[ \t\r\n]++|"(?:[^"\\]++|\\.)*+"|\[(?:[^\[\]\\]++|\\.)*+\]'
                    r'|[<>,:;@]|[^ \t\r\n"\[\]()<>,:;@\\]++|\(', re.DOTALL)
_COMMENT_PART = re.compile(r"[^()\\]++|\\.|[()]", re.DOTALL)
_SPECIALS = frozenset("<>,:;@")


class FieldError(ValueError):
    """A From or Sender value that is not an address list."""


def header_fields(data: bytes | bytearray, start: int = 0) -> list[tuple[str, str]]:
    """``(name, unfolded value)`` of each From and Sender field in the header section.

    The header section of ``data[start:]`` ends at the first empty line (or at the
    end of the data); ``name`` is lower-case.
    """
    if data.startswith(b"\r\n", start):
        return []  # an empty line first: no header section
    end = data.find(b"\r\n\r\n", start)
    if end < 0:
        end = len(data)
    found = []
    if start >= 2 and data.startswith(b"\r\n", start - 2):
        first = None
        start -= 2  # the CRLF before the first line (no copy of the section)
    else:
        first = _FIRST_FIELD.match(data, start, end)
    for m in ([first] if first else []) + list(_FIELD.finditer(data, start, end)):
        found.append((m.group(1).decode("ascii").lower(),
                      m.group(2).replace(b"\r\n", b"").decode("utf-8", "replace")))
    return found


def _tokens(value: str) -> list[str]:
    """The tokens of ``value`` without white space and comments; FieldError if malformed."""
    out: list[str] = []
    pos, n = 0, len(value)
    match = _TOKEN.match
    while pos < n:
        m = match(value, pos)
        if m is None:
            raise FieldError("unexpected character")
        tok = m.group()
        if tok == "(":
            pos = _skip_comment(value, pos)
            continue
        pos = m.end()
        if tok[0] not in " \t\r\n":
            out.append(tok)
    return out


def _skip_comment(value: str, pos: int) -> int:
    """The index after the (nested) comment opened at ``pos``."""
    depth = 0
    match = _COMMENT_PART.match
    while True:
        m = match(value, pos)
        if m is None:
            raise FieldError("comment not closed")
        tok = m.group()
        pos = m.end()
        if tok == "(":
            depth += 1
        elif tok == ")":
            depth -= 1
            if depth == 0:
                return pos


def _domain(addr: list[str]) -> str:
    """The domain of an addr-spec's tokens (``local @ domain``), in A-label form."""
    if "@" not in addr:
        raise FieldError("mailbox without @")
    at = len(addr) - 1 - addr[::-1].index("@")
    local, rest = addr[:at], addr[at + 1:]
    if not local or len(rest) != 1 or any(t in _SPECIALS for t in local):
        raise FieldError("bad addr-spec")
    domain = rest[0]
    if domain.startswith('"'):
        raise FieldError("quoted domain")
    return ascii_domain(domain)


def _mailbox(toks: list[str]) -> str:
    """The domain of one mailbox: ``[display-name] <[route:]addr-spec>`` or an addr-spec."""
    if "<" in toks:
        lt = toks.index("<")
        if toks[-1] != ">" or toks.count("<") != 1 or toks.count(">") != 1:
            raise FieldError("bad angle address")
        if any(t in _SPECIALS for t in toks[:lt]):
            raise FieldError("special in display name")
        inner = toks[lt + 1:-1]
        if ":" in inner:  # obsolete route: @a,@b:addr-spec
            inner = inner[inner.index(":") + 1:]
        return _domain(inner)
    return _domain(toks)


def field_domains(value: str) -> list[str]:
    """The domain of every mailbox in an address list (groups opened up); FieldError if
    it is not one."""
    m = _SIMPLE.fullmatch(value)
    if m is not None and (m.group(2) is None) == ("<" not in value):
        return [m.group(1).lower()]
    toks = _tokens(value)
    domains: list[str] = []
    unit: list[str] = []
    in_group = in_angle = False
    for tok in toks:
        if tok == "<":
            in_angle = True
        elif tok == ">":
            in_angle = False
        elif in_angle:
            pass  # a route's "," and ":" belong to the angle address
        elif tok == ":" and not in_group:
            if any(t in _SPECIALS for t in unit):
                raise FieldError("bad group name")
            in_group, unit = True, []
            continue
        elif tok in ",;":
            if tok == ";":
                if not in_group:
                    raise FieldError("';' outside a group")
                in_group = False
            if unit:
                domains.append(_mailbox(unit))
            unit = []
            continue
        unit.append(tok)
    if in_group or in_angle:
        raise FieldError("group or angle address not closed")
    if unit:
        domains.append(_mailbox(unit))
    return domains


def check(data: bytes | bytearray, account_domain: str, start: int = 0) -> Reply | None:
    """Refuse a message whose From (or Sender) has a mailbox outside ``account_domain``.

    ``data[start:]`` is the message as received (CRLF line ends). No mailbox in any
    From field: ``NO_HEADER_FROM``; an unparsable field or a foreign domain:
    ``HEADER_FROM_NOT_ALLOWED``.
    """
    seen_from = False
    for name, value in header_fields(data, start):
        try:
            domains = field_domains(value)
        except FieldError:
            return replies.HEADER_FROM_NOT_ALLOWED
        if name == "from":
            seen_from = seen_from or bool(domains)
        elif not domains:
            return replies.HEADER_FROM_NOT_ALLOWED  # an empty Sender names no one
        for d in domains:
            if not in_domain(d, account_domain):
                return replies.HEADER_FROM_NOT_ALLOWED
    return None if seen_from else replies.NO_HEADER_FROM
