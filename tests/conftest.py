"""One backend fixture for the whole suite (POT's pattern): every test that takes
``backend`` runs on each usable backend; unusable ones are skipped with the reason."""
import os

import pytest
import torch

import otkernels
from otkernels import backends

# The test problems are tiny (N ≤ a few hundred, except a handful of tests): intra-op threads
# only add synchronisation, and on this shared 2-core machine a second thread that has to wait
# for a busy core turns a 40 µs reduction into ~10 ms.  One thread by default;
# OTKERNELS_TEST_THREADS=n to change it.
torch.set_num_threads(int(os.environ.get("OTKERNELS_TEST_THREADS", "1")))

BACKEND_NAMES = ["tensorized", "blocked", "blocked-recompute", "native", "native-recompute", "triton", "keops"]


@pytest.fixture(params=BACKEND_NAMES)
def backend(request, monkeypatch):
    """Backend name to pass to SamplesLoss; '<name>-recompute' is that backend without the cost
    cache (tiles computed on the fly in every pass)."""
    name = request.param
    base = name.split("-")[0]
    ok, why = backends.available()[base]
    if not ok:
        pytest.skip(f"backend {base} unavailable: {why}")
    if name.endswith("-recompute"):
        monkeypatch.setattr(backends, "_budget", 0)
    return base


@pytest.fixture
def rng():
    return torch.Generator().manual_seed(0)
