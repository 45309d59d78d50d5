"""relayctl: the operator's command line for a running relayd.

Owns: argument parsing, the confirmation dialogue of irreversible operations
(SEMANTICS.md §4.2: the name typed again, the last connection shown, a warning
when it is recent), and the two output forms: readable tables, or ``--json``
(the response Struct as JSON, for scripts). In cluster mode, an answer that
says which nodes applied the change (``propagation``) adds one line on stderr
(stdout stays the same as on a single node); with ``--json`` stdout holds the
answer alone (notes, warnings and prompts go to stderr). Every failure is one
line on stderr (control characters escaped) and a non-zero exit: 1 for a refused
operation, 2 for bad usage, 3 when relayd cannot be reached. Never a traceback.

Socket: ``--socket PATH``, else ``$RELAYD_SOCKET``, else ``./var/control.sock`` (the
development default), else ``/run/relayd/control.sock`` (the installed service).
See also: control.client, control.schemas.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import time
from collections.abc import Sequence
from typing import Any

import msgspec

from control import schemas
from control.client import Client, ControlError

EXIT_REFUSED = 1
EXIT_USAGE = 2
EXIT_UNREACHABLE = 3
RECENT_SECONDS = 24 * 3600
#: How many audit entries ``user show`` prints.
SHOW_AUDIT = 5


#: Where relayctl looks without --socket or $RELAYD_SOCKET: the development
#: default of ``make run``, then the installed service's (systemd/relayd.service).
DEFAULT_SOCKETS = ("./var/control.sock", "/run/relayd/control.sock")


def default_socket() -> str:
    """The first of DEFAULT_SOCKETS that exists, else the first (its error names it)."""
    for path in DEFAULT_SOCKETS:
        if os.path.exists(path):
            return path
    return DEFAULT_SOCKETS[0]


def _ago(ts: float | None) -> str:
    if ts is None:
        return "never"
    delta = max(0.0, time.time() - ts)
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if delta >= size:
            return f"{int(delta // size)}{unit} ago"
    return f"{int(delta)}s ago"


def _duration(seconds: float) -> str:
    """A duration as people read it: ``45s``, ``3m 05s``, ``2h 04m``, ``3d 07h``."""
    n = max(0, int(seconds))
    if n < 60:
        return f"{n}s"
    for big, small, bs, ss in ((86400, 3600, "d", "h"), (3600, 60, "h", "m"), (60, 1, "m", "s")):
        if n >= big:
            return f"{n // big}{bs} {(n % big) // small:02d}{ss}"
    return f"{n}s"  # not reached


def _when(ts: float | None) -> str:
    if ts is None:
        return "-"
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(ts))


def _until(ts: float | None) -> str:
    """How long until ``ts``: ``in 23h``, ``in 5m``, ``in 30s`` (``expired`` once past)."""
    if ts is None:
        return "-"
    delta = ts - time.time()
    if delta <= 0:
        return "expired"
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if delta >= size:
            return f"in {int(delta // size)}{unit}"
    return f"in {int(delta)}s"


def _table(rows: list[list[str]], header: list[str]) -> str:
    if not rows:
        return "(none)"
    widths = [max(len(str(x)) for x in col) for col in zip(header, *rows, strict=False)]
    lines = ["  ".join(h.ljust(w) for h, w in zip(header, widths, strict=False))]
    for r in rows:
        lines.append("  ".join(str(c).ljust(w) for c, w in zip(r, widths, strict=False)))
    return "\n".join(lines)


class Cli:
    """One relayctl invocation."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        path = args.socket or os.environ.get("RELAYD_SOCKET") or default_socket()
        self.client = Client(path)

    def out(self, obj: msgspec.Struct, human: str) -> None:
        """Print the result, as JSON or as text; who applied a change, on stderr."""
        propagation = getattr(obj, "propagation", None)
        if propagation is not None:
            print(propagation_text(propagation), file=sys.stderr)
        if self.args.json:
            sys.stdout.write(msgspec.json.format(msgspec.json.encode(obj).decode()) + "\n")
        else:
            print(human)

    # -- status ---------------------------------------------------------------------
    def status(self) -> None:
        """relayctl status."""
        st = self.client.call("GET", "/v1/status", schemas.Status)
        lines = [f"relayd {st.version}, up {int(st.uptime_seconds)}s"]
        lines += [f"  listening ({x.kind}): {x.address}" for x in st.listeners]
        lines.append("  queue: " + ", ".join(f"{k}={v}" for k, v in st.queue.items()))
        lines.append(f"  in flight: {st.in_flight}; sessions: {st.sessions}")
        lines.append(f"  domains: {st.domains}; accounts: {st.accounts}")
        lines.append(f"  spool: {st.spool_bytes} bytes; free disk: {st.free_disk_bytes} bytes")
        lines += [f"  backed off: {b.destination} for {b.seconds_left:.0f}s"
                  f" (level {b.level}): {b.reply}" for b in st.backoffs]
        if st.dane:
            lines.append(f"  DANE: {st.dane}")
        self.out(st, "\n".join(lines))

    # -- domains --------------------------------------------------------------------
    def _domain_text(self, d: schemas.DomainInfo) -> str:
        lines = [f"domain {d.name} (selector {d.selector}, {d.accounts} account(s))",
                 "  header From check: " + ("on" if d.check_header_from else
                                            "off (any header From is accepted)"),
                 "  webhook: " + (d.webhook_url or "none")]
        if d.webhook_secret:
            lines.append(f"  webhook signing secret (shown once, keep it): {d.webhook_secret}")
        if d.dns_records:
            lines.append("publish these DNS records:")
            for r in d.dns_records:
                lines.append(f"  {r.name}. IN {r.type} \"{r.value}\"" if r.type == "TXT"
                             else f"  {r.name}. IN {r.type} {r.value}.")
                lines.append(f"      ({r.purpose})")
        return "\n".join(lines + _selectors_text(d.dkim_selectors))

    def domain(self) -> None:
        """relayctl domain ..."""
        a = self.args
        if a.action == "add":
            d = self.client.call("POST", "/v1/domains", schemas.DomainInfo,
                                 schemas.DomainAdd(name=a.name, reason=a.reason))
            self.out(d, self._domain_text(d))
        elif a.action == "list":
            lst = self.client.call("GET", "/v1/domains", schemas.DomainList)
            rows = [[d.name, d.selector, str(d.accounts), _when(d.created_at)]
                    for d in lst.domains]
            self.out(lst, _table(rows, ["DOMAIN", "SELECTOR", "ACCOUNTS", "CREATED"]))
        elif a.action == "show":
            d = self.client.call("GET", f"/v1/domains/{Client.seg(a.name)}", schemas.DomainInfo)
            self.out(d, self._domain_text(d))
        elif a.action == "set":
            if a.check_header_from is None and a.webhook is None \
                    and not a.rotate_webhook_secret:
                raise UsageError("nothing to set: give --check-header-from on|off,"
                                 " --webhook URL|off or --rotate-webhook-secret")
            d = self.client.call("POST", f"/v1/domains/{Client.seg(a.name)}/settings",
                                 schemas.DomainInfo, schemas.DomainSettings(
                                     check_header_from=None if a.check_header_from is None
                                     else a.check_header_from == "on",
                                     webhook=a.webhook,
                                     rotate_webhook_secret=a.rotate_webhook_secret,
                                     reason=a.reason))
            self.out(d, self._domain_text(d))
        elif a.action == "rotate-key":
            self._rotate_key()
        elif a.action == "delete":
            d = self.client.call("GET", f"/v1/domains/{Client.seg(a.name)}", schemas.DomainInfo)
            print(f"domain {d.name} (selector {d.selector}): {d.accounts} account(s) will be"
                  " disabled for good", file=sys.stderr)
            confirm = a.confirm or self._prompt(
                f"Deleting domain {d.name} is irreversible: its accounts are disabled for"
                " good and its DKIM key is destroyed.\nType the domain name to confirm: ")
            r = self.client.call("POST", f"/v1/domains/{Client.seg(a.name)}/delete",
                                 schemas.DomainDeleted,
                                 schemas.Confirm(confirm=confirm, reason=a.reason))
            self.out(r, domain_deleted_text(r))

    def _rotate_key(self) -> None:
        """relayctl domain rotate-key NAME [--activate | --cancel]."""
        a = self.args
        path = f"/v1/domains/{Client.seg(a.name)}/rotate-key"
        path += "/activate" if a.activate else "/cancel" if a.cancel else ""
        r = self.client.call("POST", path, schemas.KeyRotation,
                             schemas.ChangeReason(reason=self.args.reason))
        names = ", ".join(k.selector for k in r.selectors)
        if r.action == "created":
            lines = [f"new DKIM key for {r.name}, pending (selector {names}); mail is still"
                     " signed with the active key", "publish these DNS records:"]
            lines += [x for k in r.selectors for x in _records_text(k.dns_records)]
            lines.append(f"then, once they resolve: relayctl domain rotate-key {r.name}"
                         " --activate")
        elif r.action == "activated":
            lines = [f"{r.name} signs with selector {names} from now on"]
            if r.retired:
                lines.append(f"retired: {', '.join(k.selector for k in r.retired)} (remove its"
                             " DNS record in a few days, once the mail signed with it has"
                             " been delivered and verified)")
        else:
            lines = [f"dropped the pending key of {r.name} (selector {names}); its DNS record,"
                     " if published, can go"]
        self.out(r, "\n".join(lines))

    def _prompt(self, text: str) -> str:
        if not sys.stdin.isatty():
            raise UsageError("--confirm NAME is required when not on a terminal")
        try:  # the prompt on stderr: with --json, stdout is the answer only
            print(text, end="", file=sys.stderr, flush=True)
            return input()  # exactly as typed: the server takes the exact name only
        except EOFError:
            raise UsageError("no confirmation given") from None

    # -- users ----------------------------------------------------------------------
    def _user_text(self, u: schemas.UserInfo,
                   trail: list[schemas.AuditItem] | None = None) -> str:
        status = u.status + (f" ({u.disabled_reason})" if u.disabled_reason else "")
        lim = u.limits
        limits = ", ".join(f"{k}={v}" for k, v in (("per_minute", lim.per_minute),
                                                    ("per_hour", lim.per_hour),
                                                    ("per_day", lim.per_day))
                           if v is not None) or "workspace default"
        lines = [
            f"user {u.username}",
            f"  label:           {_printable(u.label) if u.label else '-'}",
            f"  domain:          {u.domain}",
            f"  status:          {status}",
            f"  created:         {_when(u.created_at)}",
            f"  last connection: {_when(u.last_connection)} ({_ago(u.last_connection)})",
            f"  total sent:      {u.total_sent}",
            f"  queued:          {u.queued}",
            f"  networks:        {', '.join(u.networks) or '-'}",
            f"  limits:          {limits}",
            *([f"  old password:    works until {_when(u.old_password_expires)}"
               f" ({_until(u.old_password_expires)}; end it now: relayctl user"
               f" expire-old-password {u.username})"] if u.old_password_expires else []),
        ]
        if trail:
            lines.append("  recent changes (newest first; `relayctl audit --user NAME`):")
            lines += [f"    {_when(e.at)}  {_who(e)}  {_action(e)}"
                      + (f"  reason: {_printable(e.reason)}" if e.reason else "")
                      for e in trail]
        return "\n".join(lines)

    def _users_table(self, lst: schemas.UserList) -> str:
        rows = [[u.username, u.domain,
                 u.status + (f"({u.disabled_reason})" if u.disabled_reason else ""),
                 _ago(u.last_connection), str(u.total_sent), str(u.queued),
                 _printable(u.label)[:40] if u.label else "-"] for u in lst.users]
        return _table(rows, ["USER", "DOMAIN", "STATUS", "LAST CONNECTION", "SENT", "QUEUED",
                             "LABEL"])

    def user(self) -> None:
        """relayctl user ..."""
        a = self.args
        c = self.client
        if a.action == "add":
            cred = c.call("POST", "/v1/users", schemas.Credentials,
                          schemas.UserAdd(domain=a.domain, allow_networks=a.allow_network or [],
                                          label=a.label, reason=a.reason))
            self.out(cred, f"username: {cred.username}\npassword: {cred.password}\n"
                           "(the password is shown only this once)")
        elif a.action == "list":
            lst = c.call("GET", "/v1/users", schemas.UserList,
                         query={"domain": a.domain, "status": a.status, "sort": a.sort})
            self.out(lst, self._users_table(lst))
        elif a.action == "show":
            u = c.call("GET", f"/v1/users/{Client.seg(a.name)}", schemas.UserInfo)
            trail = [] if a.json else c.call("GET", "/v1/audit", schemas.AuditList, query={
                "user": u.username, "limit": SHOW_AUDIT}).entries
            self.out(u, self._user_text(u, trail))
        elif a.action in ("disable", "enable"):
            u = c.call("POST", f"/v1/users/{Client.seg(a.name)}/{a.action}", schemas.UserInfo,
                       schemas.ChangeReason(reason=a.reason))
            self.out(u, f"{u.username}: {u.status}")
        elif a.action == "reset-password":
            self._reset_password()
        elif a.action == "expire-old-password":
            u = c.call("POST", f"/v1/users/{Client.seg(a.name)}/expire-old-password",
                       schemas.UserInfo, schemas.ChangeReason(reason=a.reason))
            self.out(u, f"{u.username}: only the current password works now")
        elif a.action == "delete":
            self._user_delete()
        elif a.action == "limits":
            body = schemas.UserLimits(per_minute=a.per_minute, per_hour=a.per_hour,
                                      per_day=a.per_day, reason=a.reason)
            u = c.call("POST", f"/v1/users/{Client.seg(a.name)}/limits", schemas.UserInfo, body)
            self.out(u, self._user_text(u))
        elif a.action == "networks":
            u = c.call("POST", f"/v1/users/{Client.seg(a.name)}/networks", schemas.UserInfo,
                       schemas.NetworkChange(action=a.net_action, cidr=a.cidr, reason=a.reason))
            self.out(u, f"{u.username}: networks {', '.join(u.networks) or '-'}")
        elif a.action == "label":
            self._user_label()
        elif a.action == "dormant":
            lst = c.call("GET", "/v1/dormant", schemas.UserList,
                         query={"days": a.days, "max_sent": a.max_sent})
            self.out(lst, self._users_table(lst))

    def _user_label(self) -> None:
        a = self.args
        if (a.text is None) == (not a.clear):
            raise UsageError("user label: give the label TEXT, or --clear")
        u = self.client.call("POST", f"/v1/users/{Client.seg(a.name)}/label", schemas.UserInfo,
                             schemas.UserLabel(label=a.text or "", reason=a.reason))
        self.out(u, f"{u.username}: label {_printable(u.label) if u.label else '(none)'}")

    def _reset_password(self) -> None:
        a = self.args
        cred = self.client.call("POST", f"/v1/users/{Client.seg(a.name)}/reset-password",
                                schemas.Credentials,
                                schemas.PasswordReset(keep_old_seconds=a.keep_old,
                                                      reason=a.reason))
        old = ("the old password no longer works" if cred.old_password_expires is None else
               f"the old password keeps working until {_when(cred.old_password_expires)}"
               f" ({_until(cred.old_password_expires)}), then stops by itself")
        note = f"\nnote: {cred.note}" if cred.note else ""
        self.out(cred, f"username: {cred.username}\npassword: {cred.password}\n"
                       f"({old}; this one is shown only once){note}")

    def _user_delete(self) -> None:
        a = self.args
        u = self.client.call("GET", f"/v1/users/{Client.seg(a.name)}", schemas.UserInfo)
        info = (f"user {u.username} ({u.domain}): last connection {_when(u.last_connection)}"
                f" ({_ago(u.last_connection)}), {u.queued} queued message(s)")
        print(info, file=sys.stderr)
        if u.last_connection is not None and time.time() - u.last_connection < RECENT_SECONDS:
            print("warning: this account connected within the last 24 hours; an application"
                  " may still use these credentials", file=sys.stderr)
        if not a.confirm:  # refused now (queued mail) rather than after the name is typed
            self.client.call("POST", f"/v1/users/{Client.seg(a.name)}/delete",
                             schemas.UserDeleted, schemas.UserDelete(
                                 confirm=a.name, purge_queue=a.purge_queue, dry_run=True))
        confirm = a.confirm or self._prompt(
            "Deleting is irreversible. Type the username to confirm: ")
        r = self.client.call("POST", f"/v1/users/{Client.seg(a.name)}/delete",
                             schemas.UserDeleted,
                             schemas.UserDelete(confirm=confirm, purge_queue=a.purge_queue,
                                                reason=a.reason))
        self.out(r, f"deleted {r.username}" + (f"; purged {r.purged} queued message(s)"
                                                if r.purged else ""))

    # -- queues and log -------------------------------------------------------------
    def queue(self) -> None:
        """relayctl queue ..."""
        a = self.args
        c = self.client
        if a.action == "list":
            lst = c.call("GET", "/v1/queue", schemas.QueueList,
                         query={"user": a.user, "state": a.state})
            rows = [[i.id, i.username, _state(i), _duration(i.age_seconds), str(i.attempts),
                     _when(i.next_attempt or i.reset_at), (i.last_error or "")[:60]]
                    for i in lst.items]
            self.out(lst, _table(rows, ["ID", "USER", "STATE", "AGE", "ATTEMPTS",
                                        "NEXT/RESET", "LAST ERROR"]))
        elif a.action == "show":
            item = c.call("GET", f"/v1/queue/{_message_id(a.id)}", schemas.QueueItem)
            self.out(item, queue_item_text(item))
        elif a.action == "purge":
            r = c.call("POST", "/v1/queue/purge", schemas.QueueChanged,
                       schemas.QueuePurge(user=a.user, state=a.state))
            self.out(r, f"purged {r.count} message(s)")
        elif a.action == "retry":
            r = c.call("POST", "/v1/queue/retry", schemas.QueueChanged,
                       schemas.QueueRetry(user=a.user))
            self.out(r, f"{r.count} deferred recipient(s) due now")
        elif a.action in ("hold", "release"):
            item = c.call("POST", f"/v1/queue/{_message_id(a.id)}/{a.action}",
                          schemas.QueueItem)
            self.out(item, f"{item.id} ({item.username}): {_state(item)}"
                     + ("; its account is disabled: `user enable` releases it"
                        if item.held_by == "account" else ""))
        elif a.action == "delete":
            r = c.call("POST", f"/v1/queue/{_message_id(a.id)}/delete", schemas.QueueChanged)
            self.out(r, f"deleted {a.id.upper()}: its recipients are logged as purged")

    def log(self) -> None:
        """relayctl log."""
        a = self.args
        since = None
        if a.since:
            since = _parse_since(a.since)
        message = _message_id(a.message) if a.message else None
        lst = self.client.call("GET", "/v1/log", schemas.LogList,
                               query={"user": a.user, "status": a.status, "since": since,
                                      "limit": a.limit, "message": message})
        rows = [[_when(e.ts), e.message_id, e.username, e.recipient,
                 e.outcome + (" (bounce)" if e.kind == "bounce" else ""),
                 str(e.code or ""), e.next_hop, e.text[:50]] for e in lst.entries]
        self.out(lst, _table(rows, ["TIME", "MESSAGE", "USER", "RECIPIENT", "OUTCOME",
                                    "CODE", "NEXT HOP", "REPLY"]))
        if lst.more:  # on stderr: --json output stays one JSON document
            print(f"-- {len(lst.entries)} entries shown, the limit; more match:"
                  " --limit N (up to 10000) or --since to see them", file=sys.stderr)

    def audit(self) -> None:
        """relayctl audit: who changed which account or domain, newest first."""
        a = self.args
        since = _parse_since(a.since) if a.since else None
        lst = self.client.call("GET", "/v1/audit", schemas.AuditList,
                               query={"user": a.user, "domain": a.domain, "since": since,
                                      "limit": a.limit})
        rows = [[_when(e.at), _who(e), e.node or "-", e.kind, _printable(e.name),
                 _action(e), _printable(e.reason) if e.reason else "-"] for e in lst.entries]
        self.out(lst, _table(rows, ["TIME", "WHO", "NODE", "KIND", "NAME", "ACTION",
                                    "REASON"]))
        if len(lst.entries) >= a.limit:
            print(f"(stopped at the limit of {a.limit} entries; older ones exist: raise"
                  " --limit or narrow with --since, --user or --domain)", file=sys.stderr)

    # -- cluster nodes --------------------------------------------------------------
    def node(self) -> None:
        """relayctl node list | forget NAME."""
        a = self.args
        if a.action == "list":
            lst = self.client.call("GET", "/v1/nodes", schemas.NodeList)
            self.out(lst, node_table(lst))
        elif a.action == "forget":
            r = self.client.call("POST", f"/v1/nodes/{Client.seg(a.name)}/forget",
                                 schemas.NodeForgotten)
            self.out(r, f"forgot node {r.name}: changes no longer wait for it")

    # -- suppression lists ----------------------------------------------------------
    def suppression(self) -> None:
        """relayctl suppression list DOMAIN [--limit N] | remove DOMAIN ADDRESS | add."""
        a = self.args
        path = f"/v1/domains/{Client.seg(a.domain)}/suppressions"
        if a.action == "list":
            lst = self.client.call("GET", path, schemas.SuppressionList,
                                   query={"limit": a.limit})
            rows = [[_printable(e.address), _when(e.since), _when(e.expires),
                     _printable(e.reason)[:60]] for e in lst.entries]
            text = _table(rows, ["ADDRESS", "SINCE", "EXPIRES", "REASON"])
            if lst.total > len(lst.entries):
                text += (f"\n(showing {len(lst.entries)} of {lst.total};"
                         f" --limit {min(lst.total, schemas.LOG_LIMIT_MAX)} for more)")
            self.out(lst, text)
        elif a.action == "remove":
            r = self.client.call("POST", path + "/remove", schemas.SuppressionChanged,
                                 schemas.SuppressionRemove(address=a.address))
            self.out(r, f"{a.address} is no longer suppressed for {r.domain}")
        elif a.action == "add":
            r = self.client.call("POST", path, schemas.SuppressionChanged,
                                 schemas.SuppressionAdd(addresses=a.addresses, reason=a.reason))
            self.out(r, f"suppressed {r.count} address(es) for {r.domain}")

    # -- failed-AUTH throttle -------------------------------------------------------
    def throttle(self) -> None:
        """relayctl throttle list | clear [ADDRESS]."""
        a = self.args
        if a.action == "list":
            lst = self.client.call("GET", "/v1/throttle", schemas.ThrottleList)
            rows = [[e.address, _printable(e.username), str(e.failures),
                     _when(e.until)] for e in lst.entries]
            self.out(lst, _table(rows, ["ADDRESS", "USERNAME", "FAILURES", "REFUSED UNTIL"]))
        elif a.action == "clear":
            r = self.client.call("POST", "/v1/throttle/clear", schemas.ThrottleCleared,
                                 schemas.ThrottleClear(address=a.address))
            self.out(r, f"cleared {r.count} throttle entr{'y' if r.count == 1 else 'ies'}"
                        + (f" of {a.address}" if a.address else ""))


def domain_deleted_text(r: schemas.DomainDeleted) -> str:
    """What a domain delete did, queue by queue (the answering node's spool)."""
    def count(c: schemas.MailCount) -> str:
        return f"{c.messages} message(s), {c.recipients} recipient(s)"

    return "\n".join([
        f"deleted domain {r.name}: {r.accounts_disabled} account(s) disabled,"
        f" {r.messages_held} message(s) held",
        f"  held:     {count(r.held)}: not sent; `queue purge --user NAME` removes them",
        f"  retrying: {count(r.retrying)}: retries go on as scheduled",
        f"  purged:   {count(r.purged)}"])


def queue_item_text(item: schemas.QueueItem) -> str:
    """``queue show`` as text: times as local times, ages and waits as durations."""
    now = time.time()

    def at(ts: float | None) -> str:
        if ts is None:
            return "-"
        wait = ts - now
        return f"{_when(ts)} ({'in ' + _duration(wait) if wait > 0 else 'now'})"

    lines = [f"message {item.id}",
             f"  user:         {_printable(item.username)}",
             f"  sender:       {_printable(item.sender) if item.sender else '<>'}",
             f"  state:        {_state(item)}",
             f"  received:     {_when(now - item.age_seconds)}"
             f" ({_duration(item.age_seconds)} ago)",
             f"  attempts:     {item.attempts}"]
    if item.next_attempt is not None:
        lines.append(f"  next attempt: {at(item.next_attempt)}")
    if item.reset_at is not None:
        lines.append(f"  limit resets: {at(item.reset_at)}")
    if item.last_error:
        lines.append(f"  last error:   {_printable(item.last_error)}")
    lines.append(f"  size:         {item.size} bytes")
    lines.append(f"  recipients:   {len(item.recipients)}")
    lines += [f"    {_printable(r)}" for r in item.recipients]
    return "\n".join(lines)


def _records_text(records: list[schemas.DnsRecord]) -> list[str]:
    lines = []
    for r in records:
        lines.append(f"  {r.name}. IN {r.type} \"{r.value}\"" if r.type == "TXT"
                     else f"  {r.name}. IN {r.type} {r.value}.")
        lines.append(f"      ({r.purpose})")
    return lines


def _selectors_text(selectors: list[schemas.DkimSelector]) -> list[str]:
    """``domain show``: the DKIM selectors, a pending key's records, the retired ones."""
    if not selectors:
        return []
    lines = ["DKIM selectors:"]
    for k in selectors:
        when = {"pending": f", made {_when(k.since)}",
                "retired": f", retired {_when(k.since)}"}.get(k.state, "")
        lines.append(f"  {k.selector}  {k.state}" + (f" ({k.algorithm})" if k.algorithm
                                                     else "") + when)
    pending = [k for k in selectors if k.state == "pending"]
    if pending:
        lines.append("pending key: publish these DNS records, then run"
                     " `domain rotate-key --activate`:")
        lines += [x for k in pending for x in _records_text(k.dns_records)]
    if any(k.state == "retired" for k in selectors):
        lines.append("a retired selector's DNS record can go a few days after it was retired"
                     " (once the mail signed with it has been verified)")
    return lines


def propagation_text(p: schemas.Propagation) -> str:
    """The one stderr line saying which nodes applied a change (cluster mode)."""
    text = f"acknowledged by {len(p.acknowledged)} node(s): {', '.join(p.acknowledged) or '-'}"
    if p.gone:
        text += f"; not waited for (gone): {', '.join(p.gone)}"
    return text


def node_table(lst: schemas.NodeList) -> str:
    """``node list`` as text: the version, then one row per node (``*``: the one answering)."""
    rows = [["*" if n.this else "", _printable(n.name), _printable(n.address), n.state,
             str(n.applied_version), str(n.behind), f"{n.heartbeat_age_seconds:.1f}s ago",
             str(n.queue_depth)] for n in lst.nodes]
    return f"control-plane version {lst.version}\n" + _table(
        rows, ["", "NAME", "ADDRESS", "STATE", "APPLIED", "BEHIND", "HEARTBEAT", "QUEUE"])


def _printable(text: str) -> str:
    """A username as a client sent it, safe for a terminal (control characters escaped)."""
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text) or '""'


def _who(e: schemas.AuditItem) -> str:
    """Who made a change: ``uid 1000 (alice)``, or ``-`` when not through the socket."""
    if e.uid is None:
        return "-"
    return f"uid {e.uid}" + (f" ({_printable(e.operator)})" if e.operator else "")


def _detail(value: Any) -> str:
    """One value of an audit entry's details as text (None: the default; "": none)."""
    if value is None:
        return "default"
    if isinstance(value, list):
        return ",".join(_printable(str(v)) for v in value) or "(none)"
    return _printable(str(value)) if value != "" else "(none)"


def _action(e: schemas.AuditItem) -> str:
    """An entry's action and its details, on one line (``limits_changed
    per_day=default->100``)."""
    d = dict(e.details)
    parts = [e.action]
    if "old" in d and "new" in d:
        old, new = d.pop("old"), d.pop("new")
        if isinstance(old, dict) and isinstance(new, dict):
            parts += [f"{k}={_detail(old.get(k))}->{_detail(new.get(k))}"
                      for k in sorted(set(old) | set(new)) if old.get(k) != new.get(k)]
        else:
            parts.append(f"{_detail(old)}->{_detail(new)}")
    parts += [f"{k}={_detail(v)}" for k, v in sorted(d.items()) if v not in ("", [], None)]
    return " ".join(parts)


class UsageError(Exception):
    """Bad command-line usage."""


def _state(item: schemas.QueueItem) -> str:
    """A queued message's state, with who held it (``held (operator)``)."""
    return f"{item.state} ({item.held_by})" if item.held_by else item.state


def _message_id(text: str) -> str:
    """A message id as ``queue list`` shows it (16 hex digits), else a usage error."""
    try:
        return msgspec.convert(text, schemas.MessageId).upper()
    except msgspec.ValidationError:
        raise UsageError(f"{text!r} is not a message id (16 hex digits, as `queue list`"
                         " shows it)") from None


def _parse_since(text: str) -> float:
    units = {"s": 1, "m": 60, "h": 3600, "d": 86400}
    when: float | None = None
    with contextlib.suppress(ValueError, OverflowError):  # too many digits, or too far
        if text and text[-1] in units and text[:-1].isascii() and text[:-1].isdigit():
            when = time.time() - int(text[:-1]) * units[text[-1]]
        else:
            try:
                when = float(text)
            except ValueError:
                when = time.mktime(time.strptime(text, "%Y-%m-%d"))
    if when is None:
        raise UsageError("--since takes 30m, 2h, 7d, a date YYYY-MM-DD or epoch seconds")
    try:
        return msgspec.convert(when, schemas.EpochSeconds)
    except msgspec.ValidationError:
        raise UsageError(f"--since {text}: not a time between 1970 and the year 9999") \
            from None


def _text(kind: Any) -> Any:
    """An argparse ``type`` for free text bounded like the API's field (reason, label)."""
    def convert(text: str) -> Any:
        try:
            return msgspec.convert(text, kind)
        except msgspec.ValidationError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None
    return convert


def _reason(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--reason", type=_text(schemas.Reason), default="",
                        help="why (kept in the audit trail; at most"
                        f" {schemas.REASON_MAX} characters)")


def _keep_old(text: str) -> float:
    """``--keep-old``: 30s, 90m, 24h, 7d (units as ``--since``), more than 0, at most 30 days."""
    units = {"s": 1, "m": 60, "h": 3600, "d": 86400}
    if not (text and text[-1] in units and text[:-1].isascii() and text[:-1].isdigit()):
        raise argparse.ArgumentTypeError(f"{text!r} is not a duration (30s, 90m, 24h, 7d)")
    seconds = float(int(text[:-1]) * units[text[-1]])
    try:
        return msgspec.convert(seconds, schemas.KeepOld)
    except msgspec.ValidationError:
        raise argparse.ArgumentTypeError(
            f"{text}: must be more than 0 and at most 30d") from None


def _checked(kind: Any, what: str) -> Any:
    """An argparse ``type`` that applies the API's bound for the field (control.schemas)."""
    base = int if what == "an integer" else float

    def convert(text: str) -> Any:
        try:
            value = base(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not {what}") from None
        try:
            return msgspec.convert(value, kind)
        except msgspec.ValidationError as exc:
            raise argparse.ArgumentTypeError(f"{text}: {exc}") from None

    return convert


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> Any:  # one line, exit 2, no usage dump
        raise UsageError(f"{self.prog}: {message}")


def build_parser() -> argparse.ArgumentParser:
    """The relayctl command line."""
    p = _Parser(prog="relayctl", description="control a running relayd")
    p.add_argument("--socket", help="control socket path (default: $RELAYD_SOCKET, else"
                   " ./var/control.sock, else /run/relayd/control.sock)")
    p.add_argument("--json", action="store_true", help="machine-readable JSON output")
    sub = p.add_subparsers(dest="cmd", required=True, parser_class=_Parser)
    sub.add_parser("status", help="version, uptime, listeners, queue depths")

    d = sub.add_parser("domain", help="sending domains").add_subparsers(
        dest="action", required=True, parser_class=_Parser)
    da = d.add_parser("add")
    da.add_argument("name")
    _reason(da)
    d.add_parser("list")
    d.add_parser("show").add_argument("name")
    ds = d.add_parser("set")
    ds.add_argument("name")
    ds.add_argument("--check-header-from", choices=["on", "off"],
                    help="refuse mail whose header From or Sender is outside the domain"
                    " (on by default; off for a relay that sends for several brands)")
    _reason(ds)
    ds.add_argument("--webhook", metavar="URL|off",
                    help="POST a signed JSON event to this http(s) URL for each recipient"
                    " delivered, failed, bounced, purged or suppressed; off removes it (a new"
                    " secret is printed once when it is first set)")
    ds.add_argument("--rotate-webhook-secret", action="store_true",
                    help="make a new signing secret (printed once; the old one stops at once)")
    dr = d.add_parser("rotate-key", help="a new DKIM key, pending until --activate")
    dr.add_argument("name")
    _reason(dr)
    drx = dr.add_mutually_exclusive_group()
    drx.add_argument("--activate", action="store_true",
                     help="sign with the pending key from now on (publish its records first);"
                     " the old selector is retired")
    drx.add_argument("--cancel", action="store_true", help="drop the pending key")
    dd = d.add_parser("delete")
    dd.add_argument("name")
    dd.add_argument("--confirm", help="the domain name again (irreversible operation)")
    _reason(dd)

    u = sub.add_parser("user", help="SMTP accounts").add_subparsers(
        dest="action", required=True, parser_class=_Parser)
    ua = u.add_parser("add")
    ua.add_argument("--domain", required=True)
    ua.add_argument("--allow-network", action="append", metavar="CIDR",
                    help="attribute unauthenticated sessions from this network (repeatable)")
    ua.add_argument("--label", type=_text(schemas.Label), default="",
                    help="free text: which application uses the account")
    _reason(ua)
    ul = u.add_parser("list")
    ul.add_argument("--domain")
    ul.add_argument("--status", choices=["active", "disabled"])
    ul.add_argument("--sort", choices=["name", "last-used", "sent"], default="name")
    u.add_parser("show").add_argument("name")
    for action in ("disable", "enable", "expire-old-password"):
        ux = u.add_parser(action)
        ux.add_argument("name")
        _reason(ux)
    urp = u.add_parser("reset-password")
    urp.add_argument("name")
    urp.add_argument("--keep-old", type=_keep_old, metavar="DURATION",
                     help="the old password keeps working this long (30s, 90m, 24h, 7d;"
                     " at most 30d), then stops by itself")
    _reason(urp)
    ud = u.add_parser("delete")
    ud.add_argument("name")
    ud.add_argument("--confirm", help="the username again (irreversible operation)")
    ud.add_argument("--purge-queue", action="store_true",
                    help="also delete the account's queued mail")
    _reason(ud)
    lbl = u.add_parser("label", help="set (or --clear) the account's label")
    lbl.add_argument("name")
    lbl.add_argument("text", nargs="?", type=_text(schemas.Label), metavar="TEXT")
    lbl.add_argument("--clear", action="store_true", help="remove the label")
    _reason(lbl)
    lim = u.add_parser("limits")
    lim.add_argument("name")
    _reason(lim)
    count = _checked(schemas.Count, "an integer")
    lim.add_argument("--per-minute", type=count)
    lim.add_argument("--per-hour", type=count)
    lim.add_argument("--per-day", type=count)
    net = u.add_parser("networks")
    net.add_argument("net_action", choices=["add", "remove"])
    net.add_argument("name")
    net.add_argument("cidr")
    _reason(net)
    dor = u.add_parser("dormant")
    dor.add_argument("--days", type=_checked(schemas.Days, "a number"), default=90.0)
    dor.add_argument("--max-sent", type=count)

    q = sub.add_parser("queue", help="queued mail").add_subparsers(
        dest="action", required=True, parser_class=_Parser)
    ql = q.add_parser("list")
    ql.add_argument("--user")
    ql.add_argument("--state", choices=["queued", "waiting_limit", "held", "deferred"])
    q.add_parser("show").add_argument("id")
    qp = q.add_parser("purge")
    qp.add_argument("--user", required=True)
    qp.add_argument("--state", choices=["queued", "waiting_limit", "held", "deferred"])
    q.add_parser("retry").add_argument("--user")
    q.add_parser("hold", help="hold one message (any account) until released"
                 ).add_argument("id", metavar="ID")
    q.add_parser("release", help="release a held message: attempted again at once"
                 ).add_argument("id", metavar="ID")
    q.add_parser("delete", help="delete one message for good (logged as purged)"
                 ).add_argument("id", metavar="ID")

    th = sub.add_parser("throttle", help="failed-AUTH throttle").add_subparsers(
        dest="action", required=True, parser_class=_Parser)
    th.add_parser("list", help="addresses and usernames slowed down or refused")
    th.add_parser("clear", help="forget counts and locks (all, or of one address)"
                  ).add_argument("address", nargs="?", metavar="ADDRESS")

    nd = sub.add_parser("node", help="the nodes of a cluster").add_subparsers(
        dest="action", required=True, parser_class=_Parser)
    nd.add_parser("list", help="name, address, state, applied version, heartbeat, queue"
                  " depth (* marks the node answering)")
    nd.add_parser("forget", help="forget a gone node: changes no longer wait for it"
                  ).add_argument("name", metavar="NAME")

    sp = sub.add_parser("suppression", help="recipients a domain does not send to again"
                        ).add_subparsers(dest="action", required=True, parser_class=_Parser)
    spl = sp.add_parser("list", help="a domain's suppressed recipients, newest first")
    spl.add_argument("domain", metavar="DOMAIN")
    spl.add_argument("--limit", type=_checked(schemas.LogLimit, "an integer"), default=100)
    spr = sp.add_parser("remove", help="send to a suppressed recipient again")
    spr.add_argument("domain", metavar="DOMAIN")
    spr.add_argument("address", metavar="ADDRESS")
    spa = sp.add_parser("add", help="suppress recipients (an import)")
    spa.add_argument("domain", metavar="DOMAIN")
    spa.add_argument("addresses", metavar="ADDRESS", nargs="+")
    spa.add_argument("--reason", default="added by the operator")

    lg = sub.add_parser("log", help="delivery log")
    lg.add_argument("--user")
    lg.add_argument("--status", choices=["queued", "deferred", "delivered", "failed", "purged",
                                         "suppressed"])
    lg.add_argument("--message", metavar="ID",
                    help="one message's history, oldest first (also after it left the queue)")
    lg.add_argument("--since", help="30m, 2h, 7d, YYYY-MM-DD or epoch seconds")
    lg.add_argument("--limit", type=_checked(schemas.LogLimit, "an integer"), default=100)

    au = sub.add_parser("audit", help="audit trail: who changed accounts and domains")
    au.add_argument("--user", help="one account's entries (also after it was deleted)")
    au.add_argument("--domain", help="a domain's entries and its accounts'")
    au.add_argument("--since", help="30m, 2h, 7d, YYYY-MM-DD or epoch seconds")
    au.add_argument("--limit", type=_checked(schemas.LogLimit, "an integer"), default=100)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``relayctl``."""
    try:
        args = build_parser().parse_args(argv)
        cli = Cli(args)
        getattr(cli, args.cmd)()
        return 0
    except UsageError as exc:
        text = _printable(str(exc))
        print(text if text.startswith("relayctl") else f"relayctl: {text}", file=sys.stderr)
        return EXIT_USAGE
    except ControlError as exc:  # one line, whatever the answer held (a name with a newline)
        print(f"relayctl: {_printable(str(exc))}", file=sys.stderr)
        return EXIT_UNREACHABLE if exc.status == 0 else EXIT_REFUSED
    except KeyboardInterrupt:
        print("relayctl: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # stdout closed early (``relayctl log | head``): no traceback
        with contextlib.suppress(OSError):
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141


if __name__ == "__main__":
    sys.exit(main())
