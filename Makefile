# privbroker: `make run`, `make test`, `make bench`.
# Each target installs what is missing on a fresh Debian 12 machine (as root)
# and is quick when everything is already there.

PYTHON   ?= /usr/bin/python3
VENV     := .venv
VPY      := $(VENV)/bin/python
STAMP    := $(VENV)/.installed
# libc6-dev/linux-libc-dev: the headers seccomp policy constants are generated from
# umockdev: tests check the broker's udev record reader against libudev on recordings
APT_PKGS := python3 python3-venv python3-dev gcc libcap-dev libseccomp2 \
            libc6-dev linux-libc-dev bubblewrap dbus strace umockdev
# The VM tests (tests/vm/, tests/test_vm_*.py): qemu, a Debian kernel whose
# modules include 9p (the cloud flavour's do not), busybox and cpio for the
# initramfs, udev for the USB gadget test's device records (its modules:
# dummy_hcd, libcomposite). Without recommends: qemu's pull in a desktop stack.
VM_APT   := qemu-system-x86 linux-image-amd64 busybox-static cpio udev

.PHONY: run test conformance fuzz soak bench deps apt-deps clean install uninstall install-deps \
        install-files install-system man deb deb-deps vm-deps vm-test

deps: apt-deps $(STAMP) /var/empty

# apt only when a package is missing: dpkg-query is fast, apt-get update is not.
# $(call apt_ensure,PACKAGES[,APT-GET FLAGS]): install those of PACKAGES that are missing.
apt_ensure = missing=$$(for p in $(1); do \
	    dpkg-query -W -f='$${Status}\n' $$p 2>/dev/null | grep -q '^install ok installed' || echo $$p; \
	  done); \
	if [ -n "$$missing" ]; then \
	  echo "installing:" $$missing; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $(2) $$missing; \
	fi

apt-deps:
	@$(call apt_ensure,$(APT_PKGS))

vm-deps:
	@$(call apt_ensure,$(VM_APT),--no-install-recommends)

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

# tests/test_vm_*.py boot qemu VMs (tests/vm/): hence vm-deps.
test: deps vm-deps
	$(VPY) -m pytest -q

# The VM tests alone, with their figures: privbrokerd.service under a real
# systemd, installed from `make deb` with dpkg, and the cgroup tests on
# cgroup v2 with controllers (about 2 min on an idle machine, TCG).
vm-test: deps vm-deps
	$(VPY) -m pytest -q -s tests/test_vm_systemd.py tests/test_vm_cgroup2.py tests/test_vm_usb.py

# Decision equivalence for every corpus seccomp policy under every default
# (make test runs a sample): reference == interpreter == kernel.
conformance: deps
	PRIVBROKER_CONFORMANCE=full $(VPY) -m pytest -q tests/test_seccomp_conformance.py

# Long fuzzing runs (make test runs 200 examples of each property):
# FUZZ_EXAMPLES per property of tests/test_fuzz.py, with hypothesis's statistics.
FUZZ_EXAMPLES ?= 20000
fuzz: deps
	PRIVBROKER_FUZZ_EXAMPLES=$(FUZZ_EXAMPLES) $(VPY) -m pytest -q tests/test_fuzz.py \
	  --hypothesis-show-statistics

# Long soak (make test runs a short one): 10,000 launches + 100,000 calls
# against one broker, then 200 concurrent callers (half misbehaving), and
# the fault tests, and the confused-deputy races (thousands of rounds of
# path swaps against OpenPath, ChownDevice and MountDaemonStore); figures
# printed.  tests/test_soak*.py, tests/test_faults.py, tests/test_deputy_*race*.py.
soak: deps
	PRIVBROKER_SOAK=full $(VPY) -m pytest -q -s tests/test_soak.py tests/test_soak_callers.py \
	  tests/test_faults.py tests/test_deputy_races.py tests/test_deputy_store_race.py

bench: deps
	$(VPY) bench/launch_latency.py
	$(VPY) bench/broker_latency.py
	$(VPY) bench/device_latency.py
	$(VPY) bench/privsep_latency.py

clean:
	rm -rf $(VENV) .pytest_cache build

# --- make install / make uninstall / make deb (README "Install") -------------
# make install [PREFIX=/usr/local] [DESTDIR=]: the package and its Python
# dependencies in a dedicated venv ($(VENVDIR)), console scripts linked into
# bin/ and sbin/, the D-Bus policy, interface XML and activation file, the
# systemd unit, the sysusers.d file, man pages, bash completions and a default
# /etc/privbroker (never overwriting a file the administrator changed: see
# packaging/conffile.sh).  With DESTDIR empty it also creates the service
# user and tells systemd and the bus; with DESTDIR set it only stages files.
PREFIX      ?= /usr/local
DESTDIR     ?=
SYSCONFDIR  ?= /etc
LIBDIR       = $(PREFIX)/lib/privbroker
VENVDIR      = $(LIBDIR)/venv
BINDIR       = $(PREFIX)/bin
SBINDIR      = $(PREFIX)/sbin
DATADIR      = $(PREFIX)/share
MANDIR       = $(DATADIR)/man
DBUSDIR      = $(DATADIR)/dbus-1
# dbus-daemon reads bus policy only from /usr/share/dbus-1/system.d and
# /etc/dbus-1/system.d (activation files also from /usr/local/share).
DBUS_POLICYDIR ?= $(if $(filter /usr,$(PREFIX)),/usr/share/dbus-1/system.d,$(SYSCONFDIR)/dbus-1/system.d)
UNITDIR     ?= $(PREFIX)/lib/systemd/system
SYSUSERSDIR ?= $(PREFIX)/lib/sysusers.d
BASHCOMPDIR ?= $(DATADIR)/bash-completion/completions
DEFAULTSDIR  = $(DATADIR)/privbroker/defaults
CONFDIR      = $(SYSCONFDIR)/privbroker
# managed: packaging/conffile.sh keeps changed files (make install);
# plain: just copy them (dpkg does the keeping for the Debian package).
CONFFILES   ?= managed
CONFIG_FILES = broker.toml $(patsubst examples/%,%,$(wildcard examples/profiles/*.conf examples/profiles/*.policy))
COMPLETIONS  = privbroker privbrokerd privjail
MAN_SRC      = $(wildcard packaging/man/*.scd)
MANPAGES     = $(patsubst packaging/man/%.scd,build/man/%,$(MAN_SRC))
INSTALL_APT := python3 python3-venv python3-dev gcc libcap-dev scdoc
DEB_APT     := $(INSTALL_APT) dpkg-dev debhelper
DEB_BUILD   := build/deb

install-deps:
	@$(call apt_ensure,$(INSTALL_APT))

man: $(MANPAGES)

build/man/%: packaging/man/%.scd
	@mkdir -p build/man
	scdoc < $< > $@

install: install-deps man
	$(MAKE) install-files
	@if [ -z "$(DESTDIR)" ]; then $(MAKE) install-system; fi

install-files: man
	rm -rf $(DESTDIR)$(VENVDIR)
	$(PYTHON) -m venv $(DESTDIR)$(VENVDIR)
	$(DESTDIR)$(VENVDIR)/bin/python -m pip install -q --no-compile --no-warn-script-location \
	    --disable-pip-version-check .
	@# pip and setuptools were only needed to install; the broker never uses them
	$(DESTDIR)$(VENVDIR)/bin/python -m pip uninstall -q -y --disable-pip-version-check pip setuptools
	@# A venv staged under DESTDIR names DESTDIR in its scripts: point them
	@# at where the venv will really be (symlinks, e.g. bin/python, untouched).
	if [ -n "$(DESTDIR)" ]; then \
	  for f in $$(find $(DESTDIR)$(VENVDIR)/bin -maxdepth 1 -type f) $(DESTDIR)$(VENVDIR)/pyvenv.cfg; do \
	    if grep -qI "$(DESTDIR)" $$f; then sed -i "s|$(DESTDIR)||g" $$f; fi; \
	  done; \
	fi
	$(DESTDIR)$(VENVDIR)/bin/python -m compileall -q -f -s "$(DESTDIR)" -p / $(DESTDIR)$(VENVDIR)/lib
	install -d $(DESTDIR)$(BINDIR) $(DESTDIR)$(SBINDIR)
	ln -sfn $(VENVDIR)/bin/privjail $(DESTDIR)$(BINDIR)/privjail
	ln -sfn $(VENVDIR)/bin/privbroker $(DESTDIR)$(BINDIR)/privbroker
	ln -sfn $(VENVDIR)/bin/privbrokerd $(DESTDIR)$(SBINDIR)/privbrokerd
	install -Dm644 dbus-policy/org.privbroker.Broker1.conf $(DESTDIR)$(DBUS_POLICYDIR)/org.privbroker.Broker1.conf
	install -Dm644 dbus-policy/org.privbroker.Broker1.xml $(DESTDIR)$(DBUSDIR)/interfaces/org.privbroker.Broker1.xml
	install -Dm644 systemd/org.privbroker.Broker1.service $(DESTDIR)$(DBUSDIR)/system-services/org.privbroker.Broker1.service
	install -d $(DESTDIR)$(UNITDIR)
	sed 's|^ExecStart=/usr/sbin/privbrokerd|ExecStart=$(SBINDIR)/privbrokerd|' systemd/privbrokerd.service \
	    > $(DESTDIR)$(UNITDIR)/privbrokerd.service
	chmod 644 $(DESTDIR)$(UNITDIR)/privbrokerd.service
	install -Dm644 packaging/privbroker.sysusers $(DESTDIR)$(SYSUSERSDIR)/privbroker.conf
	for m in $(MANPAGES); do \
	  install -Dm644 $$m $(DESTDIR)$(MANDIR)/man$${m##*.}/$$(basename $$m); done
	for c in $(COMPLETIONS); do \
	  install -Dm644 packaging/bash-completion/$$c $(DESTDIR)$(BASHCOMPDIR)/$$c; done
	for f in $(CONFIG_FILES); do \
	  if [ "$(CONFFILES)" = managed ]; then \
	    sh packaging/conffile.sh install examples/$$f $(DESTDIR)$(DEFAULTSDIR)/$$f $(DESTDIR)$(CONFDIR)/$$f; \
	  else \
	    install -Dm644 examples/$$f $(DESTDIR)$(CONFDIR)/$$f; \
	  fi; \
	done

# Only on the real system (DESTDIR empty): the service user, the seccomp
# constants (from this machine's headers), and systemd/dbus told of new files.
# Nothing is enabled or started: the bus starts the broker on demand.
install-system:
	if command -v systemd-sysusers >/dev/null 2>&1; then \
	  systemd-sysusers $(SYSUSERSDIR)/privbroker.conf; \
	elif ! getent passwd privbroker >/dev/null; then \
	  adduser --system --group --no-create-home --home /nonexistent --quiet privbroker; \
	fi
	$(VENVDIR)/bin/python -c 'from broker.jail.seccomp import ensure_constants; ensure_constants()' \
	    || echo "warning: seccomp constants not generated (gcc, libc6-dev, linux-libc-dev?)" >&2
	if [ -d /run/systemd/system ]; then \
	  systemctl daemon-reload; systemctl try-reload-or-restart dbus.service || true; fi

uninstall:
	if [ -z "$(DESTDIR)" ] && [ -d /run/systemd/system ]; then \
	  systemctl stop privbrokerd.service 2>/dev/null || true; fi
	rm -rf $(DESTDIR)$(LIBDIR)
	rm -f $(DESTDIR)$(BINDIR)/privjail $(DESTDIR)$(BINDIR)/privbroker $(DESTDIR)$(SBINDIR)/privbrokerd
	rm -f $(DESTDIR)$(DBUS_POLICYDIR)/org.privbroker.Broker1.conf \
	      $(DESTDIR)$(DBUSDIR)/interfaces/org.privbroker.Broker1.xml \
	      $(DESTDIR)$(DBUSDIR)/system-services/org.privbroker.Broker1.service \
	      $(DESTDIR)$(UNITDIR)/privbrokerd.service $(DESTDIR)$(SYSUSERSDIR)/privbroker.conf
	for m in $(MANPAGES); do rm -f $(DESTDIR)$(MANDIR)/man$${m##*.}/$$(basename $$m); done
	for c in $(COMPLETIONS); do rm -f $(DESTDIR)$(BASHCOMPDIR)/$$c; done
	@# configuration: what is unchanged goes, what the administrator changed stays
	if [ -d $(DESTDIR)$(DEFAULTSDIR) ]; then \
	  cd $(DESTDIR)$(DEFAULTSDIR) && for f in $$(find . -type f | sed 's|^\./||'); do \
	    sh $(CURDIR)/packaging/conffile.sh remove $(DESTDIR)$(DEFAULTSDIR)/$$f $(DESTDIR)$(CONFDIR)/$$f; \
	  done; \
	fi
	rm -rf $(DESTDIR)$(DATADIR)/privbroker
	rmdir $(DESTDIR)$(CONFDIR)/profiles $(DESTDIR)$(CONFDIR) 2>/dev/null || true
	@# what the broker made at run time (the unit's CacheDirectory= and StateDirectory=)
	rm -rf $(DESTDIR)/var/cache/privbroker $(DESTDIR)/var/lib/privbroker
	if [ -z "$(DESTDIR)" ] && [ -d /run/systemd/system ]; then \
	  systemctl daemon-reload; systemctl try-reload-or-restart dbus.service || true; fi
	@echo "kept: changed files in $(CONFDIR), and the system user privbroker (userdel privbroker to remove it)"

# make deb: a Debian package (debian/, built by dpkg-buildpackage and
# debhelper from apt) from a copy of the working tree, into $(DEB_BUILD)/.
deb-deps:
	@$(call apt_ensure,$(DEB_APT))

deb: deb-deps
	rm -rf $(DEB_BUILD)
	mkdir -p $(DEB_BUILD)/privbroker
	tar -cf - --exclude=./.venv --exclude=./.git --exclude=./build --exclude=./.pytest_cache \
	    --exclude=./.hypothesis --exclude=__pycache__ --exclude='*.egg-info' \
	    --exclude=./broker/jail/seccomp/_cache . | tar -xf - -C $(DEB_BUILD)/privbroker
	cd $(DEB_BUILD)/privbroker && dpkg-buildpackage -b -us -uc
	@ls $(DEB_BUILD)/*.deb
