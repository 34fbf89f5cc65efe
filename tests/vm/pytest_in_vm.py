"""Run test files with pytest inside the cgroup v2 VM, and read what passed.

The tests/test_vm_*.py that run other test files in the VM share this: a
module fixture yields from `run(...)`, one test asserts `ran_clean`, and the
rest look their must-pass node ids up in the results.
"""
from __future__ import annotations

import shutil
import tempfile
import xml.etree.ElementTree as ET
from pathlib import Path

from .harness import REPO, Result, vm_or_skip


def run(tests: list[str], name: str, timeout: float = 900):
    """Generator for a module fixture: yields (Result, results()) once the
    guest's pytest is done.  The job directory is kept when anything failed."""
    vm = vm_or_skip()
    jobdir = Path(tempfile.mkdtemp(prefix=f"privbroker-vm-{name}-"))
    job = {"mode": "run", "cwd": str(REPO),
           "argv": [str(REPO / ".venv/bin/python"), "-m", "pytest", "-q", "-p", "no:cacheprovider",
                    "--junitxml=/vmjob/junit.xml", *tests]}
    res = vm.run_job(job, timeout=timeout, jobdir=jobdir)
    print(f"\nvm {name}: {res.seconds:.0f} s in all; guest: {res.file('rc')}")
    yield res, results(res)
    if (res.file("rc") or "").split()[:1] == ["0"]:
        shutil.rmtree(jobdir, ignore_errors=True)


def results(res: Result) -> dict[str, str]:
    """node id (file::name) -> passed | failed | error | skipped, from the junit xml."""
    xml = res.file("junit.xml")
    if xml is None:
        return {}
    out = {}
    for case in ET.fromstring(xml).iter("testcase"):
        node = f"{case.get('classname').rsplit('.', 1)[-1]}.py::{case.get('name')}"
        kinds = [child.tag for child in case if child.tag in ("failure", "error", "skipped")]
        out[node] = {"failure": "failed"}.get(kinds[0], kinds[0]) if kinds else "passed"
    return out


def ran_clean(res: Result, got: dict[str, str]) -> None:
    """Assert the VM finished, its pytest ran something, and nothing failed."""
    assert res.file("rc") is not None, \
        f"the VM never finished (qemu {res.qemu_rc}); console:\n{res.console[-4000:]}"
    bad = {k: v for k, v in got.items() if v in ("failed", "error")}
    assert got and not bad, f"{bad}\n{(res.file('output.log') or '')[-6000:]}"
    assert res.file("rc").split()[0] == "0", (res.file("output.log") or "")[-6000:]
