"""Why a next hop failed: the kind of a connection or greeting failure, from its reply text.

Owns: ``kind(text)``, the bounded reason of a failed hop (a metric label and the
``reason`` of the ``mx_hop_failed`` log line), and ``HOP_FAILURE_KINDS``, every
value it returns. A hop fails when a recipient got no reply code from it
(``RcptReply.code`` None: relayd.delivery.client): the connection was refused
or timed out, the greeting was not 220, EHLO/HELO was refused, a TLS level
could not be met or the connection was lost. The text is what the delivery
agent made of the exception (``"SMTPConnectResponseError: (421, '...')"``):
its class name first, which is relayd's own (relayd.delivery.connection), so
the kind never depends on a remote server's words beyond its reply code.

Pure: no I/O, no settings.
See also: relayd.queue.destinations (finds the failed hops), relayd.observe.hops
(logs and counts them), relayd.delivery.connection (the exceptions).
"""

from __future__ import annotations

import re

#: Every kind ``kind`` returns (the ``reason`` label of ``relayd_mx_hop_failures_total``).
HOP_FAILURE_KINDS: tuple[str, ...] = (
    "refused", "unreachable", "timeout", "greeting_4xx", "greeting_5xx", "helo_refused",
    "tls", "lost", "other",
)

_GREETING = re.compile(r"SMTPConnectResponseError: \((\d)\d\d\b")
_UNREACHABLE = ("Errno 101", "Errno 113", "unreachable")


def kind(text: str) -> str:
    """The kind of a hop failure from the text of its recipients' reply (code None)."""
    name, _, rest = text.partition(":")
    if name in ("SMTPConnectTimeoutError", "TimeoutError"):
        return "timeout"
    if name == "SMTPConnectResponseError":
        m = _GREETING.match(text)
        if m is not None and m.group(1) in "45":
            return f"greeting_{m.group(1)}xx"
        return "other"
    if name == "SMTPHeloError":
        return "helo_refused"
    if name in ("SMTPTLSRequired", "SMTPStartTLSFailed", "SSLError") or "SSL" in name:
        return "tls"
    if name == "SMTPServerDisconnected":
        return "lost"
    if name == "SMTPConnectError":
        if "Errno 111" in rest or "refused" in rest.lower():
            return "refused"
        if any(u in rest for u in _UNREACHABLE):
            return "unreachable"
        if "SSL" in rest or "TLS" in rest:
            return "tls"
        return "lost"  # closed before or during the greeting
    if name in ("ConnectionRefusedError",):
        return "refused"
    if name in ("ConnectionResetError", "BrokenPipeError"):
        return "lost"
    return "other"
