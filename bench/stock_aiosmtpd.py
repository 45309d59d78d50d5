"""Peer: a stock aiosmtpd 1.4.6 server under uvloop that does no work.

The handler answers 250 to DATA and keeps nothing; AUTH PLAIN/LOGIN is offered
without TLS and accepts any credentials.  It is the floor of what any
aiosmtpd-based server can cost: relayd/stock shows what relayd's own work costs.

    python -m bench.stock_aiosmtpd --listen 127.0.0.1:2525

On SIGTERM/SIGINT it prints ``{"messages": N, "connections": N}`` to stdout and exits.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import signal
import sys
import warnings
from typing import Any

import uvloop
from aiosmtpd.smtp import SMTP, AuthResult, Envelope, Session


class NullHandler:
    def __init__(self) -> None:
        self.messages = 0

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        self.messages += 1
        return "250 2.0.0 Ok: queued"


def accept_any(server: SMTP, session: Session, envelope: Envelope, mechanism: str,
               auth_data: Any) -> AuthResult:
    return AuthResult(success=True)


async def serve(host: str, port: int, hostname: str) -> dict[str, int]:
    handler = NullHandler()
    conns = 0

    def factory() -> SMTP:
        nonlocal conns
        conns += 1
        return SMTP(handler, hostname=hostname, ident="stock-aiosmtpd",
                    authenticator=accept_any, auth_require_tls=False,
                    data_size_limit=64 * 1024 * 1024, enable_SMTPUTF8=True)

    loop = asyncio.get_running_loop()
    server = await loop.create_server(factory, host=host, port=port, backlog=1024)
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    server.close()
    return {"messages": handler.messages, "connections": conns}


def main(argv: list[str] | None = None) -> int:
    warnings.simplefilter("ignore")  # aiosmtpd's own login_data DeprecationWarning
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--listen", default="127.0.0.1:2525", help="HOST:PORT")
    ap.add_argument("--hostname", default="stock.bench.local")
    a = ap.parse_args(argv)
    host, _, port = a.listen.rpartition(":")
    result = uvloop.run(serve(host.strip("[]"), int(port), a.hostname))
    sys.stdout.write(json.dumps(result) + "\n")
    sys.stdout.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main())
