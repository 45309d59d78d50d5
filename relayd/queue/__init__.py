"""Which message goes next: the send queue, sending limits, retries and dispatch."""
