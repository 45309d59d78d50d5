"""Outbound SMTP: next hops, MX, pooled connections, the agent processes, bounces."""
