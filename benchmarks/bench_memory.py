"""Peak memory of the ``blocked`` (and ``native``) backends without a cached cost: O(N+M).

Each benchmark runs ``memory_child.py`` (one Sinkhorn forward+backward, D=3, float32,
2 threads) in a fresh process, which reports its own peak RSS (``VmHWM`` of
/proc/self/status).  Not ``getrusage(RUSAGE_CHILDREN).ru_maxrss`` (nor ``wait4``'s): Linux
carries the parent's peak RSS across fork/vfork + exec into the child's ``ru_maxrss``, so
after a few benchmarks in the same pytest process that figure is pytest's size (measured:
3.4 GB for a child whose own peak was a few hundred MB).  It is recorded as
``ru_maxrss_wait4_kb`` for reference.  The time includes the child's start (imports,
~2 s); ``extra_info["seconds"]`` is the solve alone.

* default: N=M=10k, D=3, ``blocked`` and ``native`` with ``OTKERNELS_CACHE_BYTES=0`` (tiles
  recomputed, nothing N×M stored: the O(N+M) path this benchmark measures), and a control,
  ``native`` with a 2 GiB budget (``native-n10000-cached``), which caches all three costs
  (3 × 381 MiB): the check must see it;
* ``--large``: ``native`` at N=M=20k; N=M=100k (the costs would take 3 × 40 GB), where
  ``native`` takes minutes and ``blocked`` runs with ``scaling=0.1`` (4 ε-steps instead of 10:
  the peak memory of a Sinkhorn solve does not depend on the number of iterations, and with
  the default 0.5 it would take about an hour on 2 cores).

Checks, for every case:

* *what was cached* is read from the cost handles the call built (the child runs the loss with
  ``verbose=True`` and records the line it prints, ``cache_report``), not from the caching
  rule;
* the solve's own memory, ``growth`` = peak ``VmHWM`` − RSS just before the solve, must stay
  under ``GROWTH_LIMIT`` (256 MiB) when nothing is cached: less than one 10k × 10k float32
  cost (381 MiB), so a run that cached even one cost at 10k fails; the control must exceed
  it (it proves the limit sees a cached run).  (The former limit, 2 GiB of peak RSS, could
  not: a 10k run with all three costs cached peaks at ~1.5 GB.)  The total peak RSS < 2 GiB
  is kept as a second bound;
* the value against geomloss's, in float64 (:func:`common.geomloss_sinkhorn64`: geomloss's
  own Sinkhorn loop and ``softmin_tensorized`` on row blocks, computed once per problem in
  this process, ~1–2 min at 10k; itself checked against ``SamplesLoss(backend="tensorized")``
  at N=300), to 1e-4 relative.  At 100k that reference would take hours: the value is
  recorded, not checked (``reference: null``).

Timing rule: one run of each case (``Rounds(0, 1)``, the same for all), in a fresh process.
"""
import json
import os
import subprocess
import sys
import tempfile

import pytest

from common import THREADS, Rounds, check_geomloss_sinkhorn64, geomloss_sinkhorn64, make_data, measure

CHILD = os.path.join(os.path.dirname(os.path.abspath(__file__)), "memory_child.py")
RSS_TARGET_KB = 2 * 1024 * 1024  # 2 GiB of total peak RSS (a second bound)
GROWTH_LIMIT_KB = 256 * 1024     # the solve's own memory when nothing is cached; < 381 MiB, one 10k² float32 cost
ONE_10K_COST_KB = 10000 * 10000 * 4 / 1024
REF_MAX_N = 20000                # float64 reference up to here (~4× the 10k time at 20k)
REL_TOL = 1e-4
RULE = Rounds(warmup=0, rounds=1)
_REF: dict = {}


def reference(N, D, scaling):
    """float64 geomloss value of the (N, D) problem (cached)."""
    if (N, D, scaling) not in _REF:
        check_geomloss_sinkhorn64()
        x, y = make_data(N, N, D)
        _REF[N, D, scaling] = geomloss_sinkhorn64(x, y, blur=0.05, scaling=scaling, rows=64)
    return _REF[N, D, scaling]


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


NOCACHE, CACHE_2G = {"OTKERNELS_CACHE_BYTES": "0"}, {"OTKERNELS_CACHE_BYTES": str(2 << 30)}
CASES = [  # id, backend, N, --large only, ε-scaling, environment, expect a cached cost
    ("blocked-n10000", "blocked", 10000, False, 0.5, NOCACHE, False),
    ("native-n10000", "native", 10000, False, 0.5, NOCACHE, False),
    ("native-n10000-cached", "native", 10000, False, 0.5, CACHE_2G, True),
    ("native-n20000", "native", 20000, True, 0.5, NOCACHE, False),
    ("blocked-n100000", "blocked", 100000, True, 0.1, NOCACHE, False),
    ("native-n100000", "native", 100000, True, 0.5, NOCACHE, False),
]


@pytest.mark.parametrize("backend,N,large_only,scaling,env,cached", [
    pytest.param(*c[1:], id=c[0]) for c in CASES])
def test_peak_rss(benchmark, large, backend, N, large_only, scaling, env, cached):
    from otkernels import backends
    if large_only and not large:
        pytest.skip(f"N=M={N} takes many minutes: run with --large")
    ok, why = backends.available().get(backend, (False, "unknown backend"))
    if not ok:
        pytest.skip(f"backend {backend} unavailable: {why}")
    D = 3
    benchmark.group = f"peak RSS D={D}"
    res, _ = measure(benchmark, lambda: run_child(N, D, backend, env, scaling), RULE)
    rss = res["rss_peak_kb"]
    growth = rss - res["rss_before_kb"]
    ref = reference(N, D, scaling) if N <= REF_MAX_N else None
    err = None if ref is None else abs(res["value"] - ref) / abs(ref)
    benchmark.extra_info.update(res, env=env, peak_rss_mb=round(rss / 1024, 1), growth_mb=round(growth / 1024, 1),
                                growth_limit_mb=GROWTH_LIMIT_KB // 1024, rss_target_mb=RSS_TARGET_KB // 1024,
                                reference=ref, reference_kind=None if ref is None else "geomloss float64 (blocked rows)",
                                rel_diff=err)
    assert res["threads"] == THREADS
    assert res["grad_finite"], "non-finite gradient"
    if err is not None:
        assert err <= REL_TOL, f"value {res['value']} vs geomloss float64 {ref} (rel {err:.2e})"
    if cached:  # the control: the checks below must see a cached run
        assert res["cost_cached"], f"the control cached nothing: {res['cache_report']}"
        assert growth > GROWTH_LIMIT_KB and growth > ONE_10K_COST_KB, (
            f"a cached 10k run grew by {growth / 1024:.0f} MiB only: the limit would not see it")
        return
    assert not res["cost_cached"], f"a cost was cached: this does not measure the O(N+M) path ({res['cache_report']})"
    assert growth < GROWTH_LIMIT_KB, f"the solve grew by {growth / 1024:.0f} MiB at N=M={N} (limit {GROWTH_LIMIT_KB // 1024} MiB)"
    assert rss < RSS_TARGET_KB, f"peak RSS {rss / 1024:.0f} MB at N=M={N} (target < 2 GiB)"
