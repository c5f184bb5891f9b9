"""Sharded Sinkhorn (otkernels.distributed, issue 22): 1 vs 2 processes on one machine.

    python benchmarks/bench_distributed.py                      # N = M = 20k, D = 128, ~6 min on 2 cores
    python benchmarks/bench_distributed.py --n 4000 --out /tmp/d.json   # a quick look

Problem: ``SamplesLoss("sinkhorn", p=2, blur=0.05)`` (debiased, default ε-schedule, backend
``auto``: native on CPU) between ``x ~ randn(N, D)`` and ``y ~ randn(M, D) + 0.5``
(``common.make_data``, seed 0), float32, forward + backward (gradient w.r.t. x), one timed
call per configuration in a fresh process (after a small warm-up call that loads the
extension), between barriers:

* ``1 process × 2 threads`` — the single-process library using both cores;
* ``2 processes × 1 thread`` — gloo on 127.0.0.1, each rank half of x and half of y;
* ``1 process × 1 thread`` — the per-core baseline of the scaling.

On a 2-core machine the honest comparison is the first two (both use the two cores: threads
inside one process vs processes); the third shows the scaling of the work itself.  The
sharded run also records the time its ranks spent in collectives (all-gathers of the
potentials and the points), and its value and gradient are compared with the 1-process
run.  Results (and the CPU model from /proc/cpuinfo) go to ``--out`` as JSON.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import socket
import sys
import tempfile
import time
from datetime import timedelta

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import make_data  # noqa: E402

OUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "cpu-2core-distributed.json")


def cpu_model() -> str:
    """``model name`` of /proc/cpuinfo with its family, model and widest SIMD (AVX-512 / AVX2)."""
    info = {}
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, value = line.partition(":")
                key = key.strip()
                if key in ("model name", "cpu family", "model", "flags") and key not in info:
                    info[key] = value.strip()
    except OSError:
        return platform.processor() or "unknown"
    flags = info.get("flags", "").split()
    simd = "AVX-512" if "avx512f" in flags else "AVX2" if "avx2" in flags else "no AVX2"
    return f"{info.get('model name', '?')} (family {info.get('cpu family', '?')}, model {info.get('model', '?')}, {simd})"


def _worker(rank, world, threads, port, n, d, blur, out_dir, dtype=torch.float32):
    import torch.distributed as dist

    from otkernels import distributed as otd

    torch.set_num_threads(threads)
    if world > 1:
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                                timeout=timedelta(seconds=1800))
    loss = otd.SamplesLoss("sinkhorn", p=2, blur=0.05 if blur is None else blur)
    xs, ys = make_data(200, 200, d)  # warm-up: loads the native extension, first-call costs
    loss(xs[rank::world].requires_grad_(), ys[rank::world]).backward()
    x, y = make_data(n, n, d, dtype=dtype)
    rows = slice(rank * n // world, (rank + 1) * n // world)
    xr = x[rows].clone().requires_grad_()
    yr = y[rows].clone()
    if world > 1:
        dist.barrier()
    otd._Comm.blocked = 0.0  # seconds blocked in collectives (transfers and waiting for the other rank)
    t0 = time.perf_counter()
    v = loss(xr, yr)
    v.backward()
    if world > 1:
        dist.barrier()
    wall = time.perf_counter() - t0
    torch.save({"value": float(v.detach()), "grad": xr.grad, "rows": (rows.start, rows.stop), "wall": wall,
                "comm": otd._Comm.blocked}, os.path.join(out_dir, f"r{rank}.pt"))
    if world > 1:
        dist.destroy_process_group()


def run(world, threads, n, d, blur, dtype=torch.float32):
    import torch.multiprocessing as mp

    with tempfile.TemporaryDirectory() as out, socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
        s.close()
        mp.spawn(_worker, args=(world, threads, port, n, d, blur, out, dtype), nprocs=world, join=True)
        parts = [torch.load(os.path.join(out, f"r{r}.pt")) for r in range(world)]
    grad = torch.cat([p["grad"] for p in parts])
    return {"processes": world, "threads_per_process": threads, "seconds": max(p["wall"] for p in parts),
            "collective_seconds_per_rank": [round(p["comm"], 3) for p in parts], "value": parts[0]["value"]}, grad


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--n", type=int, default=20000)
    ap.add_argument("--d", type=int, default=128)
    ap.add_argument("--blur", type=float, default=0.05)
    ap.add_argument("--out", default=OUT)
    ap.add_argument("--reference64", action="store_true",
                    help="also run 1 process x 2 threads in float64: each run's value and gradient error vs it")
    ap.add_argument("--configs", default="1x2,2x1,1x1",
                    help="processes x threads per process, comma-separated (the first is the reference)")
    args = ap.parse_args(argv)
    rows, grads = [], {}
    for world, threads in (tuple(int(v) for v in c.split("x")) for c in args.configs.split(",")):
        r, g = run(world, threads, args.n, args.d, args.blur)
        grads[(world, threads)] = g
        rows.append(r)
        print(json.dumps(r), flush=True)
    ref = rows[0]
    ref_g = grads[(ref["processes"], ref["threads_per_process"])]
    for r in rows:
        g = grads[(r["processes"], r["threads_per_process"])]
        vs = "vs_" + args.configs.split(",")[0]
        r["value_rel_diff_" + vs] = abs(r["value"] - ref["value"]) / abs(ref["value"])
        r["grad_rel_diff_" + vs] = float((g - ref_g).abs().max() / ref_g.abs().max())
        r["speedup_" + vs] = ref["seconds"] / r["seconds"]
    if args.reference64:  # float32's own error on this problem, for scale
        r64, g64 = run(1, 2, args.n, args.d, args.blur, torch.float64)
        print(json.dumps(r64), flush=True)
        for r in rows:
            g = grads[(r["processes"], r["threads_per_process"])].double()
            r["value_rel_err_vs_float64"] = abs(r["value"] - r64["value"]) / abs(r64["value"])
            r["grad_rel_err_vs_float64"] = float((g - g64).abs().max() / g64.abs().max())
        r64["dtype"] = "float64 (reference)"
        rows.append(r64)
    B, N, M = 1, args.n, args.n
    result = {
        "benchmark": "otkernels.distributed.SamplesLoss('sinkhorn', p=2, blur) forward+backward, float32, "
                     "backend auto (native), x~randn(N,D), y~randn(M,D)+0.5",
        "N": N, "M": M, "D": args.d, "blur": args.blur,
        "cpu": cpu_model(), "cores": os.cpu_count(), "torch": torch.__version__,
        "communication_per_iteration_bytes_2_ranks": (2 + 1) * B * (N + 2 * M) * 4,  # (W+1)·B·(N+2M)·s, debias
        "command": "python benchmarks/bench_distributed.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "runs": rows,
    }
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(result, f, indent=1)
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
