"""Delivery events pushed to applications: each domain's webhook, signed, retried, bounded.

relayd.webhooks.policy: the pure rules (a webhook URL, the signature, when to retry);
relayd.webhooks.poster: the task that posts the events the spool stored
(relayd.store.hookevents writes them with the outcome they report).
"""
