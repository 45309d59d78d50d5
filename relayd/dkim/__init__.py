"""DKIM: keys, signatures, and where accepted messages are signed."""
