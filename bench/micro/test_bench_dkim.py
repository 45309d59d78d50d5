"""Micro-benchmarks of DKIM signing (relayd.dkim.signature), run for every accepted message.

Target: ``Signer.sign`` of a 1 KB message costs at most 1.2x the bare RSA-2048
private-key operation on a 32-byte digest.

Run: .venv/bin/pytest bench/micro/test_bench_dkim.py --benchmark-enable -p no:cacheprovider
"""

from __future__ import annotations

import hashlib

import pytest
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ed25519, padding, rsa, utils
from pytest_benchmark.fixture import BenchmarkFixture

from relayd.dkim import signature as rd

NOW = 1_700_000_000

_HEAD = (
    b"From: Alice Example <alice@example.com>\r\n"
    b"To: Bob Example <bob@example.org>\r\n"
    b"Subject: Your order #12345 has shipped\r\n"
    b"Date: Tue, 14 Nov 2023 22:13:20 +0000\r\n"
    b"Message-ID: <20231114221320.12345@example.com>\r\n"
    b"MIME-Version: 1.0\r\n"
    b"Content-Type: text/plain; charset=utf-8\r\n"
    b"Content-Transfer-Encoding: 7bit\r\n"
    b"X-Mailer: bench\r\n"
    b"\r\n"
)
_LINE = b"Thank you for your order. It is on its way and should arrive soon.  \r\n"
MESSAGE_1K = _HEAD + _LINE * ((1024 - len(_HEAD)) // len(_LINE) + 1)


@pytest.fixture(scope="module")
def rsa_pem() -> bytes:
    return rd.generate_private_key("rsa")


@pytest.fixture(scope="module")
def ed_pem() -> bytes:
    return rd.generate_private_key("ed25519")


def test_message_is_about_1kb() -> None:
    """The benchmark message is 1 KB, give or take one line."""
    assert 1024 <= len(MESSAGE_1K) < 1024 + len(_LINE)


def test_bare_rsa2048_sign_digest(benchmark: BenchmarkFixture, rsa_pem: bytes) -> None:
    """Baseline: one RSA-2048 PKCS#1 v1.5 signature of a 32-byte SHA-256 digest."""
    key = serialization.load_pem_private_key(rsa_pem, password=None)
    assert isinstance(key, rsa.RSAPrivateKey)
    digest = hashlib.sha256(b"x").digest()
    benchmark(key.sign, digest, padding.PKCS1v15(), utils.Prehashed(hashes.SHA256()))


def test_signer_sign_rsa_1kb(benchmark: BenchmarkFixture, rsa_pem: bytes) -> None:
    """Signer.sign (rsa-sha256) of a 1 KB message: canonicalization, hashes, signature."""
    signer = rd.Signer("example.com", "rd20231114-bench", rsa_pem)
    benchmark(signer.sign, MESSAGE_1K, NOW)


def test_bare_ed25519_sign_digest(benchmark: BenchmarkFixture, ed_pem: bytes) -> None:
    """Baseline: one Ed25519 signature of a 32-byte digest."""
    key = serialization.load_pem_private_key(ed_pem, password=None)
    assert isinstance(key, ed25519.Ed25519PrivateKey)
    benchmark(key.sign, hashlib.sha256(b"x").digest())


def test_signer_sign_ed25519_1kb(benchmark: BenchmarkFixture, ed_pem: bytes) -> None:
    """Signer.sign (ed25519-sha256) of a 1 KB message."""
    signer = rd.Signer("example.com", "rd20231114-bench", ed_pem)
    benchmark(signer.sign, MESSAGE_1K, NOW)


def test_prepare_1kb(benchmark: BenchmarkFixture) -> None:
    """Canonicalization and body hash alone (shared by every signer of a message)."""
    benchmark(rd.prepare, MESSAGE_1K)


def test_dual_sign_1kb(benchmark: BenchmarkFixture, rsa_pem: bytes, ed_pem: bytes) -> None:
    """RSA and Ed25519 signatures of one 1 KB message, canonicalized once."""
    signers = [
        rd.Signer("example.com", "rd20231114-rsa", rsa_pem),
        rd.Signer("example.com", "rd20231114-ed", ed_pem),
    ]
    benchmark(rd.signature_headers, signers, MESSAGE_1K, NOW)
