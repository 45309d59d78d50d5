"""The poster: sends the stored delivery events to their domains' webhooks.

Owns: the loop that reads the events due from this node's spool, signs each with its
domain's current secret (relayd.webhooks.policy), POSTs them (one domain's events one
after the other, domains side by side) through relayd.controlplane.server.WebhookClient,
deletes what a 2xx answered and pushes the rest back with backoff. After a failed
post, the domain's other events of the round wait with it (a dead webhook costs one
timeout per round, not one per event). An event whose domain has no webhook any
more is dropped (counted). The metrics: posts by result, events dropped (the spool's
count, which includes the cap's), and the backlog.

Events survive restarts (they are rows of the spool); a post cut by a stop is made
again: delivery to the application is at-least-once, in no promised order.

Untrusted input: the webhooks' answers (only their status is used).
Settings read: [webhooks] (passed in). See also: relayd.store.hookevents,
relayd.store.webhooks, relayd.controlplane.hooks.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Callable
from typing import Protocol

from relayd.config import WebhooksConfig
from relayd.directory.accounts import Directory
from relayd.observe.metrics import Metrics
from relayd.store.hookevents import EventSink
from relayd.store.webhooks import StoredEvent, WebhookQueue
from relayd.webhooks.policy import SIGNATURE_HEADER, retry_delay, signature_header

ROUND = 200        # events read per round at most
IDLE_SECONDS = 1.0  # the longest sleep while a domain has a webhook (new events)


class Client(Protocol):
    async def post(self, url: str, body: bytes,
                   headers: dict[str, str]) -> tuple[int | None, str]: ...


class Poster:
    """Posts the stored events; ``run`` until cancelled."""

    def __init__(self, queue: WebhookQueue, sink: EventSink, directory: Directory,
                 client: Client, cfg: WebhooksConfig, metrics: Metrics, *,
                 log: Callable[..., None] = lambda event, **kw: None,
                 clock: Callable[[], float] = time.time,
                 rng: random.Random | None = None) -> None:
        self.queue = queue
        self.sink = sink
        self.directory = directory
        self.client = client
        self.cfg = cfg
        self.metrics = metrics
        self.clock = clock
        self.log = log
        self.rng = rng or random.Random()
        self._dropped_seen = 0
        self._stored = True  # events may be stored (checked at start)

    async def run(self) -> None:
        while True:
            try:
                wait = await self.round()
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # the spool unwritable, a bug: try again later
                self.log("webhook_round_failed", error=f"{type(exc).__name__}: {exc}")
                wait = 5.0
            await asyncio.sleep(wait)

    async def round(self) -> float:
        """Post what is due; the seconds to sleep before the next round."""
        self._count_dropped()
        if not self.sink.domains and not self._stored:
            return IDLE_SECONDS
        due = await self.queue.due(self.clock(), ROUND)
        by_domain: dict[str, list[StoredEvent]] = {}
        for ev in due:
            by_domain.setdefault(ev.domain, []).append(ev)
        posted: list[int] = []
        dropped: list[int] = []
        failed: list[tuple[int, float, str]] = []
        await asyncio.gather(*(self._post_domain(name, evs, posted, dropped, failed)
                               for name, evs in by_domain.items()))
        await self.queue.remove(posted)
        await self.queue.remove(dropped, dropped=True)
        await self.queue.retry(failed)
        self._count_dropped()
        backlog = await self.queue.backlog()
        self.metrics.webhook_backlog.set(backlog)
        self._stored = backlog > 0
        if len(due) == ROUND and (posted or dropped):
            return 0.0
        nxt = await self.queue.next_due() if backlog else None
        if nxt is None:
            return IDLE_SECONDS
        return max(0.0, min(IDLE_SECONDS if self.sink.domains else 60.0, nxt - self.clock()))

    async def _post_domain(self, name: str, events: list[StoredEvent], posted: list[int],
                           dropped: list[int], failed: list[tuple[int, float, str]]) -> None:
        dom = self.directory.active_domain(name)
        url = dom.webhook_url if dom is not None else None
        secret = dom.webhook_secret if dom is not None else None
        if url is None or secret is None:
            dropped.extend(ev.id for ev in events)
            return
        for n, ev in enumerate(events):
            t = int(self.clock())
            status, why = await self.client.post(
                url, ev.body, {SIGNATURE_HEADER: signature_header(secret, t, ev.body)})
            if status is not None and 200 <= status < 300:
                self.metrics.webhook_post_ok.inc()
                posted.append(ev.id)
                continue
            self.metrics.webhook_post_failed.inc()
            error = why or f"HTTP {status}"
            cfg = self.cfg
            at = self.clock() + retry_delay(ev.attempts + 1, cfg.retry_first_seconds,
                                            cfg.retry_max_seconds, self.rng)
            failed.extend((e.id, at, error) for e in events[n:])  # the rest wait with it
            self.log("webhook_post_failed", domain=name, error=error, failures=ev.attempts + 1,
                     waiting=len(events) - n, retry_in=round(at - self.clock(), 1))
            return

    def _count_dropped(self) -> None:
        total = self.sink.dropped
        if total > self._dropped_seen:
            self.metrics.webhook_events_dropped_total.inc(total - self._dropped_seen)
            self._dropped_seen = total
