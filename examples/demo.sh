#!/bin/sh
# `make run`: jail the probe with a typical service sandbox and show what the
# jail looks like from inside.  (Until the D-Bus broker lands, this uses privjail
# directly.)
set -e
VENV=${1:-.venv}
cd "$(dirname "$0")/.."
echo "\$ privjail -p -v -e -l --uts=demo -n --profile minimalistic-mountns -u nobody -g nogroup -- python3 $PWD/tests/probe.py"
"$VENV/bin/privjail" -p -v -e -l --uts=demo -n --profile minimalistic-mountns \
    -u nobody -g nogroup -- /usr/bin/python3 "$PWD/tests/probe.py" \
  | "$VENV/bin/python" examples/summarize_probe.py
