"""MTA-STS in MX mode (issue 17 item 2): discovery, the policy cache, enforce and testing.

The MX sinks, DNS server and relay of tests/test_mx_tls.py (trustme certificates: valid,
from an untrusted CA, for another name), a real HTTPS server on 127.0.0.10 serving the
policy files (aiohttp's, with a trustme certificate for every ``mta-sts.<domain>``), and
the ``_mta-sts`` TXT records in the test DNS zone. Each mode has a test that delivers
where the policy forbids, or refuses where it must deliver, if it is broken.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import smtplib
import ssl
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import trustme
from aiohttp import web

from relayd.delivery import mtasts
from relayd.delivery.tlsrpt import TlsReport, day_of
from tests.dnsserver import DnsServer
from tests.test_mx_tls import (  # noqa: F401 (fixtures)
    DOMAIN,
    MxSinks,
    TlsRelay,
    _deferred,
    _delivered,
    _one,
    _tls,
    ca,
    dns,
    mx_sinks,
    tls_relay,
)
from tests.test_queue_support import eventually, log_entries, submit

POLICY_ADDRESS = "127.0.0.10"
POLICY_DOMAINS = ("valid.test", "self.test", "wrong.test", "plain.test", "broken.test")


class PolicyServer:
    """HTTPS on 127.0.0.10: per host (``mta-sts.<domain>``), a status, media type and body."""

    def __init__(self, authority: trustme.CA) -> None:
        self.ca = authority
        self.answers: dict[str, tuple[int, str, str, dict[str, str]]] = {}
        self.hits: dict[str, int] = {}
        self.port = 0
        self.runner: web.AppRunner | None = None

    async def _handle(self, request: web.Request) -> web.Response:
        host = request.host.partition(":")[0]
        self.hits[host] = self.hits.get(host, 0) + 1
        status, ctype, body, headers = self.answers.get(host, (404, "text/plain", "", {}))
        return web.Response(status=status, text=body, content_type=ctype, headers=headers)

    async def start(self) -> None:
        app = web.Application()
        app.router.add_get("/.well-known/mta-sts.txt", self._handle)
        app.router.add_get("/elsewhere.txt", self._handle)
        ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        self.ca.issue_cert(*(f"mta-sts.{d}" for d in POLICY_DOMAINS)).configure_cert(ctx)
        self.runner = web.AppRunner(app)
        await self.runner.setup()
        site = web.TCPSite(self.runner, POLICY_ADDRESS, 0, ssl_context=ctx)
        await site.start()
        self.port = self.runner.addresses[0][1]


@pytest.fixture
async def policies(ca: trustme.CA) -> AsyncIterator[PolicyServer]:  # noqa: F811
    server = PolicyServer(ca)
    await server.start()
    yield server
    assert server.runner is not None
    await server.runner.cleanup()


def publish(dns: DnsServer, server: PolicyServer, domain: str, mode: str,  # noqa: F811
            mx: tuple[str, ...] = (), policy_id: str = "1", max_age: int = 86400,
            body: str | None = None, status: int = 200, ctype: str = "text/plain",
            headers: dict[str, str] | None = None) -> None:
    """The domain's TXT record, its policy host's address, and its policy file."""
    dns.zone[f"_mta-sts.{domain}"] = {"TXT": [f'"v=STSv1; id={policy_id};"']}
    dns.zone[f"mta-sts.{domain}"] = {"A": [POLICY_ADDRESS]}
    if body is None:
        body = "version: STSv1\r\nmode: {}\r\n{}max_age: {}\r\n".format(
            mode, "".join(f"mx: {m}\r\n" for m in mx or (f"mx.{domain}",)), max_age)
    server.answers[f"mta-sts.{domain}"] = (status, ctype, body, headers or {})


def _sts(relay: Any, mode: str, result: str) -> float:
    counter = relay.relay.metrics.mta_sts_results_total.labels(mode=mode, result=result)
    value: float = counter._value.get()
    return value


async def _relay(tls_relay: TlsRelay, policies: PolicyServer, tmp: Path,  # noqa: F811
                 **delivery: Any) -> Any:
    return await tls_relay(mta_sts_port=policies.port, tlsrpt_dir=str(tmp / "tlsrpt"),
                           **delivery)


async def _send(relay: Any, sinks: MxSinks, kind: str, n: int,
                outcome: str = "delivered") -> dict[str, Any]:
    """Message ``n`` to the domain of this kind of MX (its own recipient); its log entry,
    once the sink has ``n`` messages when it is delivered."""
    account = await relay.ctl.add_user("example.com")
    rcpt = f"r{n}@{DOMAIN[kind]}"
    await submit(relay, account, [rcpt])

    async def entry() -> dict[str, Any] | None:
        return next((e for e in await log_entries(relay) if e["recipient"] == rcpt), None)

    found: dict[str, Any] = await eventually(entry)
    assert found["outcome"] == outcome, found
    if outcome == "delivered":
        assert len(await sinks.sinks[kind].wait_for(n)) == n
    return found


# --- enforce --------------------------------------------------------------------------

async def test_enforce_delivers_at_level_verify(tls_relay: TlsRelay,  # noqa: F811
                                                mx_sinks: MxSinks, dns: DnsServer,  # noqa: F811
                                                policies: PolicyServer, tmp_path: Path) -> None:
    """Global level may, the policy enforce: the certificate is verified (not merely
    encrypted) and the success counted."""
    publish(dns, policies, "valid.test", "enforce")
    relay = await _relay(tls_relay, policies, tmp_path)
    entry = await _delivered(relay, mx_sinks, "valid")
    assert entry["outcome"] == "delivered"
    assert _tls(relay, "verified") == 1 and _tls(relay, "encrypted") == 0
    assert _sts(relay, "enforce", "success") == 1


async def test_enforce_defers_a_certificate_for_another_name(
        tls_relay: TlsRelay, mx_sinks: MxSinks, dns: DnsServer,  # noqa: F811
        policies: PolicyServer, tmp_path: Path) -> None:
    """At level may this MX would get the mail (encrypted); enforce defers it."""
    publish(dns, policies, "wrong.test", "enforce")
    relay = await _relay(tls_relay, policies, tmp_path)
    await _deferred(relay, mx_sinks, "wrongname", "not valid for 'mx.wrong.test'")
    assert _sts(relay, "enforce", mtasts.HOST_MISMATCH) == 1


async def test_enforce_defers_when_no_mx_matches_the_policy(
        tls_relay: TlsRelay, mx_sinks: MxSinks, dns: DnsServer,  # noqa: F811
        policies: PolicyServer, tmp_path: Path) -> None:
    """The valid MX, but the policy lists another: deferred without a connection."""
    publish(dns, policies, "valid.test", "enforce", mx=("*.elsewhere.test", "mx.valid"))
    relay = await _relay(tls_relay, policies, tmp_path)
    entry = await _one(relay, "valid")
    assert entry["outcome"] == "deferred", entry
    assert "MTA-STS policy of valid.test (mode enforce) matches none" in entry["text"]
    assert mx_sinks.sinks["valid"].connections == 0
    assert _sts(relay, "enforce", mtasts.VALIDATION_FAILURE) == 1


async def test_enforce_defers_an_mx_without_starttls(
        tls_relay: TlsRelay, mx_sinks: MxSinks, dns: DnsServer,  # noqa: F811
        policies: PolicyServer, tmp_path: Path) -> None:
    """At level may the plaintext MX gets the mail; enforce requires TLS."""
    publish(dns, policies, "plain.test", "enforce")
    relay = await _relay(tls_relay, policies, tmp_path)
    await _deferred(relay, mx_sinks, "plain", "does not offer STARTTLS")
    assert _sts(relay, "enforce", mtasts.STARTTLS_NOT_SUPPORTED) == 1


async def test_a_wildcard_pattern_matches_the_mx(tls_relay: TlsRelay,  # noqa: F811
                                                 mx_sinks: MxSinks, dns: DnsServer,  # noqa: F811
                                                 policies: PolicyServer, tmp_path: Path) -> None:
    publish(dns, policies, "valid.test", "enforce", mx=("*.valid.test",))
    relay = await _relay(tls_relay, policies, tmp_path)
    await _delivered(relay, mx_sinks, "valid")
    assert _tls(relay, "verified") == 1


# --- testing --------------------------------------------------------------------------

async def test_testing_delivers_to_a_bad_certificate_and_counts_it(
        tls_relay: TlsRelay, mx_sinks: MxSinks, dns: DnsServer,  # noqa: F811
        policies: PolicyServer, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """testing: the verified attempt fails (untrusted CA), the mail goes at level may,
    the failure is logged, counted and in the TLSRPT counts."""
    publish(dns, policies, "self.test", "testing")
    relay = await _relay(tls_relay, policies, tmp_path)
    entry = await _delivered(relay, mx_sinks, "untrusted")
    assert entry["outcome"] == "delivered"
    assert _sts(relay, "testing", mtasts.NOT_TRUSTED) == 1
    assert _tls(relay, "encrypted") == 1
    err = capsys.readouterr()
    assert "mta_sts_tls_failure" in err.out + err.err
    report = relay.relay.deliverer.sts.report
    assert report.counts(day_of(report.clock()), "self.test") == (0, 1)


# --- discovery and the cache ----------------------------------------------------------

async def test_the_policy_is_cached_and_refreshed_when_the_id_changes(
        tls_relay: TlsRelay, mx_sinks: MxSinks, dns: DnsServer,  # noqa: F811
        policies: PolicyServer, tmp_path: Path) -> None:
    dns.ttl = 0  # the TXT record is asked each time (relayd's DNS cache keeps nothing)
    publish(dns, policies, "valid.test", "enforce")
    relay = await _relay(tls_relay, policies, tmp_path)
    await _send(relay, mx_sinks, "valid", 1)
    await _send(relay, mx_sinks, "valid", 2)
    assert policies.hits == {"mta-sts.valid.test": 1}
    # A new id: fetched again, and the new policy (testing, another MX) applies.
    publish(dns, policies, "valid.test", "testing", mx=("mx.other.test",), policy_id="2")
    await _send(relay, mx_sinks, "valid", 3)
    assert policies.hits == {"mta-sts.valid.test": 2}
    assert _sts(relay, "testing", mtasts.VALIDATION_FAILURE) == 1
    # The policy host fails now, the id changes: the cached policy keeps serving.
    publish(dns, policies, "valid.test", "enforce", policy_id="3", status=500)
    await _send(relay, mx_sinks, "valid", 4)
    assert policies.hits == {"mta-sts.valid.test": 3}
    assert _sts(relay, "testing", mtasts.VALIDATION_FAILURE) == 2
    assert _sts(relay, "-", mtasts.FETCH_ERROR) == 1
    # ...and the failed id is not fetched again at once (no fetch timeout per message).
    await _send(relay, mx_sinks, "valid", 5)
    assert policies.hits == {"mta-sts.valid.test": 3}
    assert _sts(relay, "testing", mtasts.VALIDATION_FAILURE) == 3


async def test_a_redirect_is_not_followed(tls_relay: TlsRelay,  # noqa: F811
                                          mx_sinks: MxSinks, dns: DnsServer,  # noqa: F811
                                          policies: PolicyServer, tmp_path: Path) -> None:
    """The redirect target would enforce (and defer at the untrusted MX): not followed, no
    policy, delivered at level may."""
    publish(dns, policies, "self.test", "enforce", status=301,
            headers={"Location": f"https://mta-sts.self.test:{policies.port}/elsewhere.txt"})
    relay = await _relay(tls_relay, policies, tmp_path)
    await _delivered(relay, mx_sinks, "untrusted")
    assert policies.hits == {"mta-sts.self.test": 1}
    assert _sts(relay, "-", mtasts.FETCH_ERROR) == 1


@pytest.mark.parametrize("body,ctype", [
    ("version: STSv1\nmode: enforce\nmx: mx.self.test\n", "text/plain"),  # no max_age
    ("version: STSv1\nmode: enforce\nmx: mx.self.test\nmax_age: 86400\n", "text/html"),
])
async def test_a_bad_policy_file_is_no_policy(tls_relay: TlsRelay,  # noqa: F811
                                              mx_sinks: MxSinks, dns: DnsServer,  # noqa: F811
                                              policies: PolicyServer, tmp_path: Path,
                                              body: str, ctype: str) -> None:
    publish(dns, policies, "self.test", "enforce", body=body, ctype=ctype)
    relay = await _relay(tls_relay, policies, tmp_path)
    await _delivered(relay, mx_sinks, "untrusted")
    kind = mtasts.POLICY_INVALID if ctype == "text/plain" else mtasts.FETCH_ERROR
    assert _sts(relay, "-", kind) == 1


async def test_a_policy_host_with_an_untrusted_certificate(
        tls_relay: TlsRelay, mx_sinks: MxSinks, dns: DnsServer,  # noqa: F811
        policies: PolicyServer, tmp_path: Path) -> None:
    """Without the test CA as trust store the policy host fails (sts-webpki-invalid), so
    no policy: the untrusted MX still gets the mail at level may."""
    publish(dns, policies, "self.test", "enforce")
    relay = await _relay(tls_relay, policies, tmp_path, tls_ca_file="")
    await _delivered(relay, mx_sinks, "untrusted")
    assert _sts(relay, "-", mtasts.WEBPKI_INVALID) == 1


async def test_mta_sts_off(tls_relay: TlsRelay, mx_sinks: MxSinks,  # noqa: F811
                           dns: DnsServer, policies: PolicyServer,  # noqa: F811
                           tmp_path: Path) -> None:
    publish(dns, policies, "wrong.test", "enforce")
    relay = await _relay(tls_relay, policies, tmp_path, mta_sts=False)
    await _delivered(relay, mx_sinks, "wrongname")
    assert policies.hits == {}


# --- TLSRPT ---------------------------------------------------------------------------

async def test_the_daily_report_has_the_counts_and_survives_a_restart(
        tls_relay: TlsRelay, mx_sinks: MxSinks, dns: DnsServer,  # noqa: F811
        policies: PolicyServer, tmp_path: Path) -> None:
    """Deliveries under two policies; the relay stops (counts flushed); a new report
    keeper loads them and, a day later, writes the RFC 8460 report per domain."""
    publish(dns, policies, "valid.test", "enforce")
    publish(dns, policies, "self.test", "testing")
    relay = await _relay(tls_relay, policies, tmp_path)
    await _send(relay, mx_sinks, "valid", 1)
    await _send(relay, mx_sinks, "valid", 2)
    await _send(relay, mx_sinks, "untrusted", 1)
    today = day_of(relay.relay.deliverer.sts.report.clock())
    await relay.relay.stop()
    directory = tmp_path / "tlsrpt"
    assert json.loads((directory / "counts.json").read_text())[today]
    later = TlsReport(str(directory), "relay.test", "postmaster@relay.test",
                      clock=lambda: 86400.0 * 3 + time.time())
    later.load()
    written = later.write_due()
    assert sorted(p.name for p in written) == ["self.test.json", "valid.test.json"]
    valid = json.loads((directory / today / "valid.test.json").read_text())
    [pol] = valid["policies"]
    assert pol["policy"]["policy-type"] == "sts"
    assert pol["policy"]["policy-domain"] == "valid.test"
    assert "mode: enforce" in pol["policy"]["policy-string"]
    assert pol["summary"] == {"total-successful-session-count": 2,
                              "total-failure-session-count": 0}
    assert valid["date-range"]["start-datetime"] == f"{today}T00:00:00Z"
    assert {"organization-name", "contact-info", "report-id"} <= set(valid)
    bad = json.loads((directory / today / "self.test.json").read_text())
    [pol] = bad["policies"]
    assert pol["summary"]["total-failure-session-count"] == 1
    assert pol["failure-details"] == [{
        "result-type": "certificate-not-trusted", "failed-session-count": 1,
        "receiving-mx-hostname": "mx.self.test",
        "receiving-ip": mx_sinks.sinks["untrusted"].host}]
    assert today not in json.loads((directory / "counts.json").read_text())
    assert later.write_due() == []  # written once


# --- the pure part --------------------------------------------------------------------

def test_parse_and_match() -> None:
    assert mtasts.parse_txt(["v=spf1 -all", "v=STSv1; id=20260101T00"]) == "20260101T00"
    assert mtasts.parse_txt(["something else"]) is None
    with pytest.raises(mtasts.PolicyError):
        mtasts.parse_txt(["v=STSv1; id=1", "v=STSv1; id=2"])
    with pytest.raises(mtasts.PolicyError):
        mtasts.parse_txt(["v=STSv1; id=not-alnum!"])
    policy = mtasts.parse_policy(
        "version: STSv1\nmode: testing\nmx: *.Example.net\nmx: mx.example.org.\n"
        "max_age: 9999999999\nextension: ignored\n")
    assert (policy.mode, policy.max_age) == ("testing", mtasts.MAX_AGE_LIMIT)
    assert policy.matches("a.example.net") and policy.matches("MX.example.org.")
    assert not policy.matches("example.net")  # the wildcard needs one label
    assert not policy.matches("a.b.example.net")  # ...and only one
    for bad in ("version: STSv2\nmode: enforce\nmx: a\nmax_age: 1\n",
                "version: STSv1\nmode: strict\nmx: a\nmax_age: 1\n",
                "version: STSv1\nmode: enforce\nmax_age: 1\n",
                "version: STSv1\nmode: enforce\nmx: a\nmax_age: -1\n"):
        with pytest.raises(mtasts.PolicyError):
            mtasts.parse_policy(bad)
    assert mtasts.parse_policy("version: STSv1\nmode: none\nmax_age: 5\n").mode == "none"


def test_result_types() -> None:
    assert mtasts.result_type("TLS required (tls level verify) but mx does not offer "
                              "STARTTLS") == mtasts.STARTTLS_NOT_SUPPORTED
    assert mtasts.result_type("certificate verify failed: Hostname mismatch, certificate"
                              " is not valid for 'x'") == mtasts.HOST_MISMATCH
    assert mtasts.result_type("certificate verify failed: unable to get local issuer"
                              " certificate") == mtasts.NOT_TRUSTED
    assert mtasts.result_type("certificate verify failed: certificate has expired") == \
        mtasts.EXPIRED
    assert mtasts.result_type("handshake failure") == mtasts.VALIDATION_FAILURE


def test_report_counts_survive_a_damaged_file(tmp_path: Path) -> None:
    (tmp_path / "counts.json").write_text("{not json")
    report = TlsReport(str(tmp_path), "o", "c", clock=lambda: 0.0)
    report.load()
    assert (tmp_path / "counts.damaged").exists()
    report.record("d.test", "version: STSv1\n")
    report.flush()
    again = TlsReport(str(tmp_path), "o", "c", clock=lambda: 0.0)
    again.load()
    assert again.counts("1970-01-01", "d.test") == (1, 0)



async def test_a_day_missed_while_stopped_is_reported_at_start(tmp_path: Path) -> None:
    """Counts of a day before today, loaded at start: ``run`` writes that day's report at
    once, keeps today's counts, and flushes them when cancelled."""
    now = [86400.0 * 100 + 3600]
    report = TlsReport(str(tmp_path), "relay.test", "postmaster@relay.test",
                       clock=lambda: now[0], flush_seconds=0.05)
    report.record("d.test", "version: STSv1\nmode: enforce\nmx: mx.d.test\nmax_age: 1\n",
                  mtasts.HOST_MISMATCH, "mx.d.test", "192.0.2.1")
    report.flush()
    yesterday = day_of(now[0])
    now[0] += 86400
    later = TlsReport(str(tmp_path), "relay.test", "postmaster@relay.test",
                      clock=lambda: now[0], flush_seconds=0.05)
    later.load()
    task = asyncio.ensure_future(later.run())
    path = tmp_path / yesterday / "d.test.json"

    async def written() -> bool:
        return path.exists()

    await eventually(written)
    later.record("d.test", "")
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)
    got = json.loads(path.read_text())
    assert got["policies"][0]["failure-details"][0]["result-type"] == "certificate-host-mismatch"
    counts = json.loads((tmp_path / "counts.json").read_text())
    assert list(counts) == [day_of(now[0])]
    assert counts[day_of(now[0])]["d.test"]["success"] == 1


# --- DANE first -----------------------------------------------------------------------

def _peer_certificate(port: int, address: str, name: str) -> bytes:
    """The certificate (DER) the MX at ``address`` presents after STARTTLS."""
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    with smtplib.SMTP(address, port, timeout=10) as client:
        client.starttls(context=ctx)
        sock = client.sock
        assert isinstance(sock, ssl.SSLSocket)
        der = sock.getpeercert(binary_form=True)
    assert der
    return der


async def test_dane_records_decide_before_an_enforce_policy(
        tls_relay: TlsRelay, mx_sinks: MxSinks, dns: DnsServer,  # noqa: F811
        policies: PolicyServer, tmp_path: Path) -> None:
    """An MX whose certificate no trusted CA issued, and that an enforce policy does not
    list (which alone defers it), but with a validated TLSA record matching its
    certificate: DANE decides (RFC 8461 §2), the mail is delivered, MTA-STS counts
    nothing."""
    der = await asyncio.to_thread(_peer_certificate, mx_sinks.port, "127.0.0.3",
                                  "mx.self.test")
    dns.zone[f"_{mx_sinks.port}._tcp.mx.self.test"] = {
        "TLSA": [f"3 0 1 {hashlib.sha256(der).hexdigest()}"]}
    dns.secure = True
    publish(dns, policies, "self.test", "enforce", mx=("mx.elsewhere.test",))
    relay = await _relay(tls_relay, policies, tmp_path, dane="on")
    await _delivered(relay, mx_sinks, "untrusted")
    assert _tls(relay, "dane") == 1 and _tls(relay, "refused") == 0
    assert _sts(relay, "enforce", "success") == 0
    assert _sts(relay, "enforce", "validation-failure") == 0
