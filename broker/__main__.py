"""privbrokerd: the D-Bus broker. Not implemented yet (issue #4)."""
import sys


def main() -> int:
    print("privbrokerd: not yet implemented (the D-Bus broker lands with issue #4); "
          "use privjail to launch jails directly", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
