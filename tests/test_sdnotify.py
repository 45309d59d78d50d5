"""relayd.observe.sdnotify: the systemd notify protocol over a real AF_UNIX datagram socket."""

from __future__ import annotations

import os
import socket
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from relayd.observe import sdnotify


@pytest.fixture
def manager(tmp_path: Path) -> Iterator[tuple[str, socket.socket]]:
    """A datagram socket standing in for systemd's notify socket: (path, socket)."""
    path = str(tmp_path / "notify")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(path)
    sock.settimeout(2)
    yield path, sock
    sock.close()


def test_ready_sends_ready_1(manager: tuple[str, socket.socket]) -> None:
    """ready() delivers exactly READY=1 to the socket and reports success."""
    path, sock = manager
    assert sdnotify.ready(path) is True
    assert sock.recv(4096) == b"READY=1"


def test_stopping_sends_stopping_1(manager: tuple[str, socket.socket]) -> None:
    """stopping() delivers STOPPING=1."""
    path, sock = manager
    assert sdnotify.stopping(path) is True
    assert sock.recv(4096) == b"STOPPING=1"


def test_reloading_sends_reloading_with_monotonic_time(
    manager: tuple[str, socket.socket],
) -> None:
    """reloading() sends RELOADING=1 with MONOTONIC_USEC from CLOCK_MONOTONIC."""
    path, sock = manager
    before = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    assert sdnotify.reloading(path) is True
    first, second = sock.recv(4096).decode().split("\n")
    assert first == "RELOADING=1"
    key, value = second.split("=")
    assert key == "MONOTONIC_USEC"
    assert before <= int(value) <= time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000


def test_status_is_one_line(manager: tuple[str, socket.socket]) -> None:
    """status() sends STATUS= with newlines folded, so it cannot inject other keys."""
    path, sock = manager
    assert sdnotify.status("accepting mail\nREADY=1", path) is True
    assert sock.recv(4096) == b"STATUS=accepting mail READY=1"


def test_notify_sends_arbitrary_message(manager: tuple[str, socket.socket]) -> None:
    """notify() sends its message unchanged as one datagram."""
    path, sock = manager
    assert sdnotify.notify("WATCHDOG=1", path) is True
    assert sock.recv(4096) == b"WATCHDOG=1"


def test_abstract_socket_name_is_supported() -> None:
    """A socket name starting with @ reaches the abstract-namespace socket."""
    name = f"relayd-test-{os.getpid()}-{uuid.uuid4().hex}"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind("\0" + name)
    sock.settimeout(2)
    try:
        assert sdnotify.ready("@" + name) is True
        assert sock.recv(4096) == b"READY=1"
    finally:
        sock.close()


@pytest.mark.parametrize("value", [None, ""])
def test_not_under_systemd_returns_false(value: str | None) -> None:
    """Without a notify socket (unset or empty), nothing is sent and False is returned."""
    assert sdnotify.ready(value) is False


def test_missing_socket_returns_false(tmp_path: Path) -> None:
    """A notify socket path that does not exist gives False, not an exception."""
    assert sdnotify.ready(str(tmp_path / "gone")) is False


def test_unsupported_address_returns_false() -> None:
    """A vsock or relative address is not attempted and gives False."""
    assert sdnotify.ready("vsock:2:1234") is False
    assert sdnotify.ready("relative/path") is False
