"""Structured logging: one JSON object per line, secrets masked.

Owns: the structlog configuration (processors, level filter, output stream),
the stdlib ``logging`` bridge (aiosmtpd, asyncio and aiohttp log through the
stdlib; their records come out as the same JSON lines), and the secret masking
every line goes through.

Each line holds ``timestamp`` (ISO 8601, UTC), ``level``, ``event``, ``logger``
and the bound context, e.g.::

    {"peer": "192.0.2.7", "event": "auth failed", "level": "info",
     "logger": "relayd.smtp", "timestamp": "2024-05-01T12:00:00.123456Z"}

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

Settings read: the level and the stream are passed to :func:`configure` by the
composition root. Cost: a filtered-out call is a no-op method
(``make_filtering_bound_logger``); an emitted line costs the processors and
one JSON dump, a few microseconds, written and flushed synchronously.

See also: SEMANTICS.md §1 (ops teams read structured JSON logs).
"""

from __future__ import annotations

import json
import logging as stdlib_logging
import re
import sys
from collections.abc import Mapping
from typing import Any, TextIO

import structlog
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
    for key, value in event_dict.items():
        if _is_secret_key(key):
            event_dict[key] = MASK
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
    passes it), ``json.dumps`` builds a new encoder on every call (~2 us a line)."""

    def __init__(self) -> None:
        self._encoder: json.JSONEncoder | None = None

    def __call__(self, obj: Any, **kw: Any) -> str:
        encoder = self._encoder
        if encoder is None:
            encoder = self._encoder = json.JSONEncoder(**kw)
        return encoder.encode(obj)


def _final_processors() -> list[Processor]:
    """Processors that turn an event dict into its masked JSON line."""
    return [
        structlog.processors.format_exc_info,
        mask_secrets,
        structlog.processors.JSONRenderer(serializer=_Dumps()),
    ]


def configure(level: str = "info", stream: TextIO = sys.stdout) -> None:
    """Send all logging, structlog and stdlib, to ``stream`` as masked JSON lines."""
    name = level.lower()
    if name not in _LEVELS:
        raise ValueError(f"unknown log level {level!r}; use one of {sorted(_LEVELS)}")
    structlog.configure(
        processors=[*_shared_processors(), _add_logger_name, *_final_processors()],
        wrapper_class=structlog.make_filtering_bound_logger(name),
        logger_factory=_NamedWriteLoggerFactory(stream),
        context_class=dict,
        cache_logger_on_first_use=True,
    )

    formatter = structlog.stdlib.ProcessorFormatter(
        foreign_pre_chain=[*_shared_processors(), structlog.stdlib.add_logger_name],
        processors=[
            structlog.stdlib.ProcessorFormatter.remove_processors_meta,
            *_final_processors(),
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


def get_logger(name: str) -> FilteringBoundLogger:
    """A bound logger whose lines carry ``logger=name`` (use the module's __name__).

    Lazy: a module may call this at import time, before :func:`configure`; the
    configuration is looked up at the first line logged, then cached.
    """
    logger: FilteringBoundLogger = structlog.get_logger(name)
    return logger
