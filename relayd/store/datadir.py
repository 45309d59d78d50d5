"""The data directory on disk: creating it, keeping it private, and its size.

Owns: making ``[server] data_dir`` ready before the spool opens (created
0750, refused with a :class:`SpoolError` that says what to do when it is not a
directory or cannot be written) and keeping the directory and the database
files closed to other users (they hold DKIM private keys, password hashes and
mail); and the bytes the spool uses there (database, WAL, shared memory, the
files of large messages), for ``relayctl status`` and the spool gauge.

Untrusted input: none. Settings read: none (the paths are passed in).
See also: relayd.store.spool (the database in that directory).
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

from relayd.store.spool import SpoolError


def prepare_data_dir(path: str) -> None:
    """Create the data directory, and keep it and the spool closed to other users.

    The spool holds DKIM private keys, password hashes and mail: the directory
    is 0750 at most and the database files 0640 at most, whatever created them.
    """
    d = Path(path)
    try:
        if d.exists() and not d.is_dir():
            raise SpoolError(f"data dir {path} is not a directory; set --data-dir"
                             " ([server] data_dir) to a directory, or move the file away")
        d.mkdir(parents=True, exist_ok=True, mode=0o750)
        writable = os.access(d, os.W_OK | os.X_OK)
        read_only = bool(os.statvfs(d).f_flag & os.ST_RDONLY)
    except OSError as exc:
        raise SpoolError(f"cannot create data dir {path} ({exc.strerror or exc}); create it"
                         " as a directory relayd's user may write") from None
    if read_only or not writable:
        why = "read-only file system" if read_only else "permission denied"
        raise SpoolError(f"data dir {path} is not writable ({why}); relayd keeps its spool"
                         " there: mount it read-write or make it writable by relayd's user")
    for p in (d, *d.glob("relayd.sqlite3*"), *d.glob("relayd-log.sqlite3*")):
        with contextlib.suppress(OSError):
            mode = p.stat().st_mode & 0o7777
            if mode & 0o027:
                p.chmod(mode & ~0o027)


def spool_size(db_path: str, bodies_dir: str) -> int:
    """Bytes used by the database, its WAL and the files of large messages."""
    size = 0
    for suffix in ("", "-wal", "-shm"):
        with contextlib.suppress(OSError):
            size += os.path.getsize(db_path + suffix)
    with contextlib.suppress(OSError), os.scandir(bodies_dir) as entries:
        for entry in entries:
            with contextlib.suppress(OSError):
                size += entry.stat().st_size
    return size
