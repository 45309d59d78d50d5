"""Fetching an MTA-STS policy file: one HTTPS GET, as RFC 8461 §3.3 asks.

Owns: ``GET https://mta-sts.<domain>/.well-known/mta-sts.txt`` over an address
given by the caller (relayd's own resolver and destination policy chose it),
with a certificate valid for ``mta-sts.<domain>`` from the configured trust
store, no redirect followed (any status but 200 is a failure), media type
``text/plain`` required, the body capped at 64 KiB, and the whole exchange
bounded by a timeout. Failures raise ``FetchError`` carrying the RFC 8460
result type: ``sts-webpki-invalid`` for a certificate that does not verify,
``sts-policy-fetch-error`` for everything else.

Why a minimal HTTP/1.0 GET over asyncio streams and not urllib.request in a
thread: the connection must go to the address relayd's resolver returned
(``[delivery] dns_nameservers``, ``mx_allow_private`` / ``mx_allowed_networks``)
while the certificate is checked against the policy host's name; urllib
resolves the name itself through the system. HTTP/1.0 with
``Connection: close`` means no chunked body and no keep-alive to handle: the
body is what the server sends until it closes (or ``Content-Length`` of it).
aiohttp is the control plane's adapter only.

Untrusted input: everything the web server sends (status line, headers and
body are bounded). Settings read: none (relayd.delivery.sts passes the trust
store, port and timeout).
See also: relayd.delivery.sts (the caller), relayd.delivery.mtasts (parses the body).
"""

from __future__ import annotations

import asyncio
import ssl

from relayd.delivery.connection import level_context
from relayd.delivery.mtasts import FETCH_ERROR, MAX_POLICY_BYTES, WEBPKI_INVALID

_MAX_HEAD = 16 * 1024  # status line and headers
PATH = "/.well-known/mta-sts.txt"


class FetchError(Exception):
    """The policy could not be fetched; ``result_type`` is its RFC 8460 result type."""

    def __init__(self, text: str, result_type: str = FETCH_ERROR) -> None:
        super().__init__(text)
        self.result_type = result_type


async def fetch(host: str, address: str, port: int, ca_file: str, seconds: float) -> str:
    """The policy file's text from ``https://host:port/.well-known/mta-sts.txt``, connecting
    to ``address``; raises FetchError."""
    try:
        return await asyncio.wait_for(_fetch(host, address, port, ca_file), seconds)
    except TimeoutError:
        raise FetchError(f"fetching the policy from {host} timed out") from None
    except ssl.SSLCertVerificationError as exc:
        raise FetchError(f"certificate of {host} not valid: {exc.verify_message}",
                         WEBPKI_INVALID) from None
    except (OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError) as exc:
        raise FetchError(f"fetching the policy from {host}: {type(exc).__name__}: {exc}"
                         ) from None


async def _fetch(host: str, address: str, port: int, ca_file: str) -> str:
    ctx = await asyncio.to_thread(level_context, True, ca_file)
    reader, writer = await asyncio.open_connection(
        address, port, ssl=ctx, server_hostname=host, limit=_MAX_HEAD)
    try:
        writer.write(f"GET {PATH} HTTP/1.0\r\nHost: {host}\r\nUser-Agent: relayd\r\n"
                     "Accept: text/plain\r\nConnection: close\r\n\r\n".encode("ascii"))
        await writer.drain()
        head = await reader.readuntil(b"\r\n\r\n")
        status, headers = _head(head)
        if status != 200:
            raise FetchError(f"{host} answered HTTP {status} (redirects are not followed)")
        ctype = headers.get("content-type", "").split(";")[0].strip().lower()
        if ctype != "text/plain":
            raise FetchError(f"{host} sent media type {ctype[:60]!r}, not text/plain")
        if headers.get("transfer-encoding", "identity").lower() != "identity":
            raise FetchError(f"{host} sent a transfer encoding (HTTP/1.0 asked)")
        body = await reader.read(MAX_POLICY_BYTES + 1)
        while len(body) <= MAX_POLICY_BYTES:
            more = await reader.read(MAX_POLICY_BYTES + 1 - len(body))
            if not more:
                break
            body += more
        if len(body) > MAX_POLICY_BYTES:
            raise FetchError(f"the policy from {host} is larger than 64 KiB")
        length = headers.get("content-length")
        if length is not None and length.isdigit() and int(length) < len(body):
            body = body[: int(length)]
        return body.decode("utf-8", "replace")
    finally:
        writer.close()


def _head(head: bytes) -> tuple[int, dict[str, str]]:
    """The status code and the headers (lower-case names) of a response head."""
    lines = head.decode("latin-1").split("\r\n")
    parts = lines[0].split(" ", 2)
    if len(parts) < 2 or not parts[0].startswith("HTTP/") or not parts[1].isdigit():
        raise FetchError(f"not an HTTP response: {lines[0][:60]!r}")
    headers: dict[str, str] = {}
    for line in lines[1:]:
        name, sep, value = line.partition(":")
        if sep:
            headers.setdefault(name.strip().lower(), value.strip())
    return int(parts[1]), headers
