"""Process-tree figures read straight from /proc: CPU seconds and peak memory.

CPU of a tree = sum over its live processes of utime+stime+cutime+cstime.  A child
that exits is reaped by its parent (inside the tree), whose cutime/cstime then carry
its time, so the difference of two readings counts short-lived children too
(Postfix's master reaps smtpd/cleanup/smtp; relayd's children, if any, likewise).

Memory: RSS summed over the tree (what the issue asks for), and PSS from
smaps_rollup (shared pages split between processes; fairer for Postfix's many
processes, which share libraries and text).
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable, Iterable

CLK_TCK = os.sysconf("SC_CLK_TCK")
PAGE = os.sysconf("SC_PAGE_SIZE")


def _stat_fields(pid: int) -> list[str] | None:
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            raw = f.read().decode("ascii", "replace")
    except OSError:
        return None
    # comm may contain spaces and parentheses: split after the last ')'.
    rpar = raw.rfind(")")
    return raw[rpar + 2 :].split()  # fields from #3 (state) on; index 0 == field 3


def _all_ppids() -> dict[int, int]:
    out: dict[int, int] = {}
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        f = _stat_fields(int(name))
        if f is not None:
            out[int(name)] = int(f[1])  # field 4: ppid
    return out


def tree_pids(roots: Iterable[int]) -> list[int]:
    """The given roots (if alive) and all their descendants."""
    ppids = _all_ppids()
    children: dict[int, list[int]] = {}
    for pid, ppid in ppids.items():
        children.setdefault(ppid, []).append(pid)
    seen: list[int] = []
    stack = [r for r in roots if r in ppids]
    while stack:
        p = stack.pop()
        if p in seen:
            continue
        seen.append(p)
        stack.extend(children.get(p, ()))
    return seen


def cpu_seconds(pid: int, with_children: bool = True) -> float:
    f = _stat_fields(pid)
    if f is None:
        return 0.0
    # fields 14..17: utime stime cutime cstime -> indexes 11..14
    ticks = int(f[11]) + int(f[12])
    if with_children:
        ticks += int(f[13]) + int(f[14])
    return ticks / CLK_TCK


def tree_cpu_seconds(roots: Iterable[int]) -> float:
    return sum(cpu_seconds(p) for p in tree_pids(roots))


def tree_pids_running(roots: Iterable[int], args: Iterable[str]) -> list[int]:
    """The processes of the tree whose command line holds ``args`` in a row."""
    want = b"\0" + b"\0".join(a.encode() for a in args) + b"\0"
    found = []
    for pid in tree_pids(roots):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                cmdline = b"\0" + f.read()
        except OSError:
            continue
        if want in cmdline:
            found.append(pid)
    return found


def rss_bytes(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/statm", "rb") as f:
            return int(f.read().split()[1]) * PAGE
    except (OSError, IndexError, ValueError):
        return 0


def pss_bytes(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/smaps_rollup", "rb") as f:
            for line in f:
                if line.startswith(b"Pss:"):
                    return int(line.split()[1]) * 1024
    except (OSError, IndexError, ValueError):
        pass
    return 0


class TreeSampler:
    """Samples a process tree in a thread: peak RSS/PSS sum, peak process count.

    ``roots`` is a callable so that the root set can change (e.g. Postfix's master
    pid is only known after start; helper processes can be added).
    """

    def __init__(self, roots: Callable[[], list[int]], interval: float = 0.25, pss: bool = True):
        self._roots = roots
        self.interval = interval
        self.pss = pss
        self.peak_rss = 0
        self.peak_pss = 0
        self.peak_procs = 0
        self.samples = 0
        self.first_rss: int = 0
        self.first_pss: int = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def sample(self) -> tuple[int, int, int]:
        pids = tree_pids(self._roots())
        rss = sum(rss_bytes(p) for p in pids)
        pss = sum(pss_bytes(p) for p in pids) if self.pss else 0
        self.peak_rss = max(self.peak_rss, rss)
        self.peak_pss = max(self.peak_pss, pss)
        self.peak_procs = max(self.peak_procs, len(pids))
        self.samples += 1
        return rss, pss, len(pids)

    def _run(self) -> None:
        while not self._stop.is_set():
            t0 = time.monotonic()
            self.sample()
            # sampling 1000 Postfix processes takes a while: never spin
            self._stop.wait(max(self.interval, 2 * (time.monotonic() - t0)))

    def __enter__(self) -> TreeSampler:
        self.first_rss, self.first_pss, _ = self.sample()
        self._thread = threading.Thread(target=self._run, name="tree-sampler", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        self.sample()


def machine_info() -> dict[str, str]:
    model = "?"
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    mem_kb = 0
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemTotal:"):
                    mem_kb = int(line.split()[1])
                    break
    except OSError:
        pass
    return {
        "nproc": str(os.cpu_count()),
        "cpu": model,
        "ram": f"{mem_kb / 1024 / 1024:.1f} GiB",
        "kernel": os.uname().release,
    }
