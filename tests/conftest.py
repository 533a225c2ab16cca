"""Test-suite settings.

One intra-op thread per process: the tests use tiny models, whose ops are too small for a second thread
to help, while OpenMP's spinning workers slow everything several-fold whenever the cores are shared
(a CI runner, a DDP test's two processes, a developer's other jobs). Set before torch is imported so
subprocesses (DDP workers, CLI runs) inherit it too.
"""
import os
import sys

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("MKL_NUM_THREADS", "1")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))
