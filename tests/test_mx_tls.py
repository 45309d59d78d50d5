"""Outbound TLS security levels in MX mode (issue 17 item 1): none, may, encrypt, verify,
the per-domain policy table, and what tls_verify means there.

MX sinks on 127.0.0.x (one port, one address per MX host) with STARTTLS from trustme
certificates: valid for the MX name, from a CA relayd does not trust ("self-signed"),
valid but for another name, a server that offers STARTTLS then breaks the handshake,
and one that offers no STARTTLS. A real DNS server on loopback points each test
domain at one of them.
"""

from __future__ import annotations

import asyncio
import ssl
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import msgspec
import pytest
import trustme
from aiosmtpd.smtp import SMTP as AioSMTP

from relayd.app import Relay
from relayd.delivery import tlslevels
from tests.conftest import RelayHandle, Sink, make_config, message
from tests.dnsserver import DnsServer
from tests.mxsupport import (
    close_sinks,
    expect_deferred,
    expect_delivered,
    mx_relay_starter,
    send_one,
    start_mx_sinks,
    tls_count,
)

#: MX host name -> (address, kind of server there)
HOSTS = {
    "mx.valid.test": ("127.0.0.2", "valid"),
    "mx.self.test": ("127.0.0.3", "untrusted"),
    "mx.wrong.test": ("127.0.0.4", "wrongname"),
    "mx.broken.test": ("127.0.0.5", "broken"),
    "mx.plain.test": ("127.0.0.6", "plain"),
}
DOMAIN = {"valid": "valid.test", "untrusted": "self.test", "wrongname": "wrong.test",
          "broken": "broken.test", "plain": "plain.test"}


def _zone() -> dict[str, dict[str, list[str]]]:
    zone: dict[str, dict[str, list[str]]] = {
        "example.com": {"MX": ["10 mx.valid.test."]}}
    for name, (addr, kind) in HOSTS.items():
        zone[DOMAIN[kind]] = {"MX": [f"10 {name}."]}
        zone[name] = {"A": [addr]}
    return zone


class _BrokenStartTLS(AioSMTP):
    """Offers STARTTLS (it has a context), says 220, then sends garbage and hangs up."""

    async def smtp_STARTTLS(self, arg: str) -> None:
        await self.push("220 2.0.0 Ready to start TLS")
        transport = self.transport
        assert isinstance(transport, asyncio.Transport)
        transport.write(b"this is not a TLS record\r\n" * 4)
        transport.close()


class MxSinks:
    """One sink per MX host, all on the same port."""

    def __init__(self, ca: trustme.CA) -> None:
        self.ca = ca
        self.sinks: dict[str, Sink] = {}
        self.port = 0

    def _ctx(self, kind: str, name: str) -> ssl.SSLContext | None:
        if kind == "plain":
            return None
        ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        if kind == "untrusted":
            trustme.CA().issue_cert(name).configure_cert(ctx)  # a CA nobody trusts
        elif kind == "wrongname":
            self.ca.issue_cert("other.example").configure_cert(ctx)
        else:
            self.ca.issue_cert(name).configure_cert(ctx)
        return ctx

    async def start(self) -> None:
        self.sinks, self.port = await start_mx_sinks(
            (kind, addr, self._ctx(kind, name), _BrokenStartTLS if kind == "broken" else AioSMTP)
            for name, (addr, kind) in HOSTS.items())

    def close(self) -> None:
        close_sinks(self.sinks)


@pytest.fixture(scope="module")
def ca() -> trustme.CA:
    return trustme.CA()


@pytest.fixture
async def mx_sinks(ca: trustme.CA) -> AsyncIterator[MxSinks]:
    sinks = MxSinks(ca)
    try:
        await sinks.start()
    except OSError:  # the port was taken on one of the addresses: once more
        sinks.close()
        sinks = MxSinks(ca)
        await sinks.start()
    yield sinks
    sinks.close()


@pytest.fixture
async def dns() -> AsyncIterator[DnsServer]:
    async with DnsServer(_zone()) as server:
        yield server


TlsRelay = Callable[..., Awaitable[RelayHandle]]


@pytest.fixture
async def tls_relay(tmp_path: Path, mx_sinks: MxSinks, dns: DnsServer,
                    ca: trustme.CA) -> AsyncIterator[TlsRelay]:
    """A relay in MX mode whose trust store is the test CA (``tls_ca_file``)."""
    started: list[Relay] = []
    ca_file = tmp_path / "ca.pem"
    ca.cert_pem.write_to_path(str(ca_file))
    yield mx_relay_starter(tmp_path, dns, mx_sinks.port, started, tls_ca_file=str(ca_file))
    for r in started:
        await r.stop()


async def _one(relay: RelayHandle, kind: str) -> dict[str, Any]:
    """Send one message to the domain whose MX is of this kind; its first log entry."""
    return await send_one(relay, f"r@{DOMAIN[kind]}")


_tls = tls_count


async def _delivered(relay: RelayHandle, sinks: MxSinks, kind: str) -> dict[str, Any]:
    return await expect_delivered(relay, sinks.sinks[kind], f"r@{DOMAIN[kind]}")


async def _deferred(relay: RelayHandle, sinks: MxSinks, kind: str, reason: str) -> None:
    await expect_deferred(relay, sinks.sinks[kind], f"r@{DOMAIN[kind]}", reason)
    assert _tls(relay, "refused") >= 1


# --- may (the default) ----------------------------------------------------------------

async def test_may_delivers_encrypted_to_an_untrusted_certificate(
        tls_relay: TlsRelay, mx_sinks: MxSinks) -> None:
    """Level may (the default) encrypts without checking the certificate."""
    relay = await tls_relay()
    await _delivered(relay, mx_sinks, "untrusted")
    assert _tls(relay, "encrypted") == 1 and _tls(relay, "plaintext") == 0


async def test_may_retries_a_broken_handshake_in_plaintext_and_logs_it(
        tls_relay: TlsRelay, mx_sinks: MxSinks, capsys: pytest.CaptureFixture[str]) -> None:
    """STARTTLS offered, then the handshake fails: the same host again, once, in plaintext."""
    relay = await tls_relay(tls_level="may")
    await _delivered(relay, mx_sinks, "broken")
    assert mx_sinks.sinks["broken"].connections == 2  # the failed one and the retry
    assert _tls(relay, "fallback") == 1
    err = capsys.readouterr()
    assert "tls_plaintext_fallback" in err.out + err.err


# --- none -----------------------------------------------------------------------------

async def test_none_never_starts_tls(tls_relay: TlsRelay, mx_sinks: MxSinks) -> None:
    """Level none delivers in plaintext even where STARTTLS is offered (and broken)."""
    relay = await tls_relay(tls_level="none")
    await _delivered(relay, mx_sinks, "broken")
    assert mx_sinks.sinks["broken"].connections == 1
    assert _tls(relay, "plaintext") == 1 and _tls(relay, "fallback") == 0


# --- encrypt --------------------------------------------------------------------------

async def test_encrypt_defers_without_starttls(tls_relay: TlsRelay, mx_sinks: MxSinks) -> None:
    relay = await tls_relay(tls_level="encrypt")
    await _deferred(relay, mx_sinks, "plain", "does not offer STARTTLS")


async def test_encrypt_defers_on_a_broken_handshake(tls_relay: TlsRelay,
                                                    mx_sinks: MxSinks) -> None:
    relay = await tls_relay(tls_level="encrypt")
    await _deferred(relay, mx_sinks, "broken", "TLS required (tls level encrypt)")
    assert mx_sinks.sinks["broken"].connections == 1  # no plaintext retry


async def test_encrypt_delivers_to_an_untrusted_certificate(tls_relay: TlsRelay,
                                                            mx_sinks: MxSinks) -> None:
    relay = await tls_relay(tls_level="encrypt")
    await _delivered(relay, mx_sinks, "untrusted")
    assert _tls(relay, "encrypted") == 1


# --- verify ---------------------------------------------------------------------------

async def test_verify_defers_on_an_untrusted_certificate(tls_relay: TlsRelay,
                                                         mx_sinks: MxSinks) -> None:
    relay = await tls_relay(tls_level="verify")
    await _deferred(relay, mx_sinks, "untrusted", "certificate verify failed")


async def test_verify_defers_on_a_certificate_for_another_name(tls_relay: TlsRelay,
                                                               mx_sinks: MxSinks) -> None:
    relay = await tls_relay(tls_level="verify")
    await _deferred(relay, mx_sinks, "wrongname", "not valid for 'mx.wrong.test'")


async def test_verify_delivers_to_a_certificate_valid_for_the_mx_name(
        tls_relay: TlsRelay, mx_sinks: MxSinks) -> None:
    """The certificate names mx.valid.test (not the address): checked against the MX name."""
    relay = await tls_relay(tls_level="verify")
    await _delivered(relay, mx_sinks, "valid")
    assert _tls(relay, "verified") == 1


# --- the policy table and tls_verify ---------------------------------------------------

async def test_the_domain_table_overrides_the_global_level(tls_relay: TlsRelay,
                                                           mx_sinks: MxSinks) -> None:
    """Global may, self.test at verify: deferred there; other domains still at may."""
    relay = await tls_relay(tls_level="may", tls_policy={"self.test": "verify",
                                                         "plain.test": "none"})
    await _deferred(relay, mx_sinks, "untrusted", "certificate verify failed")
    await _delivered(relay, mx_sinks, "broken")  # may: delivered on the plaintext retry
    relay2_entry = await _delivered(relay, mx_sinks, "plain")
    assert relay2_entry["outcome"] == "delivered"


async def test_tls_verify_is_the_smarthosts_only(tls_relay: TlsRelay,
                                                 mx_sinks: MxSinks) -> None:
    """As documented: tls_verify neither raises MX hosts to verify (true, the default)
    nor lowers a verify level (false)."""
    relay = await tls_relay(tls_verify=True)
    await _delivered(relay, mx_sinks, "untrusted")  # default may: not verified
    relay2 = await tls_relay(tls_verify=False, tls_level="verify")
    await _deferred(relay2, mx_sinks, "wrongname", "not valid for 'mx.wrong.test'")


def test_levels_pure() -> None:
    """The table: the domain, then its parents, then the default; stronger never lowers."""
    table: dict[str, tlslevels.TlsLevel] = {"example.com": "verify", "a.example.com": "none"}
    assert tlslevels.level_for("B.Example.com.", "may", table) == "verify"
    assert tlslevels.level_for("x.a.example.com", "may", table) == "none"
    assert tlslevels.level_for("example.org", "may", table) == "may"
    assert tlslevels.stronger("may", "verify") == "verify"
    assert tlslevels.stronger("encrypt", "may") == "encrypt"


def test_a_policy_domain_must_be_lower_case(tmp_path: Path) -> None:
    from relayd.config import ConfigError, loads

    with pytest.raises(ConfigError, match="tls_policy"):
        loads('[delivery.tls_policy]\n"Example.com" = "verify"\n')
    cfg = loads('[delivery]\ntls_level = "encrypt"\n[delivery.tls_policy]\n'
                '"example.com" = "verify"\n')
    assert cfg.delivery.tls_level == "encrypt"
    assert msgspec.to_builtins(cfg.delivery)["tls_policy"] == {"example.com": "verify"}
    with pytest.raises(ConfigError, match="tls_level"):
        loads('[delivery]\ntls_level = "dane"\n')


async def test_a_trust_store_that_does_not_load_stops_the_start(tmp_path: Path) -> None:
    """``tls_ca_file`` is loaded at start: a missing or bad file is a configuration error
    (relayd exits with the configuration exit code), not mail deferred for days."""
    from relayd.config import ConfigError

    bad = tmp_path / "not-a-ca.pem"
    bad.write_text("not a certificate\n")
    for path in (tmp_path / "missing.pem", bad):
        cfg = make_config(tmp_path / path.stem, "127.0.0.1:9")
        cfg = msgspec.structs.replace(cfg, delivery=msgspec.structs.replace(
            cfg.delivery, tls_ca_file=str(path)))
        relay = Relay(cfg)
        with pytest.raises(ConfigError, match=r"delivery\.tls_ca_file"):
            await relay.start()


async def test_a_reload_applies_the_levels_and_the_policy_table(
        tmp_path: Path, mx_sinks: MxSinks, dns: DnsServer, ca: trustme.CA) -> None:
    """relayd as a process: at may, the untrusted MX gets the mail; after SIGHUP with
    self.test at verify (and the test CA as trust store), the next message is deferred
    there and the valid MX's is verified."""
    import signal

    from tests.procs import BASE_TOML, RelayProcess
    from tests.test_ops_support import log_lines, wait_log

    ca_file = tmp_path / "ca.pem"
    ca.cert_pem.write_to_path(str(ca_file))
    mx = (f'mode = "mx"\ndns_nameservers = ["{dns.host}:{dns.port}"]\n'
          f'mx_port = {mx_sinks.port}\nmx_allowed_networks = ["127.0.0.0/8"]\n')

    def toml(extra: str) -> str:
        return BASE_TOML.replace("[delivery]\n", "[delivery]\n" + mx) + extra

    rp = RelayProcess(tmp_path, None)
    rp.config.write_text(toml(""))
    await rp.start()
    try:
        client = await rp.sender("example.com")
        await client.sendmail("app@example.com", ["r@self.test"], message("m1"))
        [first] = await wait_log(rp, "delivery_attempt")
        assert (first["outcome"], first["tls"]) == ("delivered", "encrypted")
        rp.config.write_text(toml('[delivery.tls_policy]\n"self.test" = "verify"\n'
                                  '"valid.test" = "verify"\n').replace(
            "[delivery]\n", f'[delivery]\ntls_ca_file = "{ca_file}"\n'))
        assert rp.proc is not None
        rp.proc.send_signal(signal.SIGHUP)
        [reloaded] = await wait_log(rp, "reloaded")
        assert {"delivery.tls_policy", "delivery.tls_ca_file"} <= set(reloaded["changed"])
        await client.sendmail("app@example.com", ["r@self.test"], message("m2"))
        await client.sendmail("app@example.com", ["r@valid.test"], message("m3"))
        await wait_log(rp, "delivery_attempt", 3)
        got = {(x["rcpt"], x["outcome"], x["tls"]) for x in log_lines(rp.log)
               if x.get("event") == "delivery_attempt"}
        assert ("r@self.test", "deferred", "refused") in got
        assert ("r@valid.test", "delivered", "verified") in got
        assert len(mx_sinks.sinks["untrusted"].messages) == 1
        await client.quit()
    finally:
        await rp.terminate()
