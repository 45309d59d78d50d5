"""relayd's own asyncio SMTP load generator.

N concurrent sessions send M messages in total, K messages per connection, of a
given body size, optionally doing AUTH PLAIN on every connection.  For every
message it measures the accept latency: from writing the final "." of DATA to
reading the reply.  Prints one JSON object with the results.

    python -m bench.loadgen --target 127.0.0.1:2525 --sessions 50 --messages 20000 \
        --per-conn 1 --size 1024 [--auth-user U --auth-pass P | --auth-file F]

``--auth-file`` gives each connection a credential of its own (USER<TAB>PASSWORD
lines, taken in turn): with as many fresh accounts as connections, no login
finds relayd's credential cache warm (argon2 on every login).

Idle mode (memory per connection): open N sessions, EHLO (and AUTH), hold them
open for --hold seconds, then QUIT:

    python -m bench.loadgen --target 127.0.0.1:2525 --idle 1000 --hold 10

Counting rule: every message is either accepted (2xx after ".") or failed;
accepted + failed == messages unless the run hits --timeout.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import json
import os
import sys
import time
from collections import Counter
from typing import Any

try:
    import uvloop
except ImportError:  # plain asyncio still works, only slower
    uvloop = None  # type: ignore[assignment]


def _auth_plain(user: str, password: str) -> bytes:
    return b"AUTH PLAIN " + base64.b64encode(b"\0" + user.encode() + b"\0" + password.encode())


class SmtpError(Exception):
    def __init__(self, stage: str, code: int, text: str):
        super().__init__(f"{stage}: {code} {text}")
        self.stage, self.code, self.text = stage, code, text


def error_key(e: Exception) -> str:
    if isinstance(e, SmtpError):
        return f"{e.stage}:{e.code}"
    return f"connect:{type(e).__name__}"


def make_body(size: int) -> bytes:
    """``size`` bytes of body in 78-byte CRLF lines (no line starts with '.')."""
    line = (b"x" * 76) + b"\r\n"
    n, rest = divmod(size, len(line))
    body = line * n
    if rest:
        body += b"y" * max(rest - 2, 0) + b"\r\n"
    return body


class Conn:
    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter):
        self.r, self.w = reader, writer

    async def reply(self, stage: str, expect: int) -> str:
        lines = []
        while True:
            line = await self.r.readline()
            if not line:
                raise SmtpError(stage, 0, "connection closed")
            lines.append(line)
            if len(line) < 4 or line[3:4] != b"-":
                break
        code = int(lines[-1][:3])
        text = b"".join(lines).decode("utf-8", "replace").strip()
        if code // 100 != expect:
            raise SmtpError(stage, code, text)
        return text

    async def cmd(self, line: bytes, stage: str, expect: int) -> str:
        self.w.write(line + b"\r\n")
        return await self.reply(stage, expect)

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.w.close()


class LoadGen:
    def __init__(self, a: argparse.Namespace):
        self.a = a
        host, _, port = a.target.rpartition(":")
        self.host, self.port = host.strip("[]"), int(port)
        self.remaining = a.messages
        self.accepted = 0
        self.failed = 0
        self.connections = 0
        self.errors: Counter[str] = Counter()
        self.first_error: str | None = None
        self.latencies: list[float] = []
        self.body = make_body(a.size)
        self.seq = 0
        self.pid = os.getpid()
        self.auth = None
        if a.auth_user is not None:
            self.auth = _auth_plain(a.auth_user, a.auth_pass or "")
        # --auth-file: a credential of its own for each connection, in turn
        self.auths: list[bytes] = []
        if a.auth_file:
            with open(a.auth_file) as f:
                self.auths = [_auth_plain(*line.rstrip("\n").split("\t", 1))
                              for line in f if line.strip()]

    def note_error(self, key: str, msg: str) -> None:
        self.errors[key] += 1
        if self.first_error is None:
            self.first_error = msg

    async def open(self) -> Conn:
        reader, writer = await asyncio.open_connection(self.host, self.port, limit=1 << 20)
        c = Conn(reader, writer)
        self.connections += 1
        try:
            await c.reply("greeting", 2)
            await c.cmd(b"EHLO " + self.a.helo.encode(), "ehlo", 2)
            if self.auths:
                await c.cmd(self.auths[(self.connections - 1) % len(self.auths)], "auth", 2)
            elif self.auth is not None:
                await c.cmd(self.auth, "auth", 2)
        except BaseException:
            c.close()
            raise
        return c

    def message(self) -> bytes:
        self.seq += 1
        hdr = (
            f"From: <{self.a.mail_from}>\r\n"
            f"To: <{self.a.rcpt_to}>\r\n"
            f"Subject: bench {self.seq}\r\n"
            f"Message-ID: <{self.seq}.{self.pid}.{time.time_ns()}@loadgen.bench>\r\n"
            f"Date: {time.strftime('%a, %d %b %Y %H:%M:%S +0000', time.gmtime())}\r\n"
            "\r\n"
        ).encode()
        return hdr + self.body

    async def send_one(self, c: Conn) -> None:
        await c.cmd(b"MAIL FROM:<" + self.a.mail_from.encode() + b">", "mail", 2)
        await c.cmd(b"RCPT TO:<" + self.a.rcpt_to.encode() + b">", "rcpt", 2)
        await c.cmd(b"DATA", "data", 3)
        c.w.write(self.message())
        await c.w.drain()
        t0 = time.perf_counter()
        c.w.write(b".\r\n")
        await c.reply("dot", 2)
        self.latencies.append(time.perf_counter() - t0)

    async def worker(self) -> None:
        while self.remaining > 0:
            self.remaining -= 1  # claim the first message before connecting
            try:
                c = await self.open()
            except (SmtpError, OSError) as e:
                # the connection failed: the message it would have carried fails
                self.failed += 1
                self.note_error(error_key(e), str(e))
                await asyncio.sleep(0.05)
                continue
            sent_here = 0
            try:
                while True:
                    sent_here += 1
                    try:
                        await self.send_one(c)
                        self.accepted += 1
                    except SmtpError as e:
                        self.failed += 1
                        self.note_error(f"{e.stage}:{e.code}", str(e))
                        if e.code == 0 or e.code == 421:
                            raise
                        await c.cmd(b"RSET", "rset", 2)
                    if self.remaining <= 0 or sent_here >= self.a.per_conn:
                        break
                    self.remaining -= 1
                try:
                    await c.cmd(b"QUIT", "quit", 2)
                except (SmtpError, OSError):
                    pass
            except SmtpError:
                pass
            except OSError as e:
                self.failed += 1
                self.note_error(f"io:{type(e).__name__}", str(e))
            finally:
                c.close()

    async def run_load(self) -> dict[str, Any]:
        t0_mono = time.monotonic()  # CLOCK_MONOTONIC: comparable with the harness's clock
        t0 = time.perf_counter()
        tasks = [asyncio.create_task(self.worker()) for _ in range(self.a.sessions)]
        _done, pending = await asyncio.wait(tasks, timeout=self.a.timeout)
        for t in pending:
            t.cancel()
        timed_out = bool(pending)
        elapsed = time.perf_counter() - t0
        lat = sorted(self.latencies)

        def pct(q: float) -> float | None:
            if not lat:
                return None
            k = max(0, min(len(lat) - 1, int(q / 100.0 * len(lat) + 0.5) - 1))
            return round(lat[k] * 1000, 3)

        return {
            "mode": "load",
            "target": self.a.target,
            "sessions": self.a.sessions,
            "messages": self.a.messages,
            "per_conn": self.a.per_conn,
            "size": self.a.size,
            "auth": self.auth is not None or bool(self.auths),
            "accepted": self.accepted,
            "failed": self.failed,
            "connections": self.connections,
            "timed_out": timed_out,
            "elapsed_s": round(elapsed, 4),
            "t0_mono": t0_mono,
            "accepted_per_s": round(self.accepted / elapsed, 2) if elapsed > 0 else None,
            "latency_ms": {
                "p50": pct(50), "p90": pct(90), "p99": pct(99),
                "max": round(lat[-1] * 1000, 3) if lat else None,
                "mean": round(sum(lat) / len(lat) * 1000, 3) if lat else None,
            },
            "errors": dict(self.errors),
            "first_error": self.first_error,
        }

    async def run_idle(self) -> dict[str, Any]:
        n = self.a.idle
        conns: list[Conn] = []
        sem = asyncio.Semaphore(self.a.open_concurrency)
        t0 = time.perf_counter()

        async def one() -> None:
            async with sem:
                try:
                    conns.append(await self.open())
                except (SmtpError, OSError) as e:
                    self.note_error(error_key(e), str(e))

        await asyncio.wait_for(asyncio.gather(*(one() for _ in range(n))), self.a.timeout)
        opened = time.perf_counter() - t0
        sys.stderr.write(f"loadgen: idle-ready {len(conns)}\n")
        sys.stderr.flush()
        await asyncio.sleep(self.a.hold)
        # still alive after the hold? a NOOP on each tells
        alive = 0

        async def check(c: Conn) -> None:
            nonlocal alive
            try:
                await asyncio.wait_for(c.cmd(b"NOOP", "noop", 2), 10)
                alive += 1
                await asyncio.wait_for(c.cmd(b"QUIT", "quit", 2), 10)
            except (TimeoutError, SmtpError, OSError) as e:
                self.note_error(f"after-hold:{type(e).__name__}", str(e))
            finally:
                c.close()

        await asyncio.gather(*(check(c) for c in conns))
        return {
            "mode": "idle",
            "target": self.a.target,
            "requested": n,
            "opened": len(conns),
            "alive_after_hold": alive,
            "open_s": round(opened, 3),
            "hold_s": self.a.hold,
            "auth": self.auth is not None or bool(self.auths),
            "errors": dict(self.errors),
            "first_error": self.first_error,
        }


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description="asyncio SMTP load generator (JSON results)")
    ap.add_argument("--target", required=True, help="HOST:PORT")
    ap.add_argument("--sessions", type=int, default=50, help="concurrent sessions")
    ap.add_argument("--messages", type=int, default=1000, help="messages in total")
    ap.add_argument("--per-conn", type=int, default=1, help="messages per connection")
    ap.add_argument("--size", type=int, default=1024, help="body bytes per message")
    ap.add_argument("--from", dest="mail_from", default="sender@bench.example")
    ap.add_argument("--to", dest="rcpt_to", default="rcpt@dest.example")
    ap.add_argument("--helo", default="loadgen.bench.local")
    ap.add_argument("--auth-user")
    ap.add_argument("--auth-pass")
    ap.add_argument("--auth-file", help="USER<TAB>PASSWORD lines: one per connection, in turn")
    ap.add_argument("--idle", type=int, default=0, help="idle mode: open this many sessions")
    ap.add_argument("--hold", type=float, default=10.0, help="idle mode: seconds to hold")
    ap.add_argument("--open-concurrency", type=int, default=50)
    ap.add_argument("--timeout", type=float, default=600.0, help="give up after this many s")
    return ap.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    a = parse_args(argv)
    lg = LoadGen(a)
    coro = lg.run_idle() if a.idle else lg.run_load()
    result = uvloop.run(coro) if uvloop is not None else asyncio.run(coro)
    sys.stdout.write(json.dumps(result) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
