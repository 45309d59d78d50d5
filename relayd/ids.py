"""The external form of message ids.

Owns: writing a message id (a 64-bit integer, see relayd.store.records.IdAllocator) as
the 16 upper-case hex digits the SMTP reply, the logs and the CLI show, and
parsing that form back. A leaf: it imports nothing of relayd, so a module that
only prints ids (relayd.observe.events) need not depend on the spool.

Untrusted input: ``parse_id`` takes an operator's text (a control request).
Settings read: none.
"""

from __future__ import annotations


def format_id(message_id: int) -> str:
    """The external form of a message id: 16 upper-case hex digits."""
    return f"{message_id:016X}"


def parse_id(text: str) -> int:
    """Parse an external message id; raise ValueError if malformed."""
    if len(text) != 16 or not all(c in "0123456789abcdefABCDEF" for c in text):
        raise ValueError("message id must be 16 hex digits")  # int() takes "-", "_", " "
    return int(text, 16)
