"""Outbound TLS security levels: the level a destination gets, and what a TLS failure means.

Owns: the levels (as Postfix's ``smtp_tls_security_level``), ordered weakest
first: ``none`` (never STARTTLS), ``may`` (STARTTLS when offered, certificate
not checked; a failed handshake is retried once in plaintext at the same
host), ``encrypt`` (TLS required, certificate not checked), ``verify`` (TLS
required and a certificate valid for the MX host name, from the configured
trust store). Which level an MX destination gets (``[delivery] tls_level``,
overridden per recipient domain by ``[delivery.tls_policy]``: the domain
itself, then its parent domains), how a later policy source (MTA-STS, DANE)
raises it (``stronger``: never lowers), what to do when STARTTLS is missing
or its handshake fails, and the outcome recorded per delivery.

Pure: no I/O. relayd.delivery.connection applies the decisions,
relayd.delivery.client asks for the level of a destination.
Settings read: [delivery] tls_level, tls_policy (passed in).
See also: docs/SEMANTICS.md (Delivery), docs/OPERATIONS.md (TLS levels).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Literal

TlsLevel = Literal["none", "may", "encrypt", "verify"]
#: The levels, weakest first.
LEVELS: tuple[TlsLevel, ...] = ("none", "may", "encrypt", "verify")

#: What one delivery's connection achieved (a label of relayd_delivery_tls_total):
#: ``plaintext`` (level none, or may at a host without STARTTLS), ``fallback``
#: (may: the handshake failed, delivered in plaintext on the retry), ``encrypted``
#: (TLS, certificate not checked), ``verified`` (TLS, certificate valid for the MX
#: name), ``refused`` (encrypt/verify could not be met: deferred), ``dane`` (TLS, the
#: certificate matched the MX host's secure TLSA records: relayd.delivery.dane),
#: ``dane_failed`` (secure TLSA records, and no STARTTLS, a failed handshake or no match).
TLS_OUTCOMES: tuple[str, ...] = ("plaintext", "fallback", "encrypted", "verified", "refused",
                                 "dane", "dane_failed")


def is_level(value: str) -> bool:
    """Whether ``value`` names a level."""
    return value in LEVELS


def level_for(domain: str, default: TlsLevel, table: Mapping[str, TlsLevel]) -> TlsLevel:
    """The level for a recipient domain: the table's entry for the domain, else for its
    closest parent domain, else ``default``."""
    d = domain.lower().rstrip(".")
    while d:
        level = table.get(d)
        if level is not None:
            return level
        _, _, d = d.partition(".")
    return default


def stronger(a: TlsLevel, b: TlsLevel) -> TlsLevel:
    """The stricter of two levels (a policy source may raise a level, never lower it)."""
    return a if LEVELS.index(a) >= LEVELS.index(b) else b


def requires_tls(level: str) -> bool:
    """Whether a missing STARTTLS or a failed handshake defers (encrypt, verify)."""
    return level in ("encrypt", "verify")


def verifies(level: str) -> bool:
    """Whether the certificate must be valid for the MX host name."""
    return level == "verify"


def retries_in_plaintext(level: str) -> bool:
    """Whether a failed handshake after STARTTLS was offered is retried once in plaintext."""
    return level == "may"


def no_starttls_text(level: str, host: str) -> str:
    """The deferral reason when TLS is required and the host does not offer STARTTLS."""
    return f"TLS required (tls level {level}) but {host} does not offer STARTTLS"


def handshake_text(level: str, host: str, error: str) -> str:
    """The deferral reason when TLS is required and STARTTLS failed."""
    return f"TLS required (tls level {level}): STARTTLS with {host} failed: {error}"


def outcome(encrypted: bool, verified: bool, fallback: bool, dane: bool = False) -> str:
    """The outcome recorded for a delivery's connection."""
    if fallback:
        return "fallback"
    if dane:
        return "dane"
    if verified:
        return "verified"
    return "encrypted" if encrypted else "plaintext"
