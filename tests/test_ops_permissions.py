"""The spool (DKIM keys, password hashes, mail) is never readable by other users."""

from __future__ import annotations

import os
import stat
from pathlib import Path

from tests.procs import RelayProcess


async def test_data_dir_and_spool_are_closed_to_others(tmp_path: Path) -> None:
    """A world-readable data dir and database left by someone else are tightened at start."""
    relay = RelayProcess(tmp_path, "127.0.0.1:9")
    relay.data.mkdir(mode=0o777)
    os.chmod(relay.data, 0o777)  # noqa: S103 - the loose mode is what is tested
    await relay.start()
    await relay.ctl("domain", "add", "example.com")
    assert await relay.terminate() == 0
    for p in [relay.data, *relay.data.glob("relayd.sqlite3*")]:
        mode = stat.S_IMODE(p.stat().st_mode)
        assert mode & 0o007 == 0, (p, oct(mode))
    db = relay.data / "relayd.sqlite3"
    os.chmod(db, 0o666)  # noqa: S103 - the loose mode is what is tested
    await relay.start()
    assert stat.S_IMODE(db.stat().st_mode) & 0o027 == 0
    assert await relay.terminate() == 0
