"""Property tests on the command loop we own: random command lines and bytes sent to a
live session never produce a traceback on the wire, a non-SMTP reply, or a hang."""

from __future__ import annotations

import asyncio
import re

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.conftest import RelayHandle

pytestmark = pytest.mark.timeout(300)

REPLY_LINE = re.compile(rb"^[2-5][0-9][0-9]([ -].*)?$")
VERBS = [b"EHLO", b"HELO", b"MAIL FROM:", b"RCPT TO:", b"DATA", b"RSET", b"NOOP", b"VRFY",
         b"EXPN", b"HELP", b"AUTH", b"AUTH PLAIN", b"AUTH LOGIN", b"STARTTLS", b"BDAT",
         b"mail from:", b"QUIT "]
OPENING = (b"EHLO fuzz.test\r\nMAIL FROM:<app@example.com>\r\nRCPT TO:<r@dest.test>\r\n"
           b"DATA\r\n")

command = st.one_of(
    st.binary(max_size=120),
    st.builds(lambda v, a: v + a, st.sampled_from(VERBS), st.binary(max_size=80)),
    st.builds(lambda v, a: v + a.encode("utf-8", "surrogatepass"), st.sampled_from(VERBS),
              st.text(max_size=60)),
)
endings = st.sampled_from([b"\r\n", b"\n", b"\r", b"\r\n\r\n"])


@pytest.fixture
async def bound(relay: RelayHandle) -> RelayHandle:
    """A relay where 127.0.0.1 sends as a network-bound account (MAIL works without AUTH)."""
    await relay.ctl.add_domain("example.com")
    await relay.ctl.add_user("example.com", networks=["127.0.0.1/32"])
    return relay


async def _session(relay: RelayHandle, payload: bytes) -> list[bytes]:
    """After the greeting, send ``payload`` then a terminator and QUIT; return every reply
    line until close (input before the greeting would get 554: not what is tested here)."""
    r, w = await asyncio.open_connection(relay.host, relay.port)
    try:
        data = await asyncio.wait_for(r.readline(), 10)
        w.write(payload + b"\r\n.\r\nQUIT\r\n")
        await w.drain()
        while True:
            chunk = await asyncio.wait_for(r.read(65536), 10)  # a hang fails here
            if not chunk:
                break
            data += chunk
    except ConnectionResetError:
        pass
    finally:
        w.close()
    lines = data.split(b"\r\n")
    assert lines[-1] == b"", data[-200:]  # every reply is CRLF-terminated
    return lines[:-1]


def _check(lines: list[bytes]) -> None:
    assert lines and lines[0].startswith(b"220 ")
    for line in lines:
        assert REPLY_LINE.match(line), line
        assert b"Traceback" not in line and b"Error:" not in line and b"Exception" not in line
    assert lines[-1].split(b" ")[0] in (b"221", b"421"), lines[-3:]


@settings(max_examples=50, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(cmds=st.lists(st.tuples(command, endings), min_size=1, max_size=10))
async def test_random_commands_get_only_smtp_replies(bound: RelayHandle,
                                                     cmds: list[tuple[bytes, bytes]]) -> None:
    """Random command lines get well-formed SMTP replies and the session ends cleanly."""
    payload = b"".join(c + e for c, e in cmds)
    _check(await _session(bound, payload))


@settings(max_examples=50, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(body=st.binary(max_size=3000), after=st.lists(command, max_size=4))
async def test_random_message_data_gets_only_smtp_replies(bound: RelayHandle, body: bytes,
                                                          after: list[bytes]) -> None:
    """Random bytes as message data (and commands after it) never break the session."""
    payload = OPENING + body + b"\r\n.\r\n" + b"".join(c + b"\r\n" for c in after)
    _check(await _session(bound, payload))
