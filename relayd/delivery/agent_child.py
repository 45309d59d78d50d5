"""The child processes' program: a delivery agent, or the signing child.

Owns: the main of ``python -m relayd.delivery.agent_child --fd N --role R``,
started by relayd.delivery.agents with one end of a socketpair:

- ``--role deliver``: runs the transactions it is given (``Job``) through
  relayd.delivery.client's ``Pools`` on its own uvloop and answers one
  ``Result`` per job (one (code, text) per recipient, and the count of
  connections it opened). It reads a large message's spool file itself.
- ``--role sign``: keeps the DKIM keys it is sent (``SignKey``, dropped on
  ``ForgetKey``) and answers each ``Sign`` with ``Signed``; the waiting
  ``Sign`` frames are signed in slices of ``SIGN_SLICE``, the RSA operations
  back to back (``dkim.sign_many``). It holds no other account or domain
  state, and a key is never used after the main process stops asking for it.

A child ignores SIGTERM and SIGINT (the parent stops it in order with
``Close``: QUIT on pooled connections, then exit) and exits on end-of-file
when its parent is gone.

Untrusted input: replies of remote servers (handled by relayd.delivery.client);
frames come only from our own process.
Settings read: [delivery], sent by the parent in ``Configure``.
See also: relayd.delivery.agents (the parent side), relayd.delivery.wire.
"""

from __future__ import annotations

import asyncio
import signal
import socket
import sys

from relayd.delivery.client import BodyFile, Hop, Pools
from relayd.delivery.wire import (
    Close,
    Configure,
    ForgetKey,
    Framed,
    Job,
    Result,
    Sign,
    Signed,
    SignKey,
    ToAgent,
    ToSigner,
)
from relayd.dkim import signature as dkim

#: Signatures made back to back before the child's loop turns again. Large
#: enough that a normal burst (one per waiting SMTP session of the parent) is
#: one batch: smaller slices cost more CPU per signature (bench/NOTES.md).
SIGN_SLICE = 64


class _Child(Framed):
    """What both roles share: stop on ``Close`` or end-of-file."""

    def __init__(self, decode_type: object) -> None:
        super().__init__(decode_type)
        self.closing = asyncio.get_running_loop().create_future()

    def close_requested(self) -> None:
        if not self.closing.done():
            self.closing.set_result(None)

    async def finish(self) -> None:
        """After ``Close`` or end-of-file: end what runs, then close the socket."""
        if self.transport is not None:
            self.transport.close()


class DeliverSide(_Child):
    """A delivery agent: ``Configure``, ``Job`` -> ``Result``, ``Close``."""

    def __init__(self) -> None:
        super().__init__(ToAgent)
        self.pools: Pools | None = None
        self.jobs: set[asyncio.Task[None]] = set()

    def tail_size(self, frame: object) -> int:
        return frame.size if isinstance(frame, Job) and not frame.path else 0

    def frame_received(self, frame: object, tail: bytes) -> None:
        if isinstance(frame, Job):
            task = asyncio.get_running_loop().create_task(self._run(frame, tail))
            self.jobs.add(task)
            task.add_done_callback(self.jobs.discard)
        elif isinstance(frame, Configure):
            if self.pools is None:
                self.pools = Pools(frame.cfg, frame.helo)
            else:
                self.pools.cfg = frame.cfg
        elif isinstance(frame, Close):
            self.close_requested()

    async def _run(self, job: Job, data: bytes) -> None:
        assert self.pools is not None
        hop = Hop(job.host, job.port, job.tls, job.username, job.password, job.mx,
                  job.per_connection, job.tlsa)
        at_rcpt: list[int] = []
        tls = ""
        try:
            body: bytes | BodyFile = BodyFile(job.path, job.size) if job.path else data
            got = await self.pools.send(hop, job.sender, job.rcpts, body)
            replies = [(r.code, r.text) for r in got]
            at_rcpt = [i for i, r in enumerate(got) if r.at_rcpt]
            tls = got[0].tls if got else ""
        except Exception as exc:  # a bug must not leave the job unanswered
            replies = [(None, f"delivery agent error: {type(exc).__name__}")] * len(job.rcpts)
        self.send(Result(job.id, replies, self.pools.connections_opened, at_rcpt, tls))

    async def finish(self) -> None:
        for task in list(self.jobs):
            task.cancel()
        await asyncio.gather(*self.jobs, return_exceptions=True)
        if self.pools is not None:
            await self.pools.close()
        await super().finish()


class SignSide(_Child):
    """The signing child: ``SignKey``, ``Sign`` -> ``Signed``, ``ForgetKey``, ``Close``."""

    def __init__(self) -> None:
        super().__init__(ToSigner)
        self.signers: dict[int, dkim.Signer] = {}  # key id -> signer (SignKey frames)
        self._to_sign: list[tuple[Sign, bytes]] = []  # Sign frames not signed yet

    def tail_size(self, frame: object) -> int:
        return frame.size if isinstance(frame, Sign) else 0

    def frame_received(self, frame: object, tail: bytes) -> None:
        if isinstance(frame, Sign):
            if not self._to_sign:
                asyncio.get_running_loop().call_soon(self._sign_batch)
            self._to_sign.append((frame, tail))
        elif isinstance(frame, SignKey):
            self._add_key(frame)
        elif isinstance(frame, ForgetKey):
            self.signers.pop(frame.key_id, None)
        elif isinstance(frame, Close):
            self.close_requested()

    def _add_key(self, key: SignKey) -> None:
        """Load a key (it comes just before its first use); a bad one fails its Sign jobs."""
        try:
            self.signers[key.key_id] = dkim.Signer(key.domain, key.selector, key.pem)
        except Exception:  # noqa: S110 - its Sign jobs then fail (KeyError): the session says 451
            pass

    def _sign_batch(self) -> None:
        """Sign the waiting ``Sign`` frames, at most SIGN_SLICE of them back to back.

        Each is one RSA operation, well under a millisecond; the rest wait for
        the next loop turn, so new frames are read between slices.
        """
        batch, self._to_sign = self._to_sign[:SIGN_SLICE], self._to_sign[SIGN_SLICE:]
        if self._to_sign:
            asyncio.get_running_loop().call_soon(self._sign_batch)
        jobs: list[dkim.SignJob] = []
        answers: list[tuple[int, str]] = []  # (job id, error before signing)
        for job, data in batch:
            try:
                jobs.append(([self.signers[key_id] for key_id in job.keys], data, job.now))
                answers.append((job.id, ""))
            except KeyError as exc:  # a key that did not load: the session says 451
                answers.append((job.id, f"unknown DKIM key {exc}"))
        results = iter(dkim.sign_many(jobs, crlf_only=True))
        for job_id, error in answers:  # answered, never left hanging
            if not error:
                out = next(results)
                if isinstance(out, bytes):
                    self.send(Signed(job_id, out))
                    continue
                error = f"{type(out).__name__}: {out}"
            self.send(Signed(job_id, b"", error))


async def _serve(fd: int, role: str) -> None:
    loop = asyncio.get_running_loop()
    sock = socket.socket(fileno=fd)
    side_type = SignSide if role == "sign" else DeliverSide
    _t, side = await loop.create_unix_connection(side_type, sock=sock)
    await asyncio.wait([side.lost, side.closing], return_when=asyncio.FIRST_COMPLETED)
    await side.finish()


USAGE = "usage: python -m relayd.delivery.agent_child --fd N --role deliver|sign"


def main(argv: list[str] | None = None) -> int:
    """Entry point of a child: ``python -m relayd.delivery.agent_child --fd N --role R``.

    The role (``deliver`` or ``sign``) also names the child in its command
    line (ps, bench).
    """
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 4 or args[0] != "--fd" or not args[1].isdigit() or args[2] != "--role" \
            or args[3] not in ("deliver", "sign"):
        print(USAGE, file=sys.stderr)
        return 2
    # The parent decides when we stop (Close, or end-of-file when it is gone).
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    import uvloop

    uvloop.run(_serve(int(args[1]), args[3]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
