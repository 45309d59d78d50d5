"""A minimal Dovecot-auth-protocol server so the Postfix peer can do AUTH PLAIN.

Postfix has no SASL backend of its own: it asks Cyrus or Dovecot.  Neither
saslpasswd2 nor dovecot is installed on the bench machine, so this stub speaks
the client side of Dovecot's auth protocol (the one Postfix uses with
``smtpd_sasl_type = dovecot``) on a UNIX socket and checks PLAIN/LOGIN
credentials against one username/password held in memory.  Its CPU and memory
are counted with Postfix's.

    python -m bench.dovecot_auth_stub --socket /tmp/x/auth --user U --password P
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import binascii
import os
import secrets
import signal
import sys

try:
    import uvloop
except ImportError:
    uvloop = None  # type: ignore[assignment]


class Stub:
    def __init__(self, user: str, password: str):
        self.user = user.encode()
        self.password = password.encode()
        self.cuid = 0
        self.ok = 0
        self.fail = 0

    def check(self, mech: str, first: bytes | None, second: bytes | None) -> tuple[bool, bytes]:
        if mech == "PLAIN" and first is not None:
            parts = first.split(b"\0")
            if len(parts) != 3:
                return False, b""
            _authz, authc, pw = parts
            return (authc == self.user and secrets.compare_digest(pw, self.password)), authc
        if mech == "LOGIN" and first is not None and second is not None:
            return (first == self.user and secrets.compare_digest(second, self.password)), first
        return False, b""

    async def handle(self, r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        self.cuid += 1
        w.write(
            b"VERSION\t1\t2\nMECH\tPLAIN\tplaintext\nMECH\tLOGIN\tplaintext\n"
            + f"SPID\t{os.getpid()}\nCUID\t{self.cuid}\nCOOKIE\t{secrets.token_hex(16)}\n".encode()
            + b"DONE\n"
        )
        pending: dict[bytes, tuple[str, list[bytes]]] = {}
        try:
            while True:
                line = await r.readline()
                if not line:
                    break
                f = line.rstrip(b"\n").split(b"\t")
                if f[0] == b"AUTH" and len(f) >= 3:
                    rid, mech = f[1], f[2].decode().upper()
                    resp = None
                    for arg in f[3:]:
                        if arg.startswith(b"resp="):
                            resp = arg[5:]
                    got: list[bytes] = []
                    if resp is not None:
                        try:
                            got.append(base64.b64decode(resp))
                        except (binascii.Error, ValueError):
                            w.write(b"FAIL\t" + rid + b"\n")
                            continue
                    pending[rid] = (mech, got)
                elif f[0] == b"CONT" and len(f) >= 3 and f[1] in pending:
                    rid = f[1]
                    try:
                        pending[rid][1].append(base64.b64decode(f[2]))
                    except (binascii.Error, ValueError):
                        pending.pop(rid)
                        w.write(b"FAIL\t" + rid + b"\n")
                        continue
                else:
                    continue  # VERSION, CPID, ...
                mech, got = pending[rid]
                need = 2 if mech == "LOGIN" else 1
                if mech not in ("PLAIN", "LOGIN"):
                    pending.pop(rid)
                    w.write(b"FAIL\t" + rid + b"\treason=unsupported mechanism\n")
                elif len(got) < need:
                    prompt = b"Username:" if (mech == "LOGIN" and not got) else (
                        b"Password:" if mech == "LOGIN" else b"")
                    w.write(b"CONT\t" + rid + b"\t" + base64.b64encode(prompt) + b"\n")
                else:
                    pending.pop(rid)
                    ok, who = self.check(mech, got[0], got[1] if len(got) > 1 else None)
                    if ok:
                        self.ok += 1
                        w.write(b"OK\t" + rid + b"\tuser=" + who + b"\n")
                    else:
                        self.fail += 1
                        w.write(b"FAIL\t" + rid + b"\tuser=" + who + b"\n")
                await w.drain()
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            w.close()


async def serve(path: str, user: str, password: str) -> None:
    stub = Stub(user, password)
    if os.path.exists(path):
        os.unlink(path)
    server = await asyncio.start_unix_server(stub.handle, path=path)
    os.chmod(path, 0o666)  # noqa: S103 - Postfix's smtpd runs as the postfix user
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    server.close()
    sys.stdout.write(f'{{"auth_ok": {stub.ok}, "auth_fail": {stub.fail}}}\n')


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--socket", required=True)
    ap.add_argument("--user", required=True)
    ap.add_argument("--password", required=True)
    a = ap.parse_args(argv)
    coro = serve(a.socket, a.user, a.password)
    if uvloop is not None:
        uvloop.run(coro)
    else:
        asyncio.run(coro)
    return 0


if __name__ == "__main__":
    sys.exit(main())
