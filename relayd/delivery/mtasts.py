"""MTA-STS (RFC 8461) decisions: the TXT record, the policy file, MX matching, result types.

Owns: parsing the ``_mta-sts.<domain>`` TXT record (``v=STSv1; id=...``, §3.1)
and the policy file (§3.2: ``version: STSv1``, ``mode: enforce|testing|none``,
``mx:`` patterns, ``max_age`` up to 31557600 seconds), matching an MX host name
against the policy's patterns (§4.1: a pattern ``*.example.net`` matches one
extra leading label, nothing else), whether a cached policy is still usable or
must be fetched again (§5.1: until ``max_age``, refreshed when the TXT id
changes, kept when a refresh fails), and which RFC 8460 result type (TLSRPT)
a TLS failure text stands for.

Pure: no I/O, no clock (times are passed in). relayd.delivery.sts fetches and
applies; relayd.delivery.tlsrpt counts and writes the report.
Untrusted input: the TXT record and the policy file (from the recipient
domain's DNS and web server): lines are bounded, unknown keys ignored, a policy
missing a required field or with a bad value is invalid (``PolicyError``).
See also: RFC 8461, RFC 8460 §4.3 (result types), docs/SEMANTICS.md (Delivery).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

MAX_AGE_LIMIT = 31_557_600  # §3.2: at most about one year
MAX_POLICY_BYTES = 64 * 1024  # §3.3: a policy file larger than this is invalid
MODES = ("enforce", "testing", "none")

#: RFC 8460 result types relayd records.
FETCH_ERROR = "sts-policy-fetch-error"
POLICY_INVALID = "sts-policy-invalid"
WEBPKI_INVALID = "sts-webpki-invalid"
STARTTLS_NOT_SUPPORTED = "starttls-not-supported"
HOST_MISMATCH = "certificate-host-mismatch"
EXPIRED = "certificate-expired"
NOT_TRUSTED = "certificate-not-trusted"
VALIDATION_FAILURE = "validation-failure"

_ID = re.compile(r"^[A-Za-z0-9]{1,32}$")
_LABEL = re.compile(r"^(?!-)[a-z0-9-]{1,63}(?<!-)$")


class PolicyError(ValueError):
    """A TXT record or policy file that is not a valid MTA-STS one."""


@dataclass(frozen=True)
class Policy:
    """A parsed policy file, and its text (for the TLSRPT report's policy-string)."""

    mode: str
    mx: tuple[str, ...]
    max_age: int
    text: str = ""

    def matches(self, host: str) -> bool:
        """Whether the MX host name matches one of the policy's ``mx`` patterns."""
        return any(mx_matches(pattern, host) for pattern in self.mx)


@dataclass(frozen=True)
class Cached:
    """A policy in the cache: the TXT id it was fetched under, and when it expires."""

    policy: Policy
    txt_id: str
    expires: float


def parse_txt(records: list[str]) -> str | None:
    """The policy id of the ``_mta-sts`` TXT records, None when there is no STS record.

    Records not starting with ``v=STSv1`` are ignored (§3.1); more than one STS
    record, or one without a valid ``id``, is an error (treated as no record).
    """
    found = [r for r in records if r.replace(" ", "").startswith("v=STSv1;") or
             r.strip() == "v=STSv1"]
    if not found:
        return None
    if len(found) > 1:
        raise PolicyError("more than one v=STSv1 TXT record")
    fields: dict[str, str] = {}
    for part in found[0].split(";"):
        key, sep, value = part.strip().partition("=")
        if sep:
            fields.setdefault(key.strip(), value.strip())
    policy_id = fields.get("id", "")
    if not _ID.match(policy_id):
        raise PolicyError(f"bad or missing id in TXT record: {policy_id[:40]!r}")
    return policy_id


def parse_policy(text: str) -> Policy:
    """The policy file (§3.2); raises PolicyError when it is not a valid one."""
    if len(text.encode("utf-8", "replace")) > MAX_POLICY_BYTES:
        raise PolicyError("policy file larger than 64 KiB")
    fields: dict[str, str] = {}
    mx: list[str] = []
    for raw in text.replace("\r\n", "\n").split("\n"):
        key, sep, value = raw.partition(":")
        if not sep:
            continue
        key, value = key.strip(), value.strip()
        if key == "mx":
            mx.append(value.lower().rstrip("."))
        else:
            fields.setdefault(key, value)
    if fields.get("version") != "STSv1":
        raise PolicyError("version is not STSv1")
    mode = fields.get("mode", "")
    if mode not in MODES:
        raise PolicyError(f"bad mode {mode[:20]!r}")
    age = fields.get("max_age", "")
    if not age.isdigit() or len(age) > 10:
        raise PolicyError(f"bad max_age {age[:20]!r}")
    if mode != "none" and not mx:
        raise PolicyError("no mx pattern")
    return Policy(mode, tuple(mx), min(int(age), MAX_AGE_LIMIT), text)


def mx_matches(pattern: str, host: str) -> bool:
    """§4.1: the exact name, or ``*.`` and one leading label more (case-insensitive)."""
    host = host.lower().rstrip(".")
    pattern = pattern.lower().rstrip(".")
    if pattern.startswith("*."):
        label, dot, rest = host.partition(".")
        return bool(dot) and rest == pattern[2:] and bool(_LABEL.match(label))
    return host == pattern


def usable(cached: Cached | None, txt_id: str | None, now: float) -> bool:
    """Whether the cached policy serves without a fetch: unexpired and, when the domain
    publishes a TXT id, fetched under that id."""
    if cached is None or now >= cached.expires:
        return False
    return txt_id is None or txt_id == cached.txt_id


def result_type(text: str) -> str:
    """The RFC 8460 result type of a failed TLS requirement, from its reason text
    (relayd.delivery.tlslevels' texts, with OpenSSL's verification message)."""
    low = text.lower()
    if "does not offer starttls" in low:
        return STARTTLS_NOT_SUPPORTED
    if "hostname mismatch" in low or "not valid for" in low:
        return HOST_MISMATCH
    if "expired" in low:
        return EXPIRED
    if ("self-signed" in low or "self signed" in low or "unable to get local issuer" in low
            or "unknown ca" in low):
        return NOT_TRUSTED
    return VALIDATION_FAILURE
