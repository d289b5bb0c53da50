import os

import torch

# A test skipped because a module is missing fails instead (unless CIRCUITBENCH_ALLOW_MISSING_MODULES=1):
# the test extra installs everything the tests need. See require_modules.py.
from require_modules import pytest_make_collect_report, pytest_runtest_makereport  # noqa: F401

# Tests share a 2-core machine; one thread per test process keeps timings stable and avoids
# oversubscription when several processes run.
torch.set_num_threads(int(os.environ.get("CIRCUITBENCH_TEST_THREADS", "1")))
