"""The control API's server side and the operations it runs."""
