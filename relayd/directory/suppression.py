"""The suppression list in memory: per sending domain, the recipients not to send to again.

Owns: :class:`Suppressions`, the per-domain sets the dispatcher reads before every
attempt (a dict lookup per recipient, no I/O; nothing at all while the domain has no
entry), what a permanent failure adds (``suppresses``: the pure rule of which replies
mean "no such address") and the text a suppressed recipient fails with.

Which failures suppress: a permanent reply of the next hop to the recipient's own RCPT
(never a reply to MAIL, DATA or the end of DATA: those are about the sender or the
message) — an enhanced status 5.1.x (bad mailbox, bad domain, moved: 5.1.1, 5.1.2, 5.1.6, 5.1.10...)
or 5.2.1 (mailbox disabled), or a 550, 551 or 553 without an enhanced status. Not: a
policy or reputation rejection (5.7.x), a full mailbox or size (5.2.2, 5.2.3, 5.3.4), any
other 5.x.x, and never a failure relayd made itself (DNS, a refused route, the queue
lifetime: those results have no reply code of a next hop, or ``4.4.7``).

Addresses compare with the domain part in lower case and the local part as stored
(RFC 5321: only the receiving host may fold a local part). An entry expires ``ttl``
seconds after the failure that added it (``[delivery] suppression_days``); a newer failure
renews it.

Whoever writes the directory tables sets ``on_learn`` (called for an entry the
dispatcher added; it writes it in the background) and fills the sets at start and
after a change made elsewhere (``replace``).
Untrusted input: reply codes and texts of next hops (matched, then stored as text).
See also: relayd.queue.dispatch (checks and learns), relayd.controlplane.suppressions.
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass

DAY = 86_400.0
_ENHANCED = re.compile(r"\s*([245])\.(\d{1,3})\.(\d{1,3})\b")


@dataclass(frozen=True, slots=True)
class Entry:
    """One suppressed recipient: its address (as keyed), the reply that added it, when."""

    address: str
    reason: str
    since: float


def key(address: str) -> str:
    """The form addresses compare in: the domain part lower-cased, the local part as is."""
    local, at, domain = address.rpartition("@")
    return f"{local}@{domain.lower()}" if at else address


def suppresses(code: int | None, text: str) -> bool:
    """Whether a permanent reply ``code`` / ``text`` from a next hop says the address does
    not exist (or no longer accepts mail), so that the domain stops sending to it. Pure."""
    if code is None or not 500 <= code < 600:
        return False
    m = _ENHANCED.match(text)
    if m is None:
        return code in (550, 551, 553)
    cls, subject, detail = m.group(1), int(m.group(2)), int(m.group(3))
    return cls == "5" and (subject == 1 or (subject == 2 and detail == 1))


def failure_text(entry: Entry) -> str:
    """What a suppressed recipient's result says (the DSN's diagnostic): since when, why."""
    m = _ENHANCED.search(entry.reason)
    status = m.group(0).strip() if m and m.group(1) == "5" else "5.1.1"
    since = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(entry.since))
    return (f"{status} recipient suppressed: it failed permanently at {since}"
            f" ({entry.reason}); not sent again")


class Suppressions:
    """Suppressed recipients per domain id, with their expiry (``ttl`` seconds; 0: off)."""

    __slots__ = ("_by_domain", "on_learn", "ttl")

    def __init__(self, ttl: float = 30 * DAY) -> None:
        self._by_domain: dict[int, dict[str, Entry]] = {}
        self.ttl = ttl
        #: Set by the control plane: store an entry the dispatcher learnt (background).
        self.on_learn: Callable[[int, Entry], None] | None = None

    def find(self, domain_id: int, address: str, now: float) -> Entry | None:
        """The live entry suppressing ``address`` for the domain, or None (hot path)."""
        entries = self._by_domain.get(domain_id)
        if not entries:
            return None
        found = entries.get(key(address))
        if found is None or not self.ttl or found.since + self.ttl <= now:
            return None
        return found

    def has_any(self, domain_id: int) -> bool:
        """False when no recipient of the domain can be suppressed (no lookup needed)."""
        return bool(self.ttl) and bool(self._by_domain.get(domain_id))

    def learn(self, domain_id: int, address: str, code: int, text: str, now: float) -> None:
        """A permanent failure the rule says suppresses: remember it and have it stored."""
        if not self.ttl:
            return
        entry = Entry(key(address), f"{code} {text}".strip()[:500], now)
        self.put(domain_id, entry)
        if self.on_learn is not None:
            self.on_learn(domain_id, entry)

    def put(self, domain_id: int, entry: Entry) -> None:
        self._by_domain.setdefault(domain_id, {})[entry.address] = entry

    def remove(self, domain_id: int, address: str) -> bool:
        """Forget one entry; True if there was one."""
        entries = self._by_domain.get(domain_id)
        if not entries:
            return False
        return entries.pop(key(address), None) is not None

    def replace(self, domain_id: int, entries: Iterable[Entry]) -> None:
        """The domain's entries as stored now (at start, or after a change elsewhere)."""
        fresh = {e.address: e for e in entries}
        if fresh:
            self._by_domain[domain_id] = fresh
        else:
            self._by_domain.pop(domain_id, None)

    def entries(self, domain_id: int, now: float) -> list[Entry]:
        """The domain's live entries, newest first."""
        live = [e for e in self._by_domain.get(domain_id, {}).values()
                if self.ttl and e.since + self.ttl > now]
        return sorted(live, key=lambda e: (-e.since, e.address))
