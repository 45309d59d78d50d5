"""The batching DKIM signer gives each session its own signature, errors and all."""

from __future__ import annotations

import asyncio

import pytest

from relayd.directory.accounts import Account, Domain
from relayd.dkim import signature as dkim
from relayd.dkim.signing import DkimSigning

NOW = 1_700_000_000
MSG = b"From: a@example.com\r\nTo: b@example.org\r\nSubject: s\r\n\r\nbody\r\n"


def _account(signers: list[object]) -> Account:
    return Account(id=1, username="u", domain=Domain(1, "example.com", "s1", signers=signers),
                   password_hash="")


async def test_concurrent_jobs_each_get_their_own_signature() -> None:
    """50 sessions signing at once each get exactly the headers of their own message."""
    signer = dkim.Signer("example.com", "s1", dkim.generate_private_key("ed25519"))
    signing = DkimSigning(threads=2, clock=lambda: NOW)
    account = _account([signer])
    try:
        msgs = [MSG + b"n=%d\r\n" % i for i in range(50)]
        out = await asyncio.gather(*(signing.sign(account, m) for m in msgs))
        for m, signed in zip(msgs, out, strict=True):
            assert signed == dkim.signature_headers([signer], m, NOW) + m
    finally:
        signing.close()


async def test_no_signer_returns_data_unchanged() -> None:
    """A domain without keys (deleted) is passed through without a thread hop."""
    signing = DkimSigning()
    assert await signing.sign(_account([]), MSG) is MSG
    signing.close()


async def test_a_signing_error_reaches_the_session() -> None:
    """An exception in a signing thread is raised from ``sign``; the threads keep working."""
    class Broken:
        def _unsigned(self, prepared: object, now: int) -> tuple[bytes, bytes, int]:
            raise ValueError("bad key")

    good = dkim.Signer("example.com", "s1", dkim.generate_private_key("ed25519"))
    signing = DkimSigning(threads=1, clock=lambda: NOW)
    try:
        with pytest.raises(ValueError, match="bad key"):
            await signing.sign(_account([Broken()]), MSG)
        assert (await signing.sign(_account([good]), MSG)).endswith(MSG)
    finally:
        signing.close()
    with pytest.raises(RuntimeError):
        await signing.sign(_account([good]), MSG)
