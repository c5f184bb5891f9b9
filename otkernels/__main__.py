"""``python -m otkernels``: Sinkhorn divergences between scikit-learn digit sets on every
available backend (time and value), next to geomloss's when it is installed.

Embedded data (sklearn's 8×8 digits ship with scikit-learn: no download).  Options:
``--n`` points per set, ``--blur``, ``--dtype``, ``--json PATH`` to save the table.
"""
from __future__ import annotations

import argparse
import json
import time

import torch

from . import SamplesLoss, backends


def digit_sets(n: int, dtype):
    """Two (n, 64) clouds: digits 0–4 and 5–9, pixels scaled to [0, 1]."""
    try:
        from sklearn.datasets import load_digits
    except ImportError as e:  # scikit-learn is in the [dev] extra
        raise SystemExit(f"python -m otkernels needs scikit-learn (pip install scikit-learn): {e}")
    d = load_digits()
    X = torch.tensor(d.data / 16.0, dtype=dtype)
    y = torch.tensor(d.target)
    return X[y < 5][:n], X[y >= 5][:n]


def _time(fn, x, y):
    x = x.detach().clone().requires_grad_(True)
    t0 = time.perf_counter()
    v = fn(x, y)
    v.backward()
    return v.detach().item(), time.perf_counter() - t0


def main(argv=None):
    ap = argparse.ArgumentParser(prog="python -m otkernels", description=__doc__.split("\n")[0])
    ap.add_argument("--n", type=int, default=800, help="points per digit set (max ~900)")
    ap.add_argument("--blur", type=float, default=0.5)
    ap.add_argument("--dtype", choices=["float32", "float64"], default="float32")
    ap.add_argument("--json", default=None, help="save the results table to this path")
    args = ap.parse_args(argv)
    dtype = getattr(torch, args.dtype)
    x, y = digit_sets(args.n, dtype)
    print(f"Sinkhorn divergence (p=2, blur={args.blur}) between digits 0-4 ({len(x)}) and 5-9 "
          f"({len(y)}), D=64, {args.dtype}, forward+backward, {torch.get_num_threads()} threads")
    rows = []
    for name, (ok, why) in backends.available().items():
        if not ok:
            print(f"  {'otkernels ' + name:<24} unavailable: {why}")
            continue
        rows.append(("otkernels " + name, *_time(SamplesLoss("sinkhorn", blur=args.blur, backend=name), x, y)))
    rows.append(("otkernels auto", *_time(SamplesLoss("sinkhorn", blur=args.blur), x, y)))
    try:
        import geomloss

        rows.append(("geomloss tensorized",
                     *_time(geomloss.SamplesLoss("sinkhorn", blur=args.blur, backend="tensorized"), x, y)))
    except ImportError:
        print("  (geomloss not installed: pip install geomloss to compare)")
    ref = rows[-1][1]
    print(f"  {'implementation':<24} {'value':>14} {'time (s)':>9} {'rel. diff':>10}")
    for name, v, t in rows:
        print(f"  {name:<24} {v:>14.8f} {t:>9.3f} {abs(v - ref) / abs(ref):>10.2e}")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump([dict(name=n, value=v, seconds=t) for n, v, t in rows], fh, indent=1)
    return rows


if __name__ == "__main__":
    main()
