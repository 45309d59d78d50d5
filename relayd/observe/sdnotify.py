"""The systemd notify protocol (sd_notify), without a dependency.

Owns: telling the service manager that relayd is ready (listeners up), is
reloading (SIGHUP) and whether the reload worked, is stopping, is alive (the
watchdog), and a one-line status (listeners, queue depth, a failed reload).
systemd/relayd.service runs relayd with ``Type=notify``: systemd waits for
``READY=1`` before it considers the unit started, so units ordered after
relayd start only once it accepts mail.

Reload: ``RELOADING=1`` with ``MONOTONIC_USEC`` when it starts, then
``READY=1`` when it ends, with a ``STATUS=`` that says whether it failed.
That is right for ``Type=notify`` with ``ExecReload=kill -HUP`` and for
``Type=notify-reload`` (systemd >= 253, which sends SIGHUP itself and waits
for a ``RELOADING=1`` stamped after its signal, then for ``READY=1``). The
protocol has no "reload failed" message: the service stays up on the
configuration it had, the status line says the reload failed, and
``ERRNO=`` (sd_notify(3)'s documented error field; ``systemctl status``
shows it as "Error: 22 (Invalid argument)") is set until a reload works
(``ERRNO=0``).

Watchdog: with ``WatchdogSec=`` systemd sets ``$WATCHDOG_USEC`` (and
``$WATCHDOG_PID``); :func:`watchdog_interval` turns them into the period of
``WATCHDOG=1`` (half the timeout, as sd_watchdog_enabled(3) advises).

The protocol: one datagram of ``KEY=VALUE`` lines sent to the AF_UNIX socket
named by ``$NOTIFY_SOCKET``; a name starting with ``@`` is in the abstract
namespace. The composition root reads the environment variable and passes its
value in (DESIGN.md §3 rule 4); ``None`` or ``""`` means "not run by systemd"
and every function returns False without doing anything.

Untrusted input: none. Settings read: none.

Cost: one socket, one datagram, one close: tens of microseconds, a synchronous
call made on the loop. A stuck manager blocks it at most ``SEND_TIMEOUT``
seconds; failure is reported by the return value, never raised: a lost status
message must not take the relay down.

See also: sd_notify(3), systemd.service(5) ``Type=notify``, relayd.app.
"""

from __future__ import annotations

import socket
import time
from errno import EINVAL

#: Upper bound on one send, seconds.
SEND_TIMEOUT = 1.0


def _address(socket_path: str) -> str | None:
    """The address to connect to, or None for a name this module cannot use."""
    if socket_path.startswith("@"):
        return "\0" + socket_path[1:]
    if socket_path.startswith("/"):
        return socket_path
    return None  # e.g. "vsock:..." (VM guests): not supported


def notify(message: str, socket_path: str | None = None) -> bool:
    """Send ``message`` to the notify socket; True when it was sent."""
    if not socket_path:
        return False
    address = _address(socket_path)
    if address is None:
        return False
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.settimeout(SEND_TIMEOUT)
            sock.connect(address)
            sock.sendall(message.encode("utf-8"))
    except OSError:
        return False
    return True


def ready(socket_path: str | None = None) -> bool:
    """Listeners are up (also sent after a reload completes)."""
    return notify("READY=1", socket_path)


def reloading(socket_path: str | None = None) -> bool:
    """A reload (SIGHUP) started; follow with :func:`ready` when it is done.

    ``MONOTONIC_USEC`` (CLOCK_MONOTONIC) tells systemd when the reload began;
    systemd 253+ requires it for ``Type=notify-reload`` and ignores it otherwise.
    """
    usec = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    return notify(f"RELOADING=1\nMONOTONIC_USEC={usec}", socket_path)


def ready_after_reload(failure: str | None, status_line: str,
                       socket_path: str | None = None, *, errno: int = EINVAL) -> bool:
    """A reload ended: READY=1 and, in the same datagram, a status saying how.

    ``failure`` is the reason a reload failed (``None``: it worked); the
    status line then says so and that the running configuration was kept,
    and ``ERRNO=`` carries ``errno`` (sd_notify(3): the service's error, which
    ``systemctl status`` shows as "Error:"). A reload that worked sends
    ``ERRNO=0``, clearing an earlier failure.
    """
    if failure is None:
        return notify(f"READY=1\nSTATUS={_one_line(status_line)}\nERRNO=0", socket_path)
    text = reload_failed_line(failure, status_line)
    return notify(f"READY=1\nSTATUS={_one_line(text)}\nERRNO={errno}", socket_path)


def reload_failed_line(failure: str, status_line: str) -> str:
    """The status after a failed reload: the reason first, then the usual status."""
    return f"reload failed, running configuration kept: {failure}; {status_line}"


def stopping(socket_path: str | None = None) -> bool:
    """Graceful shutdown started."""
    return notify("STOPPING=1", socket_path)


def status(text: str, socket_path: str | None = None) -> bool:
    """Set the one-line status shown by ``systemctl status``."""
    return notify(f"STATUS={_one_line(text)}", socket_path)


def ready_with_status(text: str, socket_path: str | None = None) -> bool:
    """Listeners are up, and the first status line, in one datagram."""
    return notify(f"READY=1\nSTATUS={_one_line(text)}", socket_path)


def status_line(listeners: list[str], queue: dict[str, int] | None) -> str:
    """``systemctl status``'s line: where relayd listens and how deep its queue is.

    ``listeners`` are "kind=address" strings; ``queue`` counts messages by
    state (as ``relayctl status`` shows them), None when they could not be read.
    """
    where = f"listening on {' '.join(listeners) or 'nothing'}"
    if queue is None:
        return f"{where}; queue unknown (spool unreadable)"
    total = sum(queue.values())
    states = ", ".join(f"{n} {state}" for state, n in queue.items() if n)
    return f"{where}; queue {total}" + (f" ({states})" if states else "")


def watchdog(socket_path: str | None = None) -> bool:
    """Tell the service manager the event loop is alive."""
    return notify("WATCHDOG=1", socket_path)


def watchdog_interval(watchdog_usec: str | None, watchdog_pid: str | None,
                      pid: int) -> float | None:
    """Seconds between WATCHDOG=1 messages, or None when no watchdog is asked for.

    ``watchdog_usec`` and ``watchdog_pid`` are ``$WATCHDOG_USEC`` and
    ``$WATCHDOG_PID``; a watchdog meant for another process (a child that
    inherited the variables) is not this one's. Half the timeout, as
    sd_watchdog_enabled(3) advises.
    """
    if watchdog_pid and watchdog_pid.strip() != str(pid):
        return None
    try:
        usec = int(watchdog_usec or "")
    except ValueError:
        return None
    if usec <= 0:
        return None
    return usec / 2 / 1_000_000


def _one_line(text: str) -> str:
    """``text`` with every run of whitespace (newlines too) folded into one space."""
    return " ".join(text.split())
