"""The files of large messages: ``<spool>.bodies/<message id>``, beside the database.

Owns: writing, reading and removing those files, in step with the commits of
their rows. Large message data (over :data:`EXTERNAL_MIN`) lives in a file
the way an MTA keeps queue files: SQLite would write it twice (WAL, then
checkpoint), walk its overflow pages again to free them, and fsync it twice.
The file is written and fsynced (and its directory) before the commit of its
row, so a committed message always has its data; a file whose row never
committed or is gone is removed after the commit that deleted the row, or at
the next start.
See also: relayd.store.spool (calls these on the writer's and reader's threads).
"""

from __future__ import annotations

import os
from collections.abc import Iterable

from relayd.store.db import SqlConn, read_blob
from relayd.store.records import NewMessage

#: Messages larger than this were written and read with blob I/O; rows stored
#: that way by an earlier version are still read so (see read_data).
BLOB_STREAM_MIN = 256 * 1024
BLOB_CHUNK = 1024 * 1024
#: Messages larger than this are stored in a file of their own.
EXTERNAL_MIN = BLOB_STREAM_MIN


class Bodies:
    """The files of large messages, used only on the writer's thread.

    ``ids`` are the committed messages that have a file. Written files join
    them at the commit of their rows; a rollback removes them. A file is
    removed after the commit that deleted its row: delivery results say which
    rows they deleted; after a purge, ``reconcile`` checks the known files
    against the table.
    """

    def __init__(self, directory: str) -> None:
        self.dir = directory
        self.ids: set[int] = set()
        self._written: list[int] = []  # files of rows not committed yet
        self._gone: list[int] = []  # files of rows deleted, not committed yet

    def path(self, message_id: int) -> str:
        return os.path.join(self.dir, str(message_id))

    def open(self, conn: SqlConn) -> None:
        """At start: the directory (0750), the ids with a file, and no file left over."""
        os.makedirs(self.dir, mode=0o750, exist_ok=True)
        rows = conn.execute("SELECT id FROM messages WHERE external=1").fetchall()
        self.ids = {int(r[0]) for r in rows}
        for name in os.listdir(self.dir):
            if not (name.isdigit() and int(name) in self.ids):
                _unlink(os.path.join(self.dir, name))  # a crash before its row committed

    def write(self, msgs: list[NewMessage]) -> None:
        """Write, fsync and close each file, then fsync the directory (new entries)."""
        for m in msgs:
            fd = os.open(self.path(m.id), os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC,
                         0o640)
            self._written.append(m.id)
            try:
                view = memoryview(m.data)
                while view:
                    view = view[os.write(fd, view[:BLOB_CHUNK]):]
                os.fdatasync(fd)
            finally:
                os.close(fd)
        dfd = os.open(self.dir, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)

    def deleted(self, message_ids: Iterable[int]) -> None:
        """Rows deleted in the open transaction (files go after its commit)."""
        self._gone.extend(m for m in message_ids if m in self.ids)

    def committed(self) -> None:
        self.ids.update(self._written)
        self._written.clear()
        for m in self._gone:
            self.ids.discard(m)
            _unlink(self.path(m))
        self._gone.clear()

    def rolled_back(self) -> None:
        for m in self._written:
            _unlink(self.path(m))
        self._written.clear()
        self._gone.clear()

    def reconcile(self, conn: SqlConn) -> None:
        """After a commit with a purge: remove the files whose rows are gone."""
        known = sorted(self.ids)
        kept: set[int] = set()
        for start in range(0, len(known), 500):
            part = known[start:start + 500]
            marks = ",".join("?" * len(part))
            kept.update(int(r[0]) for r in conn.execute(
                f"SELECT id FROM messages WHERE id IN ({marks})", part))  # noqa: S608
        for m in self.ids - kept:
            _unlink(self.path(m))
        self.ids = kept


def read_data(conn: SqlConn, message_id: int, bodies_dir: str) -> bytes | None:
    """On the reader's thread: the data from its file, or with blob I/O; None if gone."""
    row = conn.execute("SELECT external FROM messages WHERE id=?", (message_id,)).fetchone()
    if row is None:
        return None
    if row[0]:
        try:
            with open(os.path.join(bodies_dir, str(message_id)), "rb") as f:
                return f.read()
        except FileNotFoundError:
            return None  # deleted after our read of the row: purged or delivered meanwhile
    return read_blob(conn, "messages", "data", message_id)  # None: purged or delivered


def _unlink(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
