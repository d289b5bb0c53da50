import os

import pytest
import torch

# A test skipped because a module is missing fails instead (unless CIRCUITBENCH_ALLOW_MISSING_MODULES=1):
# the test extra installs everything the tests need. See require_modules.py.
from require_modules import pytest_make_collect_report, pytest_runtest_makereport  # noqa: F401

# Tests share a 2-core machine; one thread per test process keeps timings stable and avoids
# oversubscription when several processes run.
torch.set_num_threads(int(os.environ.get("CIRCUITBENCH_TEST_THREADS", "1")))


@pytest.fixture
def gloo_group(tmp_path):
    """A process group of this process alone (gloo), destroyed after the test."""
    import torch.distributed as dist

    if dist.is_initialized():
        pytest.fail("a process group is already initialised in this process")
    dist.init_process_group("gloo", init_method=f"file://{os.path.join(tmp_path, 'rendezvous')}", rank=0,
                            world_size=1)
    try:
        yield
    finally:
        dist.destroy_process_group()
