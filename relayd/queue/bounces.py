"""Bounces: a delivery status notification queued for a message's failed recipients.

Owns: turning the failed results of one attempt into a DSN addressed to the
message's envelope sender (relayd.delivery.dsn builds the bytes) and putting
it in the spool as a new message with the null sender, handed to the send
queue at its commit. No DSN for the null sender or for a bounce
(``dsn.should_bounce``). The enhanced status of each failure is the one at the
start of the reply text, else the class of its code (``5.0.0`` when there is
neither). A remote server's reply is reported as ``smtp;`` with its code; a
verdict of relayd's own (``failure_of``) as ``X-Relayd;``.

The dispatcher (relayd.queue.dispatch) calls it (``on_failed``) before the
results are committed, so a crash in between repeats the attempt and never
loses the bounce; whether bounces are sent at all is ``[delivery] bounces``,
the scheduler's call (``Scheduler.reconfigure``).

Untrusted input: the remote reply texts and the original headers (cleaned by
relayd.delivery.dsn). Settings read: none directly; the caller passes
``[server] hostname`` (reporting MTA and postmaster).
See also: relayd.delivery.dsn, relayd.queue.dispatch, relayd.store.spool.
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable

from relayd.delivery import dsn
from relayd.queue import backoff
from relayd.queue.sendqueue import QMsg
from relayd.store.spool import AttemptResult, NewMessage, Spool

_STATUS = re.compile(r"\s*([245]\.\d{1,3}\.\d{1,3})")


def failure_of(r: AttemptResult) -> dsn.Failure:
    """A failed result as the DSN reports it: a remote server's reply keeps ``smtp;``
    and its code; relayd's own verdict (no next hop, no reply code, or the queue
    lifetime ran out) is of relayd's own diagnostic type, without a reply code."""
    remote = r.next_hop if r.next_hop != "-" else None
    if remote is not None and r.code is not None and not r.text.endswith(backoff.GAVE_UP):
        return dsn.Failure(r.recipient, status_of(r), f"{r.code} {r.text}".strip(), remote)
    return dsn.Failure(r.recipient, status_of(r), r.text.strip() or "failed", remote,
                       diagnostic_type=dsn.OWN_DIAGNOSTIC)


def status_of(r: AttemptResult) -> str:
    """The enhanced status of a failed result: from its text, else from its code."""
    m = _STATUS.match(r.text)
    if m:
        return m.group(1)
    if r.code is not None and 400 <= r.code < 600:
        return f"{r.code // 100}.0.0"
    return "5.0.0"


class Bounces:
    """Queues the DSN for a failed message (the scheduler's ``on_failed``)."""

    def __init__(self, spool: Spool, hostname: str,
                 enqueue: Callable[[NewMessage], None],
                 clock: Callable[[], float] = time.time) -> None:
        self.spool = spool
        self.hostname = hostname
        self.enqueue = enqueue  # the send queue's, called at the bounce's commit
        self.clock = clock

    async def __call__(self, msg: QMsg, failed: list[AttemptResult]) -> None:
        """Queue a delivery status notification to the sender of a failed message."""
        if not dsn.should_bounce(msg.sender, msg.is_bounce):
            return
        data = msg.data if msg.data is not None else await self.spool.load_data(msg.id) or b""
        head, _, _ = data.partition(b"\r\n\r\n")
        now = self.clock()
        new_id = self.spool.ids.next()
        body = dsn.build_dsn(
            reporting_mta=self.hostname,
            postmaster=f"postmaster@{self.hostname}",
            original_sender=msg.sender, original_message_id=f"{msg.id:016X}",
            original_headers=head + b"\r\n",
            failures=[failure_of(r) for r in failed],
            now=now, dsn_message_id=f"{new_id:016X}@{self.hostname}",
            received_at=msg.received_at,
        )
        bounce = NewMessage(id=new_id, account_id=msg.account_id, username=msg.username,
                            domain=msg.domain, sender="", recipients=[msg.sender], data=body,
                            received_at=now, is_bounce=True)
        # Handed over at the commit itself, even if this task is cancelled meanwhile.
        await self.spool.accept(bounce, then=self.enqueue)
