"""The VM harness (harness.py) and what runs inside the VM."""
