"""One backend fixture for the whole suite (POT's pattern): every test that takes
``backend`` runs on each of the five backends (and the two cached ones without their cache).

Without a GPU, triton runs its kernels in Triton's interpreter (``OTKERNELS_TRITON_CPU=1``)
and keops compiles its formulas for the CPU (``OTKERNELS_KEOPS_CPU=1``): both are switched on
here, before otkernels is imported, unless the environment already sets them (``=0`` opts
out).  A backend is *expected* when what it needs is installed (native: a C++ compiler;
triton: the triton package; keops: pykeops and a compiler); an expected backend that is not
available FAILS its tests (a broken native build must not turn the suite into skips).  Only a
backend whose package is absent, or that was opted out, is skipped with the reason."""
import os

os.environ.setdefault("OTKERNELS_TRITON_CPU", "1")
os.environ.setdefault("OTKERNELS_KEOPS_CPU", "1")
os.environ.setdefault("KEOPS_CACHE_FOLDER", os.path.join(os.path.expanduser("~"), ".cache", "keops-otkernels-tests"))

import pytest  # noqa: E402
import torch  # noqa: E402

import otkernels  # noqa: E402
from otkernels._env import flag  # noqa: E402
from otkernels import backends  # noqa: E402
from otk_testing import require_backend  # noqa: E402

# The test problems are tiny (N ≤ a few hundred, except a handful of tests): intra-op threads
# only add synchronisation, and on this shared 2-core machine a second thread that has to wait
# for a busy core turns a 40 µs reduction into ~10 ms.  One thread by default;
# OTKERNELS_TEST_THREADS=n to change it.
torch.set_num_threads(int(os.environ.get("OTKERNELS_TEST_THREADS", "1")))

BACKEND_NAMES = ["tensorized", "blocked", "blocked-recompute", "native", "native-recompute", "triton", "keops"]


# On a machine without a GPU, triton (interpreter) and keops (a C++ compile per formula) are
# 10-100x slower per call than the CPU backends: each test function runs on them for at most
# SLOW_BACKEND_CASES[backend] of its parametrizations, evenly spaced over its grid (every test function
# still runs on both backends).  OTKERNELS_TEST_FULL=1 runs the whole grid.
SLOW_BACKEND_CASES = {"triton": 6, "keops": 3}


def _keops_fast_compile():
    """The suite's KeOps binaries (tiny problems) are compiled at -O1 in their own cache folder
    (KEOPS_CACHE_FOLDER, default ~/.cache/keops-otkernels-tests): ~30% less compile time than
    KeOps's -O3, and the benchmarks' -O3 binaries are not replaced by slower ones."""
    try:
        from keopscore.config import config
    except Exception:  # pykeops absent or another version: leave KeOps as it is
        return
    if hasattr(config, "compile_options") and hasattr(config, "set_cpp_flags"):
        config.compile_options = config.compile_options.replace("-O3", "-O1")
        config.set_cpp_flags()


if os.environ.get("OTKERNELS_KEOPS_CPU") == "1" and not torch.cuda.is_available():
    _keops_fast_compile()


def _slow_backend(item):
    spec = getattr(item, "callspec", None)
    name = spec.params.get("backend") if spec is not None else None
    return name in ("triton", "keops") and not torch.cuda.is_available()


def pytest_collection_modifyitems(config, items):
    if flag("OTKERNELS_TEST_FULL"):
        return
    groups = {}
    for item in items:
        if _slow_backend(item):
            groups.setdefault((item.module.__name__, item.originalname, item.callspec.params["backend"]), []).append(item)
    drop = set()
    for group in groups.values():
        n = SLOW_BACKEND_CASES[group[0].callspec.params["backend"]]
        if len(group) > n:
            keep = {round(i * (len(group) - 1) / max(n - 1, 1)) for i in range(n)}
            drop.update(id(it) for i, it in enumerate(group) if i not in keep)
    if drop:
        config.hook.pytest_deselected(items=[it for it in items if id(it) in drop])
        items[:] = [it for it in items if id(it) not in drop]


@pytest.fixture(params=BACKEND_NAMES)
def backend(request, monkeypatch):
    """Backend name to pass to SamplesLoss; '<name>-recompute' is that backend without the cost
    cache (tiles computed on the fly in every pass)."""
    name = request.param
    base = name.split("-")[0]
    require_backend(base)
    if name.endswith("-recompute"):
        monkeypatch.setattr(backends, "_budget", 0)
    return base


@pytest.fixture
def rng():
    return torch.Generator().manual_seed(0)
