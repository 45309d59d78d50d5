"""TLSRPT (RFC 8460): TLS outcomes per MTA-STS policy domain, and the daily JSON report.

Owns: counting, per UTC day and policy domain, the delivery transactions whose
TLS met the domain's MTA-STS policy (successes) and those that did not (by
RFC 8460 result type, receiving MX name and address), keeping those counts
across restarts (``counts.json`` in the report directory, written atomically
every ``flush_seconds``, at stop and after each report), and writing, for every
day before today that has counts, one report per policy domain as RFC 8460 §4.4
describes: ``<directory>/<YYYY-MM-DD>/<domain>.json``. Reports are written by
``run`` shortly after midnight UTC and at start-up for a day missed while
stopped. Sending them to the domain's ``rua`` is not done: the files are the
operator's.

Counted: one per transaction (a message at one MX host), not per TLS session
(a pooled connection carries several messages); a policy fetch failure counts
once per failed fetch.
I/O: files in the report directory (blocking writes run in a thread).
Untrusted input: none (policy texts and names were parsed before).
Settings read: none directly; relayd.app passes ``[delivery] tlsrpt_dir``,
``tlsrpt_contact`` and ``[server] hostname`` (the organization name).
See also: relayd.delivery.sts (records outcomes), docs/OPERATIONS.md (reading reports).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

COUNTS_FILE = "counts.json"


@dataclass
class _Domain:
    """One policy domain's counts for one day."""

    policy: str = ""  # the policy text last applied ("" = none could be fetched)
    success: int = 0
    failures: dict[str, int] = field(default_factory=dict)  # "type|mx|ip" -> count


def day_of(now: float) -> str:
    """The UTC day of a time, ``YYYY-MM-DD``."""
    return datetime.fromtimestamp(now, UTC).strftime("%Y-%m-%d")


class TlsReport:
    """Counts per day and policy domain; the daily report files."""

    def __init__(self, directory: str, organization: str, contact: str,
                 clock: Callable[[], float] = time.time, flush_seconds: float = 60.0) -> None:
        self.directory = Path(directory)
        self.organization = organization
        self.contact = contact
        self.clock = clock
        self.flush_seconds = flush_seconds
        self._days: dict[str, dict[str, _Domain]] = {}
        self._dirty = False
        self.log: Callable[..., None] = lambda *_a, **_k: None

    def record(self, domain: str, policy: str, result: str = "", mx: str = "",
               ip: str = "") -> None:
        """One outcome for a policy domain: ``result`` "" is a success, else its RFC 8460
        result type."""
        day = self._days.setdefault(day_of(self.clock()), {})
        counts = day.setdefault(domain, _Domain())
        if policy:
            counts.policy = policy
        if result:
            key = f"{result}|{mx}|{ip}"
            counts.failures[key] = counts.failures.get(key, 0) + 1
        else:
            counts.success += 1
        self._dirty = True

    def counts(self, day: str, domain: str) -> tuple[int, int]:
        """(successes, failures) recorded for a day and domain (for status and tests)."""
        c = self._days.get(day, {}).get(domain)
        return (0, 0) if c is None else (c.success, sum(c.failures.values()))

    # -- files -------------------------------------------------------------------------
    def load(self) -> None:
        """Read the counts kept by a previous run (blocking). A damaged file is set aside."""
        path = self.directory / COUNTS_FILE
        try:
            raw = json.loads(path.read_text(encoding="utf-8"))
            self._days = {day: {d: _Domain(str(c.get("policy", "")), int(c.get("success", 0)),
                                           {str(k): int(v) for k, v in c["failures"].items()})
                                for d, c in domains.items()}
                          for day, domains in raw.items()}
        except FileNotFoundError:
            return
        except (ValueError, TypeError, KeyError, AttributeError, OSError):
            os.replace(path, path.with_suffix(".damaged"))

    def flush(self) -> None:
        """Write the counts (blocking): a temporary file renamed over the old one."""
        _write_files(self._take_counts())

    def write_due(self) -> list[Path]:
        """Write the report of every day before today (blocking); those days' counts go."""
        files = self._take_due()
        _write_files(files)
        return [path for path, _ in files if path.name != COUNTS_FILE]

    def _take_counts(self) -> list[tuple[Path, str]]:
        """The counts file's new text (taken on the loop: ``record`` runs there)."""
        data = {day: {d: {"policy": c.policy, "success": c.success, "failures": c.failures}
                      for d, c in domains.items()} for day, domains in self._days.items()}
        self._dirty = False
        return [(self.directory / COUNTS_FILE, json.dumps(data))]

    def _take_due(self) -> list[tuple[Path, str]]:
        """The report files of the days before today, and the counts without those days."""
        today = day_of(self.clock())
        files: list[tuple[Path, str]] = []
        for day in sorted(d for d in self._days if d < today):
            for domain, counts in sorted(self._days.pop(day).items()):
                files.append((self.directory / day / f"{domain}.json",
                              json.dumps(self.report(day, domain, counts), indent=2)))
            self._dirty = True
        return files + self._take_counts() if self._dirty else files

    def report(self, day: str, domain: str, counts: _Domain) -> dict[str, object]:
        """The RFC 8460 §4.4 report of one day and policy domain."""
        policy_lines = [line for line in counts.policy.replace("\r\n", "\n").split("\n") if line]
        mx = [line.partition(":")[2].strip() for line in policy_lines
              if line.partition(":")[0].strip() == "mx"]
        details = []
        for key, n in sorted(counts.failures.items()):
            result, mx_host, ip = key.split("|", 2)
            detail: dict[str, object] = {"result-type": result, "failed-session-count": n}
            if mx_host:
                detail["receiving-mx-hostname"] = mx_host
            if ip:
                detail["receiving-ip"] = ip
            details.append(detail)
        policy: dict[str, object] = {
            "policy-type": "sts" if policy_lines else "no-policy-found",
            "policy-string": policy_lines, "policy-domain": domain}
        if mx:
            policy["mx-host"] = mx
        return {
            "organization-name": self.organization,
            "date-range": {"start-datetime": f"{day}T00:00:00Z",
                           "end-datetime": f"{day}T23:59:59Z"},
            "contact-info": self.contact,
            "report-id": f"{day}_{domain}@{self.organization}",
            "policies": [{"policy": policy,
                          "summary": {"total-successful-session-count": counts.success,
                                      "total-failure-session-count":
                                          sum(counts.failures.values())},
                          "failure-details": details}],
        }

    async def run(self) -> None:
        """Until cancelled: reports for days past (at once, then after each midnight UTC),
        counts flushed every ``flush_seconds``; flushed once more when cancelled. A write
        that fails is logged and tried again at the next round (the counts stay)."""
        try:
            while True:
                files = self._take_due()
                if self._dirty:
                    files += self._take_counts()
                try:
                    await asyncio.to_thread(_write_files, files)
                except OSError as exc:
                    self._dirty = True
                    self.log("tlsrpt_write_failed", directory=str(self.directory),
                             error=str(exc))
                to_midnight = 86400 - self.clock() % 86400 + 5  # shortly after midnight UTC
                await asyncio.sleep(min(self.flush_seconds, to_midnight))
        finally:
            if self._dirty:
                with contextlib.suppress(OSError):
                    self.flush()


def _write_files(files: list[tuple[Path, str]]) -> None:
    for path, text in files:
        path.parent.mkdir(parents=True, exist_ok=True)
        _write_atomic(path, text)


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)
