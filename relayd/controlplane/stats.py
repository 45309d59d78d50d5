"""What every node counts about an account and writes now and then: its last connection
and, in cluster mode, its delivered total.

Owns: the batched write of changed last-connection times (SEMANTICS §3) and, in cluster
mode, each node adding its own deliveries to the shared total and reading back the
merged totals and latest connections before an answer shows them (SEMANTICS §7).

Untrusted input: none. Settings read: none.
See also: relayd.controlplane.accounts (the answers that show them), relayd.app (the
housekeeping loop that calls the flush).
"""

from __future__ import annotations

from relayd.controlplane.changes import Shared, agree
from relayd.directory.accounts import DELETED


async def flush_last_connections(s: Shared) -> int:
    """Write changed last-connection times in one statement batch; return how many.
    In cluster mode, also add what this node delivered since to the shared totals."""
    if s.cluster is not None:
        await _flush_totals(s)
    flushed = s.flushed
    changed = [(a.last_connection, a.id) for a in s.directory.accounts_by_id.values()
               if a.status != DELETED and a.last_connection != flushed.get(a.id)]
    if not changed:
        return 0

    def written(_: None) -> None:
        for ts, acct_id in changed:
            flushed[acct_id] = ts

    await agree(s.store.save_last_connections(changed), apply=written)
    return len(changed)


async def _flush_totals(s: Shared) -> None:
    """Cluster mode: each node adds its own deliveries to the stored total (a sum)."""
    base = s.sent_base
    deltas = [(a.total_sent - base.get(a.id, a.total_sent), a.id)
              for a in s.directory.accounts_by_id.values() if a.status != DELETED]
    deltas = [(n, acct_id) for n, acct_id in deltas if n > 0]
    if deltas:
        await s.cluster.store.add_sent(deltas)
        for n, acct_id in deltas:
            base[acct_id] = base.get(acct_id, 0) + n


async def refresh_stats(s: Shared) -> None:
    """Cluster mode, before answering with accounts: totals and last connections as
    every node left them (the sum of the totals, the latest connection), plus what
    this node has not written yet."""
    if s.cluster is None:
        return
    base, flushed, accounts = s.sent_base, s.flushed, s.directory.accounts_by_id
    for acct_id, total, last in await s.cluster.store.stats():
        acct = accounts.get(acct_id)
        if acct is None or acct.status == DELETED:
            continue
        acct.total_sent = total + acct.total_sent - base.get(acct_id, acct.total_sent)
        base[acct_id] = total
        if last is not None and (acct.last_connection or 0.0) < last:
            acct.last_connection = flushed[acct_id] = last
