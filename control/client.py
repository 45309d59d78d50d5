"""A small, fast-starting client of the control socket (HTTP/1.1 over a Unix socket).

Owns: connecting to the socket, sending one JSON request, decoding the JSON
answer into a control.schemas Struct, and turning every failure (no socket,
permission denied, daemon error answers) into a ``ControlError`` with a
one-line message. Standard library and msgspec only: ``relayctl`` must not
pay for importing the daemon.
See also: control.schemas, control.cli.
"""

from __future__ import annotations

import http.client
import socket
from typing import Any, TypeVar
from urllib.parse import quote, urlencode

import msgspec

from control import schemas

T = TypeVar("T")


class ControlError(Exception):
    """A control call failed; the text is meant for the operator."""

    def __init__(self, message: str, code: str = "error", status: int = 0) -> None:
        super().__init__(message)
        self.code = code
        self.status = status


class _UnixHTTPConnection(http.client.HTTPConnection):
    def __init__(self, path: str, timeout: float) -> None:
        super().__init__("localhost", timeout=timeout)
        self._path = path

    def connect(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(self.timeout)
        try:
            sock.connect(self._path)
        except BaseException:
            sock.close()
            raise
        self.sock = sock


class Client:
    """Calls the control API of one relayd."""

    def __init__(self, socket_path: str, timeout: float = 30.0) -> None:
        self.socket_path = socket_path
        self.timeout = timeout

    def call(self, method: str, path: str, kind: type[T], body: msgspec.Struct | None = None,
             query: dict[str, Any] | None = None) -> T:
        """One request; the answer decoded as ``kind``; raise ControlError on failure."""
        if query:
            q = {k: v for k, v in query.items() if v is not None}
            if q:
                path = f"{path}?{urlencode(q)}"
        conn = _UnixHTTPConnection(self.socket_path, self.timeout)
        payload = msgspec.json.encode(body) if body is not None else b""
        try:
            conn.request(method, path, body=payload if method == "POST" else None,
                         headers={"Content-Type": "application/json"})
            resp = conn.getresponse()
            data = resp.read()
        except FileNotFoundError:
            raise ControlError(
                f"cannot reach relayd: no control socket at {self.socket_path}"
                " (is relayd running? see --socket or RELAYD_SOCKET)", "no_socket") from None
        except ConnectionRefusedError:
            raise ControlError(
                f"cannot reach relayd: nothing is listening on {self.socket_path}",
                "refused") from None
        except PermissionError:
            raise ControlError(
                f"permission denied on {self.socket_path} (are you in the relayd group?)",
                "permission") from None
        except (OSError, http.client.HTTPException) as exc:
            raise ControlError(f"control socket error: {exc}", "io") from None
        finally:
            conn.close()
        if resp.status >= 400:
            try:
                err = msgspec.json.decode(data, type=schemas.Error)
                raise ControlError(err.error, err.code, resp.status)
            except msgspec.MsgspecError:
                raise ControlError(f"relayd answered HTTP {resp.status}", "http",
                                   resp.status) from None
        try:
            return msgspec.json.decode(data, type=kind)
        except msgspec.MsgspecError as exc:
            raise ControlError(f"unexpected answer from relayd: {exc}", "protocol") from None

    @staticmethod
    def seg(name: str) -> str:
        """Quote a path segment."""
        return quote(name, safe="")
