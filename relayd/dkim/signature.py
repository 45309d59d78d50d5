"""DKIM keys and signatures (RFC 6376, RFC 8301, RFC 8463), signed with ``cryptography``.

Owns: generating a domain's DKIM key pair, the selector naming scheme, the DNS
TXT record to publish, and signing an accepted message: relaxed/relaxed
canonicalization (RFC 6376 §3.4.2, §3.4.4), the body hash and the complete
``DKIM-Signature`` header field to prepend to the message; and, in cluster mode,
sealing a private key before it is stored in the shared database (AES-256-GCM with a
key from the node's configuration, never stored there: :func:`seal_key`,
:func:`open_key`).

Cost: ``Signer.sign`` is pure CPU and runs for every accepted message, so it
never runs on the main event loop (relayd.dkim.signing: a child process, or a
thread). It is the private-key operation plus a small part linear in the
message: canonicalization with bytes methods (a regex only for messages with
bare LF or CR; no ``email`` parsing) and the header, whose folded layout a
signer keeps per h= list so that only t= and bh= are filled in. The key is
loaded once, when the ``Signer`` is built. Dual signing canonicalizes once
(``signature_headers``); ``sign_many`` signs a batch with the private-key
operations back to back, which keeps the bignum code in the CPU caches.
bench/micro/test_bench_dkim.py measures it against the bare RSA operation
(figures: bench/NOTES.md).

Untrusted input: the message bytes (headers and body as submitted by an SMTP
client): any size, any bytes, header names in any case, folded or malformed
header lines, tabs, trailing white space, no body, no final CRLF. Nothing in
them can fail signing: a header line without a colon is simply not signed.
The message is read as the wire will carry it to the next hop (as a client
that normalises line endings sends DATA): a lone LF or CR counts as CRLF,
and a message that does not end with CRLF gets one. Signing that view, and
not the raw bytes, is what makes a last body line with trailing white space
verify at the receiver.

Signed header fields: those present among ``SIGNED_HEADERS``, each listed as many
times as it occurs (bottom-up, RFC 6376 §5.4.2); ``from`` is listed once more
than it occurs (oversigning), so a From field added later breaks the signature.
DKIM-Signature fields are never signed, so a second signer signs the original
message whether or not the first signature has been prepended yet.

Purity: no I/O, no clock, no randomness read here, with one exception:
``generate_private_key`` draws from the OpenSSL CSPRNG (``cryptography`` takes
no random source). The time (``now``) and the selector token are parameters;
``selector_token`` takes the random source as an argument.

Settings read: none (the caller passes the domain, its selector and its key).
See also: relayd.controlplane.domains (domain add/delete: key and selector), relayd.smtp.server
(signs at acceptance, before queueing), SEMANTICS.md §2, RFC 6376, RFC 8463.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import itertools
import re
import secrets
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ed25519, padding, rsa
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

__all__ = [
    "ALGORITHMS",
    "SIGNED_HEADERS",
    "Prepared",
    "SealError",
    "Signer",
    "dns_name",
    "dns_txt_strings",
    "dns_txt_value",
    "generate_private_key",
    "key_algorithm",
    "new_selector",
    "open_key",
    "prepare",
    "public_key_b64",
    "seal_key",
    "selector_token",
    "sign_many",
    "signature_headers",
]

#: Key algorithms relayd generates and signs with.
ALGORITHMS = ("rsa", "ed25519")

#: Header fields signed when present; ``h=`` lists them in message order.
SIGNED_HEADERS = (
    "from",
    "to",
    "cc",
    "subject",
    "date",
    "message-id",
    "reply-to",
    "in-reply-to",
    "references",
    "mime-version",
    "content-type",
    "content-transfer-encoding",
    "list-unsubscribe",
    "list-unsubscribe-post",
)
_SIGNED_NAMES = {name.encode("ascii"): name for name in SIGNED_HEADERS}

_RSA_BITS = 2048
_RSA_MIN_BITS = 1024  # RFC 8301 §3.2: verifiers need not accept smaller keys
_MAX_LINE = 78  # folded header lines stay within this many characters
_FOLD = "\r\n "
_FOLD_B = b"\r\n "
_LAYOUTS_MAX = 64  # h= lists whose folded layout a signer keeps (Signer._layout)

# Line endings as the wire carries them: CRLF, or a lone LF or CR (made CRLF).
_LINE_END = re.compile(rb"\r\n|\n|\r")
_LABEL = re.compile(r"[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?\Z")
_TOKEN = re.compile(r"[a-z0-9]+\Z")


_SEALED = b"rdk1"  # the format of a sealed key: tag, 12-byte nonce, AES-GCM output


class SealError(ValueError):
    """A sealed key that the configured key cannot open (another key, or damaged)."""


def seal_key(key: bytes, private_pem: bytes) -> bytes:
    """``private_pem`` encrypted and authenticated with the 32-byte ``key``."""
    nonce = secrets.token_bytes(12)
    return _SEALED + nonce + AESGCM(key).encrypt(nonce, private_pem, _SEALED)


def open_key(key: bytes, sealed: bytes) -> bytes:
    """The private key that :func:`seal_key` sealed; SealError if ``key`` cannot open it."""
    if not sealed.startswith(_SEALED) or len(sealed) < len(_SEALED) + 12 + 16:
        raise SealError("not a sealed DKIM key")
    nonce = sealed[len(_SEALED):len(_SEALED) + 12]
    try:
        return AESGCM(key).decrypt(nonce, sealed[len(_SEALED) + 12:], _SEALED)
    except InvalidTag:
        raise SealError("what the cluster database holds sealed cannot be opened with this"
                        " node's key (another key than the other nodes'?)") from None


def generate_private_key(algorithm: str) -> bytes:
    """A new private key, PKCS#8 PEM: ``"rsa"`` (2048 bits, e=65537) or ``"ed25519"``."""
    key: rsa.RSAPrivateKey | ed25519.Ed25519PrivateKey
    if algorithm == "rsa":
        key = rsa.generate_private_key(public_exponent=65537, key_size=_RSA_BITS)
    elif algorithm == "ed25519":
        key = ed25519.Ed25519PrivateKey.generate()
    else:
        raise ValueError(f"unknown DKIM key algorithm {algorithm!r}; expected one of {ALGORITHMS}")
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def _load(private_pem: bytes) -> tuple[str, rsa.RSAPrivateKey | ed25519.Ed25519PrivateKey]:
    """The algorithm name and key object of a PEM private key we can sign with."""
    key = serialization.load_pem_private_key(private_pem, password=None)
    if isinstance(key, rsa.RSAPrivateKey):
        if key.key_size < _RSA_MIN_BITS:
            raise ValueError(f"RSA key of {key.key_size} bits is too small for DKIM")
        return "rsa", key
    if isinstance(key, ed25519.Ed25519PrivateKey):
        return "ed25519", key
    raise ValueError(f"unsupported DKIM key type {type(key).__name__}")


def key_algorithm(private_pem: bytes) -> str:
    """``"rsa"`` or ``"ed25519"``: the algorithm of a PEM private key (ValueError: neither)."""
    return _load(private_pem)[0]


def public_key_b64(private_pem: bytes) -> str:
    """The ``p=`` value: base64 SubjectPublicKeyInfo (RSA) or raw 32-byte key (Ed25519)."""
    _, key = _load(private_pem)
    if isinstance(key, rsa.RSAPrivateKey):
        der = key.public_key().public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    else:
        der = key.public_key().public_bytes(
            serialization.Encoding.Raw, serialization.PublicFormat.Raw
        )
    return base64.b64encode(der).decode("ascii")


def selector_token(randbytes: Callable[[int], bytes] = secrets.token_bytes) -> str:
    """A random selector token (10 hex digits) drawn from ``randbytes``."""
    return randbytes(5).hex()


def new_selector(now: int, token: str) -> str:
    """The selector ``rdYYYYMMDD-<token>`` for a key made at ``now`` (UTC epoch seconds)."""
    if now < 0:
        raise ValueError("now must be seconds since the epoch")
    if not _TOKEN.match(token):
        raise ValueError("selector token must be lowercase letters and digits")
    day = datetime.fromtimestamp(now, tz=UTC).strftime("%Y%m%d")
    selector = f"rd{day}-{token}"
    if not _LABEL.match(selector):
        raise ValueError("selector token too long for a DNS label")
    return selector


def dns_name(selector: str, domain: str) -> str:
    """The DNS name the key record is published at: ``<selector>._domainkey.<domain>``."""
    return f"{selector}._domainkey.{domain}"


def dns_txt_value(algorithm: str, public_b64: str) -> str:
    """The key record's TXT value: ``v=DKIM1; k=<algorithm>; p=<public_b64>``."""
    if algorithm not in ALGORITHMS:
        raise ValueError(f"unknown DKIM key algorithm {algorithm!r}; expected one of {ALGORITHMS}")
    return f"v=DKIM1; k={algorithm}; p={public_b64}"


def dns_txt_strings(value: str) -> list[str]:
    """``value`` cut into DNS character-strings of at most 255 bytes (an RSA record needs 2)."""
    return [value[i : i + 255] for i in range(0, len(value), 255)] or [""]


def _check_domain(domain: str) -> str:
    """``domain`` lowercased, if it is an ASCII DNS name (A-labels); else ValueError."""
    name = domain.lower().rstrip(".")
    labels = name.split(".")
    if len(name) > 253 or len(labels) < 2 or not all(_LABEL.match(lab) for lab in labels):
        raise ValueError(f"not an ASCII DNS domain name: {domain!r}")
    return name


def _check_selector(selector: str) -> str:
    """``selector`` lowercased, if it is one or more DNS labels; else ValueError."""
    name = selector.lower()
    if len(name) > 253 or not all(_LABEL.match(lab) for lab in name.split(".")):
        raise ValueError(f"not a valid DKIM selector: {selector!r}")
    return name


@dataclass(frozen=True, slots=True)
class Prepared:
    """A message canonicalized for signing: the parts every signer of it shares."""

    h_names: tuple[str, ...]  # the h= list: signed field names, repeats included
    header_data: bytes  # relaxed canonical signed fields, in h= order, CRLF after each
    body_hash: str  # bh=: base64 SHA-256 of the relaxed canonical body


def _compress(data: bytes) -> bytes:
    """``data`` with every run of WSP (spaces, tabs) made one space."""
    if b"\t" in data:
        data = data.replace(b"\t", b" ")
    while b"  " in data:  # halves every run: log2(longest run) passes
        data = data.replace(b"  ", b" ")
    return data


def _relaxed_value(value: bytes) -> bytes:
    """A header field value in relaxed canonical form (unfolded, WSP compressed, trimmed)."""
    return _compress(value.replace(b"\r\n", b"")).strip(b" ")


def prepare(message: bytes, crlf_only: bool = False) -> Prepared:
    """Canonicalize ``message`` (relaxed/relaxed) for signing; cheap, shared by all signers.

    ``crlf_only``: the caller knows every CR and LF of ``message`` is in a CRLF
    pair (relayd.smtp.server refuses anything else before signing), so the three
    counts that would check it (three passes over the message) are skipped.
    """
    if not crlf_only:
        crlf = message.count(b"\r\n")
        if crlf != message.count(b"\n") or crlf != message.count(b"\r"):
            message = _LINE_END.sub(b"\r\n", message)
    if not message.endswith(b"\r\n"):
        message += b"\r\n"

    if message.startswith(b"\r\n"):  # no header at all: the body starts at once
        head, body_at = b"", 2
    else:
        end = message.find(b"\r\n\r\n")
        if end < 0:
            head, body_at = message[:-2], len(message)
        else:
            head, body_at = message[:end], end + 4

    # Relaxed header form for the whole block at once: tabs become spaces, a CRLF
    # before WSP (a fold) goes, runs of spaces become one; then one field per line.
    if b"\t" in head:
        head = head.replace(b"\t", b" ")
    head = _compress(head.replace(b"\r\n ", b" "))
    found: dict[bytes, list[bytes]] = {}  # signed name -> its fields, in message order
    for field in head.split(b"\r\n"):
        raw_name, colon, value = field.partition(b":")
        key = raw_name.rstrip(b" ").lower()
        if colon and key in _SIGNED_NAMES:
            line = key + b":" + value.strip(b" ") + b"\r\n"
            if key in found:
                found[key].append(line)
            else:
                found[key] = [line]

    names: list[str] = []
    lines: list[bytes] = []
    for key, instances in found.items():
        name = _SIGNED_NAMES[key]
        if len(instances) == 1:
            names.append(name)
            lines.append(instances[0])
        else:  # a verifier takes the last unused instance first (RFC 6376 §5.4.2)
            names.extend([name] * len(instances))
            lines.extend(reversed(instances))
    names.append("from")  # oversign: one From more than occurs, so an added From breaks it

    return Prepared(tuple(names), b"".join(lines), _relaxed_body_hash(message, body_at))


def _relaxed_body_hash(message: bytes, start: int) -> str:
    """bh= of the body at ``message[start:]`` (which ends with CRLF), relaxed form.

    Relaxed: WSP runs made one space, WSP at line ends and empty lines at the
    end dropped, one final CRLF unless empty. Most bodies are already in that
    form but for their trailing empty lines: then the body is hashed where it
    lies (no copy of a 10 MB body); otherwise it is rewritten first.
    """
    find = message.find
    if find(b"\t", start) >= 0 or find(b"  ", start) >= 0 or find(b" \r\n", start) >= 0:
        body = _compress(message[start:])
        if b" \r\n" in body:
            body = body.replace(b" \r\n", b"\r\n")
        message, start = body, 0
    end = len(message)
    while end - start >= 2 and message[end - 2] == 13 and message[end - 1] == 10:
        end -= 2  # every CR and LF is in a CRLF pair here: drop the empty lines at the end
    digest = hashlib.sha256(memoryview(message)[start:end])
    if end > start:
        digest.update(b"\r\n")
    return base64.b64encode(digest.digest()).decode("ascii")


def _fold(parts: list[str], width: int, pieces: Iterable[tuple[str, str]]) -> int:
    """Append each (separator, piece) to ``parts``, folding before one that would pass 78.

    Returns the width of the last line. A fold replaces the separator, so the
    relaxed form of the result is the pieces joined with their separators.
    """
    for sep, piece in pieces:
        size = len(sep) + len(piece)
        if width + size > _MAX_LINE:
            parts.append(_FOLD + piece)
            width = 1 + len(piece)
        else:
            parts.append(sep + piece)
            width += size
    return width


_KEY_IDS = itertools.count(1)

#: A signature field around its t= and bh= values: the field's three pieces, the
#: relaxed form's three pieces, and the width of the field's last line.
_Layout = tuple[bytes, bytes, bytes, bytes, bytes, bytes, int]


class Signer:
    """Signs messages for one domain with one key; build once per key, share across threads."""

    __slots__ = (
        "__weakref__",  # relayd.delivery.agents learns when a key is dropped
        "_hash",
        "_key",
        "_layouts",
        "_pad",
        "_prefix",
        "_prefix_width",
        "algorithm",
        "domain",
        "key_id",
        "pem",
        "selector",
    )

    def __init__(self, domain: str, selector: str, private_pem: bytes) -> None:
        """Load the key once; the algorithm (rsa or ed25519) is read from the key."""
        self.domain = _check_domain(domain)
        self.selector = _check_selector(selector)
        self.algorithm, self._key = _load(private_pem)
        self.pem = private_pem  # to hand the key to a signing process (relayd.dkim.signing)
        self.key_id = next(_KEY_IDS)  # unique in this process, never reused
        self._pad = padding.PKCS1v15()
        self._layouts: dict[tuple[tuple[str, ...], int, int], _Layout] = {}
        self._hash = hashes.SHA256()
        self._prefix = ["DKIM-Signature:"]
        self._prefix_width = _fold(
            self._prefix,
            len(self._prefix[0]),
            (
                (" ", "v=1;"),
                (" ", f"a={self.algorithm}-sha256;"),
                (" ", "c=relaxed/relaxed;"),
                (" ", f"d={self.domain};"),
                (" ", f"s={self.selector};"),
            ),
        )

    def sign(self, message: bytes, now: int) -> bytes:
        """The ``DKIM-Signature: ...\\r\\n`` header field to prepend to ``message``."""
        return self.sign_prepared(prepare(message), now)

    def sign_prepared(self, prepared: Prepared, now: int) -> bytes:
        """Like ``sign``, for a message already canonicalized by ``prepare``."""
        unsigned, data, width = self._unsigned(prepared, now)
        return self._finish(unsigned, self._private_op(data), width)

    def _unsigned(self, prepared: Prepared, now: int) -> tuple[bytes, bytes, int]:
        """The header field without its b= value, the data to sign, and its last line's width."""
        t = b"%d" % now
        bh = prepared.body_hash.encode("ascii")
        layout = self._layouts.get((prepared.h_names, len(t), len(bh)))
        if layout is None:
            layout = self._layout(prepared.h_names, len(t), len(bh))
        pre, mid, post, own_pre, own_mid, own_post, width = layout
        return (b"".join((pre, t, mid, bh, post)),
                b"".join((prepared.header_data, own_pre, t, own_mid, bh, own_post)), width)

    def _layout(self, names: tuple[str, ...], t_size: int, bh_size: int) -> _Layout:
        """The folded field around its t= and bh= values, which only these sizes move.

        Made once per h= list (a handful per sender) and kept, instead of
        building the field for every message.
        """
        t_mark, bh_mark = "\x00" * t_size, "\x01" * bh_size  # never in a field
        pieces = [(" ", f"t={t_mark};"), (" ", "h=" + names[0])]
        pieces.extend([("", ":" + name) for name in names[1:]])
        pieces[-1] = (pieces[-1][0], pieces[-1][1] + ";")
        pieces.append((" ", f"bh={bh_mark};"))
        pieces.append((" ", "b="))
        parts = self._prefix.copy()
        width = _fold(parts, self._prefix_width, pieces)  # a fold never splits a piece
        unsigned = "".join(parts).encode("ascii")
        # The signature field itself, b= empty, relaxed canonical, no final CRLF.
        own = b"dkim-signature:" + _relaxed_value(unsigned[15:])
        t_b, bh_b = t_mark.encode("ascii"), bh_mark.encode("ascii")
        pre, _, rest = unsigned.partition(t_b)
        mid, _, post = rest.partition(bh_b)
        own_pre, _, own_rest = own.partition(t_b)
        own_mid, _, own_post = own_rest.partition(bh_b)
        layout = (pre, mid, post, own_pre, own_mid, own_post, width)
        if len(self._layouts) >= _LAYOUTS_MAX:
            self._layouts.clear()
        self._layouts[(names, t_size, bh_size)] = layout
        return layout

    def _private_op(self, data: bytes) -> bytes:
        """The signature of ``data`` (the only step that needs the private key)."""
        key = self._key
        if isinstance(key, rsa.RSAPrivateKey):
            return key.sign(data, self._pad, self._hash)
        return key.sign(hashlib.sha256(data).digest())  # RFC 8463 §3: Ed25519 signs the hash

    @staticmethod
    def _finish(unsigned: bytes, raw: bytes, width: int) -> bytes:
        """The complete header field: ``unsigned`` and the signature, folded, with CRLF."""
        b64 = binascii.b2a_base64(raw, newline=False)
        room = _MAX_LINE - width
        if room < 8:
            unsigned += _FOLD_B
            room = _MAX_LINE - 1
        step = _MAX_LINE - 1
        chunks = [b64[:room], *(b64[i : i + step] for i in range(room, len(b64), step))]
        return b"".join((unsigned, _FOLD_B.join(chunks), b"\r\n"))


def signature_headers(signers: Iterable[Signer], message: bytes, now: int,
                      crlf_only: bool = False) -> bytes:
    """Every signer's ``DKIM-Signature`` over the same original message, to prepend together.

    ``crlf_only`` as for :func:`prepare`.
    """
    prepared = prepare(message, crlf_only)
    return b"".join(signer.sign_prepared(prepared, now) for signer in signers)


#: One message to sign: its signers, the message, the time.
SignJob = tuple[Sequence[Signer], bytes, int]


def sign_many(jobs: Sequence[SignJob], crlf_only: bool = False) -> list[bytes | Exception]:
    """``signature_headers`` of each job, or the exception that prevented it.

    The private-key operations of all the jobs run back to back, after every
    message is canonicalized: the Python work between two signatures would
    push the bignum code and the key out of the CPU caches.
    """
    out: list[bytes | Exception] = []
    ready: list[tuple[int, Sequence[Signer], list[tuple[bytes, bytes, int]]]] = []
    for signers, message, now in jobs:
        try:
            prepared = prepare(message, crlf_only)
            ready.append((len(out), signers,
                          [signer._unsigned(prepared, now) for signer in signers]))
            out.append(b"")
        except Exception as exc:
            out.append(exc)
    raws: list[list[bytes] | Exception] = []
    for _, signers, parts in ready:
        try:
            raws.append([s._private_op(data) for s, (_, data, _) in zip(signers, parts,
                                                                        strict=True)])
        except Exception as exc:
            raws.append(exc)
    for (at, _, parts), raw in zip(ready, raws, strict=True):
        if isinstance(raw, Exception):
            out[at] = raw
            continue
        out[at] = b"".join(Signer._finish(unsigned, r, width)
                           for (unsigned, _, width), r in zip(parts, raw, strict=True))
    return out
