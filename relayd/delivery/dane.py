"""DANE for SMTP (RFC 7672): what a secure TLSA RRset makes of a hop, and the certificate check.

Owns: which TLSA records relayd can check, the TLS level a hop gets from a
secure TLSA RRset (relayd.delivery.mx looks the records up, only when the MX
RRset and the host's address records were validated: the AD bit from the
resolver trusted for it), the TLS context of such a hop's handshake, and the
match of the presented certificate against the records.

Records (usage selector mtype): usable for SMTP are DANE-EE (3) and DANE-TA
(2); PKIX-TA/PKIX-EE (0, 1) are not (§2.2 / §3.1). What relayd checks:

- DANE-EE ``3 0|1 0|1|2``: the leaf certificate (selector 0) or its
  SubjectPublicKeyInfo (selector 1), exact (0), SHA-256 (1) or SHA-512 (2).
  No name check, no expiry check (§3.1.1). The handshake verifies nothing;
  the leaf is then matched before anything is sent under TLS.
- DANE-TA ``2 0 0`` only (the full trust-anchor certificate): the handshake
  verifies the chain with that certificate as its only trust anchor (partial
  chains allowed: the TA may be an intermediate), its validity dates and the
  name (the MX host name, the TLSA base domain: CNAMEs are not expanded).
  Why only this form: checking a chain against a TA given by its digest
  (``2 x 1``, ``2 x 2``) or its bare key (``2 1 0``) needs the peer's chain
  (public in Python's ssl from 3.13 only) and a chain verifier outside the
  handshake (cryptography, whose one adapter module is relayd.dkim.signature).
  Those records are counted as not checkable: when no checkable record is
  left, the hop is as one with only unusable records (TLS mandatory, not
  authenticated), never plaintext. When DANE-EE records are present, DANE-TA
  records are not consulted (one handshake, the leaf matched).

Level (``policy``): no secure TLSA → the hop's level is unchanged; any secure
record → TLS mandatory (at least ``encrypt``); checkable records → the DANE
check instead of WebPKI verification. A hop at level ``none`` (the operator's
explicit choice for that domain) is left alone.

Pure except ``context`` (builds an ssl.SSLContext from the records: no file
read). Untrusted input: the records (from DNS) and the peer's certificate
(DER, parsed by ``spki`` with bounds checks: malformed → no match).
Settings read: none ([delivery] dane is relayd.delivery.mx's and relayd.app's).
See also: relayd.delivery.mx (TLSA lookups), relayd.delivery.connection (the
handshake), relayd.delivery.tlslevels, docs/SEMANTICS.md (Delivery).
"""

from __future__ import annotations

import hashlib
import hmac
import ssl

from relayd.delivery import tlslevels

#: One TLSA record: (usage, selector, matching type, association data).
Tlsa = tuple[int, int, int, bytes]

DANE_TA = 2
DANE_EE = 3


def checkable(record: Tlsa) -> bool:
    """Whether relayd can check this record (see the module docstring)."""
    usage, selector, mtype, _data = record
    if usage == DANE_EE:
        return selector in (0, 1) and mtype in (0, 1, 2)
    return usage == DANE_TA and selector == 0 and mtype == 0


def policy(level: tlslevels.TlsLevel,
           records: tuple[Tlsa, ...]) -> tuple[tlslevels.TlsLevel, tuple[Tlsa, ...]]:
    """The level of a hop with this secure TLSA RRset, and the records to check."""
    if not records or level == "none":
        return level, ()
    return tlslevels.stronger(level, "encrypt"), tuple(r for r in records if checkable(r))


def _tlv(der: bytes, pos: int) -> tuple[int, int, int]:
    """(tag, start of content, end) of the DER element at ``pos``; ValueError if malformed."""
    if pos + 2 > len(der):
        raise ValueError("truncated DER")
    tag, length = der[pos], der[pos + 1]
    pos += 2
    if length & 0x80:
        n = length & 0x7F
        if not 0 < n <= 4 or pos + n > len(der):
            raise ValueError("bad DER length")
        length = int.from_bytes(der[pos:pos + n], "big")
        pos += n
    if pos + length > len(der):
        raise ValueError("truncated DER")
    return tag, pos, pos + length


def spki(cert: bytes) -> bytes:
    """The SubjectPublicKeyInfo (DER) of an X.509 certificate (DER); ValueError if malformed."""
    tag, start, _ = _tlv(cert, 0)  # Certificate
    if tag != 0x30:
        raise ValueError("not a certificate")
    tag, pos, _ = _tlv(cert, start)  # tbsCertificate
    if tag != 0x30:
        raise ValueError("not a certificate")
    tag, _, end = _tlv(cert, pos)
    if tag == 0xA0:  # [0] version
        pos = end
    for _field in range(5):  # serialNumber, signature, issuer, validity, subject
        _, _, pos = _tlv(cert, pos)
    tag, _, end = _tlv(cert, pos)
    if tag != 0x30:
        raise ValueError("no subjectPublicKeyInfo")
    return cert[pos:end]


def _digest(mtype: int, data: bytes) -> bytes:
    if mtype == 1:
        return hashlib.sha256(data).digest()
    if mtype == 2:
        return hashlib.sha512(data).digest()
    return data


def ee_matches(leaf: bytes, records: tuple[Tlsa, ...]) -> bool:
    """Whether the leaf certificate (DER) matches one of the DANE-EE records."""
    try:
        key = spki(leaf)
    except ValueError:
        return False
    for usage, selector, mtype, data in records:
        if usage == DANE_EE and checkable((usage, selector, mtype, data)):
            if hmac.compare_digest(_digest(mtype, leaf if selector == 0 else key), data):
                return True
    return False


def checks_leaf(records: tuple[Tlsa, ...]) -> bool:
    """Whether the check is a leaf match after an unverified handshake (DANE-EE present)."""
    return any(r[0] == DANE_EE for r in records)


_CONTEXTS: dict[tuple[Tlsa, ...], ssl.SSLContext] = {}
_MAX_CONTEXTS = 256


def context(records: tuple[Tlsa, ...]) -> ssl.SSLContext:
    """The handshake's context: verifying nothing (DANE-EE: the leaf is matched after), or
    verifying chain, dates and name with the ``2 0 0`` certificates as the only trust
    anchors (ssl.SSLError if none of them loads)."""
    ctx = _CONTEXTS.get(records)
    if ctx is not None:
        return ctx
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    if checks_leaf(records):
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
    else:
        ctx.load_verify_locations(cadata=b"".join(r[3] for r in records if checkable(r)))
        ctx.verify_flags |= ssl.VERIFY_X509_PARTIAL_CHAIN
    if len(_CONTEXTS) >= _MAX_CONTEXTS:
        _CONTEXTS.clear()
    _CONTEXTS[records] = ctx
    return ctx


def text(record: Tlsa) -> str:
    """A record as in a zone file, the data abbreviated (for logs)."""
    usage, selector, mtype, data = record
    return f"{usage} {selector} {mtype} {data.hex()[:16]}"


def mismatch_text(host: str, records: tuple[Tlsa, ...]) -> str:
    """The deferral reason when the certificate matches no record."""
    shown = ", ".join(text(r) for r in records[:3])
    return f"DANE: the certificate of {host} matches no TLSA record ({shown})"


def no_starttls_text(host: str) -> str:
    """The deferral reason when a DANE hop does not offer STARTTLS."""
    return f"DANE: TLS required (secure TLSA records) but {host} does not offer STARTTLS"


def handshake_text(host: str, error: str) -> str:
    """The deferral reason when the handshake with a DANE hop fails (DANE-TA: the chain,
    dates or name did not verify against the TLSA trust anchor)."""
    return f"DANE: TLS with {host} failed: {error}"
