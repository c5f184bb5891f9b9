"""``python -m otkernels``: the demo, and the native kernels' ahead-of-time build.

* ``python -m otkernels [demo] [--n N] [--blur B] [--dtype D] [--repeat R] [--json PATH]``:
  the Sinkhorn divergence between scikit-learn's digits 0–4 and 5–9 (embedded data, no
  download) on every available backend and on geomloss when it is installed: value, and the
  median time of ``--repeat`` forward + backward calls after one untimed warm-up call (the
  warm-up absorbs one-off costs: a just-in-time build, KeOps formula compilation, first-touch
  allocations).
* ``python -m otkernels build [--force]``: compile the native CPU kernels now (when
  ``pip install`` built no extension: build isolation has no torch) instead of on first use,
  with progress; ``--force`` rebuilds.
* ``python -m otkernels info``: which backends are usable here, and why not.
"""
from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from . import SamplesLoss, backends

COMMANDS = ("demo", "build", "info")


def digit_sets(n: int, dtype):
    """Two (n, 64) clouds: digits 0–4 and 5–9, pixels scaled to [0, 1]."""
    try:
        from sklearn.datasets import load_digits
    except ImportError as e:  # scikit-learn is in the [demo] and [dev] extras
        raise SystemExit(f"python -m otkernels needs scikit-learn (pip install -e \".[demo]\"): {e}")
    d = load_digits()
    X = torch.tensor(d.data / 16.0, dtype=dtype)
    y = torch.tensor(d.target)
    return X[y < 5][:n], X[y >= 5][:n]


def _once(fn, x, y):
    x = x.detach().clone().requires_grad_(True)
    t0 = time.perf_counter()
    v = fn(x, y)
    v.backward()
    return v.detach().item(), time.perf_counter() - t0


def timed(fn, x, y, repeat=5):
    """(value, median seconds of ``repeat`` forward + backward calls, seconds of the warm-up call)."""
    _, warm = _once(fn, x, y)
    runs = [_once(fn, x, y) for _ in range(max(1, repeat))]
    return runs[-1][0], statistics.median(t for _, t in runs), warm


def demo(argv=None):
    ap = argparse.ArgumentParser(prog="python -m otkernels [demo]",
                                 description="Sinkhorn divergence between the digits 0-4 and 5-9 on every backend")
    ap.add_argument("--n", type=int, default=800, help="points per digit set (max ~900)")
    ap.add_argument("--blur", type=float, default=0.5)
    ap.add_argument("--dtype", choices=["float32", "float64"], default="float32")
    ap.add_argument("--repeat", type=int, default=5, help="timed calls after the warm-up (median reported)")
    ap.add_argument("--json", default=None, help="save the results table to this path")
    args = ap.parse_args(argv)
    dtype = getattr(torch, args.dtype)
    x, y = digit_sets(args.n, dtype)
    print(f"Sinkhorn divergence (p=2, blur={args.blur}) between digits 0-4 ({len(x)}) and 5-9 ({len(y)}), "
          f"D=64, {args.dtype}, forward+backward, {torch.get_num_threads()} threads; "
          f"median of {args.repeat} calls after a warm-up call", flush=True)
    cands = []
    for name, (ok, why) in backends.available().items():
        if ok:
            cands.append(("otkernels " + name, SamplesLoss("sinkhorn", blur=args.blur, backend=name)))
        else:
            print(f"  {'otkernels ' + name:<24} unavailable: {why}")
    cands.append(("otkernels auto", SamplesLoss("sinkhorn", blur=args.blur)))
    try:
        import geomloss

        cands.append(("geomloss tensorized", geomloss.SamplesLoss("sinkhorn", blur=args.blur, backend="tensorized")))
    except ImportError:
        print("  (geomloss is not installed: pip install geomloss, or the [demo] extra, to compare)")
    print(f"  {'implementation':<24} {'value':>14} {'median (s)':>10} {'warm-up (s)':>11}", flush=True)
    rows = []
    for name, fn in cands:
        v, t, warm = timed(fn, x, y, args.repeat)
        rows.append((name, v, t, warm))
        print(f"  {name:<24} {v:>14.8f} {t:>10.4f} {warm:>11.3f}", flush=True)
    ref_name, ref = rows[-1][0], rows[-1][1]
    print(f"  rel. diff vs {ref_name}: " + ", ".join(
        f"{n.replace('otkernels ', '')} {abs(v - ref) / abs(ref):.1e}" for n, v, _, _ in rows[:-1]))
    if ref_name.startswith("geomloss"):
        best = min((r for r in rows[:-1]), key=lambda r: r[2])
        print(f"  fastest otkernels backend: {best[0].replace('otkernels ', '')}, "
              f"{rows[-1][2] / best[2]:.1f}x geomloss tensorized")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump([dict(name=n, value=v, median_seconds=t, warmup_seconds=w, repeat=args.repeat)
                       for n, v, t, w in rows], fh, indent=1)
    return rows


def build(argv=None):
    ap = argparse.ArgumentParser(prog="python -m otkernels build",
                                 description="compile the native CPU kernels now (once per version of the sources)")
    ap.add_argument("--force", action="store_true", help="rebuild even if a build exists")
    args = ap.parse_args(argv)
    from .backends import native

    t0 = time.perf_counter()
    msg = native.build(force=args.force)
    print(f"{msg} ({time.perf_counter() - t0:.1f} s)")
    return 0 if "unavailable" not in msg else 1


def info(argv=None):
    argparse.ArgumentParser(prog="python -m otkernels info", description="usable backends").parse_args(argv)
    for name, (ok, why) in backends.available().items():
        print(f"{name:<11} {'yes' if ok else 'no ':<4} {why}")
    print(f"cost cache budget: {backends.cache_budget() / 2 ** 30:.2f} GiB "
          f"(otkernels.backends.set_cache_budget / OTKERNELS_CACHE_BYTES)")
    return 0


def main(argv=None):
    import sys

    argv = list(sys.argv[1:] if argv is None else argv)
    cmd = argv.pop(0) if argv and argv[0] in COMMANDS else "demo"
    if cmd == "build":
        return build(argv)
    if cmd == "info":
        return info(argv)
    return demo(argv)


if __name__ == "__main__":
    out = main()
    raise SystemExit(out if isinstance(out, int) else 0)
