"""Per-destination shaping applied to attempts (MX mode): wait, defer, back off.

Owns: the asyncio side of relayd.queue.shaping for the dispatcher's worker way.
Before a transmission to a destination: mail to a backed-off destination is
deferred at once (no connection: its next attempt is at the end of the back-off,
never failed for it); at a limit (connections, messages per second or minute)
the worker waits, at most ``max_waiting`` workers per destination (a quarter of
them), and any further attempt is deferred to when the limit will allow it.
After: the replies go to the shaper, whose throttling detection may back the
destination off (the attempt's deferred recipients then wait for its end too).
Messages per connection travel with the hops (``Hop.messages_per_connection``)
to the delivery agent's pool.

The account's own sending limits (relayd.queue.ratelimit) were applied before
the attempt started, in the send queue.

Settings read: [delivery.shaping] (``ShapingConfig``), via ``configure`` on reload.
See also: relayd.queue.shaping (the pure state), relayd.queue.dispatch.
"""

from __future__ import annotations

import asyncio
import dataclasses
import time
from collections.abc import Awaitable, Callable
from typing import Any

from relayd.config import ShapingConfig
from relayd.delivery.client import Hop
from relayd.queue.destinations import Watch
from relayd.queue.shaping import Shaper, State
from relayd.store.records import AttemptResult

#: Seconds to the next attempt of mail deferred at a destination's connection cap.
CAP_RETRY_SECONDS = 5.0
#: Seconds between drops of idle destinations' state.
FORGET_SECONDS = 60.0

#: Sends a group along a chain of hops (relayd.queue.destinations ``send_chain``).
RunChain = Callable[[tuple[Hop, ...]], Awaitable[list[AttemptResult]]]
#: (recipient index, text, time) -> that recipient's deferred result, no next hop
Deferred = Callable[[int, str, float], AttemptResult]


class Shaping:
    """The shaper with the workers that wait for it, and the metrics hook."""

    def __init__(self, cfg: ShapingConfig, clock: Callable[[], float], workers: int) -> None:
        self.shaper = Shaper(cfg)
        self.clock = clock
        self.max_waiting = max(1, workers // 4)
        self.on_event: Callable[[str, str], None] | None = None  # (destination label, kind)
        self.log: Callable[..., Any] | None = None  # (event, **fields): a back-off starts
        self.watch: Watch | None = None  # failed MX hops, results by destination (app sets it)
        self._waiting: dict[str, int] = {}
        self._waiters: list[asyncio.Future[None]] = []
        self._forgot = 0.0

    def configure(self, cfg: ShapingConfig) -> None:
        """A reload: new limits for the next attempts; back-offs in force stay."""
        self.shaper.configure(cfg)

    def label(self, name: str) -> str:
        """The metrics label of a destination: a table entry's name, else ``other``."""
        return name if any(d.name == name for d in self.shaper.cfg.destination) else "other"

    def destination(self, domain: str, hops: list[Hop]) -> str:
        """The destination of a recipient domain routed to ``hops`` (its state made)."""
        name, limits = self.shaper.destination(domain, (hops[0].mx or hops[0].host)
                                               if hops else "")
        self.shaper.state(name, limits)
        return name

    async def send(self, dest: str, chain: tuple[Hop, ...], idxs: list[int],
                   run: RunChain, result: Deferred) -> list[AttemptResult]:
        """Send one group of recipients (``run`` along a chain of hops) to its
        destination, within the destination's shape; ``result`` makes a deferral."""
        st = self.shaper.state(dest, self.shaper.default)
        now = self.clock()
        until = self.shaper.backed_off(dest, now)
        if until:
            self._event(dest, "backed_off")
            text = f"4.7.0 destination {dest} backed off for {until - now:.0f} s: {st.reason}"
            return [_later(result(i, text, now), until) for i in idxs]
        wait = await self._admit(dest, st)
        if wait:
            self._event(dest, "deferred")
            now = self.clock()
            text = f"4.7.0 destination {dest} at its shaping limit (relayd)"
            return [_later(result(i, text, now), now + wait, exact=True) for i in idxs]
        if st.limits.messages_per_connection:
            n = st.limits.messages_per_connection
            chain = tuple(dataclasses.replace(h, messages_per_connection=n) for h in chain)
        mine: list[AttemptResult] = []
        try:
            mine = await run(chain)
        finally:
            backs = self.shaper.release(dest, [(r.code, r.text) for r in mine], self.clock())
            self._wake()
        if backs:
            self._backed_off(self.shaper.state(dest, st.limits), mine)
        return mine

    def _backed_off(self, st: State, mine: list[AttemptResult]) -> None:
        self._event(st.name, "throttled")
        for r in mine:
            _later(r, st.backoff_until)
        if self.log is not None:
            self.log("destination_backoff", destination=st.name, level=st.backoff_level,
                     seconds=round(st.backoff_until - self.clock(), 1), reply=st.reason)

    async def _admit(self, dest: str, st: State) -> float:
        """0 once the transmission may start (it counts as started); else the seconds
        after which a deferred attempt should come back."""
        while True:
            wait = self.shaper.acquire(dest, st.limits, self.clock())
            if not wait:
                self._forget()
                return 0.0
            if self._waiting.get(dest, 0) >= self.max_waiting:
                return CAP_RETRY_SECONDS if wait == float("inf") else max(wait, 0.5)
            self._event(dest, "waited")
            self._waiting[dest] = self._waiting.get(dest, 0) + 1
            try:
                await self._sleep(min(wait, 1.0))
            finally:
                left = self._waiting[dest] - 1
                if left:
                    self._waiting[dest] = left
                else:
                    del self._waiting[dest]

    async def _sleep(self, seconds: float) -> None:
        """Until a transmission ends (a connection may be free) or ``seconds`` passed."""
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[None] = loop.create_future()
        self._waiters.append(fut)
        timer = loop.call_later(seconds, _resolve, fut)
        try:
            await fut
        finally:
            timer.cancel()

    def _wake(self) -> None:
        waiters, self._waiters = self._waiters, []
        for fut in waiters:
            _resolve(fut)

    def _event(self, dest: str, kind: str) -> None:
        if self.on_event is not None:
            self.on_event(self.label(dest), kind)

    def _forget(self) -> None:
        now = time.monotonic()
        if now - self._forgot >= FORGET_SECONDS:
            self._forgot = now
            self.shaper.forget_idle(self.clock())

    def backoffs(self) -> list[State]:
        """The destinations backed off now (for ``relayctl status`` and the gauge)."""
        return self.shaper.backoffs(self.clock())


def _resolve(fut: asyncio.Future[None]) -> None:
    if not fut.done():
        fut.set_result(None)


def _later(r: AttemptResult, at: float, exact: bool = False) -> AttemptResult:
    """A deferred result's next attempt no earlier than ``at`` (``exact``: at ``at``, even
    if the retry schedule would wait longer: the destination only asked for patience)."""
    if r.outcome == "deferred" and r.next_attempt is not None and (exact or r.next_attempt < at):
        r.next_attempt = at
    return r
