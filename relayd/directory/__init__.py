"""Who may send: the in-memory view of domains and accounts, and the credential cache."""
