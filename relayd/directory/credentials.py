"""Password hashing and the in-memory credential cache.

Owns: argon2id hashing (argon2-cffi), run in a dedicated thread pool so the
event loop never computes a hash; and the credential cache, which makes a
repeated successful login cost a keyed BLAKE2b digest and a constant-time
compare instead of an argon2 verification.

The cache holds, per account id, a keyed digest of the last password that
verified against the account's argon2 hash. The key is random per process, so
the cache is worthless outside this process. An entry is written only if the
account's epoch did not change while argon2 ran, and ``invalidate`` drops it:
relayd.controlplane.accounts calls it (and bumps the account's epoch) before a disable,
delete or password reset returns, so no entry outlives the credentials it was
made from.

A password kept by ``reset-password --keep-old`` (``Account.old_password_hash``) has
a cache slot of its own, so an application still on the old password and one on
the new one both hit. Each entry also names the hash it verified against: it hits
only while that is still the account's current hash (or, for the old slot, its kept
old hash *and* the injected clock is before the old one's expiry), so no entry can
accept a password the account no longer has, and an expired old password misses
and fails. The old hash costs a second argon2 verification only when the current
one fails and the old one is unexpired (so a wrong password for an account inside a
grace period costs two).

Timing: every failure costs one argon2 verification, whether the user is
unknown (a dummy hash is verified), the password is wrong (even when a cached
digest exists), or the account is disabled: the reply and the time are the
same for all of them.

``attempt_digest`` names one attempt (username, password, account state) for
relayd.smtp.policy.AuthThrottle, so the same password tried through a second SASL
mechanism is recognised without keeping it.

Untrusted input: usernames and passwords from AUTH (never logged).
Settings read: [credentials]. See also: relayd.directory.accounts, relayd.controlplane.accounts.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import secrets
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import argon2

from relayd.config import CredentialsConfig
from relayd.directory.accounts import DELETED, Account


@dataclass(frozen=True, slots=True)
class AuthOutcome:
    """What a credential check decided; ``reason`` is for logs and metrics only."""

    ok: bool
    reason: str  # success, unknown_user, bad_password, account_disabled, ...
    cache_hit: bool


class Hasher:
    """argon2id hashing and verification in a thread pool."""

    def __init__(self, cfg: CredentialsConfig) -> None:
        self._ph = argon2.PasswordHasher(
            time_cost=cfg.argon2_time_cost,
            memory_cost=cfg.argon2_memory_cost_kib,
            parallelism=cfg.argon2_parallelism,
            type=argon2.Type.ID,
        )
        self._pool = ThreadPoolExecutor(max_workers=cfg.hash_threads, thread_name_prefix="argon2")
        self._dummy = self._ph.hash(secrets.token_urlsafe(16))
        self.verifications = 0

    def hash_sync(self, password: str) -> str:
        """Hash a password (blocking; call through ``hash``)."""
        return self._ph.hash(password)

    async def hash(self, password: str) -> str:
        """Hash a password off the event loop."""
        return await asyncio.get_running_loop().run_in_executor(self._pool, self._ph.hash, password)

    def _verify(self, encoded: str, password: bytes) -> bool:
        self.verifications += 1
        try:
            return bool(self._ph.verify(encoded, password))
        except argon2.exceptions.VerificationError:
            return False
        except argon2.exceptions.InvalidHashError:
            return False

    async def verify(self, encoded: str | None, password: bytes) -> bool:
        """Verify a password against an argon2 hash (or a dummy one) off the loop."""
        target = encoded or self._dummy
        ok = await asyncio.get_running_loop().run_in_executor(
            self._pool, self._verify, target, password
        )
        return ok and encoded is not None

    def close(self) -> None:
        """Stop the hashing threads."""
        self._pool.shutdown(wait=False, cancel_futures=True)


class CredentialCache:
    """Checks AUTH credentials, with a cache of recent successful verifications."""

    def __init__(self, hasher: Hasher, on_hit: Callable[[], None] | None = None,
                 on_miss: Callable[[], None] | None = None,
                 clock: Callable[[], float] = time.time) -> None:
        self.hasher = hasher
        self.clock = clock  # POSIX seconds: when a kept old password expires
        self._key = secrets.token_bytes(32)
        # account id -> (the hash the password verified against, the password's digest)
        self._entries: dict[int, tuple[str, bytes]] = {}
        self._old: dict[int, tuple[str, bytes]] = {}
        self._on_hit = on_hit
        self._on_miss = on_miss

    def _digest(self, account: Account, password: bytes) -> bytes:
        return hashlib.blake2b(
            password, key=self._key, person=account.id.to_bytes(8, "little"), digest_size=32
        ).digest()

    def attempt_digest(self, username: str, password: bytes, account: Account | None) -> bytes:
        """A keyed digest naming one credential attempt, for the failed-AUTH throttle.

        Equal for the same username, password and state of the account (id,
        epoch, status), whatever SASL mechanism carried them; so a password
        tried again after a disable, enable or reset is a new attempt. Keyed
        with this process's random key: worthless outside it, and the password
        is never kept or logged.
        """
        state = b"-" if account is None else (
            f"{account.id}:{account.epoch}:{account.status}:{account.disabled_reason}".encode())
        user = username.encode("utf-8", "surrogatepass")
        h = hashlib.blake2b(key=self._key, person=b"relayd-attempt", digest_size=16)
        for part in (user, state, password):
            h.update(len(part).to_bytes(4, "little"))
            h.update(part)
        return h.digest()

    def hit(self, account: Account | None, password: bytes) -> bool:
        """True (and counted as a hit) if ``password`` is a cached verification of a usable
        ``account``: a success decided without argon2 and without awaiting anything."""
        if account is None or account.status == DELETED or not account.usable:
            return False
        if not self._hit(account, self._digest(account, password)):
            return False
        if self._on_hit is not None:
            self._on_hit()
        return True

    async def check(self, account: Account | None, password: bytes) -> AuthOutcome:
        """Decide whether ``password`` authenticates ``account`` (None = unknown user)."""
        if account is None:
            await self.hasher.verify(None, password)
            return AuthOutcome(False, "unknown_user", False)
        if account.status == DELETED:
            await self.hasher.verify(None, password)
            return AuthOutcome(False, "account_deleted", False)
        if self.hit(account, password):
            return AuthOutcome(True, "success", True)
        digest = self._digest(account, password)
        if self._on_miss is not None:
            self._on_miss()
        epoch = account.epoch
        encoded = account.password_hash
        old = account.old_password_hash if account.old_password_valid(self.clock()) else ""
        ok = await self.hasher.verify(encoded, password)
        if not ok and old:  # only when the current one fails and the old one is unexpired
            ok = await self.hasher.verify(old, password)
            encoded = old
        if not ok:
            return AuthOutcome(False, "bad_password", False)
        if not account.usable:
            reason = (
                "domain_deleted" if account.disabled_reason == "domain_deleted"
                else "account_disabled"
            )
            return AuthOutcome(False, reason, False)
        if account.epoch != epoch:
            # Invalidated while argon2 ran: the password it checked is stale.
            return AuthOutcome(False, "bad_password", False)
        if encoded == account.password_hash:
            self._entries[account.id] = (encoded, digest)
        elif encoded == account.old_password_hash and account.old_password_valid(self.clock()):
            self._old[account.id] = (encoded, digest)  # kept old (or rotated while argon2 ran)
        else:  # changed, ended or expired while argon2 ran
            return AuthOutcome(False, "bad_password", False)
        return AuthOutcome(True, "success", False)

    def _hit(self, account: Account, digest: bytes) -> bool:
        """True if ``digest`` is cached for a password the account has now."""
        entry = self._entries.get(account.id)
        if (entry is not None and entry[0] == account.password_hash
                and hmac.compare_digest(entry[1], digest)):
            return True
        entry = self._old.get(account.id)
        return (entry is not None and entry[0] == account.old_password_hash
                and account.old_password_valid(self.clock())
                and hmac.compare_digest(entry[1], digest))

    def invalidate(self, account_id: int) -> None:
        """Forget the cached verifications of one account (cheap, no I/O)."""
        self._entries.pop(account_id, None)
        self._old.pop(account_id, None)

    def rotate(self, account_id: int) -> None:
        """The account's current password became its kept old one
        (``reset-password --keep-old``): its cached verification moves to the old slot,
        and the previous old one's is forgotten."""
        entry = self._entries.pop(account_id, None)
        if entry is None:
            self._old.pop(account_id, None)
        else:
            self._old[account_id] = entry

    def __len__(self) -> int:
        return len(self._entries) + len(self._old)
