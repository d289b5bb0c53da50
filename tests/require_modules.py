"""A pytest plugin (loaded by conftest.py): a test skipped because a module is missing fails instead.

A test that skips in CI protects nothing, and a new optional dependency must not switch a test off
without anyone noticing. So a skip whose reason says a module could not be imported -- what
``pytest.importorskip`` raises: "could not import 'scipy.stats': No module named 'scipy'", or its
"module 'x' has __version__ ..., required is ..." -- is reported as a failure (a module-level
``importorskip`` as a collection error) naming the module and how to install it. The ``test`` extra
(``pip install -e ".[test]"``) installs everything the tests import.

Skips for any other reason (no CUDA device, a platform the test does not apply to) stay skips.
``CIRCUITBENCH_ALLOW_MISSING_MODULES=1`` in the environment turns the check off, for a deliberately
partial install.
"""
from __future__ import annotations

import os
import re

import pytest

ALLOW_ENV = "CIRCUITBENCH_ALLOW_MISSING_MODULES"

# pytest.importorskip's own reasons (without a custom `reason=`), and a bare ModuleNotFoundError text
_MISSING = re.compile(r"could not import '[^']+'|No module named '[^']+'|module '[^']+' has __version__ .*required is")


def allowed() -> bool:
    return os.environ.get(ALLOW_ENV, "").strip().lower() not in ("", "0", "false", "no")


def missing_module_reason(report) -> str | None:
    """The skip reason of ``report`` when it is a skip for a missing (or too old) module, else None."""
    if not report.skipped or hasattr(report, "wasxfail"):
        return None
    longrepr = report.longrepr
    reason = str(longrepr[2]) if isinstance(longrepr, tuple) and len(longrepr) == 3 else str(longrepr)
    return reason if _MISSING.search(reason) else None


def _fail(report, reason: str) -> None:
    report.outcome = "failed"
    report.longrepr = (f"{reason}\nA test may not skip for a missing module: install the test extra "
                       f"(pip install -e \".[test]\"), or set {ALLOW_ENV}=1 to allow the skip.")


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item, call):
    report = yield
    reason = missing_module_reason(report)
    if reason is not None and not allowed():
        _fail(report, reason)
    return report


@pytest.hookimpl(wrapper=True)
def pytest_make_collect_report(collector):
    report = yield
    reason = missing_module_reason(report)
    if reason is not None and not allowed():
        _fail(report, reason)
    return report
