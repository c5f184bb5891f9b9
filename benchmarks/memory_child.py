"""One Sinkhorn forward+backward in a fresh process, for peak-RSS measurements.

``python benchmarks/memory_child.py N D BACKEND [SCALING]`` prints one JSON line: value, seconds,
this process's RSS just before the solve and its peak RSS (``VmHWM``, KB; also the peak
before the solve: imports can peak above the steady state).  The optional backends are
imported before the first measurement, so ``rss_peak_kb − rss_before_kb`` is the solve's
own memory.  The cache budget is the default one unless ``OTKERNELS_CACHE_BYTES`` is set.

What the solve cached is read from the objects it built, not from the caching rule: the loss
runs with ``verbose=True`` and the line it prints (``backends.describe_cache`` of the cost
handles the call created: "C(x,y) cached 381.5 MiB; ..." or "no N×M matrix stored") is
recorded as ``cache_report``; ``cost_cached`` is true unless it says nothing was stored.
"""
import contextlib
import io
import json
import os
import resource
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import make_data, set_threads  # noqa: E402


def _status_kb(field):
    """``VmRSS`` (now) or ``VmHWM`` (peak) of this process image, KB, from /proc/self/status.

    Not ``ru_maxrss``: Linux carries the parent's peak RSS across fork/vfork + exec into the
    child's ``ru_maxrss`` (and so into the parent's ``RUSAGE_CHILDREN``/``wait4`` figure),
    which would report the pytest process's size, not this solve's."""
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except (OSError, ValueError):
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


def main(N, D, backend, scaling=0.5):
    import torch

    import otkernels
    from otkernels import backends

    set_threads()
    backends.available()  # import the optional backends (pykeops, triton: ~75 MB) before measuring
    x, y = make_data(N, N, D)
    x.requires_grad_()
    loss = otkernels.SamplesLoss("sinkhorn", p=2, blur=0.05, scaling=scaling, debias=True,
                                 backend=backend, verbose=True)
    rss_now, hwm0 = _status_kb("VmRSS"), _status_kb("VmHWM")
    printed = io.StringIO()
    t, c = time.perf_counter(), time.process_time()
    with contextlib.redirect_stdout(printed):
        v = loss(x, y)
    t_fwd = time.perf_counter() - t
    report = [ln.strip() for ln in printed.getvalue().splitlines() if ln.strip().startswith("cost matrices:")]
    if len(report) != 1:
        raise RuntimeError(f"expected one 'cost matrices:' line from verbose=True, got {printed.getvalue()!r}")
    v.backward()
    out = dict(N=N, D=D, backend=backend, scaling=scaling, value=v.item(),
               seconds=time.perf_counter() - t, forward_s=t_fwd, cpu_s=time.process_time() - c,
               grad_finite=bool(torch.isfinite(x.grad).all()),
               rss_before_kb=rss_now, peak_before_kb=hwm0, rss_peak_kb=_status_kb("VmHWM"),
               ru_maxrss_kb=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss,
               cache_budget=backends.cache_budget(),
               # what the cost handles of this call stored (verbose=True's report)
               cache_report=report[0], cost_cached="no N×M matrix stored" not in report[0],
               resolved=backends.select(1, N, N, D, x.device) if backend == "auto" else backend,
               threads=torch.get_num_threads(), otkernels=os.path.dirname(otkernels.__file__))
    print(json.dumps(out))


if __name__ == "__main__":
    main(int(sys.argv[1]), int(sys.argv[2]), sys.argv[3] if len(sys.argv) > 3 else "blocked",
         float(sys.argv[4]) if len(sys.argv) > 4 else 0.5)
