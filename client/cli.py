"""privbroker: the broker's command-line client. Not implemented yet (issue #4)."""
import sys


def main() -> int:
    print("privbroker: not yet implemented (the client lands with issue #4)", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
