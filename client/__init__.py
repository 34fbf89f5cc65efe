"""privbroker client library and CLI."""
