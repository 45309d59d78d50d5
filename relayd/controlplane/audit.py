"""The audit trail: who changed which account or domain, when, and why.

Owns: the operator of the control request being served (``OPERATOR_UID``, the
socket peer's uid, set by relayd.controlplane.server for the request's task),
the one way an operation makes the entries of its change (``account_entry``,
``domain_entry``: pass the result as ``audit=`` to the store's write, which stores
them in the same transaction as the change), the check of an operator's free text
(``checked_text``: reasons and labels are one line), and reading the trail
(``relayctl audit``; ``user show`` asks it for the account's last entries).

An entry never holds a secret: details are what changed (old and new limits, a
network, a label), never a password or hash. The trail is kept by name, so it outlives
the account or domain (SEMANTICS §4.4).

Untrusted input: reasons and labels (bounded by control.schemas, control characters
refused here). Settings read: none.
See also: relayd.store.directory (AuditEntry, the table), relayd.controlplane.accounts.
"""

from __future__ import annotations

import contextvars
import functools
import json
import pwd
from collections.abc import Sequence
from typing import Any

from control import schemas
from relayd.controlplane.changes import LifecycleError, Shared
from relayd.directory.accounts import Account
from relayd.store.directory import AuditEntry

#: The uid of the control socket's peer for the request being served (None: no request,
#: or not a Unix socket).
OPERATOR_UID: contextvars.ContextVar[int | None] = contextvars.ContextVar(
    "relayd_operator_uid", default=None)


def checked_text(value: str, field: str) -> str:
    """``value`` (a reason or label) stripped; LifecycleError naming ``field`` if it holds
    a control character (the trail and the tables print one line per entry)."""
    if any(ord(c) < 32 or ord(c) == 127 for c in value):
        raise LifecycleError(f"invalid request: {field}: control characters are not allowed",
                             "invalid_request")
    return value.strip()


def entry(s: Shared, kind: str, subject: str, action: str, reason: str = "", *,
          domain: str = "", **details: Any) -> list[AuditEntry]:
    """The audit entry of a change, made now by the request's operator (a list: the
    ``audit=`` argument of every store write)."""
    return [AuditEntry(at=s.clock(), kind=kind, subject=subject, action=action,
                       uid=OPERATOR_UID.get(), reason=checked_text(reason, "reason"),
                       details=json.dumps(details, sort_keys=True) if details else "",
                       domain=domain)]


def account_entry(s: Shared, acct: Account, action: str, reason: str = "",
                  **details: Any) -> list[AuditEntry]:
    """The audit entry of a change to ``acct``."""
    return entry(s, "account", acct.username, action, reason, domain=acct.domain.name,
                 **details)


def domain_entry(s: Shared, name: str, action: str, reason: str = "",
                 **details: Any) -> list[AuditEntry]:
    """The audit entry of a change to the domain ``name``."""
    return entry(s, "domain", name, action, reason, domain=name, **details)


@functools.lru_cache(maxsize=256)
def user_name(uid: int) -> str | None:
    """The user name of ``uid`` on this host, if it has one."""
    try:
        return pwd.getpwuid(uid).pw_name
    except (KeyError, OverflowError):
        return None


def item(e: AuditEntry) -> schemas.AuditItem:
    """The operator's view of an entry."""
    return schemas.AuditItem(
        at=e.at, kind="domain" if e.kind == "domain" else "account", name=e.subject,
        domain=e.domain, action=e.action, uid=e.uid,
        operator=None if e.uid is None else user_name(e.uid), node=e.node or None,
        reason=e.reason, details=json.loads(e.details) if e.details else {})


def items(entries: Sequence[AuditEntry]) -> list[schemas.AuditItem]:
    return [item(e) for e in entries]


async def audit_list(s: Shared, user: str | None, domain: str | None, since: float | None,
                     limit: int) -> schemas.AuditList:
    """The audit trail, newest first, filtered (``relayctl audit``)."""
    dom = domain.strip().lower().rstrip(".") if domain else None
    return schemas.AuditList(entries=items(await s.store.audit_entries(
        account=user, domain=dom, since=since, limit=limit)))
