"""Request and response types of the control API (version 1), shared by server and CLI.

Owns: the wire contract of the control socket: HTTP/1.1 + JSON, paths under
``/v1/``, bodies and query strings decoded strictly into these Structs
(unknown fields, repeated keys, wrong types and out-of-range numbers are 400
errors naming the field; the bounds are the ``Annotated`` types below, which
relayctl applies to its own flags too). Every error response is an ``Error``.

Paths (all JSON):
  GET  /v1/health                         -> Health
  GET  /v1/status                         -> Status
  POST /v1/domains            DomainAdd   -> DomainInfo (with dns_records)
  GET  /v1/domains                        -> DomainList
  GET  /v1/domains/{name}                 -> DomainInfo
  POST /v1/domains/{name}/delete Confirm  -> DomainDeleted
  POST /v1/users              UserAdd     -> Credentials (password shown once)
  GET  /v1/users?domain=&status=&sort=    -> UserList
  GET  /v1/users/{name}                   -> UserInfo
  POST /v1/users/{name}/disable           -> UserInfo
  POST /v1/users/{name}/enable            -> UserInfo
  POST /v1/users/{name}/reset-password    -> Credentials
  POST /v1/users/{name}/delete UserDelete -> UserDeleted
  POST /v1/users/{name}/limits UserLimits -> UserInfo
  POST /v1/users/{name}/networks NetworkChange -> UserInfo
  GET  /v1/dormant?days=&max_sent=        -> UserList
  GET  /v1/queue?user=&state=             -> QueueList
  GET  /v1/queue/{id}                     -> QueueItem
  POST /v1/queue/purge        QueuePurge  -> QueueChanged
  POST /v1/queue/retry        QueueRetry  -> QueueChanged
  GET  /v1/log?user=&status=&since=&limit= -> LogList
  GET  /v1/throttle                       -> ThrottleList
  POST /v1/throttle/clear     ThrottleClear -> ThrottleCleared

This module imports msgspec only: the CLI stays light and fast to start.
"""

from __future__ import annotations

from typing import Annotated, Literal

import msgspec

API_VERSION = 1

#: Largest value SQLite stores in an INTEGER column.
SQLITE_INT_MAX = 2**63 - 1
#: Most entries one ``log`` call returns.
LOG_LIMIT_MAX = 10_000
#: 9999-12-31T23:59:59Z: the latest time a ``since`` may name.
EPOCH_MAX = 253_402_300_799.0
#: Longest ``dormant`` threshold, in days (about 270 years).
DAYS_MAX = 100_000.0

# Bounded numbers: out of range (negative, too large for the database, NaN,
# infinite) is a 400 naming the field, never a silent clamp or a 500.
Count = Annotated[int, msgspec.Meta(ge=0, le=SQLITE_INT_MAX)]
LogLimit = Annotated[int, msgspec.Meta(ge=1, le=LOG_LIMIT_MAX)]
EpochSeconds = Annotated[float, msgspec.Meta(ge=0.0, le=EPOCH_MAX)]
Days = Annotated[float, msgspec.Meta(ge=0.0, le=DAYS_MAX)]


class _S(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    pass


class Error(_S):
    """Every failed call answers this, with an HTTP 4xx/5xx status."""

    error: str
    code: str = "bad_request"


class Health(_S):
    """Cheap liveness answer."""

    ok: bool


class Listener(_S):
    """One listening address."""

    kind: str
    address: str


class Status(_S):
    """What ``relayctl status`` shows."""

    version: str
    uptime_seconds: float
    listeners: list[Listener]
    queue: dict[str, int]
    in_flight: int
    spool_bytes: int
    free_disk_bytes: int
    domains: int
    accounts: int
    sessions: int


class DomainAdd(_S):
    """Create a sending domain."""

    name: str


class DnsRecord(_S):
    """A DNS record the operator must publish."""

    type: str
    name: str
    value: str
    purpose: str


class DomainInfo(_S):
    """A sending domain."""

    name: str
    selector: str
    created_at: float
    deleted: bool = False
    accounts: int = 0
    dns_records: list[DnsRecord] = msgspec.field(default_factory=list)


class DomainList(_S):
    """All live domains."""

    domains: list[DomainInfo]


class Confirm(_S):
    """An irreversible operation needs the name typed again."""

    confirm: str


class DomainDeleted(_S):
    """Result of ``domain delete``."""

    name: str
    accounts_disabled: int
    messages_held: int


class UserAdd(_S):
    """Create an SMTP account."""

    domain: str
    allow_networks: list[str] = msgspec.field(default_factory=list)


class Credentials(_S):
    """A username and password, shown once."""

    username: str
    password: str


class Limits(_S):
    """Sending limits (None = workspace default)."""

    per_minute: int | None = None
    per_hour: int | None = None
    per_day: int | None = None


class UserInfo(_S):
    """An SMTP account as operators see it."""

    username: str
    domain: str
    status: str
    disabled_reason: str
    created_at: float
    last_connection: float | None
    total_sent: int
    queued: int
    networks: list[str]
    limits: Limits


class UserList(_S):
    """A list of accounts."""

    users: list[UserInfo]


class UserDelete(_S):
    """Delete an account: irreversible."""

    confirm: str
    purge_queue: bool = False


class UserDeleted(_S):
    """Result of ``user delete``."""

    username: str
    purged: int


class UserLimits(_S):
    """Set per-account sending limits; 0 means unlimited, None keeps the default."""

    per_minute: Count | None = None
    per_hour: Count | None = None
    per_day: Count | None = None


class NetworkChange(_S):
    """Bind or unbind a source network to an account."""

    action: Literal["add", "remove"]
    cidr: str


class UserListQuery(_S):
    """Query of ``GET /v1/users``."""

    domain: str | None = None
    status: Literal["active", "disabled"] | None = None
    sort: Literal["name", "last-used", "sent"] = "name"


class DormantQuery(_S):
    """Query of ``GET /v1/dormant``."""

    days: Days = 90.0
    max_sent: Count | None = None


class QueueListQuery(_S):
    """Query of ``GET /v1/queue``."""

    user: str | None = None
    state: Literal["queued", "waiting_limit", "held", "deferred"] | None = None


class LogQuery(_S):
    """Query of ``GET /v1/log`` (``since``: epoch seconds)."""

    user: str | None = None
    status: Literal["queued", "deferred", "delivered", "failed"] | None = None
    since: EpochSeconds | None = None
    limit: LogLimit = 100


class QueueItem(_S):
    """A queued message."""

    id: str
    username: str
    sender: str
    state: str
    age_seconds: float
    attempts: int
    recipients: list[str]
    next_attempt: float | None = None
    reset_at: float | None = None
    last_error: str | None = None
    size: int = 0


class QueueList(_S):
    """Queued messages."""

    items: list[QueueItem]


class QueuePurge(_S):
    """Remove queued messages of an account."""

    user: str
    state: str | None = None


class QueueRetry(_S):
    """Make deferred mail due now."""

    user: str | None = None


class QueueChanged(_S):
    """How many messages a queue operation touched."""

    count: int


class LogEntry(_S):
    """One delivery attempt for one recipient."""

    ts: float
    message_id: str
    username: str
    domain: str
    recipient: str
    next_hop: str
    code: int | None
    text: str
    outcome: str


class LogList(_S):
    """Delivery log entries, newest first."""

    entries: list[LogEntry]


class ThrottleEntry(_S):
    """Failed AUTH counted from one address: for one username, or ``*`` for the address."""

    address: str
    username: str
    failures: int  # for ``*``: the distinct usernames that failed
    until: float | None = None  # refused until then (epoch seconds); None: counted only


class ThrottleList(_S):
    """The failed-AUTH throttle's entries (what is slowed down or refused now)."""

    entries: list[ThrottleEntry]


class ThrottleClear(_S):
    """Forget failed-AUTH counts and locks: of one client address, or all."""

    address: str | None = None


class ThrottleCleared(_S):
    """How many throttle entries a clear removed."""

    count: int


def encode(obj: msgspec.Struct) -> bytes:
    """Encode a response or request as JSON."""
    return msgspec.json.encode(obj)
