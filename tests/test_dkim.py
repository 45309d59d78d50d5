"""relayd.dkim.signature: keys, selectors, DNS records, and signatures that dkimpy verifies.

dkimpy verifies RSA with its own pure-Python code, independent of ``cryptography``.
For Ed25519 it needs PyNaCl, which is not a dependency here: a small stand-in for
the three names dkimpy uses is backed by ``cryptography``, and is itself checked
against the published example of RFC 8463 (Appendix A).
"""

from __future__ import annotations

import base64
import hashlib
import re
import types
from collections.abc import Callable, Iterator

import dkim
import pytest
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519, rsa
from hypothesis import given, settings
from hypothesis import strategies as st

from relayd.dkim import signature as rd

NOW = 1_700_000_000  # in the past: dkimpy refuses a t= in the future
DOMAIN = "example.com"

BASE = (
    b"From: Alice <alice@example.com>\r\n"
    b"To: bob@example.org\r\n"
    b"Subject: Hello\r\n"
    b"Date: Tue, 14 Nov 2023 22:13:20 +0000\r\n"
    b"Message-ID: <1@example.com>\r\n"
    b"X-Mailer: test\r\n"
    b"\r\n"
    b"Hello Bob,\r\n"
    b"\r\n"
    b"See you.\r\n"
)


# --- an Ed25519 stand-in for PyNaCl, for dkimpy ---------------------------------


class _NaclValueError(ValueError):
    """The stand-in's nacl.exceptions.ValueError."""


class _BadSignatureError(Exception):
    """The stand-in's nacl.exceptions.BadSignatureError."""


class _VerifyKey:
    """The stand-in's nacl.signing.VerifyKey: only what dkimpy calls."""

    def __init__(self, key: bytes, encoder: object = None) -> None:
        try:
            self._key = ed25519.Ed25519PublicKey.from_public_bytes(base64.b64decode(key))
        except ValueError as exc:
            raise _NaclValueError(str(exc)) from exc

    def verify(self, message: bytes, signature: bytes) -> bytes:
        try:
            self._key.verify(signature, message)
        except InvalidSignature as exc:
            raise _BadSignatureError from exc
        return message


_NACL = types.SimpleNamespace(
    signing=types.SimpleNamespace(VerifyKey=_VerifyKey),
    encoding=types.SimpleNamespace(Base64Encoder=object()),
    exceptions=types.SimpleNamespace(
        ValueError=_NaclValueError, BadSignatureError=_BadSignatureError
    ),
)


@pytest.fixture(scope="module", autouse=True)
def _nacl_for_dkimpy() -> Iterator[None]:
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(dkim, "nacl", _NACL, raising=False)
        yield


# --- keys, signers and a fake DNS ------------------------------------------------


@pytest.fixture(scope="module")
def rsa_pem() -> bytes:
    return rd.generate_private_key("rsa")


@pytest.fixture(scope="module")
def ed_pem() -> bytes:
    return rd.generate_private_key("ed25519")


@pytest.fixture(scope="module")
def rsa_signer(rsa_pem: bytes) -> rd.Signer:
    return rd.Signer(DOMAIN, rd.new_selector(NOW, "aaaa0001"), rsa_pem)


@pytest.fixture(scope="module")
def ed_signer(ed_pem: bytes) -> rd.Signer:
    return rd.Signer(DOMAIN, rd.new_selector(NOW, "bbbb0002"), ed_pem)


@pytest.fixture(scope="module")
def dns(
    rsa_signer: rd.Signer, ed_signer: rd.Signer, rsa_pem: bytes, ed_pem: bytes
) -> Callable[..., bytes | None]:
    records = {
        f"{rd.dns_name(rsa_signer.selector, DOMAIN)}.".encode(): rd.dns_txt_value(
            "rsa", rd.public_key_b64(rsa_pem)
        ).encode(),
        f"{rd.dns_name(ed_signer.selector, DOMAIN)}.".encode(): rd.dns_txt_value(
            "ed25519", rd.public_key_b64(ed_pem)
        ).encode(),
    }

    def dnsfunc(name: bytes, timeout: int = 5) -> bytes | None:
        return records.get(name)

    return dnsfunc


def verifies(message: bytes, dns: Callable[..., bytes | None], idx: int = 0) -> bool:
    """True when dkimpy verifies the idx-th DKIM-Signature of ``message``."""
    try:
        return bool(dkim.DKIM(message).verify(idx=idx, dnsfunc=dns))
    except dkim.DKIMException:
        return False


def tags(header: bytes) -> dict[str, str]:
    """The tag=value pairs of a DKIM-Signature header, white space removed."""
    value = re.sub(r"\s+", "", header.decode().partition(":")[2])
    return dict(item.split("=", 1) for item in value.split(";") if item)


# --- keys and DNS records -----------------------------------------------------------


def test_rsa_key_is_2048_bit_pkcs8(rsa_pem: bytes) -> None:
    """An RSA key is PKCS#8 PEM, 2048 bits, public exponent 65537."""
    assert rsa_pem.startswith(b"-----BEGIN PRIVATE KEY-----")
    key = serialization.load_pem_private_key(rsa_pem, password=None)
    assert isinstance(key, rsa.RSAPrivateKey)
    assert key.key_size == 2048
    assert key.public_key().public_numbers().e == 65537


def test_ed25519_key_is_pkcs8(ed_pem: bytes) -> None:
    """An Ed25519 key is PKCS#8 PEM."""
    assert ed_pem.startswith(b"-----BEGIN PRIVATE KEY-----")
    key = serialization.load_pem_private_key(ed_pem, password=None)
    assert isinstance(key, ed25519.Ed25519PrivateKey)


def test_unknown_algorithm_is_refused() -> None:
    """Asking for a key of an unknown algorithm raises ValueError."""
    with pytest.raises(ValueError, match="unknown DKIM key algorithm"):
        rd.generate_private_key("dsa")


def test_rsa_public_key_is_subject_public_key_info(rsa_pem: bytes) -> None:
    """The RSA p= value is the base64 DER SubjectPublicKeyInfo of the key."""
    public = serialization.load_der_public_key(base64.b64decode(rd.public_key_b64(rsa_pem)))
    private = serialization.load_pem_private_key(rsa_pem, password=None)
    assert isinstance(public, rsa.RSAPublicKey) and isinstance(private, rsa.RSAPrivateKey)
    assert public.public_numbers() == private.public_key().public_numbers()


def test_ed25519_public_key_matches_rfc8463() -> None:
    """The Ed25519 p= value is the raw 32-byte key, as in RFC 8463 Appendix A."""
    seed = base64.b64decode("nWGxne/9WmC6hEr0kuwsxERJxWl7MmkZcDusAxyuf2A=")
    pem = ed25519.Ed25519PrivateKey.from_private_bytes(seed).private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    assert rd.public_key_b64(pem) == "11qYAYKxCrfVS/7TyWQHOg7hcvPapiMlrwIaaPcHURo="


def test_dns_txt_value_names_the_key_type() -> None:
    """The TXT value is v=DKIM1, the key type and the public key."""
    assert rd.dns_txt_value("rsa", "QUJD") == "v=DKIM1; k=rsa; p=QUJD"
    assert rd.dns_txt_value("ed25519", "QUJD") == "v=DKIM1; k=ed25519; p=QUJD"


def test_dns_txt_strings_fit_character_strings(rsa_pem: bytes) -> None:
    """An RSA-2048 record is cut into character-strings of at most 255 bytes that rejoin."""
    value = rd.dns_txt_value("rsa", rd.public_key_b64(rsa_pem))
    parts = rd.dns_txt_strings(value)
    assert len(parts) == 2 and all(len(p) <= 255 for p in parts)
    assert "".join(parts) == value


def test_dns_name_is_under_domainkey() -> None:
    """The record is published at <selector>._domainkey.<domain>."""
    assert rd.dns_name("s1", "example.com") == "s1._domainkey.example.com"


# --- selectors -------------------------------------------------------------------


def test_selector_has_date_and_token() -> None:
    """A selector is rd, the UTC date of ``now``, a hyphen and the token."""
    assert rd.new_selector(1_795_219_200, "0a1b2c3d") == "rd20261121-0a1b2c3d"


def test_selectors_are_unique_valid_dns_labels() -> None:
    """Selectors made with fresh random tokens on the same day are distinct DNS labels."""
    selectors = {rd.new_selector(NOW, rd.selector_token()) for _ in range(1000)}
    assert len(selectors) == 1000
    label = re.compile(r"[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?\Z")
    assert all(label.match(s) for s in selectors)


def test_selector_token_reads_the_given_source() -> None:
    """The selector token is drawn from the random source passed in."""
    assert rd.selector_token(lambda n: bytes(range(n))) == "0001020304"


@pytest.mark.parametrize("token", ["", "Ab", "a.b", "a_b", "-a", "x" * 60])
def test_selector_refuses_bad_token(token: str) -> None:
    """A token that is not lowercase alphanumeric, or too long for a label, is refused."""
    with pytest.raises(ValueError):
        rd.new_selector(NOW, token)


# --- the signer ----------------------------------------------------------------------


def test_signer_reads_algorithm_from_key(rsa_signer: rd.Signer, ed_signer: rd.Signer) -> None:
    """The signer's algorithm comes from the key it is given."""
    assert (rsa_signer.algorithm, ed_signer.algorithm) == ("rsa", "ed25519")


@pytest.mark.parametrize("domain", ["localhost", "exa mple.com", "ex;ample.com", "bücher.de"])
def test_signer_refuses_bad_domain(domain: str, ed_pem: bytes) -> None:
    """A domain that is not an ASCII DNS name cannot go into d=."""
    with pytest.raises(ValueError):
        rd.Signer(domain, "s1", ed_pem)


def test_rsa_signature_verifies(rsa_signer: rd.Signer, dns: Callable[..., bytes | None]) -> None:
    """An rsa-sha256 signature of a plain message verifies with dkimpy."""
    assert verifies(rsa_signer.sign(BASE, NOW) + BASE, dns)


def test_ed25519_signature_verifies(ed_signer: rd.Signer, dns: Callable[..., bytes | None]) -> None:
    """An ed25519-sha256 signature of a plain message verifies with dkimpy."""
    assert verifies(ed_signer.sign(BASE, NOW) + BASE, dns)


def test_nacl_stand_in_verifies_rfc8463_example() -> None:
    """The Ed25519 stand-in lets dkimpy verify the signed example of RFC 8463."""
    message = (
        b"DKIM-Signature: v=1; a=ed25519-sha256; c=relaxed/relaxed;\r\n"
        b" d=football.example.com; i=@football.example.com;\r\n"
        b" q=dns/txt; s=brisbane; t=1528637909; h=from : to :\r\n"
        b" subject : date : message-id : from : subject : date;\r\n"
        b" bh=2jUSOH9NhtVGCQWNr9BrIAPreKQjO6Sn7XIkfJVOzv8=;\r\n"
        b" b=/gCrinpcQOoIfuHNQIbq4pgh9kyIK3AQUdt9OdqQehSwhEIug4D11Bus\r\n"
        b" Fa3bT3FY5OsU7ZbnKELq+eXdp1Q1Dw==\r\n"
        b"From: Joe SixPack <joe@football.example.com>\r\n"
        b"To: Suzie Q <suzie@shopping.example.net>\r\n"
        b"Subject: Is dinner ready?\r\n"
        b"Date: Fri, 11 Jul 2003 21:00:37 -0700 (PDT)\r\n"
        b"Message-ID: <20030712040037.46341.5F8J@football.example.com>\r\n"
        b"\r\n"
        b"Hi.\r\n\r\nWe lost the game.  Are you hungry yet?\r\n\r\nJoe.\r\n"
    )
    record = b"v=DKIM1; k=ed25519; p=11qYAYKxCrfVS/7TyWQHOg7hcvPapiMlrwIaaPcHURo="
    assert verifies(message, lambda name, timeout=5: record)
    assert not verifies(message.replace(b"Joe.", b"Jim."), lambda name, timeout=5: record)


def test_header_has_the_expected_tags(rsa_signer: rd.Signer) -> None:
    """The header carries v, a, c=relaxed/relaxed, d, s, t=now, h, bh and b."""
    header = rsa_signer.sign(BASE, NOW)
    assert header.startswith(b"DKIM-Signature: ") and header.endswith(b"\r\n")
    got = tags(header)
    assert list(got) == ["v", "a", "c", "d", "s", "t", "h", "bh", "b"]
    assert got["a"] == "rsa-sha256" and got["c"] == "relaxed/relaxed"
    assert (got["d"], got["s"], got["t"]) == (DOMAIN, rsa_signer.selector, str(NOW))
    assert len(base64.b64decode(got["b"])) == 256


def test_header_lines_fit_78_columns(rsa_signer: rd.Signer) -> None:
    """Every line of the folded signature header fits in 78 characters, CRLF-separated."""
    header = rsa_signer.sign(BASE, NOW)
    lines = header[:-2].split(b"\r\n")
    assert len(lines) > 1 and all(len(line) <= 78 for line in lines)
    assert all(line[:1] == b" " for line in lines[1:])
    assert b"\n" not in header.replace(b"\r\n", b"")


def test_h_lists_present_signed_headers_and_oversigns_from(ed_signer: rd.Signer) -> None:
    """h= lists the signed fields present, and from once more than it occurs."""
    got = tags(ed_signer.sign(BASE, NOW))
    assert got["h"] == "from:to:subject:date:message-id:from"


def test_repeated_field_is_listed_per_occurrence(
    rsa_signer: rd.Signer, dns: Callable[..., bytes | None]
) -> None:
    """A field that occurs twice is listed twice in h=, and the signature verifies."""
    message = b"Cc: a@x.org\r\n" + BASE.replace(b"X-Mailer", b"cc: b@x.org\r\nX-Mailer")
    header = rsa_signer.sign(message, NOW)
    assert tags(header)["h"].split(":").count("cc") == 2
    assert verifies(header + message, dns)


def test_header_names_in_any_case(ed_signer: rd.Signer, dns: Callable[..., bytes | None]) -> None:
    """Header names in upper or mixed case are signed under their lowercase name."""
    message = BASE.replace(b"From:", b"FROM:").replace(b"Subject:", b"sUbJeCt:")
    header = ed_signer.sign(message, NOW)
    assert tags(header)["h"] == "from:to:subject:date:message-id:from"
    assert verifies(header + message, dns)


def test_folded_headers_verify(rsa_signer: rd.Signer, dns: Callable[..., bytes | None]) -> None:
    """Folded header fields with tabs and trailing white space verify."""
    message = BASE.replace(
        b"Subject: Hello\r\n", b"Subject:   Hello \t\r\n\tthere,\r\n    world  \r\n"
    ).replace(b"To: bob@example.org", b"To: bob@example.org,\r\n carol@example.org")
    assert verifies(rsa_signer.sign(message, NOW) + message, dns)


def test_relaxed_header_form() -> None:
    """Header fields are lowercased, unfolded, white space compressed and trimmed."""
    prepared = rd.prepare(b"SUBJECT \t:  a \t b\r\n\t c  \r\nTo:x\r\n\r\nbody\r\n")
    assert prepared.h_names == ("subject", "to", "from")
    assert prepared.header_data == b"subject:a b c\r\nto:x\r\n"


def test_empty_body_verifies(ed_signer: rd.Signer, dns: Callable[..., bytes | None]) -> None:
    """A message with an empty body verifies, with bh= the hash of the empty string."""
    message = BASE.split(b"\r\n\r\n")[0] + b"\r\n\r\n"
    header = ed_signer.sign(message, NOW)
    assert tags(header)["bh"] == base64.b64encode(hashlib.sha256(b"").digest()).decode()
    assert verifies(header + message, dns)


def test_message_without_body_separator_verifies(
    rsa_signer: rd.Signer, dns: Callable[..., bytes | None]
) -> None:
    """A message of header fields only, with no blank line, verifies."""
    message = BASE.split(b"\r\n\r\n")[0] + b"\r\n"
    assert verifies(rsa_signer.sign(message, NOW) + message, dns)


def test_blank_lines_at_end_of_body_are_ignored(ed_signer: rd.Signer) -> None:
    """Empty and white-space-only lines at the end of the body do not change bh=."""
    padded = BASE + b"\r\n \r\n\t\r\n\r\n"
    assert tags(ed_signer.sign(padded, NOW))["bh"] == tags(ed_signer.sign(BASE, NOW))["bh"]


def test_body_without_final_crlf_verifies(
    rsa_signer: rd.Signer, dns: Callable[..., bytes | None]
) -> None:
    """A body whose last line has no CRLF verifies, as sent and with the CRLF the wire adds."""
    message = BASE + b"Bye"
    header = rsa_signer.sign(message, NOW)
    assert verifies(header + message, dns)
    assert verifies(header + message + b"\r\n", dns)


def test_unterminated_last_line_with_trailing_space_verifies_as_sent(
    ed_signer: rd.Signer, dns: Callable[..., bytes | None]
) -> None:
    """An unterminated last line ending in white space verifies as the wire carries it."""
    message = BASE + b"Bye \t"
    assert verifies(ed_signer.sign(message, NOW) + message + b"\r\n", dns)


def test_trailing_whitespace_in_body_lines_verifies(
    rsa_signer: rd.Signer, dns: Callable[..., bytes | None]
) -> None:
    """Body lines with trailing spaces and tabs, and inner runs of white space, verify."""
    message = BASE + b"one  \r\ntwo\t\t\r\n  three \t four\r\n \r\n"
    header = rsa_signer.sign(message, NOW)
    assert verifies(header + message, dns)
    clean = BASE + b"one\r\ntwo\r\n three four\r\n"
    assert tags(header)["bh"] == tags(rsa_signer.sign(clean, NOW))["bh"]


def test_bare_lf_is_signed_as_the_wire_carries_it(
    ed_signer: rd.Signer, dns: Callable[..., bytes | None]
) -> None:
    """A message with bare LF line endings is signed as it will be sent: with CRLF."""
    message = BASE.replace(b"\r\n", b"\n")
    header = ed_signer.sign(message, NOW)
    assert header == ed_signer.sign(BASE, NOW)
    assert verifies(header + BASE, dns)


def test_eight_bit_headers_and_body_verify(
    rsa_signer: rd.Signer, dns: Callable[..., bytes | None]
) -> None:
    """UTF-8 in a header field and in the body (SMTPUTF8, 8BITMIME) is signed as bytes."""
    message = BASE.replace(b"Subject: Hello", "Subject: Grüße \t aus Köln".encode()) + (
        "Ça va ?  \r\n".encode()
    )
    assert verifies(rsa_signer.sign(message, NOW) + message, dns)


def test_dual_signing_both_verify(
    rsa_signer: rd.Signer, ed_signer: rd.Signer, dns: Callable[..., bytes | None]
) -> None:
    """RSA and Ed25519 signatures of the same original message both verify."""
    first = ed_signer.sign(BASE, NOW)
    second = rsa_signer.sign(first + BASE, NOW)  # a prior signature is never signed
    assert second.split(b"b=")[0] == rsa_signer.sign(BASE, NOW).split(b"b=")[0]
    message = second + first + BASE
    assert verifies(message, dns, idx=0) and verifies(message, dns, idx=1)


def test_signature_headers_signs_once_for_all(
    rsa_signer: rd.Signer, ed_signer: rd.Signer, dns: Callable[..., bytes | None]
) -> None:
    """signature_headers returns one header per signer, each verifying."""
    headers = rd.signature_headers([ed_signer, rsa_signer], BASE, NOW)
    assert headers.startswith(ed_signer.sign(BASE, NOW))  # Ed25519 is deterministic
    assert headers.count(b"DKIM-Signature:") == 2
    assert verifies(headers + BASE, dns, idx=0) and verifies(headers + BASE, dns, idx=1)


def test_sign_many_answers_each_job_in_order(
    rsa_signer: rd.Signer, ed_signer: rd.Signer, dns: Callable[..., bytes | None]
) -> None:
    """sign_many gives every job its own headers, in job order; a failing job fails alone."""

    class Broken:
        def _unsigned(self, prepared: object, now: int) -> tuple[str, bytes, int]:
            raise ValueError("bad key")

    messages = [BASE + b"n=%d\r\n" % i for i in range(3)]
    jobs: list[rd.SignJob] = [([ed_signer, rsa_signer], messages[0], NOW),
                              ([Broken()], messages[1], NOW),  # type: ignore[list-item]
                              ([ed_signer], messages[2], NOW)]
    first, broken, last = rd.sign_many(jobs)
    assert isinstance(broken, ValueError)
    assert isinstance(first, bytes) and isinstance(last, bytes)
    assert first.startswith(rd.signature_headers([ed_signer], messages[0], NOW))
    assert verifies(first + messages[0], dns, idx=0) and verifies(first + messages[0], dns, idx=1)
    assert last == rd.signature_headers([ed_signer], messages[2], NOW)
    assert rd.sign_many([]) == []


def test_tampered_body_fails(rsa_signer: rd.Signer, dns: Callable[..., bytes | None]) -> None:
    """Changing one word of the body makes verification fail."""
    header = rsa_signer.sign(BASE, NOW)
    assert not verifies(header + BASE.replace(b"See you", b"See yuo"), dns)


def test_tampered_signed_header_fails(
    ed_signer: rd.Signer, dns: Callable[..., bytes | None]
) -> None:
    """Changing a signed header field makes verification fail."""
    header = ed_signer.sign(BASE, NOW)
    assert not verifies(header + BASE.replace(b"Subject: Hello", b"Subject: Hullo"), dns)


def test_added_from_field_fails(rsa_signer: rd.Signer, dns: Callable[..., bytes | None]) -> None:
    """A From field added after signing makes verification fail (oversigning)."""
    header = rsa_signer.sign(BASE, NOW)
    forged = BASE.replace(b"X-Mailer: test\r\n", b"X-Mailer: test\r\nFrom: eve@evil.example\r\n")
    assert not verifies(header + forged, dns)


def test_unsigned_field_may_change(ed_signer: rd.Signer, dns: Callable[..., bytes | None]) -> None:
    """Changing or adding a field outside the signed set keeps the signature valid."""
    header = ed_signer.sign(BASE, NOW)
    changed = b"Received: by mx.example.net\r\n" + BASE.replace(b"X-Mailer: test", b"X-Mailer: x")
    assert verifies(header + changed, dns)


# --- property ------------------------------------------------------------------------

_TEXT = st.text(st.characters(min_codepoint=0x20, max_codepoint=0x7E) | st.just("\t"), max_size=40)
_NAMES = st.sampled_from([*rd.SIGNED_HEADERS, "x-custom", "received", "keywords"]).flatmap(
    lambda n: st.sampled_from([n, n.upper(), n.title()])
)
_FIELD = st.tuples(
    _NAMES, st.lists(_TEXT, min_size=1, max_size=3), st.sampled_from(["\r\n ", "\r\n\t"])
).map(lambda f: f"{f[0]}:{f[2].join(f[1])}\r\n")
_BODY = st.tuples(st.lists(_TEXT, max_size=8), st.booleans()).map(
    lambda b: "\r\n".join(b[0]) + ("\r\n" if b[1] else "")
)


@settings(max_examples=150, deadline=None)
@given(fields=st.lists(_FIELD, min_size=1, max_size=8), body=_BODY)
def test_any_printable_message_verifies(
    fields: list[str], body: str, rsa_signer: rd.Signer, dns: Callable[..., bytes | None]
) -> None:
    """Any message of printable ASCII fields and body verifies with dkimpy as sent."""
    message = ("".join(fields) + "\r\n" + body).encode("ascii")
    sent = message if message.endswith(b"\r\n") else message + b"\r\n"
    assert verifies(rsa_signer.sign(message, NOW) + sent, dns)


def test_relaxed_body_hash_matches_a_plain_reference() -> None:
    """The body hash (hashed in place when the body is already relaxed, rewritten when
    not) equals the relaxed form computed the obvious way, with and without crlf_only."""
    import base64
    import hashlib
    import random
    import re

    def reference(body: bytes) -> str:
        body = re.sub(rb"[ \t]+", b" ", body).replace(b" \r\n", b"\r\n").rstrip(b"\r\n")
        if body:
            body += b"\r\n"
        return base64.b64encode(hashlib.sha256(body).digest()).decode("ascii")

    rng = random.Random(11)
    head = BASE.split(b"\r\n\r\n", 1)[0] + b"\r\n\r\n"
    pieces = [b"a", b"bc", b" ", b"  ", b"\t", b"x y", b""]
    for _ in range(1500):
        lines = [b"".join(rng.choice(pieces) for _ in range(rng.randint(0, 5)))
                 for _ in range(rng.randint(0, 6))]
        body = b"\r\n".join(lines) + b"\r\n" * rng.randint(0, 3)
        message = head + body
        # prepare() ends an unterminated last line with CRLF, as the wire will
        want = reference(body if body.endswith(b"\r\n") or not body else body + b"\r\n")
        assert rd.prepare(message).body_hash == want, body
        assert rd.prepare(message, crlf_only=True).body_hash == want, body
