# privbroker: `make run`, `make test`, `make bench`.
# Each target installs what is missing on a fresh Debian 12 machine (as root)
# and is quick when everything is already there.

PYTHON   ?= /usr/bin/python3
VENV     := .venv
VPY      := $(VENV)/bin/python
STAMP    := $(VENV)/.installed
# libc6-dev/linux-libc-dev: the headers seccomp policy constants are generated from
APT_PKGS := python3 python3-venv python3-dev gcc libcap-dev libseccomp2 \
            libc6-dev linux-libc-dev bubblewrap dbus strace

.PHONY: run test bench deps apt-deps clean

deps: apt-deps $(STAMP) /var/empty

# apt only when a package is missing: dpkg-query is fast, apt-get update is not.
apt-deps:
	@missing=$$(for p in $(APT_PKGS); do \
	    dpkg-query -W -f='$${Status}\n' $$p 2>/dev/null | grep -q '^install ok installed' || echo $$p; \
	  done); \
	if [ -n "$$missing" ]; then \
	  echo "installing:" $$missing; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing; \
	fi

$(STAMP): pyproject.toml
	test -x $(VPY) || $(PYTHON) -m venv $(VENV)
	# compat mode: a plain .pth path, no import hook (privjail starts faster)
	$(VPY) -m pip install -q -e '.[test]' --config-settings editable_mode=compat
	# seccomp policy constants, generated once from this machine's headers
	$(VPY) -c 'from broker.jail.seccomp import ensure_constants; ensure_constants()'
	touch $(STAMP)

# minijail's minimalistic-mountns profile pivots into /var/empty.
/var/empty:
	mkdir -p -m 0755 /var/empty

run: deps
	@sh examples/demo.sh $(VENV)

test: deps
	$(VPY) -m pytest -q

bench: deps
	$(VPY) bench/launch_latency.py
	$(VPY) bench/broker_latency.py

clean:
	rm -rf $(VENV) .pytest_cache
