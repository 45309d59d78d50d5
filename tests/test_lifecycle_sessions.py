"""Sessions that authenticated before a disable, delete or domain delete cannot submit
another message once the control call has returned (SEMANTICS §4, "Immediately")."""

from __future__ import annotations

import asyncio
import time

import aiosmtplib
import pytest

from tests.conftest import RelayHandle, message


async def test_authenticated_session_gets_530_at_mail_after_disable(
        relay: RelayHandle, account: tuple[str, str]) -> None:
    """The next MAIL of a session authenticated before disable gets 530 5.7.0."""
    user, pw = account
    c = await relay.client(user, pw)
    _, reply = await c.sendmail("app@example.com", ["r@dest.test"], message())
    assert reply.startswith("2.0.0")
    await relay.ctl.ok("POST", f"/v1/users/{user}/disable")
    with pytest.raises(aiosmtplib.SMTPSenderRefused) as exc:
        await c.mail("app@example.com")
    assert (exc.value.code, exc.value.message) == (530, "5.7.0 Authentication required")
    c.close()


async def test_open_transaction_gets_530_at_end_of_data_after_disable(
        relay: RelayHandle, account: tuple[str, str]) -> None:
    """A transaction whose MAIL and RCPT were accepted before disable gets 530 after DATA."""
    user, pw = account
    c = await relay.client(user, pw)
    assert (await c.mail("app@example.com")).code == 250
    assert (await c.rcpt("r@dest.test")).code == 250
    await relay.ctl.ok("POST", f"/v1/users/{user}/disable")
    with pytest.raises(aiosmtplib.SMTPDataError) as exc:
        await c.data(message())
    assert exc.value.code == 530
    queue = await relay.ctl.ok("GET", "/v1/queue", user=user)
    assert queue["items"] == []
    c.close()


async def test_open_transaction_gets_530_at_end_of_data_after_delete(
        relay: RelayHandle, account: tuple[str, str]) -> None:
    """A transaction opened before delete is refused with 530 at the end of DATA."""
    user, pw = account
    c = await relay.client(user, pw)
    await c.mail("app@example.com")
    await c.rcpt("r@dest.test")
    await relay.ctl.ok("POST", f"/v1/users/{user}/delete", {"confirm": user})
    with pytest.raises(aiosmtplib.SMTPDataError) as exc:
        await c.data(message())
    assert exc.value.code == 530
    c.close()


async def test_session_stays_refused_after_enable_until_new_auth(
        relay: RelayHandle, account: tuple[str, str]) -> None:
    """After disable+enable an old session needs a new AUTH; with it, it sends again."""
    user, pw = account
    c = await relay.client(user, pw)
    await relay.ctl.ok("POST", f"/v1/users/{user}/disable")
    await relay.ctl.ok("POST", f"/v1/users/{user}/enable")
    with pytest.raises(aiosmtplib.SMTPSenderRefused) as exc:
        await c.mail("app@example.com")
    assert exc.value.code == 530
    assert (await c.auth_plain(user, pw)).code == 235
    _, reply = await c.sendmail("app@example.com", ["r@dest.test"], message())
    assert reply.startswith("2.0.0")
    await c.quit()


SESSIONS = 20


async def test_no_message_accepted_after_disable_under_load(
        relay: RelayHandle, account: tuple[str, str]) -> None:
    """With 20 sessions of one account sending in a loop, no message whose MAIL was sent
    after disable returned gets 250."""
    user, pw = account
    # (monotonic time just before MAIL was written, final reply code) per message
    outcomes: list[tuple[float, int]] = []
    enough = asyncio.Event()
    returned: list[float] = []  # monotonic time when the disable call had returned

    async def session(n: int) -> None:
        c = await relay.client(user, pw)
        try:
            for i in range(10_000):
                t_mail = time.monotonic()
                try:
                    await c.mail("app@example.com")
                    await c.rcpt(f"s{n}.{i}@dest.test")
                    resp = await c.data(message(f"s{n} m{i}"))
                    code = resp.code
                except aiosmtplib.SMTPResponseException as exc:
                    code = exc.code
                outcomes.append((t_mail, code))
                if len(outcomes) >= SESSIONS * 5:
                    enough.set()
                if returned and t_mail > returned[0]:
                    return  # this session sent at least one MAIL after the return
        finally:
            c.close()

    tasks = [asyncio.create_task(session(n)) for n in range(SESSIONS)]
    await asyncio.wait_for(enough.wait(), 30)
    await relay.ctl.ok("POST", f"/v1/users/{user}/disable")
    returned.append(time.monotonic())
    await asyncio.wait_for(asyncio.gather(*tasks), 30)
    t_return = returned[0]
    before = sum(1 for t, code in outcomes if t < t_return and code == 250)
    after = [code for t, code in outcomes if t > t_return]
    after_ok = after.count(250)
    assert after_ok == 0, (f"250s with MAIL before the return: {before}, after: {after_ok}"
                           f" of {len(after)}")
    assert before >= SESSIONS * 5, f"only {before} messages accepted before the disable"
    assert len(after) == SESSIONS and set(after) == {530}, after
