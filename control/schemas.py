"""Request and response types of the control API (version 1), shared by server and CLI.

Owns: the wire contract of the control socket: HTTP/1.1 + JSON, paths under
``/v1/``, bodies and query strings decoded strictly into these Structs
(unknown fields, repeated keys, wrong types and out-of-range numbers are 400
errors naming the field; the bounds are the ``Annotated`` types below, which
relayctl applies to its own flags too). Every error response is an ``Error``.

The routes are ``ROUTES`` at the end of this module: the server builds its
router from that table and control.openapi its OpenAPI document (served at
``GET /v1/openapi.json``, committed as docs/openapi.json), so neither can
forget a route.

This module imports msgspec only: the CLI stays light and fast to start.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal, NamedTuple

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
#: Longest grace ``reset-password --keep-old`` gives the old password: 30 days.
KEEP_OLD_MAX = 30 * 86400.0

# Bounded numbers: out of range (negative, too large for the database, NaN,
# infinite) is a 400 naming the field, never a silent clamp or a 500.
Count = Annotated[int, msgspec.Meta(ge=0, le=SQLITE_INT_MAX)]
LogLimit = Annotated[int, msgspec.Meta(ge=1, le=LOG_LIMIT_MAX)]
EpochSeconds = Annotated[float, msgspec.Meta(ge=0.0, le=EPOCH_MAX)]
Days = Annotated[float, msgspec.Meta(ge=0.0, le=DAYS_MAX)]
#: Longest ``reason`` an operator may give with a change (the audit trail keeps it).
REASON_MAX = 500
#: Longest account ``label``.
LABEL_MAX = 200
#: Why the operator made a change (free text, one line; the audit trail keeps it).
Reason = Annotated[str, msgspec.Meta(max_length=REASON_MAX)]
#: An account's label: which application uses it (free text, one line; "" is none).
Label = Annotated[str, msgspec.Meta(max_length=LABEL_MAX)]
#: How long a reset keeps the old password working (seconds, > 0, at most 30 days).
KeepOld = Annotated[float, msgspec.Meta(gt=0.0, le=KEEP_OLD_MAX)]
#: The states of a queued message (``queue`` and ``queue purge`` filter on them).
QueueState = Literal["queued", "waiting_limit", "held", "deferred"]


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


class DestinationBackoff(_S):
    """A destination per-destination shaping backed off after a throttling reply."""

    destination: str
    seconds_left: float
    level: int  # throttling replies in a row
    throttled: int  # throttling replies since the start
    reply: str  # the last one


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
    backoffs: list[DestinationBackoff] = []  # MX mode: destinations backed off now
    dane: str = ""  # [delivery] dane on: "on", or "skipped: why" (no validating resolver)



class DomainAdd(_S):
    """Create a sending domain."""

    name: str
    reason: Reason = ""


class DnsRecord(_S):
    """A DNS record the operator must publish."""

    type: str
    name: str
    value: str
    purpose: str


class DkimSelector(_S, omit_defaults=True):
    """A DKIM selector of a domain: ``active`` (signing now), ``pending`` (made by
    rotate-key: publish its records, then activate it) or ``retired`` (no longer signing
    since ``since``: its record can go once mail signed with it has been verified)."""

    selector: str
    state: str
    algorithm: str = ""  # rsa or ed25519 (a retired selector's key is gone)
    since: float | None = None  # pending: made at; retired: retired at
    dns_records: list[DnsRecord] = msgspec.field(default_factory=list)


class DomainInfo(_S):
    """A sending domain."""

    name: str
    selector: str
    created_at: float
    deleted: bool = False
    accounts: int = 0
    #: Mail must have a header From (and Sender) in the domain or a subdomain.
    check_header_from: bool = True
    dns_records: list[DnsRecord] = msgspec.field(default_factory=list)
    #: Where delivery events are posted (None: no webhook).
    webhook_url: str | None = None
    #: The webhook's signing secret: only in the answer of the ``domain set`` that made
    #: it (shown once; relayd never shows it again).
    webhook_secret: str | None = None
    #: ``domain show``: its active, pending and retired DKIM selectors.
    dkim_selectors: list[DkimSelector] = msgspec.field(default_factory=list)


class DomainSettings(_S):
    """Change a domain's settings (a field left out is left as it is)."""

    check_header_from: bool | None = None
    reason: Reason = ""
    #: Post delivery events to this http(s) URL; "" (or "off") removes the webhook.
    webhook: Annotated[str, msgspec.Meta(max_length=2048)] | None = None
    #: Make a new signing secret for the webhook (the old one stops at once).
    rotate_webhook_secret: bool = False


class DomainList(_S):
    """All live domains."""

    domains: list[DomainInfo]


class Confirm(_S):
    """An irreversible operation needs the name typed again."""

    confirm: str
    reason: Reason = ""


class ChangeReason(_S):
    """The optional reason of a change without other fields (kept in the audit trail)."""

    reason: Reason = ""


class Propagation(_S):
    """In cluster mode: the nodes that applied a change before the call returned."""

    version: int  # the control-plane version of the change
    acknowledged: list[str]  # names of the nodes that applied it
    gone: list[str] = msgspec.field(default_factory=list)  # declared gone, not waited for


class MailCount(_S):
    """Messages and their recipients (not yet delivered) in one queue."""

    messages: int
    recipients: int


class DomainDeleted(_S, omit_defaults=True):
    """Result of ``domain delete``: what it did to each queue of the answering node
    (its accounts' mail: ``held`` until purged, ``retrying`` on its schedule, ``purged``:
    removed by the delete, none today, SEMANTICS §4.1)."""

    name: str
    accounts_disabled: int
    messages_held: int  # = held.messages
    held: MailCount
    retrying: MailCount
    purged: MailCount
    propagation: Propagation | None = None  # cluster mode only


class UserAdd(_S):
    """Create an SMTP account."""

    domain: str
    allow_networks: list[str] = msgspec.field(default_factory=list)
    label: Label = ""
    reason: Reason = ""


class Credentials(_S, omit_defaults=True):
    """A username and password, shown once."""

    username: str
    password: str
    propagation: Propagation | None = None  # cluster mode only (reset-password)
    #: reset-password --keep-old: when the previous password stops working (POSIX seconds).
    old_password_expires: float | None = None
    #: reset-password on a disabled account: it stays disabled (and how to enable it).
    note: str | None = None


class PasswordReset(_S):
    """Reset an account's password; ``keep_old_seconds``: the previous one keeps working
    that long (then stops by itself), else it fails at once."""

    keep_old_seconds: KeepOld | None = None
    reason: Reason = ""


class Limits(_S):
    """Sending limits (None = workspace default)."""

    per_minute: int | None = None
    per_hour: int | None = None
    per_day: int | None = None


class UserInfo(_S, omit_defaults=True):
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
    propagation: Propagation | None = None  # cluster mode only (changes taking rights away)
    label: str = ""  # the operator's free text; omitted when none
    #: A previous password kept by reset-password --keep-old: when it stops working.
    old_password_expires: float | None = None


class UserList(_S):
    """A list of accounts."""

    users: list[UserInfo]


class UserDelete(_S):
    """Delete an account: irreversible."""

    confirm: str
    purge_queue: bool = False
    #: Check only: refused as the delete would be (queued mail, per node in cluster
    #: mode), else answered with ``dry_run`` true; nothing changes, ``confirm`` unchecked.
    dry_run: bool = False
    reason: Reason = ""


class UserDeleted(_S, omit_defaults=True):
    """Result of ``user delete`` (with ``dry_run``: what it would purge)."""

    username: str
    purged: int
    dry_run: bool = False
    propagation: Propagation | None = None  # cluster mode only


class UserLimits(_S):
    """Set per-account sending limits; 0 means unlimited, None keeps the default."""

    per_minute: Count | None = None
    per_hour: Count | None = None
    per_day: Count | None = None
    reason: Reason = ""


class NetworkChange(_S):
    """Bind or unbind a source network to an account."""

    action: Literal["add", "remove"]
    cidr: str
    reason: Reason = ""


class UserLabel(_S):
    """Set an account's label ("" clears it)."""

    label: Label
    reason: Reason = ""


class AuditItem(_S):
    """One entry of the audit trail: what an operator changed, when, who, why."""

    at: float
    kind: Literal["account", "domain"]
    name: str  # the username or domain name
    domain: str  # an account's domain; a domain's own name
    action: str
    uid: int | None  # the control socket peer's uid; None: not through the socket
    operator: str | None  # that uid's user name on the answering node, if it has one
    node: str | None  # cluster mode: the node that made the change
    reason: str
    details: dict[str, Any] = msgspec.field(default_factory=dict)  # never a secret


class AuditQuery(_S):
    """Query of ``GET /v1/audit`` (``since``: epoch seconds)."""

    user: str | None = None
    domain: str | None = None
    since: EpochSeconds | None = None
    limit: LogLimit = 100


class AuditList(_S):
    """Audit trail entries, newest first."""

    entries: list[AuditItem]


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
    state: QueueState | None = None


#: The outcomes ``log --status`` filters on (``queued``: not attempted yet; ``purged``:
#: removed by the operator before it was final).
LogStatus = Literal["queued", "deferred", "delivered", "failed", "purged", "suppressed"]
#: A message id as ``queue list`` shows it.
MessageId = Annotated[str, msgspec.Meta(pattern="^[0-9A-Fa-f]{16}$")]


class LogQuery(_S):
    """Query of ``GET /v1/log`` (``since``: epoch seconds; ``message``: one message's
    history, oldest first, also after it left the queue)."""

    user: str | None = None
    status: LogStatus | None = None
    since: EpochSeconds | None = None
    limit: LogLimit = 100
    message: MessageId | None = None


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
    #: State ``held``: who held it, ``operator`` (``queue hold``, until ``queue release``)
    #: or ``account`` (its account is disabled, until ``user enable``); else None.
    held_by: str | None = None


class QueueList(_S):
    """Queued messages."""

    items: list[QueueItem]


class QueuePurge(_S):
    """Remove queued messages of an account."""

    user: str
    state: QueueState | None = None


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
    outcome: str  # queued, delivered, deferred, failed, purged (removed by the operator),
    # or suppressed (not sent: on the domain's suppression list)
    kind: str = "message"  # or ``bounce``: a DSN relayd generated (not in total sent)


class LogList(_S):
    """Delivery log entries, newest first."""

    entries: list[LogEntry]
    more: bool = False  # the limit stopped the list: more entries match


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


class NodeInfo(_S):
    """One node of a cluster, as the answering node sees it."""

    name: str
    address: str
    applied_version: int
    behind: int  # control-plane versions behind the cluster's
    heartbeat_age_seconds: float
    state: Literal["live", "fenced", "gone"]
    queue_depth: int
    this: bool  # the node answering


class NodeList(_S):
    """The nodes of a cluster and the control-plane version."""

    version: int
    nodes: list[NodeInfo]


class NodeForgotten(_S):
    """Result of ``node forget``."""

    name: str


class KeyRotation(_S, omit_defaults=True):
    """Result of ``domain rotate-key``: ``created`` (the pending key(s) with the DNS
    records to publish), ``activated`` (the new active key(s); ``retired``: the selectors
    no longer used) or ``cancelled`` (the pending key(s) dropped)."""

    name: str
    action: str
    selectors: list[DkimSelector]
    retired: list[DkimSelector] = msgspec.field(default_factory=list)
    propagation: Propagation | None = None  # cluster mode only


class SuppressionEntry(_S):
    """A recipient the domain does not send to: the reply that added it, since when, until."""

    address: str
    reason: str
    since: float
    expires: float


class SuppressionList(_S):
    """A domain's suppression list, newest first (``total``: entries, ``limit`` aside)."""

    domain: str
    total: int
    entries: list[SuppressionEntry]


class SuppressionQuery(_S):
    """Query of ``GET /v1/domains/{name}/suppressions``."""

    limit: LogLimit = 100


class SuppressionAdd(_S):
    """Recipients an operator suppresses (imported from another provider, say)."""

    addresses: Annotated[list[str], msgspec.Meta(min_length=1, max_length=10_000)]
    reason: Annotated[str, msgspec.Meta(max_length=500)] = "added by the operator"


class SuppressionRemove(_S):
    """The recipient to send to again."""

    address: str


class SuppressionChanged(_S):
    """Result of a suppression add or remove: how many entries it added or removed."""

    domain: str
    count: int
    propagation: Propagation | None = None  # cluster mode only


class Route(NamedTuple):
    """One operation of the control API: what the router serves and the document describes."""

    method: Literal["GET", "POST"]
    path: str  # aiohttp/OpenAPI template: ``{name}`` is a path parameter
    operation: str  # the handler's name in relayd.controlplane.server.ControlServer; operationId
    summary: str
    response: type[msgspec.Struct] | None  # None: any JSON object (the OpenAPI document)
    status: int = 200  # the success status
    body: type[msgspec.Struct] | None = None  # the request body, strictly decoded
    query: type[msgspec.Struct] | None = None  # the query string, strictly decoded
    params: tuple[tuple[str, str], ...] = ()  # path parameters: (name, description)
    errors: tuple[tuple[int, str], ...] = ()  # statuses with an ``Error`` body, besides 500


_DOMAIN = (("name", "the domain name, as `domain list` shows it"),)
_USER = (("name", "the username"),)
_MESSAGE = (("id", "the message id, 16 hex digits as `queue` lists it"),)
_BAD = (400, "bad request: malformed JSON or UTF-8, an unknown, repeated or mistyped field,"
        " a number out of range, or a value the operation refuses (`code` says which)")
_BAD_QUERY = (400, "bad query: an unknown or repeated parameter, a mistyped or out-of-range"
              " value (`code` is `invalid_request`)")
_TOO_LARGE = (413, "the body is larger than 1 MiB (`code` is `too_large`)")
_NO_DOMAIN = (404, "no such domain (`code` is `not_found`)")
_NO_PENDING_KEY = (409, "the domain has no pending key (`code` is `no_pending_key`)")
_NO_USER = (404, "no such user (`code` is `not_found`)")
_BAD_ID = (400, "not a message id (`code` is `bad_request`)")
_NO_MESSAGE = (404, "no such queued message, on this node in cluster mode (`code` is"
               " `not_found`)")
_NODE = (("name", "the node name, as `node list` shows it"),)
_NOT_CLUSTERED = (409, "this relayd is a single node, not in a cluster (`code` is"
                  " `not_clustered`)")
#: Cluster mode: a change the database could not store, or stored but not yet applied
#: by every live node.
_CLUSTER = (503, "cluster mode: the cluster database cannot be used (`code` is"
            " `cluster_unavailable`: nothing changed), or a live node has not applied the change"
            " in time (`not_acknowledged`: the change is stored and takes effect there when it"
            " does)")
_NO_THROTTLE = (503, "this process runs no SMTP AUTH throttle (`code` is `unavailable`)")

#: Every operation the control socket serves, in the order the document lists them.
ROUTES: tuple[Route, ...] = (
    Route("GET", "/v1/health", "health", "Cheap liveness check", Health),
    Route("GET", "/v1/status", "get_status", "Version, uptime, listeners, queue depths", Status),
    Route("POST", "/v1/domains", "domain_add",
          "Create a sending domain with a new DKIM key (its DNS records to publish)",
          DomainInfo, 201, body=DomainAdd,
          errors=(_CLUSTER, _BAD, (409, "the domain exists (`code` is `exists`)"), _TOO_LARGE)),
    Route("GET", "/v1/domains", "domain_list", "All live domains", DomainList),
    Route("GET", "/v1/domains/{name}", "domain_show", "One domain with its DNS records",
          DomainInfo, params=_DOMAIN, errors=(_NO_DOMAIN,)),
    Route("POST", "/v1/domains/{name}/settings", "domain_set",
          "Change a domain's settings: whether the header From (and Sender) of its mail"
          " is checked against it; its webhook for delivery events (a new secret is"
          " in the answer, once)", DomainInfo, body=DomainSettings, params=_DOMAIN,
          errors=(_CLUSTER, _BAD, _NO_DOMAIN, _TOO_LARGE)),
    Route("POST", "/v1/domains/{name}/delete", "domain_delete",
          "Delete a domain (irreversible): its accounts are disabled for good, its key"
          " destroyed", DomainDeleted, body=Confirm, params=_DOMAIN,
          errors=(_CLUSTER, _BAD, _NO_DOMAIN, _TOO_LARGE)),
    Route("POST", "/v1/domains/{name}/rotate-key", "domain_rotate_key",
          "Make a new DKIM key (each algorithm the domain signs with) with a never-used"
          " selector, pending: its DNS records to publish; the active key keeps signing",
          KeyRotation, 201, body=ChangeReason, params=_DOMAIN,
          errors=(_CLUSTER, _BAD, _NO_DOMAIN, _TOO_LARGE,
                  (409, "a rotation is pending already: activate or cancel it first (`code`"
                        " is `key_pending`)"))),
    Route("POST", "/v1/domains/{name}/rotate-key/activate", "domain_activate_key",
          "The pending DKIM key signs from now on, on every node; the old selector is"
          " retired", KeyRotation, body=ChangeReason, params=_DOMAIN,
          errors=(_CLUSTER, _BAD, _NO_DOMAIN, _NO_PENDING_KEY, _TOO_LARGE)),
    Route("POST", "/v1/domains/{name}/rotate-key/cancel", "domain_cancel_key",
          "Drop the pending DKIM key (its selector is never drawn again)", KeyRotation,
          body=ChangeReason, params=_DOMAIN,
          errors=(_CLUSTER, _BAD, _NO_DOMAIN, _NO_PENDING_KEY, _TOO_LARGE)),
    Route("POST", "/v1/users", "user_add",
          "Create an account: a generated username and password (shown once)",
          Credentials, 201, body=UserAdd,
          errors=(_CLUSTER, _BAD, _NO_DOMAIN,
                  (409, "the plan's account slots are all in use (`code` is `plan_limit`)"),
                  _TOO_LARGE)),
    Route("GET", "/v1/users", "user_list", "Accounts (not deleted), filtered and sorted",
          UserList, query=UserListQuery, errors=(_BAD_QUERY,)),
    Route("GET", "/v1/users/{name}", "user_show", "One account", UserInfo, params=_USER,
          errors=(_NO_USER,)),
    Route("POST", "/v1/users/{name}/disable", "user_disable",
          "Disable an account, effective before this returns; its mail is held",
          UserInfo, body=ChangeReason, params=_USER, errors=(_CLUSTER, _BAD, _NO_USER,)),
    Route("POST", "/v1/users/{name}/enable", "user_enable", "Enable an account",
          UserInfo, body=ChangeReason, params=_USER,
          errors=(_CLUSTER, _BAD, _NO_USER,
                  (409, "the account's domain was deleted: it can never be enabled"
                        " (`code` is `domain_deleted`)"))),
    Route("POST", "/v1/users/{name}/reset-password", "user_reset",
          "A new password (shown once); the old one fails at once, or with"
          " `keep_old_seconds` keeps working that long (at most 30 days)", Credentials,
          body=PasswordReset, params=_USER,
          errors=(_CLUSTER, _BAD, _NO_USER,
                  (409, "`keep_old_seconds` on a disabled account (`code` is"
                        " `account_disabled`)"), _TOO_LARGE)),
    Route("POST", "/v1/users/{name}/expire-old-password", "user_expire_old",
          "End the grace of a password kept by reset-password: it fails before this"
          " returns", UserInfo, body=ChangeReason, params=_USER,
          errors=(_CLUSTER, _BAD, _NO_USER, _TOO_LARGE)),
    Route("POST", "/v1/users/{name}/delete", "user_delete",
          "Delete an account (irreversible); with `dry_run`, only check whether it would"
          " be refused", UserDeleted, body=UserDelete, params=_USER,
          errors=(_CLUSTER, _BAD, _NO_USER,
                  (409, "the account still has queued mail and `purge_queue` is false"
                        " (`code` is `queue_not_empty`; in cluster mode, on any node), or a"
                        " node that may hold some is gone (`node_unreachable`)"), _TOO_LARGE)),
    Route("POST", "/v1/users/{name}/limits", "user_limits", "Set sending limits",
          UserInfo, body=UserLimits, params=_USER, errors=(_CLUSTER, _BAD, _NO_USER, _TOO_LARGE)),
    Route("POST", "/v1/users/{name}/networks", "user_networks",
          "Bind or unbind a source network, effective at once", UserInfo,
          body=NetworkChange, params=_USER,
          errors=(_CLUSTER, _BAD, (404, "no such user, or (remove) no such binding (`code` is"
                              " `not_found`)"), _TOO_LARGE)),
    Route("POST", "/v1/users/{name}/label", "user_label",
          "Set or clear an account's label (free text: which application uses it)",
          UserInfo, body=UserLabel, params=_USER,
          errors=(_CLUSTER, _BAD, _NO_USER, _TOO_LARGE)),
    Route("GET", "/v1/audit", "audit_list",
          "The audit trail of accounts and domains, newest first (deleted ones included)",
          AuditList, query=AuditQuery, errors=(_BAD_QUERY,)),
    Route("GET", "/v1/dormant", "dormant", "Accounts not used for a while, oldest first",
          UserList, query=DormantQuery, errors=(_BAD_QUERY,)),
    Route("GET", "/v1/queue", "queue_list", "Queued messages (send and retry queues)",
          QueueList, query=QueueListQuery, errors=(_BAD_QUERY, _NO_USER)),
    Route("GET", "/v1/queue/{id}", "queue_show", "One queued message", QueueItem,
          params=_MESSAGE, errors=(_BAD_ID, _NO_MESSAGE)),
    Route("POST", "/v1/queue/purge", "queue_purge", "Remove an account's queued messages",
          QueueChanged, body=QueuePurge, errors=(_BAD, _NO_USER, _TOO_LARGE)),
    Route("POST", "/v1/queue/{id}/hold", "queue_hold",
          "Hold one message (any account): not attempted until released; kept across"
          " restarts", QueueItem, params=_MESSAGE, errors=(_BAD_ID, _NO_MESSAGE)),
    Route("POST", "/v1/queue/{id}/release", "queue_release",
          "Release a held message: attempted again at once", QueueItem, params=_MESSAGE,
          errors=(_BAD_ID, _NO_MESSAGE)),
    Route("POST", "/v1/queue/{id}/delete", "queue_delete",
          "Delete one message (any account) for good; its recipients are logged `purged`",
          QueueChanged, params=_MESSAGE, errors=(_BAD_ID, _NO_MESSAGE)),
    Route("POST", "/v1/queue/retry", "queue_retry", "Make deferred mail due now",
          QueueChanged, body=QueueRetry, errors=(_BAD, _NO_USER, _TOO_LARGE)),
    Route("GET", "/v1/log", "delivery_log",
          "Delivery attempts, newest first (one message's: oldest first)", LogList,
          query=LogQuery, errors=(_BAD_QUERY,)),
    Route("GET", "/v1/throttle", "throttle_list",
          "What the failed-AUTH throttle counts or refuses now", ThrottleList,
          errors=(_NO_THROTTLE,)),
    Route("POST", "/v1/throttle/clear", "throttle_clear",
          "Forget failed-AUTH counts and locks (of one address): logins work again at once",
          ThrottleCleared, body=ThrottleClear, errors=(_BAD, _TOO_LARGE, _NO_THROTTLE)),
    Route("GET", "/v1/nodes", "node_list",
          "The nodes of the cluster: address, state, applied version, heartbeat, queue depth",
          NodeList, errors=(_NOT_CLUSTERED,)),
    Route("POST", "/v1/nodes/{name}/forget", "node_forget",
          "Forget a node that is gone: changes no longer wait for it", NodeForgotten,
          params=_NODE,
          errors=((404, "no such node (`code` is `not_found`)"),
                  (409, "the node is live: only a gone node can be forgotten (`code` is"
                        " `node_live`)"), _NOT_CLUSTERED)),
    Route("GET", "/v1/domains/{name}/suppressions", "suppression_list",
          "The domain's suppressed recipients, newest first", SuppressionList,
          query=SuppressionQuery, params=_DOMAIN, errors=(_BAD_QUERY, _NO_DOMAIN)),
    Route("POST", "/v1/domains/{name}/suppressions", "suppression_add",
          "Suppress recipients for the domain (an operator's import)", SuppressionChanged,
          body=SuppressionAdd, params=_DOMAIN, errors=(_BAD, _NO_DOMAIN, _TOO_LARGE, _CLUSTER)),
    Route("POST", "/v1/domains/{name}/suppressions/remove", "suppression_remove",
          "Send to a suppressed recipient again", SuppressionChanged, body=SuppressionRemove,
          params=_DOMAIN,
          errors=(_BAD, (404, "no such domain, or the address is not suppressed (`code` is"
                              " `not_found`)"), _TOO_LARGE, _CLUSTER)),
    Route("GET", "/v1/openapi.json", "openapi",
          "This API as an OpenAPI 3.1 document (docs/openapi.json)", None),
)


def encode(obj: msgspec.Struct) -> bytes:
    """Encode a response or request as JSON."""
    return msgspec.json.encode(obj)
