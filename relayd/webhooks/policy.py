"""The pure rules of webhooks: which URL is one, how an event is signed, when to retry.

Owns: :func:`check_url` (http or https, a host, no credentials or fragment, at most
2048 characters), :func:`new_secret`, :func:`signature_header` — the value of
``X-Relayd-Signature``, ``t=UNIX,v1=HEX`` where HEX is HMAC-SHA256 with the domain's
secret (its UTF-8 bytes) over ``f"{t}.{body}"`` (SEMANTICS §5: how an application
verifies it and refuses replays) — and :func:`retry_delay` (doubling from the
first delay up to the longest, with jitter drawn from the ``rng`` passed in).

Pure: no I/O, the clock and randomness are passed in. Untrusted input: the URL an
operator gives. See also: relayd.webhooks.poster, relayd.controlplane.hooks.
"""

from __future__ import annotations

import hashlib
import hmac
import random
import secrets
from urllib.parse import urlsplit

SIGNATURE_HEADER = "X-Relayd-Signature"
MAX_URL = 2048


def check_url(url: str) -> str | None:
    """What is wrong with ``url`` as a webhook (None: nothing)."""
    if len(url) > MAX_URL:
        return f"longer than {MAX_URL} characters"
    if any(c.isspace() or ord(c) < 32 for c in url):
        return "contains white space or control characters"
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018 - raises on a bad port
    except ValueError as exc:
        return f"not a URL ({exc})"
    if parts.scheme not in ("http", "https"):
        return "must start with http:// or https://"
    if not parts.hostname:
        return "has no host"
    if parts.username is not None or parts.password is not None:
        return "must not carry credentials (the signature authenticates relayd)"
    if parts.fragment:
        return "must not have a #fragment"
    return None


def new_secret() -> str:
    """A new signing secret (shown once to the operator)."""
    return "whsec_" + secrets.token_hex(32)


def signature(secret: str, timestamp: int, body: bytes) -> str:
    """HMAC-SHA256 of ``f"{timestamp}.{body}"`` with ``secret``, in hex."""
    return hmac.new(secret.encode("utf-8"), str(timestamp).encode("ascii") + b"." + body,
                    hashlib.sha256).hexdigest()


def signature_header(secret: str, timestamp: int, body: bytes) -> str:
    """The ``X-Relayd-Signature`` value of a post made at ``timestamp`` (POSIX seconds)."""
    return f"t={timestamp},v1={signature(secret, timestamp, body)}"


def verify(secret: str, header: str, body: bytes, now: float, tolerance: float = 300.0) -> bool:
    """What an application does: the header's signature matches and its time is within
    ``tolerance`` seconds of ``now`` (a replayed old post is refused)."""
    fields = dict(p.split("=", 1) for p in header.split(",") if "=" in p)
    try:
        t = int(fields["t"])
    except (KeyError, ValueError):
        return False
    if abs(now - t) > tolerance:
        return False
    return hmac.compare_digest(fields.get("v1", ""), signature(secret, t, body))


def retry_delay(failures: int, first: float, longest: float, rng: random.Random) -> float:
    """Seconds until the next post of an event that failed ``failures`` times (≥ 1):
    ``first`` doubled per failure, at most ``longest``, minus up to 20 % jitter."""
    base = min(longest, first * 2.0 ** min(failures - 1, 40))
    return base * (1.0 - 0.2 * rng.random())
