"""Structured logging: one JSON object per line, secrets masked.

Owns: the structlog configuration (processors, level filter, output stream),
the stdlib ``logging`` bridge (aiosmtpd, asyncio and aiohttp log through the
stdlib; their records come out as the same JSON lines), and the secret masking
every line goes through.

Each line holds ``timestamp`` (ISO 8601, UTC), ``level``, ``event``, ``logger``
and the bound context, e.g.::

    {"peer": "192.0.2.7", "event": "auth failed", "level": "info",
     "logger": "relayd.smtp.server", "timestamp": "2024-05-01T12:00:00.123456Z"}

Untrusted input: every logged value may come from a client. Masking, applied
after all other processors and before rendering:

- the value of any key named in :data:`SECRET_KEYS`, or ending in ``_`` plus
  one of them (``smarthost_password``), case-insensitive, at any depth of
  dicts, lists and tuples, becomes ``"***"``;
- in any string or bytes value (``event`` included), the argument of an SMTP
  ``AUTH <mechanism> <initial-response>`` command becomes ``***``.

Masking cannot recognise a bare base64 continuation line of ``AUTH LOGIN`` or
``AUTH PLAIN`` without an initial response: callers log those only under a
secret key (``auth_data``), never as the event text.

journald priority: with ``StandardOutput=journal`` systemd reads the level of a
line from a ``<N>`` prefix (sd-daemon(3): ``<7>`` debug, ``<6>`` info, ``<4>``
warning, ``<3>`` error, ``<2>`` critical) and strips it, so ``journalctl -p
warning`` and the colours work; a JSON consumer reading the same stdout through
a pipe or a file would see a broken line. So the prefix is written only when
asked (``priority_prefix="always"``) or, with ``"auto"`` (the default), when
stdout *is* the journal stream: ``$JOURNAL_STREAM`` (``DEVICE:INODE``, set by
systemd) names the device and inode of the stream's own file descriptor, as
systemd.exec(5) says to check. It applies to every line: structlog's, the
stdlib bridge's and :class:`Event`'s.

Settings read: the level, the priority prefix mode and the stream are passed
to :func:`configure` by the composition root ([server] log_level,
log_priority_prefix). Cost: a filtered-out call is a no-op method
(``make_filtering_bound_logger``); an emitted line costs the processors and
one JSON dump, a few microseconds, written and flushed synchronously; the
per-message lines of :class:`Event` are flushed once per event-loop turn.

See also: SEMANTICS.md §1 (ops teams read structured JSON logs).
"""

from __future__ import annotations

import asyncio
import json
import logging as stdlib_logging
import os
import re
import sys
import time
from collections.abc import Mapping
from typing import Any, NamedTuple, TextIO

import structlog
import structlog._config
import structlog.processors
from structlog.typing import EventDict, FilteringBoundLogger, Processor, WrappedLogger

#: Keys whose values never reach a log line.
SECRET_KEYS: frozenset[str] = frozenset(
    {"password", "passwd", "secret", "auth_data", "authorization", "token", "new_password"}
)
MASK = "***"

_LEVELS = {"debug", "info", "warning", "error", "critical"}
# SASL mechanisms by name (not any word: "auth failed for x" is not a command).
_MECHANISMS = (
    r"(?:PLAIN|LOGIN|XOAUTH2|OAUTHBEARER|CRAM-MD5|DIGEST-MD5|SCRAM-[A-Z0-9-]+|NTLM|GSSAPI)"
)
_AUTH_PATTERN = r"(?i)(\bAUTH[ \t]+" + _MECHANISMS + r"[ \t]+)[A-Za-z0-9+/=]+"
_AUTH_RE = re.compile(_AUTH_PATTERN)
_AUTH_RE_BYTES = re.compile(_AUTH_PATTERN.encode())
_MASK_SUB = r"\1" + MASK
_MASK_SUB_BYTES = rb"\1" + MASK.encode()
# Marks the stdlib handler this module installs, so configure() can replace it.
_HANDLER_MARK = "_relayd_json_handler"


def _is_secret_key(key: object) -> bool:
    """True when a value stored under ``key`` must be masked (memoised: keys repeat)."""
    known = _SECRET_KEY_MEMO.get(key)  # type: ignore[call-overload]
    if known is not None:
        return known
    secret = False
    if isinstance(key, str):
        k = key.lower()
        secret = k in SECRET_KEYS or any(k.endswith("_" + s) for s in SECRET_KEYS)
    if len(_SECRET_KEY_MEMO) < 4096 and isinstance(key, str):
        _SECRET_KEY_MEMO[key] = secret
    return secret


_SECRET_KEY_MEMO: dict[str, bool] = {}


def _mask_value(value: Any) -> Any:
    """Return ``value`` with secrets masked (containers are copied, never mutated)."""
    if isinstance(value, str):
        return _AUTH_RE.sub(_MASK_SUB, value) if "auth" in value.lower() else value
    if isinstance(value, bytes):
        return _AUTH_RE_BYTES.sub(_MASK_SUB_BYTES, value) if b"auth" in value.lower() else value
    if isinstance(value, Mapping):
        return {
            k: MASK if _is_secret_key(k) else _mask_value(v) for k, v in value.items()
        }
    if isinstance(value, list | tuple):
        return [_mask_value(v) for v in value]
    return value


class _NamedWriteLogger(structlog.WriteLogger):
    """structlog's WriteLogger plus the name given to get_logger()."""

    def __init__(self, file: TextIO, name: str) -> None:
        super().__init__(file)
        self.name = name


class _NamedWriteLoggerFactory:
    """Makes a _NamedWriteLogger on ``stream`` for each get_logger(name)."""

    def __init__(self, stream: TextIO) -> None:
        self._stream = stream

    def __call__(self, *args: Any) -> _NamedWriteLogger:
        return _NamedWriteLogger(self._stream, str(args[0]) if args else "")


def _add_logger_name(logger: WrappedLogger, _method: str, event_dict: EventDict) -> EventDict:
    """structlog processor: ``logger`` = the name given to get_logger()."""
    name = getattr(logger, "name", "")
    if name:
        event_dict["logger"] = name
    return event_dict


def mask_secrets(_logger: WrappedLogger, _method: str, event_dict: EventDict) -> EventDict:
    """structlog processor: mask secret keys and AUTH payloads (see module doc)."""
    memo = _SECRET_KEY_MEMO
    for key, value in event_dict.items():
        secret = memo.get(key)
        if secret is None:
            secret = _is_secret_key(key)
        if secret:
            event_dict[key] = MASK
        elif type(value) is str:
            if "auth" in value.lower():  # the common case (no AUTH text) without a call
                event_dict[key] = _AUTH_RE.sub(_MASK_SUB, value)
        elif type(value) not in _NOTHING_TO_MASK:
            event_dict[key] = _mask_value(value)
    return event_dict


#: Value types that cannot hold a secret (skipped by mask_secrets: most fields).
_NOTHING_TO_MASK = frozenset({int, float, bool, type(None)})


def _shared_processors() -> list[Processor]:
    """Processors run on every line, structlog's and the stdlib's alike."""
    return [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
    ]


class _Dumps:
    """``json.dumps`` with its encoder built once: given ``default=`` (as structlog
    passes it), ``json.dumps`` builds a new encoder on every call.

    The C encoder ``JSONEncoder.encode`` would make again on every call is made
    once too (same arguments, same output); its circular-reference memo is
    empty after every successful call and replaced after a failed one.
    """

    def __init__(self) -> None:
        self._encoder: json.JSONEncoder | None = None
        self._c: Any = None

    def __call__(self, obj: Any, **kw: Any) -> str:
        encoder = self._encoder
        if encoder is None:
            encoder = self._encoder = json.JSONEncoder(**kw)
        c = self._c
        if c is None:
            make = json.encoder.c_make_encoder  # type: ignore[attr-defined]
            if make is None or not isinstance(obj, dict):
                return encoder.encode(obj)
            c = self._c = make({}, encoder.default, json.encoder.encode_basestring_ascii,
                               None, encoder.key_separator, encoder.item_separator,
                               False, False, True)
        try:
            return "".join(c(obj, 0))
        except BaseException:
            self._c = None  # its memo may hold ids of this object
            raise


#: sd-daemon(3) priority prefixes by ``level`` (what add_log_level writes).
PRIORITY_PREFIX: dict[str, str] = {
    "debug": "<7>", "info": "<6>", "notice": "<5>", "warning": "<4>", "warn": "<4>",
    "error": "<3>", "exception": "<3>", "critical": "<2>", "fatal": "<2>",
}
PRIORITY_MODES = ("auto", "always", "never")


class _PrefixedRenderer:
    """structlog's JSONRenderer, the line preceded by its journald ``<N>`` priority."""

    def __init__(self, render: Processor) -> None:
        self._render = render

    def __call__(self, logger: WrappedLogger, method: str, event_dict: EventDict) -> str:
        prefix = PRIORITY_PREFIX.get(str(event_dict.get("level", method)), "<6>")
        return prefix + str(self._render(logger, method, event_dict))


def _final_processors(prefix: bool = False) -> list[Processor]:
    """Processors that turn an event dict into its masked JSON line (``<N>``-prefixed)."""
    render: Processor = structlog.processors.JSONRenderer(serializer=_Dumps())
    return [
        structlog.processors.format_exc_info,
        mask_secrets,
        _PrefixedRenderer(render) if prefix else render,
    ]


def is_journal_stream(stream: TextIO, journal_stream: str | None) -> bool:
    """True when ``stream``'s file descriptor is the journal connection systemd named.

    ``journal_stream`` is ``$JOURNAL_STREAM`` (``"DEVICE:INODE"``, decimal);
    a stream without a file descriptor, an unset or malformed value, or another
    file (stdout redirected by a wrapper) is not.
    """
    if not journal_stream:
        return False
    dev, sep, ino = journal_stream.partition(":")
    try:
        st = os.fstat(stream.fileno())
        return bool(sep) and (st.st_dev, st.st_ino) == (int(dev), int(ino))
    except (OSError, ValueError, AttributeError):  # io.UnsupportedOperation is both
        return False


def wants_priority_prefix(mode: str, stream: TextIO,
                          environ: Mapping[str, str] = os.environ) -> bool:
    """Whether lines on ``stream`` get the ``<N>`` prefix under ``mode`` (see module doc)."""
    if mode not in PRIORITY_MODES:
        raise ValueError(f"unknown priority prefix mode {mode!r}; use one of {PRIORITY_MODES}")
    if mode == "auto":
        return is_journal_stream(stream, environ.get("JOURNAL_STREAM"))
    return mode == "always"


class _Installed(NamedTuple):
    """What :func:`configure` installed, for :class:`Event`'s direct path."""

    processors: list[Processor]
    size: int  # len(processors) and its last one: capture_logs() edits the list in place
    last: Processor
    stream: TextIO
    level: int
    info_prefix: str  # "<6>" when lines carry the journald priority, else ""


_LEVEL_NO = {"debug": 10, "info": 20, "warning": 30, "error": 40, "critical": 50}
_installed: _Installed | None = None
_stamp_second = -1
_stamp_prefix = ""
_event_dumps = _Dumps()
_FALLBACK = getattr(structlog.processors, "_json_fallback_handler", None)


def _iso_utc_now() -> str:
    """What structlog's ``TimeStamper(fmt="iso", utc=True)`` writes, the date part cached
    per second (``...T12:00:00.123456Z``; no fraction when it is zero, as isoformat)."""
    global _stamp_second, _stamp_prefix
    us_total = time.time_ns() // 1000
    sec, us = divmod(us_total, 1_000_000)
    if sec != _stamp_second:
        _stamp_prefix = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(sec))
        _stamp_second = sec
    return f"{_stamp_prefix}.{us:06d}Z" if us else _stamp_prefix + "Z"


class Event:
    """A hot-path event at level info, written without structlog's per-call chain.

    ``Event(log, "smtp_accepted")(fields)`` writes the line that
    ``log.info("smtp_accepted", **fields)`` writes under :func:`configure`:
    the fields, ``event``, the context variables, ``level``, ``timestamp``,
    ``logger``, in that order, masked, the same JSON, written at once and
    flushed at the end of the loop turn (``fields`` is used up). While
    another structlog configuration is active (before :func:`configure`, or
    one a test installed), or for a logger that is not a plain
    :func:`get_logger` one, it is that call. Cheaper than the chain per line.
    """

    __slots__ = ("_event", "_log", "_name")

    def __init__(self, log: Any, event: str) -> None:
        self._log = log
        self._event = event
        name: str | None = None
        if isinstance(log, structlog._config.BoundLoggerLazyProxy):
            args: tuple[Any, ...] = tuple(log._logger_factory_args)
            if not log._initial_values and len(args) == 1:
                name = str(args[0])
        self._name = name

    def __call__(self, fields: dict[str, Any]) -> None:
        inst = _installed
        procs = structlog._config._CONFIG.default_processors
        if (inst is None or self._name is None or procs is not inst.processors
                or len(procs) != inst.size or procs[-1] is not inst.last):
            self._log.info(self._event, **fields)
            return
        if inst.level > 20:
            return
        fields["event"] = self._event
        structlog.contextvars.merge_contextvars(None, "info", fields)
        fields["level"] = "info"
        fields["timestamp"] = _iso_utc_now()
        if self._name:
            fields["logger"] = self._name
        mask_secrets(None, "info", fields)
        stream = inst.stream
        stream.write(inst.info_prefix + _event_dumps(fields, default=_FALLBACK) + "\n")
        _flush_soon(stream)


_flush_due = False


def _flush_soon(stream: TextIO) -> None:
    """Flush ``stream`` once at the end of this loop turn (now, outside a loop).

    The hot-path lines of one loop turn (many sessions' ``smtp_accepted``,
    ``delivery_attempt``) share one write syscall instead of one each. Any
    other line (structlog's logger flushes per line) flushes them too, in
    order. What SIGKILL can lose: the lines of the last loop turn.
    """
    global _flush_due
    if _flush_due:
        return
    try:
        loop = asyncio.get_running_loop()
    except RuntimeError:
        stream.flush()
        return
    _flush_due = True
    loop.call_soon(_flush_now, stream)


def _flush_now(stream: TextIO) -> None:
    global _flush_due
    _flush_due = False
    try:
        stream.flush()
    except (OSError, ValueError):  # closed or broken: nothing to log to
        pass


def configure(level: str = "info", stream: TextIO = sys.stdout,
              priority_prefix: str = "never") -> None:
    """Send all logging, structlog and stdlib, to ``stream`` as masked JSON lines.

    ``priority_prefix`` ("auto", "always", "never") decides the journald
    ``<N>`` prefix (module doc); "auto" looks at ``$JOURNAL_STREAM`` now.
    """
    name = level.lower()
    if name not in _LEVELS:
        raise ValueError(f"unknown log level {level!r}; use one of {sorted(_LEVELS)}")
    prefix = wants_priority_prefix(priority_prefix, stream)
    global _installed
    processors = [*_shared_processors(), _add_logger_name, *_final_processors(prefix)]
    structlog.configure(
        processors=processors,
        wrapper_class=structlog.make_filtering_bound_logger(name),
        logger_factory=_NamedWriteLoggerFactory(stream),
        context_class=dict,
        cache_logger_on_first_use=True,
    )

    formatter = structlog.stdlib.ProcessorFormatter(
        foreign_pre_chain=[*_shared_processors(), structlog.stdlib.add_logger_name],
        processors=[
            structlog.stdlib.ProcessorFormatter.remove_processors_meta,
            *_final_processors(prefix),
        ],
    )
    handler = stdlib_logging.StreamHandler(stream)
    handler.setFormatter(formatter)
    setattr(handler, _HANDLER_MARK, True)
    root = stdlib_logging.getLogger()
    for old in [h for h in root.handlers if getattr(h, _HANDLER_MARK, False)]:
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(name.upper())
    _installed = _Installed(processors, len(processors), processors[-1], stream,
                            _LEVEL_NO[name], PRIORITY_PREFIX["info"] if prefix else "")


def get_logger(name: str) -> FilteringBoundLogger:
    """A bound logger whose lines carry ``logger=name`` (use the module's __name__).

    Lazy: a module may call this at import time, before :func:`configure`; the
    configuration is looked up at the first line logged, then cached.
    """
    logger: FilteringBoundLogger = structlog.get_logger(name)
    return logger


def bind_context(**fields: Any) -> None:
    """Add ``fields`` to every line logged from this task (and tasks it starts) from now on.

    structlog's context variables: a control request binds its peer's uid so
    each operation it logs carries it. Undo with :func:`unbind_context`.
    """
    structlog.contextvars.bind_contextvars(**fields)


def unbind_context(*keys: str) -> None:
    """Stop adding the fields ``keys`` that :func:`bind_context` bound."""
    structlog.contextvars.unbind_contextvars(*keys)


def reset() -> None:
    """Undo :func:`configure`: structlog's defaults, no relayd handler on the root logger."""
    structlog.reset_defaults()
    root = stdlib_logging.getLogger()
    for handler in list(root.handlers):
        if getattr(handler, _HANDLER_MARK, False):
            root.removeHandler(handler)
    root.setLevel(stdlib_logging.WARNING)
