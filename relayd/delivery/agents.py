"""The delivery agent processes and the signing child, seen from the main process.

Owns: starting the child processes (relayd.delivery.agent_child), keeping
them running, and handing them work over their socketpair (relayd.delivery.wire):

- ``agent_processes`` delivery agents (``[delivery] agent_processes``, at
  least one) run every outbound SMTP transaction (connect, TLS, AUTH at the
  next hop, the pipelined transaction, the pools), on a core other than the
  main loop's. ``AgentPool`` is the ``Transport`` relayd.delivery.client's
  ``Deliverer`` sends through; the least busy agent takes a job. Everything
  that decides *whether* and *when* a message goes (send queue, limits,
  held mail, retries, spool writes, invalidation) stays in the main process.
- With DKIM on, one signing child: it is sent every ``Sign`` and never a
  ``Job``, so a loop busy with RSA never reads deliveries' replies late. Keys
  go to it once (``SignKey``) and are dropped (``ForgetKey``) when their
  ``Signer`` is collected (domain deleted, key replaced). While it does not
  run (starting, restarting) ``sign`` returns None, and a ``Sign`` it never
  answered fails with ``SigningUnavailable``: relayd.dkim.signing then signs
  in a local thread.

Failure: when a child exits (crash, kill), every job it had not answered
gets ``code=None`` for each recipient, a temporary failure, so the scheduler
defers and retries it (at-least-once: a message that reached the next hop
may be delivered twice, as after any crash). The child is started again after
0.1 s, doubling up to 5 s. Children ignore SIGTERM and SIGINT (systemd and a
terminal signal the whole group): ``close`` sends ``Close`` after the
scheduler's running attempts finished, the child QUITs its pooled
connections and exits; one that hangs is killed after 10 s.

Untrusted input: none (frames come only from our own processes).
Settings read: [delivery] (passed on to the agents in ``Configure``;
``connections_per_host`` is shared out among them), whether DKIM is on
(through relayd.app).
See also: relayd.delivery.client, relayd.dkim.signing, relayd.queue.scheduler.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import sys
import weakref
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

import msgspec

from relayd.config import DeliveryConfig
from relayd.delivery.client import BodyFile, Hop, RcptReply
from relayd.delivery.wire import (
    Close,
    Configure,
    ForgetKey,
    Framed,
    FromChild,
    Job,
    Result,
    Sign,
    Signed,
    SignKey,
)

if TYPE_CHECKING:
    from relayd.dkim.signature import Signer

RESTART_DELAY_FIRST = 0.1
RESTART_DELAY_MAX = 5.0
STOP_TIMEOUT_SECONDS = 10.0
# Where ``relayd`` is imported from, so the child finds the same code.
_PACKAGE_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


class SigningUnavailable(Exception):
    """The signing child died before answering a ``Sign``: sign elsewhere."""


class _ParentSide(Framed):
    def __init__(self, agent: _Agent) -> None:
        super().__init__(FromChild)
        self.agent = agent

    def frame_received(self, frame: object, tail: bytes) -> None:
        if isinstance(frame, Result):
            self.agent.answered(frame)
        else:
            assert isinstance(frame, Signed)
            self.agent.signed(frame)


class _Agent:
    """One child process and the jobs it has not answered yet."""

    def __init__(self, pool: AgentPool, n: int, role: str = "deliver") -> None:
        self.pool = pool
        self.n = n
        self.role = role  # "deliver" or "sign": in the child's command line (ps, bench)
        self.proc: asyncio.subprocess.Process | None = None
        self.side: _ParentSide | None = None
        # job id -> (who gets the replies, number of recipients)
        self.pending: dict[int, tuple[Callable[[list[RcptReply]], None], int]] = {}
        self.signing: dict[int, asyncio.Future[bytes]] = {}
        self.sent_keys: set[int] = set()  # DKIM keys this life of the child has
        self.ready = asyncio.Event()
        self.opened_before = 0  # connections opened by earlier lives of this agent
        self.opened = 0
        self.task: asyncio.Task[None] | None = None

    @property
    def pid(self) -> int | None:
        """The child's process id while it runs."""
        proc = self.proc
        return proc.pid if proc is not None and proc.returncode is None else None

    async def spawn(self) -> None:
        """Start the child and connect to it."""
        parent, child = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            env = dict(os.environ)
            env["PYTHONPATH"] = os.pathsep.join(
                p for p in (_PACKAGE_ROOT, env.get("PYTHONPATH")) if p)
            self.proc = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "relayd.delivery.agent_child", "--fd", str(child.fileno()),
                "--role", self.role, pass_fds=(child.fileno(),),
                stdin=asyncio.subprocess.DEVNULL, env=env)
        except BaseException:
            parent.close()
            raise
        finally:
            child.close()
        loop = asyncio.get_running_loop()
        _t, side = await loop.create_unix_connection(lambda: _ParentSide(self), sock=parent)
        self.side = side
        self.sent_keys = set()
        if self.role == "deliver":
            side.send(Configure(self.pool.child_cfg(), self.pool.helo))
        self.opened_before += self.opened
        self.opened = 0
        self.ready.set()

    async def supervise(self) -> None:
        """Keep a child running: restart it when it exits, until the pool closes."""
        delay = RESTART_DELAY_FIRST
        while True:
            loop = asyncio.get_running_loop()
            started = loop.time()
            try:
                await self.spawn()
            except OSError:
                await asyncio.sleep(delay)
                delay = min(delay * 2, RESTART_DELAY_MAX)
                continue
            assert self.proc is not None and self.side is not None
            await asyncio.wait([asyncio.ensure_future(self.proc.wait()), self.side.lost],
                               return_when=asyncio.FIRST_COMPLETED)
            self.ready.clear()
            if self.side.transport is not None:
                self.side.transport.close()
            if self.proc.returncode is None:
                try:
                    await asyncio.wait_for(self.proc.wait(), 1.0)
                except TimeoutError:
                    with contextlib.suppress(ProcessLookupError):  # it exited meanwhile
                        self.proc.kill()
                    await self.proc.wait()
            self.fail_pending(f"delivery agent exited ({self.proc.returncode})"
                              if self.role == "deliver" else
                              f"signing child exited ({self.proc.returncode})")
            if self.pool.closing:
                return
            if loop.time() - started > 10 * RESTART_DELAY_MAX:
                delay = RESTART_DELAY_FIRST
            await asyncio.sleep(delay)
            delay = min(delay * 2, RESTART_DELAY_MAX)

    def fail_pending(self, text: str) -> None:
        """Every unanswered job: a temporary failure for each recipient."""
        pending, self.pending = self.pending, {}
        for done, nrcpts in pending.values():
            done([RcptReply(None, text) for _ in range(nrcpts)])
        signing, self.signing = self.signing, {}
        for fut in signing.values():
            if not fut.done():
                fut.set_exception(SigningUnavailable(text))

    def signed(self, res: Signed) -> None:
        fut = self.signing.pop(res.id, None)
        if fut is None or fut.done():
            return
        if res.error:
            fut.set_exception(RuntimeError(f"DKIM signing failed: {res.error}"))
        else:
            fut.set_result(res.headers)

    def answered(self, res: Result) -> None:
        self.opened = res.opened
        entry = self.pending.pop(res.id, None)
        if entry is not None:
            at = set(res.at_rcpt)
            entry[0]([RcptReply(c, t, i in at, res.tls) for i, (c, t) in enumerate(res.replies)])


class AgentPool:
    """Delivery agent processes seen as one ``send``; the least busy one takes a job."""

    def __init__(self, cfg: DeliveryConfig, helo: str, processes: int,
                 signer: bool = False) -> None:
        if processes < 1:
            raise ValueError("at least one delivery agent process")
        self.cfg = cfg
        self.helo = helo
        self.closing = False
        self._agents = [_Agent(self, n) for n in range(processes)]  # only deliver
        self._signer = _Agent(self, processes, "sign") if signer else None  # only signs
        self._children = self._agents + ([self._signer] if self._signer else [])
        self._ids = 0
        self._watched: set[int] = set()  # key ids whose Signer is watched (see _forget)

    def child_cfg(self) -> DeliveryConfig:
        """The settings of one child: the per-hop connection bound is shared out."""
        n = len(self._agents)
        return msgspec.structs.replace(
            self.cfg, connections_per_host=max(1, self.cfg.connections_per_host // n))

    async def start(self) -> None:
        """Start every child (returns once each is connected)."""
        loop = asyncio.get_running_loop()
        for a in self._children:
            a.task = loop.create_task(a.supervise())
        await asyncio.wait_for(asyncio.gather(*(a.ready.wait() for a in self._children)), 30)

    def reconfigure(self, cfg: DeliveryConfig) -> None:
        """New settings (reload) for every running child and every future one."""
        self.cfg = cfg
        for a in self._agents:
            if a.side is not None and a.ready.is_set():
                a.side.send(Configure(self.child_cfg(), self.helo))

    @property
    def pids(self) -> list[int]:
        """Process ids of the running children (for tests and status)."""
        return [pid for a in self._children if (pid := a.pid) is not None]

    @property
    def delivery_pids(self) -> list[int]:
        """Process ids of the running children that deliver (all but the signing one)."""
        return [pid for a in self._agents if (pid := a.pid) is not None]

    @property
    def signer_pid(self) -> int | None:
        """Process id of the signing child, if one runs (for tests and status)."""
        return self._signer.pid if self._signer is not None else None

    @property
    def connections_opened(self) -> int:
        """Connections opened by every child since start."""
        return sum(a.opened_before + a.opened for a in self._agents)

    async def send(self, hop: Hop, sender: str, rcpts: Sequence[str],
                   data: bytes | BodyFile) -> list[RcptReply]:
        """One transaction at one hop, run by a child; one reply per recipient."""
        agent = min(self._agents, key=lambda a: len(a.pending))
        if not agent.ready.is_set():
            try:
                await asyncio.wait_for(agent.ready.wait(), self.cfg.connect_timeout_seconds)
            except TimeoutError:
                return [RcptReply(None, "delivery agent not running") for _ in rcpts]
        fut: asyncio.Future[list[RcptReply]] = asyncio.get_running_loop().create_future()

        def done(replies: list[RcptReply]) -> None:
            if not fut.done():
                fut.set_result(replies)

        job_id = self._submit(agent, hop, sender, rcpts, data, done)
        try:
            return await fut
        finally:
            agent.pending.pop(job_id, None)

    def submit(self, hop: Hop, sender: str, rcpts: Sequence[str], data: bytes,
               done: Callable[[list[RcptReply]], None]) -> bool:
        """``send`` without a future: ``done`` gets the replies (exactly once).

        False, with nothing sent, when the least busy child is not running
        (starting or restarting): the caller waits in ``send`` instead. If the
        child dies after this, ``done`` gets a temporary failure per recipient.
        """
        agent = min(self._agents, key=lambda a: len(a.pending))
        if not agent.ready.is_set() or agent.side is None:
            return False
        self._submit(agent, hop, sender, rcpts, data, done)
        return True

    def _submit(self, agent: _Agent, hop: Hop, sender: str, rcpts: Sequence[str],
                data: bytes | BodyFile, done: Callable[[list[RcptReply]], None]) -> int:
        side = agent.side
        assert side is not None
        self._ids += 1
        job_id = self._ids
        agent.pending[job_id] = (done, len(rcpts))
        if isinstance(data, bytes):
            side.send(Job(job_id, hop.host, hop.port, hop.tls, hop.username, hop.password,
                          sender, list(rcpts), len(data), mx=hop.mx,
                          per_connection=hop.messages_per_connection, tlsa=hop.tlsa), data)
        else:  # a BodyFile: the child reads it
            side.send(Job(job_id, hop.host, hop.port, hop.tls, hop.username, hop.password,
                          sender, list(rcpts), data.size, data.path, hop.mx,
                          hop.messages_per_connection, hop.tlsa))
        return job_id

    def sign(self, signers: Sequence[Signer], data: bytes,
             now: int) -> asyncio.Future[bytes] | None:
        """DKIM headers for ``data``, made by the signing child; None if it does not run now.

        The RSA work then runs in the child's interpreter, not beside the event
        loop fighting it for the GIL; the delivery agents never sign. A key goes
        to the child once (``SignKey``) before its first use; keys are identified
        by ``Signer.key_id``, which is never reused, so a rotated key is a new
        one. The future fails with SigningUnavailable if the child dies first.
        """
        agent = self._signer
        side = agent.side if agent is not None else None
        if agent is None or not agent.ready.is_set() or side is None:
            return None
        for signer in signers:
            if signer.key_id not in agent.sent_keys:
                side.send(SignKey(signer.key_id, signer.domain, signer.selector, signer.pem))
                agent.sent_keys.add(signer.key_id)
                if signer.key_id not in self._watched:
                    self._watched.add(signer.key_id)
                    watch = weakref.finalize(signer, _forget_key, weakref.ref(self),
                                             asyncio.get_running_loop(), signer.key_id)
                    watch.atexit = False
        self._ids += 1
        fut: asyncio.Future[bytes] = asyncio.get_running_loop().create_future()
        agent.signing[self._ids] = fut
        side.send(Sign(self._ids, [s.key_id for s in signers], now, len(data)), data)
        return fut

    def _forget(self, key_id: int) -> None:
        """A key's Signer is gone: every child that has the key drops it (``ForgetKey``)."""
        self._watched.discard(key_id)
        for a in self._children:
            if key_id in a.sent_keys:
                a.sent_keys.discard(key_id)
                if a.side is not None and a.side.transport is not None:
                    a.side.send(ForgetKey(key_id))

    async def close(self) -> None:
        """Ask every child to stop (QUIT its connections) and wait; kill one that hangs."""
        self.closing = True
        for a in self._children:
            if a.side is not None and a.side.transport is not None:
                a.side.send(Close())
        tasks = [a.task for a in self._children if a.task is not None]
        if not tasks:
            return
        _done, hanging = await asyncio.wait(tasks, timeout=STOP_TIMEOUT_SECONDS)
        for a in self._children:
            if a.task in hanging and a.proc is not None and a.proc.returncode is None:
                with contextlib.suppress(ProcessLookupError):  # it exited meanwhile
                    a.proc.kill()
        if hanging:
            await asyncio.gather(*hanging, return_exceptions=True)


def _forget_key(pool: weakref.ref[AgentPool], loop: asyncio.AbstractEventLoop,
                key_id: int) -> None:
    """A watched Signer was collected (in any thread): tell the pool on its loop."""
    live = pool()
    if live is None:
        return
    try:
        loop.call_soon_threadsafe(live._forget, key_id)
    except RuntimeError:
        pass  # the loop is closed: so are the children
