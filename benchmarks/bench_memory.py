"""Peak memory of the ``blocked`` (and ``native``) backends without a cached cost: O(N+M).

Each benchmark runs ``memory_child.py`` (one Sinkhorn forward+backward, D=3, float32,
2 threads) in a fresh process, which reports its own peak RSS (``VmHWM`` of
/proc/self/status).  Not ``getrusage(RUSAGE_CHILDREN).ru_maxrss`` (nor ``wait4``'s): Linux
carries the parent's peak RSS across fork/vfork + exec into the child's ``ru_maxrss``, so
after a few benchmarks in the same pytest process that figure is pytest's size (measured:
3.4 GB for a child whose own peak was a few hundred MB).  It is recorded as
``ru_maxrss_wait4_kb`` for reference.  The time includes the child's start (imports,
~2 s); ``extra_info["seconds"]`` is the solve alone.

* always on: ``blocked`` at N=M=10k (its recomputed tiles are slow: ~50 passes over N·M
  costs) and ``native`` at N=M=20k;
* N=M=100k (the costs would take 3 × 40 GB): only with ``--large``; ``native``
  takes minutes; ``blocked`` runs with ``scaling=0.1`` (4 ε-steps instead of 10: the peak
  memory of a Sinkhorn solve does not depend on the number of iterations, and with the
  default 0.5 it would take about an hour on 2 cores).

Every case runs with ``OTKERNELS_CACHE_BYTES=0`` (tiles recomputed, nothing N×M stored: the
path this benchmark measures; with the default budget ``native`` would cache up to 2 GiB of
rows of C(x, y)).  ``tests/test_memory.py`` checks the budget itself.
"""
import json
import os
import subprocess
import sys
import tempfile

import pytest

from common import THREADS

CHILD = os.path.join(os.path.dirname(os.path.abspath(__file__)), "memory_child.py")
RSS_TARGET_KB = 2 * 1024 * 1024  # 2 GiB


def run_child(N, D, backend, env, scaling=0.5):
    import otkernels  # the child imports the same otkernels as this process
    root = os.path.dirname(os.path.dirname(os.path.abspath(otkernels.__file__)))
    path = os.pathsep.join([root] + [p for p in [os.environ.get("PYTHONPATH")] if p])
    env = {**os.environ, "PYTHONPATH": path, **env}
    with tempfile.TemporaryFile("w+") as err:
        p = subprocess.Popen([sys.executable, CHILD, str(N), str(D), backend, str(scaling)],
                             stdout=subprocess.PIPE, stderr=err, text=True,
                             env=env)
        stdout = p.stdout.read()
        # os.wait4 reaps the child; its ru_maxrss includes this (parent) process's RSS
        _, status, usage = os.wait4(p.pid, 0)
        p.returncode = os.waitstatus_to_exitcode(status)
        if p.returncode != 0:
            err.seek(0)
            raise RuntimeError(f"memory child failed ({p.returncode}):\n{err.read()[-3000:]}")
    res = json.loads(stdout.strip().splitlines()[-1])
    res["ru_maxrss_wait4_kb"] = usage.ru_maxrss
    return res


CASES = [  # backend, N, --large only, ε-scaling
    ("blocked", 10000, False, 0.5), ("native", 20000, False, 0.5),
    ("blocked", 100000, True, 0.1), ("native", 100000, True, 0.5),
]


@pytest.mark.parametrize("backend,N,large_only,scaling", [
    pytest.param(*c, id=f"{c[0]}-n{c[1]}") for c in CASES])
def test_peak_rss(benchmark, large, backend, N, large_only, scaling):
    from otkernels import backends
    if large_only and not large:
        pytest.skip(f"N=M={N} takes many minutes: run with --large")
    ok, why = backends.available().get(backend, (False, "unknown backend"))
    if not ok:
        pytest.skip(f"backend {backend} unavailable: {why}")
    env = {"OTKERNELS_CACHE_BYTES": "0"}
    D = 3
    benchmark.group = f"peak RSS D={D}"
    res = benchmark.pedantic(run_child, args=(N, D, backend, env, scaling),
                             rounds=1, iterations=1, warmup_rounds=0)
    rss = res["rss_peak_kb"]
    benchmark.extra_info.update(res, env=env, peak_rss_mb=round(rss / 1024, 1),
                                rss_target_mb=RSS_TARGET_KB // 1024)
    assert res["threads"] == THREADS
    assert res["grad_finite"], "non-finite gradient"
    assert not res["cost_cached"], "the cost was cached: this does not measure the O(N+M) path"
    assert rss < RSS_TARGET_KB, f"peak RSS {rss / 1024:.0f} MB at N=M={N} (target < 2 GiB)"
