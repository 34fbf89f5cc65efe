#!/bin/sh
# `make run`: a private system-style bus with the project's own policy, the
# broker on it with the sample deployment, and a jailed command launched
# through the client, as a newcomer would.
set -e
VENV=${1:-.venv}
cd "$(dirname "$0")/.."
TOP=$PWD
getent group privbroker >/dev/null || groupadd --system privbroker
# the broker's front runs as this user (broker/front.py); `make install` makes it too
getent passwd privbroker >/dev/null || useradd --system --no-create-home \
    --home-dir /nonexistent --shell /usr/sbin/nologin --gid privbroker privbroker
exec "$VENV/bin/python" - "$VENV" <<PY
import os, subprocess, sys, time
sys.path.insert(0, "$TOP/tests")
from dbus_fixture import PrivateBus
venv = sys.argv[1]
import tempfile
from pathlib import Path
from dbus_fixture import sample_deployment
# The sample deployment with a lease journal of its own: an installed
# privbrokerd's journal is not the demo's to replay (one broker per journal).
demo = Path(tempfile.mkdtemp(prefix="privbroker-demo-", dir="/var/tmp"))
os.chmod(demo, 0o755)
config = str(sample_deployment(demo))
with PrivateBus() as bus:
    print(f"private system bus at {bus.address} (policy: dbus-policy/)")
    broker = subprocess.Popen([f"{venv}/bin/privbrokerd", "--bus-address", bus.address,
                               "--config", config])
    try:
        for _ in range(100):
            if subprocess.run(["busctl", f"--address={bus.address}", "status",
                               "org.privbroker.Broker1"], capture_output=True).returncode == 0:
                break
            time.sleep(0.1)
        cmd = [f"{venv}/bin/privbroker", "--bus-address", bus.address, "run", "minimal",
               "--", "/usr/bin/python3", "$TOP/tests/probe.py"]
        print("$ privbroker run minimal -- python3 tests/probe.py   (as root, via the broker)")
        probe = subprocess.run(cmd, capture_output=True, text=True)
        if probe.returncode != 0:
            sys.exit(f"privbroker run failed ({probe.returncode}): {probe.stderr}")
        subprocess.run([f"{venv}/bin/python", "examples/summarize_probe.py"],
                       input=probe.stdout, text=True, check=True)
        print("$ privbroker run minimal -- /bin/sh -c 'echo hello from \$(hostname); exit 3'")
        rc = subprocess.call([f"{venv}/bin/privbroker", "--bus-address", bus.address, "run",
                              "minimal", "--", "/bin/sh", "-c", "echo hello from \$(hostname); exit 3"])
        print(f"exit status {rc}")
        print("$ privbroker run filtered -- /bin/cat /etc/hostname /root/.profile   "
              "(seccomp + Landlock profile)")
        rc = subprocess.call([f"{venv}/bin/privbroker", "--bus-address", bus.address, "run",
                              "filtered", "--", "/bin/cat", "/etc/hostname", "/root/.profile"])
        print(f"exit status {rc} (Landlock: /root is outside the profile's paths)")
        print("$ privbroker run filtered -- /bin/sh -c true   (the shell is not in its policy)")
        rc = subprocess.call([f"{venv}/bin/privbroker", "--bus-address", bus.address, "run",
                              "filtered", "--", "/bin/sh", "-c", "true"])
        print(f"exit status {rc} = 128 + SIGSYS: seccomp killed it")
        print("$ privbroker explain --config examples/broker.toml filtered --uid 1000")
        subprocess.call([f"{venv}/bin/privbroker", "explain", "--config", "examples/broker.toml",
                         "filtered", "--uid", "1000"])
    finally:
        broker.terminate()
        broker.wait()
        import shutil
        shutil.rmtree(demo, ignore_errors=True)
PY
