"""The Sinkhorn divergence (forward + backward w.r.t. x) timed in this source tree and in other
trees (older commits), processes alternated so that both see the same machine state.

    git worktree add /tmp/before 638f152^ && (cd /tmp/before && python setup.py build_ext --inplace)
    OMP_WAIT_POLICY=PASSIVE python benchmarks/divergence_vs_tree.py /tmp/before --json out.json

Each process imports otkernels from its tree (PYTHONPATH), builds ``x ~ randn(N, D)``, ``y ~
randn(N, D) + 0.5`` (seed 0, float32), runs ``SamplesLoss("sinkhorn", p=2, blur=0.05,
scaling=0.5, backend="native")`` three times and reports the best call (the first pays for the
cache pool's first allocation).  ``--rounds`` processes per tree, alternated; the table gives
each tree's best and median over its processes and the ratio of the medians to the first
tree.  Extra environment for one tree: ``TREE=VAR=value,VAR=value`` (e.g. ``.:OTKERNELS_NATIVE_PLAN=0``).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys

CHILD = r"""
import json, sys, time, torch, otkernels
torch.set_num_threads(int(sys.argv[3]))
N, D = int(sys.argv[1]), int(sys.argv[2])
g = torch.Generator().manual_seed(0)
x = torch.randn(N, D, generator=g); y = torch.randn(N, D, generator=g) + 0.5
L = otkernels.SamplesLoss("sinkhorn", p=2, blur=0.05, scaling=0.5, backend="native")
ts = []
for _ in range(3):
    xg = x.clone().requires_grad_()
    t = time.perf_counter(); v = L(xg, y); v.backward(); ts.append(time.perf_counter() - t)
print(json.dumps({"times": ts, "value": v.item(), "file": otkernels.__file__}))
"""


def cpu_name():
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def run_tree(tree, env_extra, N, D, threads):
    env = dict(os.environ, PYTHONPATH=os.path.abspath(tree), **env_extra)
    out = subprocess.run([sys.executable, "-c", CHILD, str(N), str(D), str(threads)], env=env, cwd="/",
                         capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def parse_tree(spec):
    tree, _, extra = spec.partition(":")
    env = dict(kv.split("=", 1) for kv in extra.split(",") if kv)
    return spec, tree, env


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("trees", nargs="+", help="other source trees (this tree runs first): PATH or PATH:VAR=value,...")
    ap.add_argument("--n", type=int, default=10000)
    ap.add_argument("--dim", type=int, default=128)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=3, help="processes per tree, alternated")
    ap.add_argument("--json")
    args = ap.parse_args()
    here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    trees = [parse_tree(here)] + [parse_tree(t) for t in args.trees]
    best = {spec: [] for spec, _, _ in trees}
    runs = []
    for r in range(args.rounds):
        for spec, tree, env in trees:
            res = run_tree(tree, env, args.n, args.dim, args.threads)
            best[spec].append(min(res["times"]))
            runs.append({"tree": spec, "round": r, **res})
            print(f"round {r + 1}: {spec}: best of 3 calls {min(res['times']):.3f} s (value {res['value']:.9f})",
                  flush=True)
    ref = statistics.median(best[trees[0][0]])
    print(f"\nN = M = {args.n}, D = {args.dim}, {args.threads} threads, {cpu_name()}")
    print("| tree | best | median | median / this tree |\n|---|---:|---:|---:|")
    for spec, _, _ in trees:
        med = statistics.median(best[spec])
        print(f"| {spec} | {min(best[spec]):.3f} s | {med:.3f} s | {med / ref:.2f} |")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"cpu": cpu_name(), "n": args.n, "dim": args.dim, "threads": args.threads, "runs": runs,
                       "best_per_process": best}, fh, indent=1)


if __name__ == "__main__":
    main()
