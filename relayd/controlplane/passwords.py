"""Account passwords: reset (optionally keeping the old one for a grace period) and the
early end of that grace.

Owns: ``user reset-password [--keep-old DURATION]`` and ``user expire-old-password``
(SEMANTICS.md §4), each returning only when the database, the directory and the
credential cache agree. Without ``keep_old`` a reset is what it always was: the old
password fails at once (epoch bumped, cache dropped, any kept old password ended).
With it, the current password becomes the kept old one until ``now + keep_old``
(this node's clock writes the expiry; every node compares it with its own), the new
one works at once, and no session loses its authentication — unless an older kept
password, still valid, ends with it (at most two passwords are valid at a time).
Ending the grace early takes a password away: epoch and cache first, then the database.

Untrusted input: usernames and the grace period from the control socket, decoded and
bounded by control.schemas. Settings read: none.
See also: relayd.directory.credentials (the cache's old-password slot),
relayd.controlplane.accounts (disable and delete, which end both passwords).
"""

from __future__ import annotations

from collections.abc import Callable

from control import schemas
from relayd.controlplane import audit
from relayd.controlplane.accounts import new_password
from relayd.controlplane.changes import LifecycleError, Shared, agree
from relayd.directory.accounts import Account


def _still_disabled(acct: Account) -> str | None:
    """What a reset's answer says about an account it leaves disabled (None: usable)."""
    if acct.usable:
        return None
    if acct.disabled_reason == "domain_deleted":
        return "the account stays disabled: its domain was deleted"
    return f"the account stays disabled: `relayctl user enable {acct.username}` to use it"


class Passwords:
    """The operator's operations on account passwords."""

    def __init__(self, shared: Shared,
                 info: Callable[[Account], schemas.UserInfo]) -> None:
        self.s = shared
        self._info = info

    async def user_reset_password(self, username: str, keep_old: float | None = None,
                                  reason: str = "") -> schemas.Credentials:
        """A new password (shown once). Without ``keep_old`` the old one fails at once;
        with it (seconds; bounded by control.schemas.KeepOld when the request is decoded),
        the old one keeps working until then, and stops by itself."""
        reason = audit.checked_text(reason, "reason")
        self.s.account(username)
        password = new_password()
        hashed = await self.s.hasher.hash(password)
        async with self.s.lock:
            acct = self.s.account(username)
            if keep_old is not None and not acct.usable:
                raise LifecycleError(
                    f"{username} is disabled: no password of it works now, so there is none"
                    " to keep; reset without --keep-old", "account_disabled", 409)
            saved = (acct.password_hash, acct.old_password_hash, acct.old_password_expires)
            now = self.s.clock()
            if keep_old is None:
                acct.end_old_password()
                acct.invalidate()
                self.s.cache.invalidate(acct.id)
            else:
                if acct.old_password_valid(now):  # the older kept one ends: sessions too
                    acct.invalidate()
                acct.old_password_hash, acct.old_password_expires = (
                    acct.password_hash, now + keep_old)
                self.s.cache.rotate(acct.id)
            acct.password_hash = hashed

            def undo() -> None:
                acct.password_hash, acct.old_password_hash, acct.old_password_expires = saved
                self.s.cache.invalidate(acct.id)

            details = {} if keep_old is None else {"keep_old_seconds": keep_old}
            await agree(self.s.store.set_password(
                acct.id, hashed, acct.old_password_hash or None, acct.old_password_expires,
                audit=audit.account_entry(self.s, acct, "password_reset", reason, **details)),
                undo=undo)
        kept = {} if keep_old is None else {"keep_old_seconds": keep_old,
                                            "old_password_expires": acct.old_password_expires}
        self.s.log("user_password_reset", username=username, **kept)
        return schemas.Credentials(username=username, password=password,
                                   old_password_expires=acct.old_password_expires,
                                   note=_still_disabled(acct))

    async def user_expire_old_password(self, username: str,
                                       reason: str = "") -> schemas.UserInfo:
        """End a kept old password's grace now: it fails before this returns (sessions
        of the account lose their authentication, as for a reset)."""
        reason = audit.checked_text(reason, "reason")
        async with self.s.lock:
            acct = self.s.account(username)
            if acct.old_password_hash:
                saved = (acct.old_password_hash, acct.old_password_expires)
                acct.end_old_password()
                acct.invalidate()
                self.s.cache.invalidate(acct.id)

                def undo() -> None:
                    acct.old_password_hash, acct.old_password_expires = saved

                await agree(self.s.store.set_password(
                    acct.id, acct.password_hash, None, None, audit=audit.account_entry(
                        self.s, acct, "old_password_expired", reason)), undo=undo)
                self.s.log("user_old_password_expired", username=username)
        return self._info(acct)
