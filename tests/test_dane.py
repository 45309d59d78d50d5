"""DANE (RFC 7672) in MX mode (issue 17 item 3): TLSA records from a validating resolver
make TLS mandatory and the certificate must match them.

A real DNS server on loopback plays the validating resolver (``secure``: the AD bit,
``insecure`` names excepted); MX sinks on 127.0.0.x (one port) present: a self-signed
certificate (no CA anywhere), a trustme chain for the MX name, the same CA's certificate
for another name, and no STARTTLS at all. TLSA records are computed here with
cryptography (not with relayd's own SPKI reader, which a unit test checks against it).
"""

from __future__ import annotations

import asyncio
import datetime
import hashlib
import ssl
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
import trustme
from aiosmtpd.smtp import SMTP as AioSMTP
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from relayd.app import Relay
from relayd.delivery import dane
from tests.conftest import RelayHandle, Sink
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

#: kind -> (MX host name, address)
HOSTS = {
    "ee": ("mx.ee.test", "127.0.0.2"),  # a self-signed certificate
    "ta": ("mx.ta.test", "127.0.0.3"),  # trustme chain, valid for its name
    "wrongname": ("mx.wrongname.test", "127.0.0.4"),  # same CA, another name
    "plain": ("mx.plain.test", "127.0.0.5"),  # no STARTTLS
}


def _domain(kind: str) -> str:
    return f"{kind}.test"


def _self_signed(name: str) -> tuple[bytes, bytes]:
    """(certificate PEM, key PEM) of a self-signed certificate for ``name``."""
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = datetime.datetime.now(datetime.UTC)
    cert = (x509.CertificateBuilder().subject_name(subject).issuer_name(subject)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(days=1))
            .not_valid_after(now + datetime.timedelta(days=30))
            .add_extension(x509.SubjectAlternativeName([x509.DNSName(name)]), critical=False)
            .sign(key, hashes.SHA256()))
    return (cert.public_bytes(serialization.Encoding.PEM),
            key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                              serialization.NoEncryption()))


def _spki(cert_der: bytes) -> bytes:
    cert = x509.load_der_x509_certificate(cert_der)
    return cert.public_key().public_bytes(serialization.Encoding.DER,
                                          serialization.PublicFormat.SubjectPublicKeyInfo)


def _der(pem: bytes) -> bytes:
    return ssl.PEM_cert_to_DER_cert(pem.decode())


class MxSinks:
    """One sink per MX host, all on one port; ``leaf`` holds each one's certificate (DER)."""

    def __init__(self, ca: trustme.CA, tmp: Path) -> None:
        self.ca = ca
        self.tmp = tmp
        self.sinks: dict[str, Sink] = {}
        self.leaf: dict[str, bytes] = {}
        self.port = 0

    def _ctx(self, kind: str, name: str) -> ssl.SSLContext | None:
        if kind == "plain":
            return None
        ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        if kind == "ee":
            cert, key = _self_signed(name)
            (self.tmp / "ee.pem").write_bytes(cert)
            (self.tmp / "ee.key").write_bytes(key)
            ctx.load_cert_chain(self.tmp / "ee.pem", self.tmp / "ee.key")
            self.leaf[kind] = _der(cert)
            return ctx
        issued = self.ca.issue_cert(name if kind == "ta" else "other.example")
        issued.configure_cert(ctx)
        self.leaf[kind] = _der(issued.cert_chain_pems[0].bytes())
        return ctx

    async def start(self) -> None:
        self.sinks, self.port = await start_mx_sinks(
            (kind, addr, self._ctx(kind, name), AioSMTP) for kind, (name, addr) in HOSTS.items())

    def close(self) -> None:
        close_sinks(self.sinks)


@pytest.fixture(scope="module")
def ca() -> trustme.CA:
    return trustme.CA()


@pytest.fixture
async def mx_sinks(ca: trustme.CA, tmp_path: Path) -> AsyncIterator[MxSinks]:
    sinks = MxSinks(ca, tmp_path)
    try:
        await sinks.start()
    except OSError:  # the port was taken on one of the addresses: once more
        sinks.close()
        sinks = MxSinks(ca, tmp_path)
        await sinks.start()
    yield sinks
    sinks.close()


@pytest.fixture
async def dns() -> AsyncIterator[DnsServer]:
    zone: dict[str, dict[str, list[str]]] = {"example.com": {"MX": ["10 mx.ee.test."]}}
    for kind, (name, addr) in HOSTS.items():
        zone[_domain(kind)] = {"MX": [f"10 {name}."]}
        zone[name] = {"A": [addr]}
    async with DnsServer(zone) as server:
        server.secure = True
        yield server


def tlsa_name(kind: str, port: int) -> str:
    return f"_{port}._tcp.{HOSTS[kind][0]}"


def publish(dns: DnsServer, sinks: MxSinks, kind: str, *records: str) -> None:
    """TLSA records (zone-file text) for the MX host of ``kind`` at the sinks' port."""
    dns.zone[tlsa_name(kind, sinks.port)] = {"TLSA": list(records)}


def ee_311(der: bytes) -> str:
    return f"3 1 1 {hashlib.sha256(_spki(der)).hexdigest()}"


DaneRelay = Callable[..., Awaitable[RelayHandle]]


@pytest.fixture
async def dane_relay(tmp_path: Path, mx_sinks: MxSinks, dns: DnsServer) -> AsyncIterator[DaneRelay]:
    """A relay in MX mode with ``dane = "on"`` and the test DNS server as its resolver."""
    started: list[Relay] = []
    yield mx_relay_starter(tmp_path, dns, mx_sinks.port, started, dane="on")
    for r in started:
        await r.stop()


async def _one(relay: RelayHandle, kind: str) -> dict[str, Any]:
    """Send one message to the domain whose MX is of this kind; its first log entry."""
    return await send_one(relay, f"r@{_domain(kind)}")


_tls = tls_count


async def _delivered(relay: RelayHandle, sinks: MxSinks, kind: str) -> dict[str, Any]:
    return await expect_delivered(relay, sinks.sinks[kind], f"r@{_domain(kind)}")


async def _deferred(relay: RelayHandle, sinks: MxSinks, kind: str, reason: str) -> None:
    await expect_deferred(relay, sinks.sinks[kind], f"r@{_domain(kind)}", reason)


# --- DANE-EE ----------------------------------------------------------------------------

async def test_ee_311_matching_a_self_signed_certificate_delivers(
        dane_relay: DaneRelay, mx_sinks: MxSinks, dns: DnsServer) -> None:
    """No CA anywhere: the record alone authenticates the MX (level may would not check)."""
    publish(dns, mx_sinks, "ee", ee_311(mx_sinks.leaf["ee"]))
    relay = await dane_relay()
    await _delivered(relay, mx_sinks, "ee")
    assert _tls(relay, "dane") == 1 and _tls(relay, "encrypted") == 0
    assert dns.count(tlsa_name("ee", mx_sinks.port), "TLSA") == 1
    assert (await relay.relay.status()).dane == "on"


async def test_ee_311_not_matching_defers_and_sends_nothing(
        dane_relay: DaneRelay, mx_sinks: MxSinks, dns: DnsServer,
        capsys: pytest.CaptureFixture[str]) -> None:
    publish(dns, mx_sinks, "ee", ee_311(mx_sinks.leaf["ta"]))  # another certificate's key
    relay = await dane_relay()
    await _deferred(relay, mx_sinks, "ee", "DANE: the certificate of mx.ee.test matches no"
                                           " TLSA record (3 1 1")
    assert _tls(relay, "dane_failed") == 1
    err = capsys.readouterr()
    assert "dane_failed" in err.out + err.err and "mx.ee.test" in err.out + err.err


async def test_ee_full_certificate_and_sha512_records_match(
        dane_relay: DaneRelay, mx_sinks: MxSinks, dns: DnsServer) -> None:
    """3 0 0 (the whole certificate) beside a non-matching 3 1 2: one match is enough."""
    leaf = mx_sinks.leaf["ee"]
    publish(dns, mx_sinks, "ee", f"3 1 2 {hashlib.sha512(b'other').hexdigest()}",
            f"3 0 0 {leaf.hex()}")
    relay = await dane_relay()
    await _delivered(relay, mx_sinks, "ee")
    assert _tls(relay, "dane") == 1


# --- DANE-TA ----------------------------------------------------------------------------

async def test_ta_200_with_the_right_name_delivers(
        dane_relay: DaneRelay, mx_sinks: MxSinks, dns: DnsServer, ca: trustme.CA) -> None:
    """The trustme CA, which relayd's trust store does not hold, is the trust anchor."""
    publish(dns, mx_sinks, "ta", f"2 0 0 {_der(ca.cert_pem.bytes()).hex()}")
    relay = await dane_relay()
    await _delivered(relay, mx_sinks, "ta")
    assert _tls(relay, "dane") == 1


async def test_ta_200_with_the_wrong_name_defers(
        dane_relay: DaneRelay, mx_sinks: MxSinks, dns: DnsServer, ca: trustme.CA) -> None:
    publish(dns, mx_sinks, "wrongname", f"2 0 0 {_der(ca.cert_pem.bytes()).hex()}")
    relay = await dane_relay()
    await _deferred(relay, mx_sinks, "wrongname", "not valid for 'mx.wrongname.test'")
    assert _tls(relay, "dane_failed") == 1


async def test_ta_200_of_another_ca_defers(
        dane_relay: DaneRelay, mx_sinks: MxSinks, dns: DnsServer) -> None:
    other = trustme.CA()
    publish(dns, mx_sinks, "ta", f"2 0 0 {_der(other.cert_pem.bytes()).hex()}")
    relay = await dane_relay()
    await _deferred(relay, mx_sinks, "ta", "certificate verify failed")


# --- when DANE does not apply, or makes TLS mandatory without authentication -------------

async def test_insecure_tlsa_is_ignored(dane_relay: DaneRelay, mx_sinks: MxSinks,
                                        dns: DnsServer) -> None:
    """TLSA present but not validated (no AD): level may as before, even though the
    record does not match the certificate."""
    publish(dns, mx_sinks, "ee", ee_311(mx_sinks.leaf["ta"]))
    dns.insecure.add(tlsa_name("ee", mx_sinks.port))
    relay = await dane_relay()
    await _delivered(relay, mx_sinks, "ee")
    assert _tls(relay, "encrypted") == 1 and _tls(relay, "dane") == 0


@pytest.mark.parametrize("unvalidated", ["ee.test", "mx.ee.test"])
async def test_insecure_mx_or_address_answer_means_no_tlsa_lookup(
        dane_relay: DaneRelay, mx_sinks: MxSinks, dns: DnsServer, unvalidated: str) -> None:
    """The MX RRset, or the MX host's address records, not validated: TLSA is not even
    asked for (and the mismatching record does not stop the mail)."""
    publish(dns, mx_sinks, "ee", ee_311(mx_sinks.leaf["ta"]))
    dns.insecure.add(unvalidated)
    relay = await dane_relay()
    await _delivered(relay, mx_sinks, "ee")
    assert dns.count(tlsa_name("ee", mx_sinks.port), "TLSA") == 0


async def test_secure_tlsa_at_an_mx_without_starttls_defers(
        dane_relay: DaneRelay, mx_sinks: MxSinks, dns: DnsServer) -> None:
    publish(dns, mx_sinks, "plain", f"3 1 1 {'00' * 32}")
    relay = await dane_relay()
    await _deferred(relay, mx_sinks, "plain", "does not offer STARTTLS")
    assert _tls(relay, "dane_failed") == 1


async def test_only_unusable_records_make_tls_mandatory_unauthenticated(
        dane_relay: DaneRelay, mx_sinks: MxSinks, dns: DnsServer) -> None:
    """PKIX-EE (1) and PKIX-TA (0) are unusable for SMTP: TLS required (no plaintext at
    the MX without STARTTLS), the certificate not checked (delivered to a self-signed one)."""
    publish(dns, mx_sinks, "plain", f"1 1 1 {'00' * 32}")
    publish(dns, mx_sinks, "ee", f"0 0 1 {'00' * 32}", f"1 1 1 {'00' * 32}")
    relay = await dane_relay()
    await _deferred(relay, mx_sinks, "plain", "TLS required (tls level encrypt)")
    await _delivered(relay, mx_sinks, "ee")
    assert _tls(relay, "encrypted") == 1 and _tls(relay, "refused") == 1


async def test_a_failing_tlsa_lookup_defers(dane_relay: DaneRelay, mx_sinks: MxSinks,
                                            dns: DnsServer) -> None:
    """SERVFAIL on a secure host's TLSA: deferred (RFC 7672 §2.1.1), never plaintext."""
    dns.servfail.add(tlsa_name("plain", mx_sinks.port))
    relay = await dane_relay()
    await _deferred(relay, mx_sinks, "plain", "TLSA lookup failed")
    assert mx_sinks.sinks["plain"].connections == 0


async def test_dane_is_skipped_with_a_warning_when_the_resolver_does_not_validate(
        dane_relay: DaneRelay, mx_sinks: MxSinks, dns: DnsServer,
        capsys: pytest.CaptureFixture[str]) -> None:
    """No AD bit on the start-up probe: a warning, status says so, TLSA never consulted
    (a mismatching record does not stop the mail)."""
    dns.secure = False
    publish(dns, mx_sinks, "ee", ee_311(mx_sinks.leaf["ta"]))
    relay = await dane_relay()
    err = capsys.readouterr()
    assert "dane_skipped" in err.out + err.err
    assert (await relay.relay.status()).dane.startswith("skipped: the resolver does not"
                                                        " validate DNSSEC")
    await _delivered(relay, mx_sinks, "ee")
    assert dns.count(tlsa_name("ee", mx_sinks.port), "TLSA") == 0
    assert dns.count(".", "DNSKEY") == 1


async def test_dane_without_a_configured_resolver_is_skipped(
        dane_relay: DaneRelay, capsys: pytest.CaptureFixture[str]) -> None:
    relay = await dane_relay(dns_nameservers=[])
    assert "dns_nameservers is empty" in (await relay.relay.status()).dane
    err = capsys.readouterr()
    assert "dane_skipped" in err.out + err.err


async def test_a_silent_resolver_does_not_hang_the_start(
        dane_relay: DaneRelay, dns: DnsServer) -> None:
    dns.silent.add(".")
    loop = asyncio.get_running_loop()
    began = loop.time()
    relay = await dane_relay()
    assert loop.time() - began < 10
    assert "did not answer the DNSSEC probe" in (await relay.relay.status()).dane


# --- the pure parts ---------------------------------------------------------------------

def test_spki_reader_agrees_with_cryptography(ca: trustme.CA) -> None:
    """RSA (trustme) and EC (self-signed) certificates; malformed DER never matches."""
    rsa_leaf = _der(ca.issue_cert("a.test").cert_chain_pems[0].bytes())
    ec_leaf = _der(_self_signed("b.test")[0])
    for der in (rsa_leaf, ec_leaf, _der(ca.cert_pem.bytes())):
        assert dane.spki(der) == _spki(der)
    for bad in (b"", b"\x30", b"\x30\x84\xff\xff\xff\xff", rsa_leaf[:200], b"\x04\x00"):
        with pytest.raises(ValueError):
            dane.spki(bad)
        assert not dane.ee_matches(bad, ((3, 0, 0, bad),))


def test_ee_matches_every_selector_and_matching_type() -> None:
    leaf = _der(_self_signed("c.test")[0])
    key = _spki(leaf)
    for selector, data in ((0, leaf), (1, key)):
        for mtype, digest in ((0, data), (1, hashlib.sha256(data).digest()),
                              (2, hashlib.sha512(data).digest())):
            assert dane.ee_matches(leaf, ((3, selector, mtype, digest),))
            assert not dane.ee_matches(leaf, ((3, selector, mtype, digest[:-1] + b"x"),))
            assert not dane.ee_matches(leaf, ((1, selector, mtype, digest),))  # PKIX-EE


def test_policy() -> None:
    ee = (3, 1, 1, b"x" * 32)
    ta_full = (2, 0, 0, b"cert")
    ta_hash = (2, 1, 1, b"y" * 32)
    pkix = (1, 1, 1, b"z" * 32)
    assert dane.policy("may", ()) == ("may", ())
    assert dane.policy("may", (ee, pkix)) == ("encrypt", (ee,))
    assert dane.policy("verify", (ta_full,)) == ("verify", (ta_full,))
    assert dane.policy("may", (pkix,)) == ("encrypt", ())
    assert dane.policy("may", (ta_hash,)) == ("encrypt", ())  # not checkable by relayd
    assert dane.policy("none", (ee,)) == ("none", ())  # the operator's explicit none
