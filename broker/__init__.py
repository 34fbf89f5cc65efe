"""privbroker: the privileged side (jail engine, and later the D-Bus broker)."""
