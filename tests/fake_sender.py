"""A Sender for unit tests of the dispatcher: scripted replies, no network (no tests here).

``FakeSender`` implements relayd.queue.dispatch.Sender (``route`` and ``send``):
each recipient gets the reply its script says (250 by default), and every
transaction is recorded. With ``agent=True`` it also offers what a running
delivery agent offers (``route_now`` and ``submit`` with a callback), and
answers a submitted job only when ``answer`` is called, so a test can hold
transmissions in flight.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from relayd.delivery.client import BodyFile, Hop, RcptReply
from relayd.delivery.routing import RouteError

HOP = Hop("next.test", 25, "none")


@dataclass
class Sent:
    """One transaction the fake sender saw."""

    hop: Hop
    sender: str
    rcpts: list[str]
    data: bytes


@dataclass
class FakeSender:
    """Replies by recipient (``replies``: address -> (code or None, text))."""

    replies: dict[str, tuple[int | None, str]] = field(default_factory=dict)
    agent: bool = False
    no_route: dict[str, RouteError] = field(default_factory=dict)
    sent: list[Sent] = field(default_factory=list)
    held: list[tuple[list[str], Callable[[list[RcptReply]], None]]] = field(default_factory=list)

    def reply(self, rcpt: str) -> RcptReply:
        code, text = self.replies.get(rcpt, (250, "2.0.0 ok"))
        return RcptReply(code, text)

    async def route(self, domain: str) -> list[Hop]:
        if domain in self.no_route:
            raise self.no_route[domain]
        return [HOP]

    async def send(self, hop: Hop, sender: str, rcpts: list[str],
                   data: bytes | BodyFile) -> list[RcptReply]:
        body = data if isinstance(data, bytes) else await asyncio.to_thread(data.read)
        self.sent.append(Sent(hop, sender, list(rcpts), body))
        await asyncio.sleep(0)
        return [self.reply(r) for r in rcpts]

    # -- what a running delivery agent adds (the dispatcher's fast way) ----------------
    def route_now(self, domain: str) -> list[Hop] | None:
        return [HOP] if self.agent and domain not in self.no_route else None

    def submit(self, hop: Hop, sender: str, rcpts: Sequence[str], data: bytes,
               done: Callable[[list[RcptReply]], None]) -> bool:
        if not self.agent:
            return False
        self.sent.append(Sent(hop, sender, list(rcpts), data))
        self.held.append((list(rcpts), done))
        return True

    def answer(self) -> None:
        """Answer every job submitted so far (each with its scripted replies)."""
        held, self.held = self.held, []
        for rcpts, done in held:
            done([self.reply(r) for r in rcpts])
