"""One Sinkhorn forward+backward in a fresh process, for peak-RSS measurements.

``python benchmarks/memory_child.py N D BACKEND`` prints one JSON line: value, seconds,
this process's RSS just before the solve and its peak RSS (KB; the peak before the solve
too: imports can peak above the steady state).  The parent
(``bench_memory.py``) also reads the child's peak RSS from ``os.wait4``.
"""
import json
import os
import resource
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import make_data, set_threads  # noqa: E402


def current_rss_kb():
    """Resident set size now (KB), from /proc/self/statm (Linux); ru_maxrss is the peak."""
    try:
        with open("/proc/self/statm") as fh:
            return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") // 1024
    except (OSError, ValueError, IndexError):
        return None


def main(N, D, backend):
    import torch

    import otkernels
    from otkernels import backends

    set_threads()
    x, y = make_data(N, N, D)
    x.requires_grad_()
    loss = otkernels.SamplesLoss("sinkhorn", p=2, blur=0.05, scaling=0.5, debias=True,
                                 backend=backend)
    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    rss_now = current_rss_kb()
    t, c = time.perf_counter(), time.process_time()
    v = loss(x, y)
    t_fwd = time.perf_counter() - t
    v.backward()
    out = dict(N=N, D=D, backend=backend, value=v.item(),
               seconds=time.perf_counter() - t, forward_s=t_fwd, cpu_s=time.process_time() - c,
               grad_finite=bool(torch.isfinite(x.grad).all()),
               rss_before_kb=rss_now, maxrss_before_kb=rss0, rss_peak_kb=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss,
               cache_budget=backends.cache_budget(),
               # the rule of the blocked and native backends: cache C_xy, C_xx, C_yy if they fit
               cost_cached=(N * N * 3) * x.element_size() <= backends.cache_budget(),
               resolved=backends.select(1, N, N, D, x.device) if backend == "auto" else backend,
               threads=torch.get_num_threads(), otkernels=os.path.dirname(otkernels.__file__))
    print(json.dumps(out))


if __name__ == "__main__":
    main(int(sys.argv[1]), int(sys.argv[2]), sys.argv[3] if len(sys.argv) > 3 else "blocked")
