"""The systemd notify protocol (sd_notify), without a dependency.

Owns: telling the service manager that relayd is ready (listeners up), is
reloading (SIGHUP), is stopping, and a one-line status. systemd/relayd.service
runs relayd with ``Type=notify``: systemd waits for ``READY=1`` before it
considers the unit started, so units ordered after relayd start only once it
accepts mail.

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


def stopping(socket_path: str | None = None) -> bool:
    """Graceful shutdown started."""
    return notify("STOPPING=1", socket_path)


def status(text: str, socket_path: str | None = None) -> bool:
    """Set the one-line status shown by ``systemctl status``."""
    line = " ".join(text.split())
    return notify(f"STATUS={line}", socket_path)
