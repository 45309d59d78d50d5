"""A domain's webhook: set, changed, rotated, removed; loaded at start and followed.

Owns: the webhook part of ``domain set`` (``--webhook URL|off``, a new secret when the
webhook is first set or on ``--rotate-webhook-secret``, shown once), keeping memory
(``Domain.webhook_url``/``webhook_secret``) and the spool's set of domains whose
results become events (``Spool.hooks.domains``) in agreement with the database, and
dropping a domain's stored events when its webhook is removed or it is deleted.
Removing a webhook takes something away (memory first, then the write); setting one
writes first.

Untrusted input: the URL (checked by relayd.webhooks.policy.check_url).
See also: relayd.controlplane.domains (``domain set``), relayd.controlplane.follow
(other nodes' changes), relayd.webhooks.poster.
"""

from __future__ import annotations

from relayd.controlplane import audit
from relayd.controlplane.changes import LifecycleError, Shared, agree
from relayd.directory.accounts import Domain
from relayd.store.webhooks import WebhookQueue, WebhookRecord
from relayd.webhooks.policy import check_url, new_secret


def refresh(s: Shared) -> None:
    """The spool writes events for exactly the live domains with a webhook."""
    s.spool.hooks.domains = frozenset(d.name for d in s.directory.domains_by_id.values()
                                      if d.webhook_url and not d.deleted)


async def load(s: Shared) -> None:
    """At start (after the domains): every stored webhook into memory."""
    for rec in await s.store.webhooks():
        dom = s.directory.domains_by_id.get(rec.domain_id)
        if dom is not None:
            dom.webhook_url, dom.webhook_secret = rec.url, rec.secret
    refresh(s)


async def apply(s: Shared, dom: Domain, rec: WebhookRecord | None) -> None:
    """A change read back from the cluster database (follow): memory as stored."""
    gone = dom.webhook_url is not None and (rec is None or dom.deleted)
    if rec is None or dom.deleted:
        dom.webhook_url = dom.webhook_secret = None
    else:
        dom.webhook_url, dom.webhook_secret = rec.url, rec.secret
    refresh(s)
    if gone:
        await WebhookQueue(s.spool).drop_domain(dom.name)


async def forget(s: Shared, dom: Domain) -> int:
    """The domain was deleted: no more events for it, and its stored ones dropped."""
    dom.webhook_url = dom.webhook_secret = None
    refresh(s)
    return await WebhookQueue(s.spool).drop_domain(dom.name)


async def set_webhook(s: Shared, dom: Domain, url: str | None, rotate: bool,
                      reason: str = "") -> str | None:
    """Apply ``--webhook`` (``url``; "" or "off": remove) and ``--rotate-webhook-secret``;
    the new secret when one was made (shown once), else None. Under ``s.lock``. The
    change is audited (never the secret)."""
    if url is not None and url.strip().lower() in ("", "off"):
        if rotate:
            raise LifecycleError("invalid request: a webhook being removed has no secret to"
                                 " rotate", "invalid_request")
        if dom.webhook_url is not None:
            await _remove(s, dom, reason)
        return None
    if url is not None:
        url = url.strip()
        problem = check_url(url)
        if problem:
            raise LifecycleError(f"invalid request: webhook {problem}", "invalid_webhook")
    elif rotate and dom.webhook_url is None:
        raise LifecycleError("invalid request: the domain has no webhook (set one with"
                             " --webhook URL)", "invalid_request")
    new_url = url or dom.webhook_url
    assert new_url is not None
    secret = new_secret() if rotate or dom.webhook_secret is None else dom.webhook_secret
    old_secret = dom.webhook_secret
    entry = audit.domain_entry(s, dom.name, "webhook_set", reason, url=new_url,
                               new_secret=secret != old_secret)
    if secret != old_secret and old_secret is not None:
        # a rotation takes the old secret away: memory first, undone if the write fails
        was = dom.webhook_url, dom.webhook_secret
        dom.webhook_url, dom.webhook_secret = new_url, secret

        def undo() -> None:
            dom.webhook_url, dom.webhook_secret = was
        await agree(s.store.set_webhook(dom.id, new_url, secret, audit=entry), undo=undo)
    else:
        def put(_: object = None) -> None:
            dom.webhook_url, dom.webhook_secret = new_url, secret
        await agree(s.store.set_webhook(dom.id, new_url, secret, audit=entry), apply=put)
    refresh(s)
    s.log("domain_webhook_set", domain=dom.name, new_secret=secret != old_secret)
    return secret if secret != old_secret else None


async def _remove(s: Shared, dom: Domain, reason: str) -> None:
    was = dom.webhook_url, dom.webhook_secret
    dom.webhook_url = dom.webhook_secret = None
    refresh(s)

    def undo() -> None:
        dom.webhook_url, dom.webhook_secret = was
        refresh(s)
    await agree(s.store.set_webhook(dom.id, None, None, audit=audit.domain_entry(
        s, dom.name, "webhook_removed", reason)), undo=undo)
    dropped = await WebhookQueue(s.spool).drop_domain(dom.name)
    s.log("domain_webhook_removed", domain=dom.name, events_dropped=dropped)

