"""How many rejection log lines may be written: token buckets per (reason, client address).

Owns: the decision, for each SMTP rejection or failed AUTH, whether its log
line is written or only counted, and when the count of the lines not written
is reported. Pure: every method takes the clock reading ``now`` (monotonic
seconds); no I/O. relayd.observe.events writes the lines it decides.

Why per client address. A flood of rejections must not fill the disk, but the
lines are also what fail2ban counts, per address: a budget per reason alone
would let one loud address use it up and hide every other one (an attacker
could flood ``syntax`` errors to hide its AUTH failures, or one address could
hide another's). So each (reason, address) key has its own bucket: ``burst``
lines at once, then ``per_minute`` more a minute. The default burst (20) is
above the AUTH throttle's lockout count and any usual fail2ban ``maxretry``,
so fail2ban sees enough lines of each attacking address to ban it before any
is sampled away; the summary of what was not written carries the address, the
reason and the count, and fail2ban's filter matches it too.

A flood from many addresses (an IPv6 prefix has more than anyone can track)
is bounded by one more bucket for all keys together: ``max_per_second`` lines
a second, summaries included. Lines past it are counted under their key.

Summaries. A key's count of lines not written is reported (a) just before its
next written line, or (b) by :meth:`due`, ``summary_seconds`` after the first
line it did not write, whichever comes first; each count is reported once.

Memory: at most ``max_keys`` keys; the least recently used goes first, and its
unreported count moves to a count per reason with no address (reported by
:meth:`due` like any other, with ``client`` ""). A key's bucket that refilled
and has nothing to report is the same as a new one, so forgetting it is free.

Cost: :meth:`admit` is O(1), no I/O: a dict lookup, a move to the end and a
few float operations; :meth:`due` is O(1) when nothing is due.

Untrusted input: the client address (a key, never parsed). Settings read:
none; [server] log_rejections_* are passed in by relayd.app.
See also: relayd.observe.events (the log lines), config/fail2ban/.
"""

from __future__ import annotations

from collections import OrderedDict

#: Keys remembered at most (least recently used forgotten first).
MAX_KEYS = 10_000


class _Key:
    """One (reason, client) bucket."""

    __slots__ = ("first_dropped", "last", "suppressed", "tokens")

    def __init__(self, tokens: float, now: float) -> None:
        self.tokens = tokens
        self.last = now
        self.suppressed = 0  # lines not written since the last report
        self.first_dropped = 0.0  # when the first of them was not written


class LogBudget:
    """Token buckets deciding which rejection lines are written (see the module doc)."""

    def __init__(self, *, burst: int, per_minute: float, max_per_second: float,
                 summary_seconds: float = 60.0, max_keys: int = MAX_KEYS) -> None:
        if burst < 1 or per_minute < 0 or max_per_second <= 0 or summary_seconds <= 0:
            raise ValueError("burst >= 1, per_minute >= 0, max_per_second > 0 and"
                             " summary_seconds > 0 are required")
        self.burst = float(burst)
        self.rate = per_minute / 60.0  # tokens a second, per key
        self.global_burst = float(max_per_second)
        self.global_rate = float(max_per_second)
        self.summary_seconds = summary_seconds
        self.max_keys = max_keys
        self._keys: OrderedDict[tuple[str, str], _Key] = OrderedDict()
        self._global = float(max_per_second)
        self._global_last: float | None = None
        # Keys with an unreported count, in the order of their first unwritten line.
        self._pending: dict[tuple[str, str], float] = {}
        # Unreported counts of forgotten keys, by reason (client "").
        self._orphans: dict[str, int] = {}
        self._orphans_since = 0.0

    def _take_global(self, now: float) -> bool:
        last = self._global_last
        tokens = self._global
        if last is not None and now > last:
            tokens = min(self.global_burst, tokens + (now - last) * self.global_rate)
        self._global_last = now if last is None or now > last else last
        if tokens >= 1.0:
            self._global = tokens - 1.0
            return True
        self._global = tokens
        return False

    def admit(self, reason: str, client: str, now: float) -> tuple[bool, int]:
        """(write this line?, lines of this key not written since its last report).

        When the line is written and the count is not zero, the caller writes
        that count's summary first; the count is then reported.
        """
        key = (reason, client)
        keys = self._keys
        k = keys.get(key)
        if k is None:
            k = keys[key] = _Key(self.burst, now)
            if len(keys) > self.max_keys:
                self._forget_oldest()
        else:
            keys.move_to_end(key)
            if now > k.last:
                k.tokens = min(self.burst, k.tokens + (now - k.last) * self.rate)
                k.last = now
        if k.tokens >= 1.0 and self._take_global(now):
            k.tokens -= 1.0
            n = k.suppressed
            if n:
                k.suppressed = 0
                self._pending.pop(key, None)
            return True, n
        if not k.suppressed:
            k.first_dropped = now
            self._pending[key] = now
        k.suppressed += 1
        return False, 0

    def _forget_oldest(self) -> None:
        key, k = self._keys.popitem(last=False)
        if k.suppressed:
            self._pending.pop(key, None)
            if not self._orphans:
                self._orphans_since = k.first_dropped
            self._orphans[key[0]] = self._orphans.get(key[0], 0) + k.suppressed

    def next_due(self) -> float | None:
        """When :meth:`due` will next have something to report (None: nothing pending)."""
        first = next(iter(self._pending.values()), None)
        if self._orphans:
            first = self._orphans_since if first is None else min(first, self._orphans_since)
        return None if first is None else first + self.summary_seconds

    def due(self, now: float, *, everything: bool = False) -> list[tuple[str, str, int]]:
        """The (reason, client, count) summaries due now (all unreported ones with
        ``everything``, e.g. at shutdown); each count is reported once.

        A key's summary competes for the all-keys budget like a line; one that
        finds it empty joins its reason's count without an address. Those
        counts (client "") are always reported, at most one per reason.
        """
        out: list[tuple[str, str, int]] = []
        cutoff = float("inf") if everything else now - self.summary_seconds
        pending = self._pending
        while pending:
            key, since = next(iter(pending.items()))
            if since > cutoff:
                break
            del pending[key]
            k = self._keys[key]
            n, k.suppressed = k.suppressed, 0
            if everything or self._take_global(now):
                out.append((key[0], key[1], n))
            else:
                if not self._orphans:
                    self._orphans_since = since
                self._orphans[key[0]] = self._orphans.get(key[0], 0) + n
        if self._orphans and self._orphans_since <= cutoff:
            out.extend((reason, "", n) for reason, n in self._orphans.items())
            self._orphans.clear()
        return out

    def __len__(self) -> int:
        """Keys remembered now."""
        return len(self._keys)
