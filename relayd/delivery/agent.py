"""The delivery agent: outbound SMTP transactions (and DKIM signing) in a child process.

Owns: running ``Deliverer.send`` (pools, pipelining, TLS, AUTH at the next
hop) in one or more child processes, so that the outbound SMTP work uses a
core other than the main event loop's. Everything that decides *whether* and
*when* a message goes (send queue, sending limits, held mail, retries, spool
writes, credential invalidation) stays in the main process: a child only
runs the transaction it is given and answers one reply per recipient.

It also signs: ``Sign`` frames (the message follows as raw bytes) get DKIM
headers back in ``Signed`` (relayd.dkim.signing sends them), with the keys sent
once per child in ``SignKey`` frames; the child holds no other account or
domain state, and a key is never used after the main process stops asking
for it (a deleted domain's mail is refused before it is signed). When a
key's ``Signer`` is collected (domain deleted, key replaced), the children
drop the key too (``ForgetKey``), so a long-running child does not keep
every key it ever had. The child signs on its loop, the waiting ``Sign``
frames in slices of ``SIGN_SLICE``
with the RSA operations back to back (``dkim.sign_many``), reading its
deliveries' replies between slices.

With ``signer=True`` (``[dkim] signing_process``, the default) one more child
runs, the same program, that only signs: it is never given a ``Job``, so a
loop busy with RSA never reads its deliveries' replies late (the A/B figures
are in bench/NOTES.md). A signing child that
is not running (starting, restarting) makes ``sign`` return None: the caller
signs locally meanwhile.

Wire: a Unix socketpair per child, frames of a 4-byte big-endian length and a
msgpack body (msgspec, tagged array-like structs). Parent to child:
``Configure`` (first, and after a reload), ``Job``, ``Close``. Child to
parent: ``Result`` (one per job, with the child's count of connections
opened). A ``Job`` frame is followed by the message data as raw bytes
(``size`` of them): packing the data into the frame would copy it twice in
the parent and twice more in the child. Small frames written in one loop
iteration go out in one write; large tails are written as they are.

Failure: when a child exits (crash, kill), every job it had not answered
gets ``code=None`` for each recipient — a temporary failure, so the
scheduler defers and retries it (nothing is lost; a message that did reach
the next hop may be delivered twice, as after any crash: at-least-once).
The child is started again after a short pause. A child whose parent is
gone sees end-of-file on its socket and exits; it ignores SIGTERM and SIGINT
(systemd and a terminal signal the whole group), the parent stops it in
order: ``Close`` after the scheduler's running attempts finished, then the
child says QUIT on its pooled connections and exits.

Untrusted input: none new (replies of remote servers are handled by
relayd.delivery.client inside the child; frames come only from our own process).
Settings read: [delivery] agent_processes, [dkim] signing_process (through
relayd.app), and everything relayd.delivery.client reads (sent to the child in
``Configure``).
See also: relayd.delivery.client (``Deliverer`` uses ``AgentPool`` when
``agent_processes > 0``), relayd.queue.scheduler.
"""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import sys
import weakref
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import msgspec

from relayd.config import DeliveryConfig

if TYPE_CHECKING:
    from relayd.delivery.client import BodyFile, Hop, RcptReply
    from relayd.dkim.signature import Signer

_LEN = 4
_DIRECT = 64 * 1024  # pieces this large are written alone, not joined into a frame
RESTART_DELAY_FIRST = 0.1
RESTART_DELAY_MAX = 5.0
STOP_TIMEOUT_SECONDS = 10.0
#: Signatures made back to back before the child's loop turns again, so the
#: child still reads its deliveries' replies between slices. Large enough that a
#: normal burst (one per waiting SMTP session of the parent) is one batch:
#: smaller slices cost more CPU per signature (bench/NOTES.md).
SIGN_SLICE = 64
# Where ``relayd`` is imported from, so the child finds the same code.
_PACKAGE_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


class Configure(msgspec.Struct, array_like=True, tag=1):
    """Settings for the child's deliverer (sent first and after a reload)."""

    cfg: DeliveryConfig
    helo: str


class Job(msgspec.Struct, array_like=True, tag=2):
    """One transaction at one hop."""

    id: int
    host: str
    port: int
    tls: str
    username: str
    password: str
    sender: str
    rcpts: list[str]
    size: int  # the message data follows the frame: this many raw bytes...
    path: str = ""  # ...unless it is in this spool file, which the child reads itself


class Close(msgspec.Struct, array_like=True, tag=3):
    """Stop: drop what is still running, QUIT pooled connections, exit."""


class Result(msgspec.Struct, array_like=True, tag=4):
    """The replies to one job, one (code, text) per recipient, in order."""

    id: int
    replies: list[tuple[int | None, str]]
    opened: int  # connections the child opened since it started


class SignKey(msgspec.Struct, array_like=True, tag=5):
    """A DKIM key the child keeps for ``Sign`` jobs (sent once, before its first use)."""

    key_id: int
    domain: str
    selector: str
    pem: bytes


class Sign(msgspec.Struct, array_like=True, tag=6):
    """DKIM signature headers for a message, by these keys, in this order."""

    id: int
    keys: list[int]
    now: int
    size: int  # the message follows the frame: this many raw bytes


class Signed(msgspec.Struct, array_like=True, tag=7):
    """The headers for one ``Sign``, or the error that prevented them."""

    id: int
    headers: bytes
    error: str = ""


class ForgetKey(msgspec.Struct, array_like=True, tag=8):
    """A key no longer used (its ``Signer`` is gone: domain deleted, key replaced)."""

    key_id: int


class SigningUnavailable(Exception):
    """The child died before answering a ``Sign``: sign elsewhere."""


ToAgent = Configure | Job | Close | SignKey | Sign | ForgetKey


class _Framed(asyncio.Protocol):
    """Length-prefixed msgpack frames over a stream, writes coalesced per loop turn.

    A frame may be followed by a raw tail (``tail_size`` says how long): the
    tail's chunks are kept as they arrive and joined once.
    """

    def __init__(self, decode_type: object) -> None:
        self._decoder = msgspec.msgpack.Decoder(decode_type)
        self._encoder = msgspec.msgpack.Encoder()
        self._buf = bytearray()
        self._out: list[bytes] = []
        self._tail_of: object = None  # the frame whose tail is being received
        self._tail: list[bytes] = []
        self._need = 0  # bytes of that tail still to come
        self.transport: asyncio.Transport | None = None
        self.lost = asyncio.get_running_loop().create_future()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        while data:
            if self._need:
                piece = data if len(data) <= self._need else data[:self._need]
                data = data[len(piece):]
                self._tail.append(piece)
                self._need -= len(piece)
                if not self._need:
                    frame, self._tail_of = self._tail_of, None
                    tail, self._tail = b"".join(self._tail), []
                    self.frame_received(frame, tail)
                continue
            data = self._frames(data)

    def _frames(self, data: bytes) -> bytes:
        """Decode the complete frames; return what follows a frame with a tail."""
        buf = self._buf
        buf.extend(data)
        start = 0
        end = len(buf)
        frames: list[tuple[object, bytes]] = []
        rest = b""
        with memoryview(buf) as view:
            while end - start >= _LEN:
                n = int.from_bytes(view[start:start + _LEN], "big")
                if end - start - _LEN < n:
                    break
                frame = self._decoder.decode(view[start + _LEN:start + _LEN + n])
                start += _LEN + n
                need = self.tail_size(frame)
                if need <= end - start:  # small tails come with their frame
                    frames.append((frame, bytes(view[start:start + need]) if need else b""))
                    start += need
                    continue
                # A large tail: the rest of the buffer is its beginning.
                self._tail_of, self._need = frame, need
                rest = bytes(view[start:])
                start = end
                break
        if start:
            del buf[:start]
        for frame, tail in frames:
            self.frame_received(frame, tail)
        return rest

    def tail_size(self, frame: object) -> int:
        """How many raw bytes follow this frame."""
        return 0

    def frame_received(self, frame: object, tail: bytes) -> None:
        raise NotImplementedError

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None
        if not self.lost.done():
            self.lost.set_result(None)

    def send(self, frame: msgspec.Struct, tail: bytes = b"") -> None:
        """Queue a frame (and its raw tail); written together at the end of this loop turn."""
        body = self._encoder.encode(frame)
        if not self._out:
            asyncio.get_running_loop().call_soon(self._flush)
        self._out.append(len(body).to_bytes(_LEN, "big"))
        self._out.append(body)
        if tail:
            self._out.append(tail)

    def _flush(self) -> None:
        out, self._out = self._out, []
        transport = self.transport
        if transport is None or transport.is_closing():
            return
        small: list[bytes] = []
        for piece in out:
            if len(piece) < _DIRECT:
                small.append(piece)
                continue
            if small:
                transport.write(b"".join(small))
                small = []
            transport.write(piece)  # a large message: not copied into a joined buffer
        if small:
            transport.write(b"".join(small))


# -- the parent side ----------------------------------------------------------------

class _ParentSide(_Framed):
    def __init__(self, agent: _Agent) -> None:
        super().__init__(Result | Signed)
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
                sys.executable, "-m", "relayd.delivery.agent", "--fd", str(child.fileno()),
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
                    self.proc.kill()
                    await self.proc.wait()
            self.fail_pending(f"delivery agent exited ({self.proc.returncode})")
            if self.pool.closing:
                return
            if loop.time() - started > 10 * RESTART_DELAY_MAX:
                delay = RESTART_DELAY_FIRST
            await asyncio.sleep(delay)
            delay = min(delay * 2, RESTART_DELAY_MAX)

    def fail_pending(self, text: str) -> None:
        """Every unanswered job: a temporary failure for each recipient."""
        from relayd.delivery.client import RcptReply

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
        from relayd.delivery.client import RcptReply

        self.opened = res.opened
        entry = self.pending.pop(res.id, None)
        if entry is not None:
            entry[0]([RcptReply(c, t) for c, t in res.replies])


class AgentPool:
    """Delivery agent processes seen as one ``send``; the least busy one takes a job."""

    def __init__(self, cfg: DeliveryConfig, helo: str, processes: int,
                 signer: bool = False) -> None:
        self.cfg = cfg
        self.helo = helo
        self.closing = False
        self._agents = [_Agent(self, n) for n in range(processes)]  # deliver (and sign)
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
        for a in self._children:
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
        from relayd.delivery.client import RcptReply

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
                          sender, list(rcpts), len(data)), data)
        else:  # a BodyFile: the child reads it
            side.send(Job(job_id, hop.host, hop.port, hop.tls, hop.username, hop.password,
                          sender, list(rcpts), data.size, data.path))
        return job_id

    def sign(self, signers: Sequence[Signer], data: bytes,
             now: int) -> asyncio.Future[bytes] | None:
        """DKIM headers for ``data``, made by a child; None if no child runs now.

        The RSA work then runs in the child's interpreter, not beside the event
        loop fighting it for the GIL. A key goes to a child once (``SignKey``)
        before its first use; keys are identified by ``Signer.key_id``, which
        is never reused, so a rotated key is a new one. The future fails with
        SigningUnavailable if the child dies first.
        """
        agent = self._signer or min(self._agents,
                                    key=lambda a: len(a.pending) + len(a.signing))
        side = agent.side
        if not agent.ready.is_set() or side is None:
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


# -- the child side -----------------------------------------------------------------

class _ChildSide(_Framed):
    def __init__(self) -> None:
        super().__init__(ToAgent)
        from relayd.delivery.client import Deliverer

        self._deliverer_type = Deliverer
        self.deliverer: Deliverer | None = None
        self.jobs: set[asyncio.Task[None]] = set()
        self.closing = asyncio.get_running_loop().create_future()
        self.signers: dict[int, Any] = {}  # key id -> dkim.Signer (SignKey frames)
        self._to_sign: list[tuple[Sign, bytes]] = []  # Sign frames not signed yet

    def tail_size(self, frame: object) -> int:
        if isinstance(frame, Job):
            return 0 if frame.path else frame.size
        return frame.size if isinstance(frame, Sign) else 0

    def frame_received(self, frame: object, tail: bytes) -> None:
        if isinstance(frame, Job):
            task = asyncio.get_running_loop().create_task(self._run(frame, tail))
            self.jobs.add(task)
            task.add_done_callback(self.jobs.discard)
        elif isinstance(frame, Configure):
            if self.deliverer is None:
                self.deliverer = self._deliverer_type(frame.cfg, frame.helo)
            else:
                self.deliverer.cfg = frame.cfg
        elif isinstance(frame, Sign):
            self._sign(frame, tail)
        elif isinstance(frame, SignKey):
            self._add_key(frame)
        elif isinstance(frame, ForgetKey):
            self.signers.pop(frame.key_id, None)
        elif isinstance(frame, Close) and not self.closing.done():
            self.closing.set_result(None)

    def _add_key(self, key: SignKey) -> None:
        """Load a key (it comes just before its first use); a bad one fails its Sign jobs."""
        from relayd.dkim import signature as dkim

        try:
            self.signers[key.key_id] = dkim.Signer(key.domain, key.selector, key.pem)
        except Exception:  # noqa: S110 - its Sign jobs then fail (KeyError): the session says 451
            pass

    def _sign(self, job: Sign, data: bytes) -> None:
        """Queue a ``Sign``; the waiting ones are signed after this read, in slices."""
        if not self._to_sign:
            asyncio.get_running_loop().call_soon(self._sign_batch)
        self._to_sign.append((job, data))

    def _sign_batch(self) -> None:
        """Sign the waiting ``Sign`` frames, at most SIGN_SLICE of them back to back.

        On this loop: each is one RSA operation, well under a millisecond. The
        rest wait for the next loop turn, so the replies of deliveries are read
        between slices however many sessions of the parent wait for a signature.
        """
        from relayd.dkim import signature as dkim

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

    async def _run(self, job: Job, data: bytes) -> None:
        from relayd.delivery.client import BodyFile, Hop

        assert self.deliverer is not None
        hop = Hop(job.host, job.port, job.tls, job.username, job.password)
        try:
            body: bytes | BodyFile = BodyFile(job.path, job.size) if job.path else data
            replies = [(r.code, r.text) for r in
                       await self.deliverer.send(hop, job.sender, job.rcpts, body)]
        except Exception as exc:  # a bug must not leave the job unanswered
            replies = [(None, f"delivery agent error: {type(exc).__name__}")] * len(job.rcpts)
        self.send(Result(job.id, replies, self.deliverer.connections_opened))


async def _serve(fd: int) -> None:
    loop = asyncio.get_running_loop()
    sock = socket.socket(fileno=fd)
    _t, side = await loop.create_unix_connection(_ChildSide, sock=sock)
    await asyncio.wait([side.lost, side.closing], return_when=asyncio.FIRST_COMPLETED)
    for task in list(side.jobs):
        task.cancel()
    await asyncio.gather(*side.jobs, return_exceptions=True)
    if side.deliverer is not None:
        await side.deliverer.close()
    if side.transport is not None:
        side.transport.close()


def main(argv: list[str] | None = None) -> int:
    """Entry point of the child: ``python -m relayd.delivery.agent --fd N [--role R]``.

    The role (``deliver`` or ``sign``) only names the child in its command line:
    what it does is what the parent sends it.
    """
    args = sys.argv[1:] if argv is None else argv
    if len(args) == 4 and args[2] == "--role" and args[3] in ("deliver", "sign"):
        args = args[:2]
    if len(args) != 2 or args[0] != "--fd":
        print("usage: python -m relayd.delivery.agent --fd N [--role deliver|sign]",
              file=sys.stderr)
        return 2
    # The parent decides when we stop (Close, or end-of-file when it is gone).
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    import uvloop

    uvloop.run(_serve(int(args[1])))
    return 0


if __name__ == "__main__":
    sys.exit(main())
