"""relayd benchmark harness: relayd against Postfix, stock aiosmtpd and the smtp-sink ceiling.

Entry point: ``python -m bench.run`` (see bench/README.md).
"""
