"""DKIM signing at acceptance, off the event loop.

Owns: the thread pool in which relayd.dkim signs accepted messages, and the
choice of which domain's signers apply (the account's domain; none once the
domain is deleted). Signing happens before the spool commit, so what is
queued is exactly what is delivered.

Interface cost: one thread-pool round trip per message (the RSA operation
releases the GIL inside OpenSSL, so both cores are used).
Settings read: [dkim] (through the signers built by relayd.lifecycle).
See also: relayd.dkim (the pure signer), relayd.smtp (calls ``sign``).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

from relayd import dkim
from relayd.accounts import Account


class DkimSigning:
    """Prepends DKIM-Signature header(s) for the account's domain."""

    def __init__(self, threads: int = 2, clock: Callable[[], float] = time.time) -> None:
        self._pool = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="dkim")
        self._clock = clock

    async def sign(self, account: Account, data: bytes) -> bytes:
        """``data`` with the domain's signature header(s) prepended (unchanged if no key)."""
        signers = account.domain.signers
        if not signers:
            return data
        now = int(self._clock())
        headers = await asyncio.get_running_loop().run_in_executor(
            self._pool, dkim.signature_headers, list(signers), data, now
        )
        return headers + data

    def close(self) -> None:
        """Stop the signing threads."""
        self._pool.shutdown(wait=False, cancel_futures=True)
