"""Metrics, logs, hot-path events and the systemd notify protocol."""
