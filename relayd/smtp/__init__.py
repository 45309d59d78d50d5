"""Inbound SMTP: the session, its transport, address parsing, policy and the reply table."""
