"""DKIM signing at acceptance, off the event loop.

Owns: where accepted messages are signed, and the choice of which domain's
signers apply (the account's domain; none once the domain is deleted).
Signing happens before the spool commit, so what is queued is exactly what
is delivered.

Where: in the signing child (``remote``: relayd.delivery.agents
``AgentPool.sign``), its own interpreter, so the RSA work and the Python
around it never wait for this process's GIL (a signing thread here waits for
the busy loop thread at every return to Python). That is the one path. The
documented fallback, for the time the child does not run (starting,
restarting; a ``Sign`` it never answered fails with SigningUnavailable), is a
local signing thread: a job queued for it and, per batch of jobs a thread
took at once, one wake-up of the loop (``call_soon_threadsafe``) that
resolves all their futures. A session never fails for want of a signer.

Settings read: [dkim] (through the signers built by relayd.controlplane.domains).
See also: relayd.dkim.signature (the pure signer), relayd.smtp.server (calls ``sign``).
"""

from __future__ import annotations

import asyncio
import os
import queue
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any, Protocol

from relayd.delivery.agents import SigningUnavailable
from relayd.directory.accounts import Account
from relayd.dkim import signature as dkim

#: Jobs one thread takes at once (each is one RSA operation).
_BATCH_MAX = 16

class RemoteSigner(Protocol):
    """Signs in another process (relayd.delivery.agents.AgentPool: the signing child)."""

    def sign(self, signers: Sequence[dkim.Signer], data: bytes,
             now: int) -> asyncio.Future[bytes] | None: ...


_Job = tuple[asyncio.AbstractEventLoop, "asyncio.Future[bytes]", list[Any], bytes, int]
_Result = tuple["asyncio.Future[bytes]", bytes | Exception]


class DkimSigning:
    """Prepends DKIM-Signature header(s) for the account's domain."""

    def __init__(self, threads: int | None = None,  # the fallback's threads
                 clock: Callable[[], float] = time.time,
                 remote: RemoteSigner | None = None) -> None:
        self._clock = clock
        self._remote = remote
        self._jobs: queue.SimpleQueue[_Job | None] = queue.SimpleQueue()
        # One core is the event loop's: a second signing thread on two cores only
        # fights the loop for the GIL (bench/NOTES.md).
        self._nthreads = threads if threads is not None else max(1, (os.cpu_count() or 2) - 1)
        self._threads: list[threading.Thread] = []
        self._closed = False

    async def sign(self, account: Account, data: bytes) -> bytes:
        """``data`` with the domain's signature header(s) prepended (unchanged if no key).

        ``data`` is a message as relayd.smtp.server accepts it: CRLF line endings only.
        """
        signers = account.domain.signers
        if not signers:
            return data
        if self._closed:
            raise RuntimeError("DKIM signing is stopped")
        if self._remote is not None:
            remote = self._remote.sign(signers, data, int(self._clock()))
            if remote is not None:
                try:
                    return await remote + data
                except SigningUnavailable:
                    pass  # the process died before answering: sign here instead
        if not self._threads:
            self._start()
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[bytes] = loop.create_future()
        self._jobs.put((loop, fut, list(signers), data, int(self._clock())))
        headers = await fut
        return headers + data

    def _start(self) -> None:
        for n in range(self._nthreads):
            t = threading.Thread(target=self._work, name=f"dkim_{n}", daemon=True)
            t.start()
            self._threads.append(t)

    def _work(self) -> None:
        """A signing thread: take every waiting job (up to _BATCH_MAX), sign, post results."""
        jobs = self._jobs
        while True:
            job = jobs.get()
            if job is None:
                return
            batch = [job]
            while len(batch) < _BATCH_MAX:
                try:
                    more = jobs.get_nowait()
                except queue.Empty:
                    break
                if more is None:
                    jobs.put(None)  # for this thread's next turn: finish the batch first
                    break
                batch.append(more)
            # An exception is handed to its session (logged there, 451).
            outs = dkim.sign_many([(signers, data, now) for _l, _f, signers, data, now in batch],
                                  crlf_only=True)
            done: dict[asyncio.AbstractEventLoop, list[_Result]] = {}
            for (loop, fut, *_), out in zip(batch, outs, strict=True):
                done.setdefault(loop, []).append((fut, out))
            for loop, results in done.items():
                try:
                    loop.call_soon_threadsafe(_resolve, results)
                except RuntimeError:
                    pass  # the loop is closed: nobody waits for these any more

    def close(self) -> None:
        """Stop the signing threads (jobs not yet taken are cancelled)."""
        self._closed = True
        while True:
            try:
                job = self._jobs.get_nowait()
            except queue.Empty:
                break
            if job is not None and not job[1].done():
                job[1].cancel()
        for _ in self._threads:
            self._jobs.put(None)


def _resolve(results: list[_Result]) -> None:
    """On the loop: hand each signing result to its session."""
    for fut, out in results:
        if fut.done():
            continue  # the session went away (cancelled)
        if isinstance(out, Exception):
            fut.set_exception(out)
        else:
            fut.set_result(out)
