"""Why a recipient domain has no next hop: the one routing error and its kinds.

Owns: ``RouteError``, raised by next-hop choice (relayd.delivery.mx) and
handled by the dispatcher (relayd.queue.dispatch). It carries what the
dispatcher needs and nothing it must work out from the text: ``permanent``
(fail the recipients, else defer them), and for a permanent one the reply
code and enhanced status that go into the delivery log and the DSN.

The kinds are subclasses that fix those fields:

- ``PermanentRouteError``: the domain cannot receive mail (``550 5.1.2``,
  bad destination system address: an invalid name);
- ``NotFoundRouteError``: NXDOMAIN, or no address at all (``550 5.4.4``, as
  Postfix's "Host or domain name not found");
- ``NullMxRouteError``: the domain publishes a null MX, RFC 7505 (``556 5.1.10``);
- ``RefusedRouteError``: every address found is one mail must not go to
  (``550 5.4.4``, unable to route);
- ``TemporaryRouteError``: DNS trouble that may pass: defer.

Pure: no I/O, no settings.
See also: relayd.delivery.mx (raises them), relayd.queue.dispatch (handles them).
"""

from __future__ import annotations

#: Kinds of DNS failure relayd.delivery.mx reports (``MxResolver.on_dns_failure``): a
#: lookup that failed (servfail, timeout, error), or a domain left without a route for a
#: DNS reason (nxdomain, no_address, null_mx, invalid).
DNS_FAILURE_KINDS: tuple[str, ...] = ("servfail", "timeout", "error", "nxdomain",
                                      "no_address", "null_mx", "invalid")

#: The text of a null MX (RFC 7505) failure.
NULL_MX_MESSAGE = "domain does not accept mail (null MX)"


class RouteError(Exception):
    """No next hop for a domain: ``permanent`` says whether to fail or defer.

    A permanent one carries the reply code and enhanced status that go into
    the delivery log and the DSN.
    """

    def __init__(self, text: str, permanent: bool, code: int = 550,
                 status: str = "5.1.2") -> None:
        super().__init__(text)
        self.permanent = permanent
        self.code = code
        self.status = status


class PermanentRouteError(RouteError):
    """The domain cannot receive mail: fail the recipients (``550 5.1.2``)."""

    def __init__(self, text: str, code: int = 550, status: str = "5.1.2") -> None:
        super().__init__(text, permanent=True, code=code, status=status)


class NotFoundRouteError(PermanentRouteError):
    """The domain, or every address of its mail hosts, does not exist: ``550 5.4.4``."""

    def __init__(self, text: str) -> None:
        super().__init__(text, code=550, status="5.4.4")


class NullMxRouteError(PermanentRouteError):
    """The domain says it accepts no mail (null MX, RFC 7505): ``556 5.1.10``."""

    def __init__(self, text: str = NULL_MX_MESSAGE) -> None:
        super().__init__(text, code=556, status="5.1.10")


class RefusedRouteError(PermanentRouteError):
    """Every address found is one mail must not go to (loopback, private...): ``550 5.4.4``."""

    def __init__(self, text: str) -> None:
        super().__init__(text, code=550, status="5.4.4")


class TemporaryRouteError(RouteError):
    """DNS trouble that may pass: defer the recipients."""

    def __init__(self, text: str) -> None:
        super().__init__(text, permanent=False)
