import os

import torch

# Tests share a 2-core machine; one thread per test process keeps timings stable and avoids
# oversubscription when several processes run.
torch.set_num_threads(int(os.environ.get("CIRCUITBENCH_TEST_THREADS", "1")))
