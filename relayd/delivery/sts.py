"""MTA-STS in MX mode: discovering a domain's policy, caching it, and applying it to hops.

Owns: the policy cache (in memory, per recipient domain, for the policy's
``max_age``; not kept across restarts: the first delivery after a start fetches
again), discovery (``_mta-sts.<domain>`` TXT through relayd.delivery.mx's
resolver, then the policy file through relayd.delivery.stsfetch, one fetch at a
time per domain), and what a policy does to a delivery:

- ``enforce``: only MX hosts matching the policy's ``mx`` patterns are tried,
  each at least at TLS level ``verify`` (``tlslevels.stronger``: a configured
  level is never lowered), the certificate checked against the MX name with the
  trust store of ``[delivery] tls_ca_file``; no MX host matching: a temporary
  route error (the recipients are deferred, never bounced for it);
- ``testing``: delivery as the configured level says, but each matching hop is
  tried at level ``verify`` first; when that is refused (no STARTTLS, or the
  certificate does not verify) the failure is logged and counted, and the same
  hop is tried again at its configured level (nothing was sent: TLS is set up
  before MAIL). A non-matching MX is logged and counted, and delivered to;
- ``none``, no policy, or no policy could be fetched and none is cached: as
  before (the configured level).

An MX host with usable DANE records (``Hop.tlsa``: validated TLSA,
relayd.delivery.dane) is left to DANE, as RFC 8461 §2 says: kept whatever the
policy lists, checked against its records, not counted for MTA-STS.

Every outcome of a hop under a policy goes to TLSRPT (relayd.delivery.tlsrpt)
and to ``on_result(mode, result)`` (the metric); failures to ``log``.
A refresh happens when the cached policy expired or the TXT id changed; when it
fails, an unexpired cached policy keeps being used (RFC 8461 §5.1), and that TXT
id is not fetched again for ``RETRY_FETCH_SECONDS``.

Untrusted input: TXT records and policy files (relayd.delivery.mtasts parses).
Settings read: none directly; relayd.app builds it from ``[delivery] mta_sts_port``,
``mta_sts_timeout_seconds``, ``tls_ca_file``.
See also: relayd.delivery.client (``Deliverer.route`` and ``send`` call it),
relayd.delivery.mtasts, docs/SEMANTICS.md (Delivery), RFC 8461.
"""

from __future__ import annotations

import asyncio
import dataclasses
import time
from collections.abc import Awaitable, Callable
from typing import Any, Protocol, cast

from relayd.delivery import mtasts, tlslevels
from relayd.delivery.client import Hop, RcptReply
from relayd.delivery.connection import forget_level_contexts
from relayd.delivery.mtasts import Cached, Policy, PolicyError
from relayd.delivery.routing import RouteError, TemporaryRouteError
from relayd.delivery.stsfetch import FetchError, fetch
from relayd.delivery.tlslevels import TlsLevel
from relayd.delivery.tlsrpt import TlsReport


class StsResolver(Protocol):
    """The lookups discovery needs (relayd.delivery.mx ``MxResolver``)."""

    async def txt(self, name: str) -> list[str]: ...

    async def addresses(self, host: str) -> list[str]: ...


MAX_CACHED = 10_000  # policies kept (domains); beyond, the expired then the oldest go
#: After a failed fetch, the same TXT id is not fetched again for this long (deliveries
#: meanwhile go as without a policy, or with the cached one): a policy host that is down
#: must not add a fetch timeout to every delivery.
RETRY_FETCH_SECONDS = 300.0


def _nothing(*_args: Any, **_kwargs: Any) -> None:
    return None


class MtaSts:
    """Policies per recipient domain, and their effect on next hops and transactions."""

    def __init__(self, resolver: StsResolver, *, port: int = 443, ca_file: str = "",
                 timeout: float = 10.0, report: TlsReport | None = None,
                 clock: Callable[[], float] = time.time) -> None:
        self.resolver = resolver
        self.port = port
        self.ca_file = ca_file
        self.timeout = timeout
        self.report = report
        self.clock = clock
        self.on_result: Callable[[str, str], None] = _nothing
        self.log: Callable[..., None] = _nothing
        self._cache: dict[str, Cached] = {}
        self._fetching: dict[str, asyncio.Future[Policy | None]] = {}
        self._failed: dict[str, tuple[str, float]] = {}  # domain -> (TXT id, no fetch until)

    def reconfigure(self, ca_file: str) -> None:
        """A reload: the trust store (``[delivery] tls_ca_file``) read again at the next
        fetch. The port and timeout are read at start only."""
        self.ca_file = ca_file
        forget_level_contexts()

    async def policy(self, domain: str) -> Policy | None:
        """The domain's policy in effect now (cached, or fetched), None when it has none."""
        domain = domain.lower().rstrip(".")
        try:
            txt_id = mtasts.parse_txt(await self.resolver.txt(f"_mta-sts.{domain}"))
        except (RouteError, PolicyError):
            txt_id = None  # no usable record now: a cached policy still serves
        cached = self._cache.get(domain)
        now = self.clock()
        failed = self._failed.get(domain)
        recent_failure = failed is not None and failed[0] == txt_id and now < failed[1]
        if mtasts.usable(cached, txt_id, now) or txt_id is None or recent_failure:
            return cached.policy if cached and now < cached.expires else None
        task = self._fetching.get(domain)  # one fetch at a time per domain
        if task is None:
            task = asyncio.ensure_future(self._refresh(domain, txt_id, cached))
            self._fetching[domain] = task
            task.add_done_callback(lambda _: self._fetching.pop(domain, None))
        return await asyncio.shield(task)

    async def _refresh(self, domain: str, txt_id: str, cached: Cached | None) -> Policy | None:
        """Fetch the policy; on failure the unexpired cached one (or None)."""
        host = f"mta-sts.{domain}"
        try:
            addresses = await self.resolver.addresses(host)
            text = await fetch(host, addresses[0], self.port, self.ca_file, self.timeout)
            policy = mtasts.parse_policy(text)
        except (RouteError, FetchError, PolicyError) as exc:
            kind = exc.result_type if isinstance(exc, FetchError) else (
                mtasts.POLICY_INVALID if isinstance(exc, PolicyError) else mtasts.FETCH_ERROR)
            self.log("mta_sts_fetch_failed", domain=domain, result=kind, reason=str(exc)[:300])
            keep = cached if cached is not None and self.clock() < cached.expires else None
            if len(self._failed) >= MAX_CACHED:
                self._failed.clear()
            self._failed[domain] = (txt_id, self.clock() + RETRY_FETCH_SECONDS)
            self._result(domain, keep.policy if keep else None, kind, "-")
            return keep.policy if keep else None
        if len(self._cache) >= MAX_CACHED:  # the expired first, else the oldest fetched
            now = self.clock()
            for key in [k for k, c in self._cache.items() if c.expires <= now] or \
                    list(self._cache)[: len(self._cache) // 10 + 1]:
                del self._cache[key]
        self._cache.pop(domain, None)
        self._failed.pop(domain, None)
        self._cache[domain] = Cached(policy, txt_id, self.clock() + policy.max_age)
        return policy

    async def apply(self, domain: str, hops: list[Hop]) -> list[Hop]:
        """The hops as the domain's policy wants them (see the module docstring); raises
        TemporaryRouteError when ``enforce`` leaves none."""
        policy = await self.policy(domain)
        if policy is None or policy.mode == "none":
            return hops
        domain = domain.lower().rstrip(".")
        out: list[Hop] = []
        for hop in hops:
            if hop.tlsa:  # DANE before MTA-STS (RFC 8461 §2): its records decide
                out.append(hop)
                continue
            name = hop.mx or hop.host
            if policy.matches(name):
                level = tlslevels.stronger(cast(TlsLevel, hop.tls), "verify") \
                    if policy.mode == "enforce" else hop.tls
                out.append(dataclasses.replace(hop, tls=level, sts=domain,
                                               sts_mode=policy.mode))
                continue
            self.log("mta_sts_mx_not_in_policy", domain=domain, mode=policy.mode, mx=name,
                     ip=hop.host)
            self._result(domain, policy, mtasts.VALIDATION_FAILURE, policy.mode, name, hop.host)
            if policy.mode == "testing":
                out.append(hop)
        if not out:
            raise TemporaryRouteError(
                f"MTA-STS policy of {domain} (mode enforce) matches none of its MX hosts"
                f" ({', '.join(sorted({h.mx or h.host for h in hops}))}): not delivered")
        return out

    async def send(self, hop: Hop,
                   send: Callable[[Hop], Awaitable[list[RcptReply]]]) -> list[RcptReply]:
        """One transaction at a hop under a policy (``apply`` marked it), its outcome recorded."""
        cached = self._cache.get(hop.sts)
        policy = cached.policy if cached is not None else None
        probe = hop
        if hop.sts_mode == "testing":
            probe = dataclasses.replace(hop, tls="verify")
        replies = await send(probe)
        tls = replies[0].tls if replies else ""
        if tls == "verified":
            self._result(hop.sts, policy, "", hop.sts_mode, hop.mx, hop.host)
        elif tls == "refused":
            kind = mtasts.result_type(replies[0].text)
            self._result(hop.sts, policy, kind, hop.sts_mode, hop.mx, hop.host)
            self.log("mta_sts_tls_failure", domain=hop.sts, mode=hop.sts_mode, mx=hop.mx,
                     ip=hop.host, result=kind, reason=replies[0].text[:300],
                     delivered_anyway=probe is not hop and hop.tls != "verify")
            if probe is not hop and hop.tls != "verify":
                return await send(hop)  # testing: as the configured level would
        return replies

    def _result(self, domain: str, policy: Policy | None, result: str, mode: str,
                mx: str = "", ip: str = "") -> None:
        self.on_result(mode, result or "success")
        if self.report is not None:
            self.report.record(domain, policy.text if policy else "", result, mx, ip)
