"""The control API (HTTP/1.1 + JSON on a Unix socket) and the /metrics endpoint.

Owns: the one adapter to aiohttp — routing each ``/v1/`` path (the table
control.schemas.ROUTES, which control.openapi documents) to a
relayd.controlplane.lifecycle operation (``/v1/throttle``: to the SMTP server's failed-AUTH
throttle, relayd.smtp.policy.AuthThrottle), decoding request bodies strictly into
control.schemas Structs, encoding responses, mapping errors to HTTP status
codes with an ``Error`` body, and recording the uid of the socket peer
(SO_PEERCRED) with every operation it logs and, for the audit trail, in
relayd.controlplane.audit.OPERATOR_UID while the request runs. The control socket is created
with mode 0660 (umask set around the bind), so it is never world-accessible.
The Prometheus endpoint is a second, TCP site of the same library; it also serves
``GET /health`` for a load balancer (200 ``ok`` or 503 with the reason, plain text,
never cached), from the ``health`` function the app passes. The client side of the
library is here too: :class:`WebhookClient`, the POSTs of relayd.webhooks.poster.

Untrusted input: request paths, query strings and bodies (from local users
allowed on the socket; still validated: malformed JSON or UTF-8, unknown or
repeated fields, wrong types, out-of-range numbers and unknown paths get a
clear 4xx answer naming what is wrong).
Settings read: [control], [metrics].
See also: control.schemas (the contract), control.cli (the client).
"""

from __future__ import annotations

import contextlib
import ipaddress
import json
import os
import re
import socket
import stat
import struct
import time
import typing
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, TypeVar

import aiohttp
import msgspec
from aiohttp import web

from control import schemas
from control.openapi import dump as openapi_document
from relayd.controlplane.audit import OPERATOR_UID
from relayd.controlplane.lifecycle import Lifecycle, LifecycleError
from relayd.observe.logs import bind_context, unbind_context
from relayd.observe.metrics import Registry, render
from relayd.smtp.policy import AuthThrottle

S = TypeVar("S", bound=msgspec.Struct)
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def _json(obj: msgspec.Struct, status: int = 200) -> web.Response:
    return web.Response(body=msgspec.json.encode(obj), status=status,
                        content_type="application/json")


def _error(message: str, code: str, status: int) -> web.Response:
    return _json(schemas.Error(error=message, code=code), status)


class _DuplicateKey(Exception):
    pass


def _no_repeats(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    seen: set[str] = set()
    for key, _ in pairs:
        if key in seen:
            raise _DuplicateKey(key)
        seen.add(key)
    return {}


async def _body(request: web.Request, kind: type[S]) -> S:
    raw = await request.read() or b"{}"
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise LifecycleError(f"malformed JSON: not valid UTF-8 at byte {exc.start}",
                             "malformed_json") from None
    try:
        obj = msgspec.json.decode(raw, type=kind)
    except msgspec.ValidationError as exc:
        raise _invalid("invalid request", exc, kind) from None
    except msgspec.DecodeError as exc:
        raise LifecycleError(f"malformed JSON: {exc}", "malformed_json") from None
    # msgspec keeps the last of repeated keys; an operator's request must not be
    # read two ways. Parsed again only here (the control path is not hot), after
    # msgspec accepted the shape, so the nesting is bounded by the schema.
    try:
        json.loads(text, object_pairs_hook=_no_repeats)
    except _DuplicateKey as exc:
        raise LifecycleError(f"invalid request: duplicate key `{exc.args[0]}`",
                             "invalid_request") from None
    except ValueError:
        pass  # msgspec's verdict stands
    return obj


def _invalid(prefix: str, exc: msgspec.ValidationError, kind: type[msgspec.Struct]) -> \
        LifecycleError:
    """A 400 with msgspec's text (which names the field); for a field with fixed choices,
    the choices too."""
    text = f"{prefix}: {exc}"
    m = re.search(r"at `\$\.(\w+)`", str(exc))
    if m:
        hint = typing.get_type_hints(kind).get(m.group(1))
        choices = [a for t in (hint, *typing.get_args(hint))
                   if typing.get_origin(t) is typing.Literal for a in typing.get_args(t)]
        if choices:
            text += f" ({m.group(1)} must be {', '.join(choices[:-1])} or {choices[-1]})" \
                if len(choices) > 1 else f" ({m.group(1)} must be {choices[0]})"
    return LifecycleError(text, "invalid_request")


def _query(request: web.Request, kind: type[S]) -> S:
    """The query string as ``kind``: each key once; an empty value is an absent one."""
    q = request.query
    values: dict[str, str] = {}
    for key, value in q.items():
        if len(q.getall(key)) > 1:
            raise LifecycleError(f"invalid request: query parameter `{key}` given twice",
                                 "invalid_request")
        if value != "":
            values[key] = value
    try:
        obj = msgspec.convert(values, type=kind, strict=False)
    except msgspec.ValidationError as exc:
        raise _invalid("invalid query", exc, kind) from None
    for key, value in values.items():  # lax decoding reads "null" as None: not a value here
        if getattr(obj, key) is None:
            raise _invalid("invalid query", msgspec.ValidationError(
                f"Invalid value {value!r} - at `$.{key}`"), kind)
    return obj


def _peer_uid(request: web.Request) -> int | None:
    sock = request.transport.get_extra_info("socket") if request.transport else None
    if sock is None or sock.family != socket.AF_UNIX:
        return None
    try:
        creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    except OSError:
        return None
    _pid, uid, _gid = struct.unpack("3i", creds)
    return int(uid)


class ControlServer:
    """The control socket and the metrics endpoint."""

    def __init__(self, lifecycle: Lifecycle, status: Callable[[], Awaitable[schemas.Status]],
                 registry: Registry, log: Any,
                 before_scrape: Callable[[], Awaitable[None]] | None = None,
                 throttle: AuthThrottle | None = None,
                 clock: Callable[[], float] = time.time,
                 health: Callable[[], tuple[bool, str]] | None = None) -> None:
        self.lc = lifecycle
        #: (healthy, reason) for the load balancer's GET /health; None: always healthy.
        self.lb_health = health
        self.throttle = throttle  # the SMTP server's failed-AUTH throttle (relayd.smtp.policy)
        self.clock = clock
        self.status = status
        self.before_scrape = before_scrape  # refreshes gauges (queue depths) before /metrics
        self.registry = registry
        self.log = log
        self._runners: list[web.AppRunner] = []
        self.metrics_address = ""
        self._openapi: bytes | None = None  # the document, made on first request
        self._plain: dict[str, set[str]] = {}  # methods of each path without parameters

    # -- app -------------------------------------------------------------------------
    def app(self) -> web.Application:
        """The control API application."""
        app = web.Application(middlewares=[self._errors], client_max_size=1024 * 1024)
        self._plain.clear()
        for route in schemas.ROUTES:  # the table control.openapi documents
            if "{" not in route.path:
                extra = ["HEAD"] if route.method == "GET" else []
                self._plain.setdefault(route.path, set()).update([route.method, *extra])
            handler = getattr(self, route.operation)
            if route.method == "GET":
                app.router.add_get(route.path, handler)  # and HEAD, as aiohttp does
            else:
                app.router.add_route(route.method, route.path, handler)
        return app

    @web.middleware
    async def _errors(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        uid = _peer_uid(request)
        bind_context(peer_uid=uid)
        operator = OPERATOR_UID.set(uid)
        try:
            allowed = self._plain.get(request.path)
            if allowed is not None and request.method not in allowed:
                # a fixed path wins over a template (GET /v1/queue/purge is no message id),
                # as OpenAPI matches paths
                raise web.HTTPMethodNotAllowed(request.method, allowed)
            return await handler(request)
        except LifecycleError as exc:
            return _error(str(exc), exc.code, exc.status)
        except web.HTTPNotFound:
            return _error(f"unknown endpoint: {request.method} {request.path}",
                          "unknown_endpoint", 404)
        except web.HTTPMethodNotAllowed as exc:
            resp = _error(f"method not allowed: {request.method} {request.path}",
                          "method_not_allowed", 405)
            resp.headers["Allow"] = ", ".join(sorted(exc.allowed_methods))  # RFC 9110
            return resp
        except web.HTTPRequestEntityTooLarge:
            return _error("request too large", "too_large", 413)
        except Exception as exc:
            self.log.error("control_error", path=request.path,
                           error=f"{type(exc).__name__}: {exc}")
            return _error("internal error (see the relayd log)", "internal", 500)
        finally:
            unbind_context("peer_uid")
            OPERATOR_UID.reset(operator)

    # -- handlers --------------------------------------------------------------------
    async def health(self, request: web.Request) -> web.Response:
        """Cheap liveness check."""
        return _json(schemas.Health(ok=True))

    async def openapi(self, request: web.Request) -> web.Response:
        """This API as an OpenAPI 3.1 document (control.openapi; docs/openapi.json)."""
        if self._openapi is None:
            self._openapi = openapi_document().encode()
        return web.Response(body=self._openapi, content_type="application/json")

    async def get_status(self, request: web.Request) -> web.Response:
        """Version, uptime, listeners, queue depths..."""
        return _json(await self.status())

    async def domain_add(self, request: web.Request) -> web.Response:
        """Create a sending domain."""
        body = await _body(request, schemas.DomainAdd)
        return _json(await self.lc.domain_add(body.name, body.reason), 201)

    async def domain_list(self, request: web.Request) -> web.Response:
        """All live domains."""
        return _json(await self.lc.domain_list())

    async def domain_show(self, request: web.Request) -> web.Response:
        """One domain."""
        return _json(await self.lc.domain_info(request.match_info["name"]))

    async def domain_set(self, request: web.Request) -> web.Response:
        """Change a domain's settings."""
        body = await _body(request, schemas.DomainSettings)
        return _json(await self.lc.domain_set(request.match_info["name"], body))

    async def domain_delete(self, request: web.Request) -> web.Response:
        """Delete a domain (irreversible)."""
        body = await _body(request, schemas.Confirm)
        return _json(await self.lc.domain_delete(request.match_info["name"], body.confirm,
                                                 body.reason))

    async def domain_rotate_key(self, request: web.Request) -> web.Response:
        """A new pending DKIM key."""
        body = await _body(request, schemas.ChangeReason)
        return _json(await self.lc.domain_rotate_key(request.match_info["name"], body.reason),
                     201)

    async def domain_activate_key(self, request: web.Request) -> web.Response:
        """The pending DKIM key signs from now on."""
        body = await _body(request, schemas.ChangeReason)
        return _json(await self.lc.domain_activate_key(request.match_info["name"], body.reason))

    async def domain_cancel_key(self, request: web.Request) -> web.Response:
        """Drop the pending DKIM key."""
        body = await _body(request, schemas.ChangeReason)
        return _json(await self.lc.domain_cancel_key(request.match_info["name"], body.reason))

    async def user_add(self, request: web.Request) -> web.Response:
        """Create an account."""
        body = await _body(request, schemas.UserAdd)
        return _json(await self.lc.user_add(body.domain, body.allow_networks, body.label,
                                            body.reason), 201)

    async def user_list(self, request: web.Request) -> web.Response:
        """List accounts."""
        q = _query(request, schemas.UserListQuery)
        return _json(await self.lc.user_list(q.domain, q.status, q.sort))

    async def user_show(self, request: web.Request) -> web.Response:
        """One account."""
        return _json(await self.lc.user_show(request.match_info["name"]))

    async def user_disable(self, request: web.Request) -> web.Response:
        """Disable an account, effective before this returns."""
        body = await _body(request, schemas.ChangeReason)
        return _json(await self.lc.user_disable(request.match_info["name"], body.reason))

    async def user_enable(self, request: web.Request) -> web.Response:
        """Enable an account."""
        body = await _body(request, schemas.ChangeReason)
        return _json(await self.lc.user_enable(request.match_info["name"], body.reason))

    async def user_reset(self, request: web.Request) -> web.Response:
        """Reset an account's password (optionally keeping the old one for a while)."""
        body = await _body(request, schemas.PasswordReset)
        return _json(await self.lc.user_reset_password(request.match_info["name"],
                                                       body.keep_old_seconds, body.reason))

    async def user_expire_old(self, request: web.Request) -> web.Response:
        """End a kept old password's grace now."""
        body = await _body(request, schemas.ChangeReason)
        return _json(await self.lc.user_expire_old_password(request.match_info["name"],
                                                            body.reason))

    async def user_delete(self, request: web.Request) -> web.Response:
        """Delete an account (irreversible)."""
        body = await _body(request, schemas.UserDelete)
        if body.dry_run:
            return _json(await self.lc.user_delete_check(request.match_info["name"],
                                                         body.purge_queue))
        return _json(await self.lc.user_delete(request.match_info["name"], body.confirm,
                                               body.purge_queue, body.reason))

    async def user_limits(self, request: web.Request) -> web.Response:
        """Set sending limits."""
        body = await _body(request, schemas.UserLimits)
        return _json(await self.lc.user_limits(request.match_info["name"], body))

    async def user_networks(self, request: web.Request) -> web.Response:
        """Bind or unbind a network."""
        body = await _body(request, schemas.NetworkChange)
        return _json(await self.lc.user_networks(request.match_info["name"], body))

    async def user_label(self, request: web.Request) -> web.Response:
        """Set or clear an account's label."""
        body = await _body(request, schemas.UserLabel)
        return _json(await self.lc.user_label(request.match_info["name"], body))

    async def audit_list(self, request: web.Request) -> web.Response:
        """The audit trail."""
        q = _query(request, schemas.AuditQuery)
        return _json(await self.lc.audit_list(q.user, q.domain, q.since, q.limit))

    async def dormant(self, request: web.Request) -> web.Response:
        """Accounts not used for a while."""
        q = _query(request, schemas.DormantQuery)
        return _json(await self.lc.user_dormant(q.days, q.max_sent))

    async def queue_list(self, request: web.Request) -> web.Response:
        """Queued messages."""
        q = _query(request, schemas.QueueListQuery)
        return _json(await self.lc.queue_list(q.user, q.state))

    async def queue_show(self, request: web.Request) -> web.Response:
        """One queued message."""
        return _json(await self.lc.queue_show(request.match_info["id"]))

    async def queue_purge(self, request: web.Request) -> web.Response:
        """Purge an account's queue."""
        body = await _body(request, schemas.QueuePurge)
        return _json(await self.lc.queue_purge(body.user, body.state))

    async def queue_retry(self, request: web.Request) -> web.Response:
        """Make deferred mail due now."""
        body = await _body(request, schemas.QueueRetry)
        return _json(await self.lc.queue_retry(body.user))

    async def queue_hold(self, request: web.Request) -> web.Response:
        """Hold one message until released."""
        return _json(await self.lc.queue_hold(request.match_info["id"]))

    async def queue_release(self, request: web.Request) -> web.Response:
        """Release a held message."""
        return _json(await self.lc.queue_release(request.match_info["id"]))

    async def queue_delete(self, request: web.Request) -> web.Response:
        """Delete one message for good."""
        return _json(await self.lc.queue_delete(request.match_info["id"]))

    async def delivery_log(self, request: web.Request) -> web.Response:
        """Delivery attempts."""
        q = _query(request, schemas.LogQuery)
        return _json(await self.lc.delivery_log(q.user, q.status, q.since, q.limit,
                                                q.message))

    async def suppression_list(self, request: web.Request) -> web.Response:
        """A domain's suppressed recipients."""
        q = _query(request, schemas.SuppressionQuery)
        return _json(await self.lc.suppression_list(request.match_info["name"], q.limit))

    async def suppression_add(self, request: web.Request) -> web.Response:
        """Suppress recipients for a domain."""
        body = await _body(request, schemas.SuppressionAdd)
        return _json(await self.lc.suppression_add(request.match_info["name"], body))

    async def suppression_remove(self, request: web.Request) -> web.Response:
        """Send to a suppressed recipient again."""
        body = await _body(request, schemas.SuppressionRemove)
        return _json(await self.lc.suppression_remove(request.match_info["name"],
                                                      body.address))

    async def node_list(self, request: web.Request) -> web.Response:
        """The nodes of the cluster (409 on a single node)."""
        return _json(await self.lc.node_list())

    async def node_forget(self, request: web.Request) -> web.Response:
        """Forget a gone node (409 on a single node or a live node)."""
        return _json(await self.lc.node_forget(request.match_info["name"]))

    def _throttle(self) -> AuthThrottle:
        if self.throttle is None:
            raise LifecycleError("no AUTH throttle in this process", "unavailable", 503)
        return self.throttle

    async def throttle_list(self, request: web.Request) -> web.Response:
        """What the failed-AUTH throttle counts or refuses now."""
        entries = self._throttle().entries(self.clock())
        return _json(schemas.ThrottleList(entries=[
            schemas.ThrottleEntry(address=e.address, username=e.username,
                                  failures=e.failures, until=e.until) for e in entries]))

    async def throttle_clear(self, request: web.Request) -> web.Response:
        """Forget failed-AUTH counts and locks (of one address): logins work again at once."""
        body = await _body(request, schemas.ThrottleClear)
        address = body.address
        if address is not None:
            try:
                address = str(ipaddress.ip_address(address))
            except ValueError:
                raise LifecycleError(f"invalid request: address: not an IP address: {address!r}",
                                     "invalid_request") from None
        count = self._throttle().clear(self.clock(), address)
        self.log.info("auth_throttle_cleared", address=address or "*", entries=count)
        return _json(schemas.ThrottleCleared(count=count))

    async def metrics(self, request: web.Request) -> web.Response:
        """Prometheus exposition."""
        if self.before_scrape is not None:
            try:
                await self.before_scrape()
            except Exception as exc:  # a stale gauge is better than a failed scrape
                self.log.error("scrape_refresh_failed", error=f"{type(exc).__name__}: {exc}")
        body, ctype = render(self.registry, request.headers.get("Accept", ""))
        resp = web.Response(body=body)
        resp.headers["Content-Type"] = ctype
        return resp

    async def load_balancer_health(self, request: web.Request) -> web.Response:
        """GET /health on the metrics listener: 200 ``ok`` or 503 with the reason."""
        healthy, reason = (True, "") if self.lb_health is None else self.lb_health()
        resp = web.Response(text="ok\n" if healthy else f"{reason or 'unhealthy'}\n",
                            status=200 if healthy else 503, content_type="text/plain")
        resp.headers["Cache-Control"] = "no-store"
        return resp

    # -- start and stop -------------------------------------------------------------
    async def start(self, socket_path: str, mode: int, metrics_host: str | None,
                    metrics_port: int | None) -> None:
        """Bind the control socket (mode ``mode``) and the metrics endpoint."""
        path = Path(socket_path)
        path.parent.mkdir(parents=True, exist_ok=True)
        _clear_stale_socket(path)
        runner = web.AppRunner(self.app(), access_log=None, handle_signals=False)
        await runner.setup()
        self._runners.append(runner)
        old = os.umask(0o777 & ~mode)
        try:
            site = web.UnixSite(runner, str(path))
            await site.start()
        finally:
            os.umask(old)
        os.chmod(path, mode)
        if metrics_host is not None and metrics_port is not None:
            mapp = web.Application()
            mapp.router.add_get("/metrics", self.metrics)
            mapp.router.add_get("/health", self.load_balancer_health)
            mrunner = web.AppRunner(mapp, access_log=None, handle_signals=False)
            await mrunner.setup()
            self._runners.append(mrunner)
            msite = web.TCPSite(mrunner, metrics_host, metrics_port)
            await msite.start()
            sockets = getattr(msite._server, "sockets", None)
            if sockets:
                addr = sockets[0].getsockname()
                self.metrics_address = f"{addr[0]}:{addr[1]}"

    async def stop(self) -> None:
        """Close both sites."""
        for runner in reversed(self._runners):
            with contextlib.suppress(Exception):
                await runner.cleanup()
        self._runners.clear()


def _clear_stale_socket(path: Path) -> None:
    """Remove a leftover socket file, refusing if a live server answers on it."""
    try:
        st = path.lstat()
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(st.st_mode):
        raise OSError(f"{path} exists and is not a socket")
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.settimeout(1.0)
        probe.connect(str(path))
    except OSError:
        path.unlink(missing_ok=True)
        return
    finally:
        probe.close()
    raise OSError(f"another relayd is already listening on {path}")


class WebhookClient:
    """The client side of the same library: the webhook poster's POSTs (one session, its
    connections reused), each with its own total timeout; TLS verified by default."""

    def __init__(self, timeout: float, user_agent: str) -> None:
        self._timeout = aiohttp.ClientTimeout(total=timeout)
        self._headers = {"User-Agent": user_agent, "Content-Type": "application/json"}
        self._session: aiohttp.ClientSession | None = None

    async def post(self, url: str, body: bytes, headers: dict[str, str]) -> tuple[int | None, str]:
        """POST ``body``; ``(status, "")``, or ``(None, why)`` when no answer came (refused,
        timed out, TLS or protocol error). The answer's body is not read beyond 1 KiB."""
        if self._session is None:
            self._session = aiohttp.ClientSession(timeout=self._timeout, headers=self._headers)
        try:
            async with self._session.post(url, data=body, headers=headers,
                                          allow_redirects=False) as resp:
                await resp.content.read(1024)
                return resp.status, ""
        except TimeoutError:
            return None, "timed out"
        except (aiohttp.ClientError, OSError, ValueError) as exc:
            return None, f"{type(exc).__name__}: {exc}"[:300]

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None
