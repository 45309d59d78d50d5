"""Destinations of one message: which recipients go together, and sending them.

Owns: grouping a message's recipients by destination (``destination_groups``),
one group's attempt (``send_group``: route it unless it came routed, then its
next hops in order, a recipient without an answer going on to the next one) and
running several groups at once (``send_groups``). A group routed by MX goes
through per-destination shaping when it is on (relayd.queue.shaped: wait, defer,
back off), and what it saw is reported to the shaper's ``Watch`` (MX hops that
failed, the results by destination: relayd.observe.hops). Recipients whose next hop is
known without a lookup (static route, smarthost) are grouped by hop, one
transaction per hop; every domain that needs an MX lookup is a group of its own
(as Postfix delivers per next-hop domain), so a slow lookup or a slow MX for
one destination never holds another (SEMANTICS §5).

The dispatcher (relayd.queue.dispatch) classifies and records: results are made
by the ``Result`` it passes (``Dispatcher._result``), and the results of a group
that ends while others still run go to its ``on_part``.

Untrusted input: none read here (replies are the dispatcher's to classify).
Settings read: none.
See also: relayd.queue.dispatch, relayd.delivery.client (``route``, ``route_now``,
``send``), relayd.delivery.routing (``RouteError``).
"""

from __future__ import annotations

import asyncio
import functools
from collections.abc import Awaitable, Callable
from typing import Protocol

from relayd.delivery.client import BodyFile, Hop, RcptReply
from relayd.delivery.routing import RouteError
from relayd.queue.sendqueue import QMsg
from relayd.store.spool import AttemptResult

#: (recipient index, next hop, reply code, text, time, at RCPT) -> a classified result
Result = Callable[[int, str, "int | None", str, float, bool, str], AttemptResult]


class Transmitter(Protocol):
    """What sending a group needs from delivery (the dispatcher's ``Sender``)."""

    async def route(self, domain: str) -> list[Hop]: ...

    async def send(self, hop: Hop, sender: str, rcpts: list[str],
                   data: bytes | BodyFile) -> list[RcptReply]: ...


class Group:
    """Recipients of one message sent together: a domain to route (``chain`` None),
    or a next-hop chain known without a lookup."""

    __slots__ = ("chain", "domain", "idxs")

    def __init__(self, domain: str, chain: tuple[Hop, ...] | None) -> None:
        self.domain = domain
        self.chain = chain
        self.idxs: list[int] = []


def destination_groups(msg: QMsg, skip: set[int],
                       route_now: Callable[[str], list[Hop] | None] | None) -> list[Group]:
    """The message's recipients (but ``skip``) by destination: one group per next-hop
    chain known without a lookup, one per domain that needs one; first-seen order."""
    by_key: dict[object, Group] = {}
    by_domain: dict[str, Group] = {}
    for idx, (rcpt, _att) in msg.rcpts.items():
        if idx in skip:
            continue
        domain = rcpt.rpartition("@")[2].lower()
        group = by_domain.get(domain)
        if group is None:
            hops = route_now(domain) if route_now is not None else None
            chain = tuple(hops) if hops is not None else None
            key = chain if chain is not None else domain
            group = by_key.get(key)
            if group is None:
                group = by_key[key] = Group(domain, chain)
            by_domain[domain] = group
        group.idxs.append(idx)
    return list(by_key.values())


class Watch(Protocol):
    """What a group routed by MX reports (relayd.observe.hops ``HopWatch``); ``dest``
    is its destination's metrics label (``Shaper.label``: bounded)."""

    def hop_failed(self, msg_id: int, domain: str, dest: str, hop: Hop, text: str,
                   rcpts: int) -> None: ...

    def attempted(self, dest: str, results: list[AttemptResult]) -> None: ...


class Shaper(Protocol):
    """Per-destination shaping (relayd.queue.shaped ``Shaping``), as a group uses it;
    its ``watch`` (None: nothing reported) is told what its groups saw."""

    watch: Watch | None

    def destination(self, domain: str, hops: list[Hop]) -> str: ...

    def label(self, name: str) -> str: ...

    async def send(self, dest: str, chain: tuple[Hop, ...], idxs: list[int],
                   run: Callable[[tuple[Hop, ...]], Awaitable[list[AttemptResult]]],
                   result: Callable[[int, str, float], AttemptResult]
                   ) -> list[AttemptResult]: ...


async def send_group(sender: Transmitter, msg: QMsg, data: bytes | BodyFile, group: Group,
                     clock: Callable[[], float], result: Result,
                     shaping: Shaper | None = None) -> list[AttemptResult]:
    """Route the group (unless it came routed: never shaped), then send it along its
    chain of hops, within its destination's shape when the route was looked up (the
    shaper's ``watch``, if any, told of its failed hops and its results)."""
    chain = group.chain
    watch = shaping.watch if shaping is not None else None
    if chain is not None:
        return await send_chain(sender, msg, data, chain, group.idxs, clock, result)
    try:
        chain = tuple(await sender.route(group.domain))
    except RouteError as exc:
        if exc.permanent:
            code: int | None = exc.code
            text = f"{exc.status} {exc}"
        else:
            code, text = None, str(exc)
        now = clock()
        failed = [result(i, "-", code, text, now, False, "") for i in group.idxs]
        if watch is not None and shaping is not None:
            watch.attempted(shaping.label(shaping.destination(group.domain, [])), failed)
        return failed
    if shaping is None:
        return await send_chain(sender, msg, data, chain, group.idxs, clock, result)
    dest = shaping.destination(group.domain, list(chain))
    label = shaping.label(dest)
    on_failed = None if watch is None else functools.partial(
        watch.hop_failed, msg.id, group.domain, label)
    results = await shaping.send(
        dest, chain, group.idxs,
        lambda c: send_chain(sender, msg, data, c, group.idxs, clock, result, on_failed),
        lambda i, text, now: result(i, "-", None, text, now, False, ""))
    if watch is not None:
        watch.attempted(label, results)
    return results


async def send_chain(sender: Transmitter, msg: QMsg, data: bytes | BodyFile,
                     chain: tuple[Hop, ...], idxs: list[int], clock: Callable[[], float],
                     result: Result,
                     on_failed: Callable[[Hop, str, int], None] | None = None
                     ) -> list[AttemptResult]:
    """Try the hops of a chain in order: a recipient without an answer (connection
    trouble) goes to the next one; ``on_failed`` gets each hop that left recipients
    without an answer (the hop, the first such reply's text, how many)."""
    results: list[AttemptResult] = []
    pending = idxs
    for n, h in enumerate(chain):
        rcpts = [msg.rcpts[i][0] for i in pending]
        replies = await sender.send(h, msg.sender, rcpts, data)
        now = clock()
        if on_failed is not None:
            unanswered = [rep.text for rep in replies if rep.code is None]
            if unanswered:
                on_failed(h, unanswered[0], len(unanswered))
        retry_next: list[int] = []
        for i, rep in zip(pending, replies, strict=True):
            if rep.code is None and n < len(chain) - 1:
                retry_next.append(i)  # connection trouble: try the next MX
            else:
                results.append(result(i, h.name, rep.code, rep.text, now, rep.at_rcpt,
                                      rep.tls))
        pending = retry_next
        if not pending:
            break
    return results


async def send_groups(groups: list[Group],
                      run: Callable[[Group], Awaitable[list[AttemptResult]]],
                      on_error: Callable[[Group, Exception], list[AttemptResult]],
                      on_part: Callable[[list[AttemptResult]], None]) -> list[AttemptResult]:
    """Run the groups at once; every result, relayd's own verdicts (no next hop) first.

    A group that ends while others still run is handed to ``on_part`` (which
    may commit it); one that raises gets ``on_error``'s results (only its own
    recipients). Cancelled: the groups still running are cancelled.
    """
    tasks = {asyncio.ensure_future(run(g)): g for g in groups}
    pending = set(tasks)
    results: list[AttemptResult] = []
    try:
        while pending:
            finished, pending = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
            for task in [t for t in tasks if t in finished]:  # in group order
                try:
                    part = task.result()
                except Exception as exc:  # a bug in one group defers only its own
                    part = on_error(tasks[task], exc)
                results.extend(part)
                if pending:
                    on_part(part)
    finally:
        for task in pending:
            task.cancel()
    results.sort(key=lambda r: r.next_hop != "-")  # as when every route came first
    return results
