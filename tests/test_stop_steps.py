"""Shutdown goes on past a step that fails: the spool is still closed and the
process can exit (a failed step used to leave the spool open and the process alive)."""

from __future__ import annotations

from tests.conftest import RelayFactory


async def test_failed_stop_step_still_closes_the_spool(relay_factory: RelayFactory) -> None:
    """When closing the deliverer raises, stop() returns and still closes the spool."""
    h = await relay_factory()

    async def broken_close() -> None:
        raise RuntimeError("deliverer could not be closed")

    real_close = h.relay.deliverer.close
    h.relay.deliverer.close = broken_close  # type: ignore[method-assign]
    try:
        await h.stop()
        assert h.relay.spool._w is None  # closed: the writer connection is gone
    finally:
        await real_close()  # the delivery children, which the broken step left running
