"""One command that measures otkernels on the day a GPU exists, and records it all in one JSON.

Run from the repository root:

    python benchmarks/gpu_check.py               # CUDA machine, full sizes: < 8 min on one H100/H200
    python benchmarks/gpu_check.py --tiny        # small sizes; without CUDA, in Triton's interpreter
    options: --json PATH   (default benchmarks/results/gpu-check-<device-slug>[-tiny].json)
             --skip-keops  (no geomloss-KeOps references: sections 3 and 4 record why)
             --workers N   (processes that compile and run section 2's cases; 1 = in this process)
             --sections a,b (these sections, in this order; default all, in the order below)
             --deadline S  (no section starts after S seconds; section 2 stops its jobs there: the
                            skipped ones are recorded, so a leased GPU's time limit cannot lose the run)
             --jobs-from J (section 2 runs only the jobs that the earlier JSON J skipped at its deadline)

The JSON is rewritten after every section (``"complete": false`` until the last), so a run that
is killed keeps what it measured.

Device: chosen in one place, :func:`pick_device`: CUDA when torch sees a device, else CPU with
``TRITON_INTERPRET=1``, set there before triton or otkernels are imported (the Triton kernels
then run in Triton's interpreter: only ``--tiny`` sizes are practical, so a full run without
CUDA stops with exit code 2).  Timings use CUDA events on a GPU, ``time.perf_counter`` on CPU.

Sections (each runs inside a guard: an exception is recorded with its traceback and the next
section runs):

1. ``versions``: torch, triton, CUDA, driver, device name, capability, SM count, memory,
   pykeops / geomloss versions and KeOps usability, host and CPU, date, git commit.
2. ``correctness``: every Triton reduction of ``otkernels.backends.triton.ops`` against dense
   float64 torch, N=3000, M=3001, B=2, D in {3, 48, 128, 256, 1000}, p in {1, 2}, two ε: ``softmin``
   value (no-grad and fused paths) and its x, y, h gradients; ``kernel_sum`` (gaussian,
   laplacian, energy) value and x, y, b gradients; ``argmin`` (sqdist) / ``argmax`` (dot):
   the chosen value must be the best one to the tolerance (near ties may pick another index);
   ``plan_apply`` (the transport plan times V, K = 64) against the dense float64 plan.
   Variants: float32 points at every precision of ``ops.PRECISIONS`` and the default, plus
   float16, bfloat16 and float64 points; the reference is float64 of the very tensors passed
   in.  Per output: ``max_rel`` = max|out − ref| / max|ref|, checked against the stated bounds
   :data:`TOLERANCES` (or twice the error that rounding the points to TF32 / bfloat16 alone
   causes, when larger: see :func:`judge`), and the elementwise |out − ref| / max(|ref|,
   1e-3·max|ref|) (median and max, for information).  Autotuning is pinned to one config per kernel here (the
   largest tile its pruning keeps) to bound compile time; sections 4-6 autotune normally.
3. ``parity``: ``otkernels.SamplesLoss(backend="triton")`` and geomloss ``backend="online"``
   (KeOps; ``tensorized`` with the reason when KeOps cannot run) on 20 configurations, values
   and gradients w.r.t. x, both in float32 against geomloss tensorized in float64
   (:func:`section_parity` states the rule, :data:`PARITY_TOL` its floors).
4. ``timings``: N=M=50k, D=128: one softmin pass and a Sinkhorn divergence forward+backward,
   per precision; first call (compilation, autotuning) apart from the median of 5; the roofline
   from the device's peak table (``bench_gpu.PEAKS``) and the measured/roofline ratio; geomloss
   KeOps at the same size (warm-up + median of 3) and the speed ratio; the error of each timed
   result against float64; every autotuning of the first calls (:class:`AutotuneLog`: kernel,
   key, winner, each config's time), the data for tuning the tiles.
5. ``large_offsets``: x of 1.1M × 2048 float32 (9 GB: element offsets of the last rows pass
   2^31), M=64: ``softmin_rows`` and ``argmin`` on sampled rows against float64.
6. ``fronts``: ``diffusion.sample.ddim_sample_with_ot`` with a tiny untrained UNet,
   ``otkernels.metrics.evaluate`` on device features (compared with the same call on CPU), and
   ``otkernels.plan.transport_plan(...) @ V`` and ``coupling.sample_pairs("sinkhorn")`` on device
   (n = 4096, D = 64; against float64 on CPU).
7. ``ragged``: 256 pairs of clouds of 50–2,000 points (D = 3, float32), Sinkhorn forward +
   backward in one launch per reduction (the Triton ragged grid) against the loop over the
   segments and against padding with zero weights: times, speed-up, values and gradients vs
   the loop.
8. ``distributed``: ``otkernels.distributed.SamplesLoss`` with NCCL, one rank per visible GPU
   (N = 20k, M = 20,007, D = 128), against the single-process loss: time per rank, value and
   x-gradient errors.  ``--tiny`` without CUDA: 2 gloo processes, N = 60.
9. ``cuda_graph``: the divergence (``diameter=`` given) forward + backward captured in one CUDA
   graph, replayed on new points (N = M = 10k, D = 128) against the eager loss; skipped
   without CUDA.

``--tiny``: section 2 at N=40, M=41, D in {3, 17}, ε = 0.01, a subset of variants; section 3 against geomloss
``backend="tensorized"`` at N ≤ 30; section 4 at N=M=64, D=16 against geomloss tensorized and
dense torch; section 5 on a strided view of a small storage; section 6 on small inputs.

Exit code: 0 when every section ran and every check passed, 1 otherwise (the failures are
listed under ``"failures"`` in the JSON), 2 for a full run without CUDA.
"""
from __future__ import annotations

import argparse
import contextlib
import datetime
import inspect
import json
import math
import os
import platform
import re
import subprocess
import sys
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(1, str(ROOT))  # the working tree's otkernels / diffusion, installed or not

import torch  # noqa: E402  (torch does not import triton)

# Stated error bounds of section 2: max|out − ref| / max|ref| against float64, per variant.
TOLERANCES = {
    "float64": dict(value=1e-9, grad=1e-9),       # float64 points: float64 end to end
    "ieee": dict(value=1e-4, grad=3e-3),          # float32 tl.dot
    "tf32x3": dict(value=1e-4, grad=3e-3),        # three TF32 products ≈ float32
    "default": dict(value=1e-4, grad=3e-3),       # precision=None (tf32x3 or ieee for float32)
    "tf32": dict(value=2e-3, grad=5e-3),          # TF32 operands, rounded to nearest
    "bf16": dict(value=2e-2, grad=3e-2),          # float32 points, bfloat16 tensor-core dots
    "float16": dict(value=2e-2, grad=3e-2),       # float16 points (tensor cores, fp32 accumulation)
    "bfloat16": dict(value=2e-2, grad=3e-2),      # bfloat16 points
}
PARITY_TOL = dict(value=1e-4, grad=1e-3)  # section 3 floors (float32 vs geomloss float64), see section_parity
POINT_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float64": torch.float64}
FULL = dict(corr_n=3000, corr_d=(3, 48, 128, 256, 1000), corr_eps=(0.5, 0.01), parity_n=(4000, 3000), parity_d=3,
            time_n=50_000, time_d=128, rounds=5, big_n=1_100_000, big_d=2048, big_m=64)
TINY = dict(corr_n=40, corr_d=(3, 17), corr_eps=(0.01,), parity_n=(30, 25), parity_d=3,
            time_n=64, time_d=16, rounds=1, big_n=200, big_d=17, big_m=64)
TINY_VARIANTS = ("default", "tf32", "bfloat16", "float64")
SINKHORN = dict(loss="sinkhorn", p=2, blur=0.05, scaling=0.5)


class Unsupported(Exception):
    """A measurement this build cannot make (recorded as such, not as a failure)."""


# ----------------------------------------------------------------------------- device
def pick_device(tiny: bool) -> str:
    """The one place where the device is chosen: "cuda" when available, else "cpu" with
    ``TRITON_INTERPRET=1`` (set before triton / otkernels are imported)."""
    if torch.cuda.is_available():
        return "cuda"
    if not tiny:
        print("gpu_check: no CUDA device; run with --tiny for the CPU (Triton interpreter) run", file=sys.stderr)
        sys.exit(2)
    os.environ["TRITON_INTERPRET"] = "1"
    return "cpu"


def sync(device):
    if device == "cuda":
        torch.cuda.synchronize()


def first_call(fn, device):
    """(result, seconds) of one call, compilation and autotuning included."""
    sync(device)
    t = time.perf_counter()
    out = fn()
    sync(device)
    return out, time.perf_counter() - t


def median_time(fn, device, rounds):
    """Median seconds over ``rounds`` calls: CUDA events on a GPU, perf_counter on CPU."""
    times = []
    for _ in range(rounds):
        if device == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
        else:
            t = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t)
    return sorted(times)[len(times) // 2]


# ----------------------------------------------------------------------------- precision API
def accepts(fn, name) -> bool:
    try:
        return name in inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return False


def precision_call(fn, precision):
    """``(kwargs, via)`` to call ``fn`` at ``precision`` (None: the default, no keyword);
    :class:`Unsupported` when ``fn`` has no ``precision=`` keyword (an older build)."""
    if precision is None:
        return {}, "default"
    if accepts(fn, "precision"):
        return {"precision": precision}, "keyword"
    raise Unsupported("precision not supported by this build")


def resolved_precision(ops, precision, dtype):
    """The dot precision a call really uses, as a roofline kind's name."""
    if dtype == torch.float64:
        return "fp64"
    if dtype in (torch.float16, torch.bfloat16):
        return "bf16"
    if hasattr(ops, "resolve_precision"):
        return ops.resolve_precision(dtype, precision)
    return precision or ops.get_precision()


def variant_setup(variant):
    """Variant name -> (points dtype, precision keyword)."""
    if variant in POINT_DTYPES:
        return POINT_DTYPES[variant], None
    return torch.float32, (None if variant == "default" else variant)


@contextlib.contextmanager
def fresh_autotuning():
    """Inside the block every kernel tunes afresh (the autotuners' caches and the launcher's
    "already tuned" keys are emptied); after it, both are as before."""
    from otkernels.backends.triton import kernels, ops
    tuners = getattr(kernels, "KERNELS", {}).values()
    caches = [(t, dict(t.cache)) for t in tuners]
    tuned = set(getattr(ops, "_tuned", ()))
    for t, _ in caches:
        t.cache.clear()
    if hasattr(ops, "_tuned"):
        ops._tuned.clear()
    try:
        yield
    finally:
        for t, cache in caches:
            t.cache.clear()
            t.cache.update(cache)
        if hasattr(ops, "_tuned"):
            ops._tuned.clear()
            ops._tuned.update(tuned)


@contextlib.contextmanager
def one_config_per_kernel():
    """Pin each autotuned kernel to the largest tile its pruning keeps (restored after)."""
    from otkernels.backends.triton import kernels
    saved = []
    for tuner in getattr(kernels, "KERNELS", {}).values():
        prune = getattr(tuner, "early_config_prune", None)
        if prune is None:
            continue
        saved.append((tuner, prune))

        def pinned(configs, nargs, _prune=prune, **kw):
            return [max(_prune(configs, nargs, **kw),
                        key=lambda c: (c.kwargs["BLOCK_N"] * c.kwargs["BLOCK_M"],
                                       c.kwargs.get("BLOCK_DV", 0), c.num_warps, -c.num_stages))]
        tuner.early_config_prune = pinned
    try:
        with fresh_autotuning():
            yield
    finally:
        for tuner, prune in saved:
            tuner.early_config_prune = prune


# ----------------------------------------------------------------------------- errors
def rel_errors(out, ref):
    """max|out − ref| / max|ref|, and the elementwise |out − ref| / max(|ref|, 1e-3·max|ref|)."""
    out, ref = out.detach().double(), ref.detach().double()
    diff = (out - ref).abs()
    scale = ref.abs().max().clamp_min(1e-300)
    elem = (diff / ref.abs().clamp_min(1e-3 * scale)).flatten()
    return dict(max_rel=(diff.max() / scale).item(), elem_rel_median=elem.median().item(),
                elem_rel_max=elem.max().item())


def sqdist64(x, y):
    x, y = x.double(), y.double()
    return ((x * x).sum(-1)[..., :, None] + (y * y).sum(-1)[..., None, :] - 2 * x @ y.transpose(-1, -2)).clamp_min(0)


def cost64(x, y, p):
    """The softmin's cost in float64: ½‖x−y‖² (p = 2) or sqrt(max(‖x−y‖², 1e-8)) (p = 1)."""
    C = sqdist64(x, y)
    return C / 2 if p == 2 else C.clamp_min(1e-8).sqrt()


def judge(row, tol):
    """Attach the bounds and the verdict to a row of ``{"errors": {name: rel_errors}}``: each
    output's bound is its stated tolerance, or twice the error that rounding the points as the
    precision's dots see them (TF32, bfloat16) causes by itself in float64, if that is larger."""
    rounding = row.get("rounding", {})
    row["bound"] = {k: max(tol["grad" if k.startswith("grad") else "value"], 2 * rounding.get(k, 0.0))
                    for k in row["errors"]}
    row["pass"] = all(e["max_rel"] <= row["bound"][k] for k, e in row["errors"].items())
    return row


# ----------------------------------------------------------------------------- section 1
def section_versions(cfg):
    out = dict(torch=torch.__version__, python=sys.version.split()[0], host=platform.node(),
               platform=platform.platform(), cpu=_cpu_name(), cpu_count=os.cpu_count(),
               date=datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
               device=cfg["device"], triton_interpret=os.environ.get("TRITON_INTERPRET", "0"))
    out["git_commit"] = _run(["git", "-C", str(ROOT), "rev-parse", "HEAD"])
    import triton
    import otkernels
    from otkernels.backends.triton import ops
    out.update(triton=triton.__version__, otkernels=otkernels.__version__, precisions=list(ops.PRECISIONS),
               precision_keyword={f: accepts(getattr(ops, f), "precision")
                                  for f in ("softmin", "softmin_rows", "kernel_sum", "argmin", "argmax")},
               samples_loss_precision=accepts(otkernels.SamplesLoss, "precision"))
    # every backend's probe (a native JIT build where otkernels._C is not built: once, here)
    avail, out["backends_probe_s"] = first_call(otkernels.backends.available, "cpu")
    out["backends"] = {k: list(v) for k, v in avail.items()}
    if cfg["device"] == "cuda":
        props = torch.cuda.get_device_properties(0)
        out.update(cuda=torch.version.cuda, device_name=props.name, capability=list(torch.cuda.get_device_capability()),
                   sm_count=props.multi_processor_count, memory_gib=props.total_memory / 2**30,
                   driver=_run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"]))
    for mod in ("pykeops", "geomloss"):
        try:
            out[mod] = __import__(mod).__version__
        except Exception as e:  # not installed, or a broken install
            out[mod] = f"unavailable: {e!r}"
    out["keops_usable"] = list(keops_status(cfg))
    return out


def _run(cmd):
    try:
        return subprocess.run(cmd, capture_output=True, text=True, timeout=30).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def _cpu_name():
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def keops_status(cfg):
    if cfg["skip_keops"]:
        return False, "--skip-keops"
    if cfg["tiny"]:
        return False, "--tiny compares with geomloss backend='tensorized'"
    if "keops" not in cfg:  # once per run; in a child process: KeOps can crash the interpreter
        code = ("import sys, json; sys.path.insert(0, %r); from common import keops_status; "
                "print(json.dumps(keops_status(%r)))" % (str(ROOT / "benchmarks"), cfg["device"]))
        try:
            r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
            if r.returncode == 0:
                cfg["keops"] = tuple(json.loads(r.stdout.strip().splitlines()[-1]))
            else:
                tail = (r.stderr or r.stdout).strip().splitlines()[-3:]
                cfg["keops"] = (False, f"pykeops probe exited with {r.returncode} on {cfg['device']} "
                                       f"(negative: killed by that signal): {' | '.join(tail)[:300]}")
        except subprocess.TimeoutExpired:
            cfg["keops"] = (False, "pykeops probe did not finish in 300 s")
    return cfg["keops"]


# ----------------------------------------------------------------------------- section 2
def correctness_jobs(cfg):
    from otkernels.backends.triton import ops
    variants = ["default", *ops.PRECISIONS, *POINT_DTYPES]
    if cfg["tiny"]:
        variants = [v for v in variants if v in TINY_VARIANTS]
    # largest D first: the pool starts the long jobs first
    only = cfg.get("only_jobs")  # --jobs-from: the jobs an earlier run skipped at its deadline
    return [dict(D=D, variant=v, N=cfg["corr_n"], eps=cfg["corr_eps"], device=cfg["device"])
            for D in sorted(cfg["corr_d"], reverse=True) for v in variants if only is None or (D, v) in only]


def run_job(job):
    """Every section-2 check of one (D, variant): a list of rows (runs in a worker process)."""
    with one_config_per_kernel():
        rows = []
        for check in (_check_softmin, _check_kernel_sum, _check_argbest, _check_plan_apply):
            rows += check(job)
        return rows


def _job_data(job):
    B, N, D = 2, job["N"], job["D"]
    g = torch.Generator().manual_seed(1000 + D)
    x = torch.randn(B, N, D, generator=g, dtype=torch.float64) / math.sqrt(D)
    y = (torch.randn(B, N + 1, D, generator=g, dtype=torch.float64) + 0.5) / math.sqrt(D)  # M = N + 1
    h = -math.log(N + 1) + 0.3 * torch.randn(B, N + 1, generator=g, dtype=torch.float64)
    b = torch.rand(B, N + 1, generator=g, dtype=torch.float64) / (N + 1)
    gout = torch.randn(B, N, generator=g, dtype=torch.float64)
    dtype, precision = variant_setup(job["variant"])
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    dev = job["device"]
    return dict(x=x.to(dev, dtype), y=y.to(dev, dtype), h=h.to(dev, acc), b=b.to(dev, acc),
                g=gout.to(dev, acc), precision=precision)


def _guarded(job, op, extra, fn):
    """One row: ``fn()`` -> {"errors": {...}, "via": ..., more}; an exception becomes a failed
    row with its traceback."""
    row = dict(op=op, D=job["D"], variant=job["variant"], **extra)
    t = time.perf_counter()
    try:
        row.update(fn())
        judge(row, TOLERANCES[job["variant"]])
    except Unsupported as e:
        row.update(status="unsupported", reason=str(e))
    except Exception:
        row.update(status="error", traceback=traceback.format_exc(), **{"pass": False})
    row["seconds"] = time.perf_counter() - t
    return row


def _compare(job, op, extra, run, reference):
    """Row of ``run(kw) -> {name: output}`` against ``reference(x, y) -> {name: float64}``
    (also evaluated on the points as the precision rounds them, see :func:`judge`)."""
    from otkernels.backends.triton import ops
    d = _job_data(job)

    def fn():
        kw, via = precision_call(getattr(ops, op), d["precision"])
        out, ref = run(d, kw), reference(d, d["x"], d["y"])
        res = dict(via=via, errors={k: rel_errors(v, ref[k]) for k, v in out.items()})
        rx = ops.rounded(d["x"], d["precision"]) if hasattr(ops, "rounded") else d["x"]
        if rx is not d["x"]:
            rnd = reference(d, rx, ops.rounded(d["y"], d["precision"]))
            res["rounding"] = {k: rel_errors(rnd[k], ref[k])["max_rel"] for k in out}
        return res
    return _guarded(job, op, extra, fn)


def _leaves(*ts):
    return [t.detach().clone().requires_grad_() for t in ts]


def _check_softmin(job):
    from otkernels.backends.triton import ops
    rows = []
    for p in (1, 2):
        for eps in job["eps"]:  # the data are scaled so that C ~ 1 at every D
            def run(d, kw):
                x, y, h = _leaves(d["x"], d["y"], d["h"])
                with torch.no_grad():
                    f0 = ops.softmin(x, y, h, eps, p, **kw)  # the no-grad pass (_softmin_fwd)
                f = ops.softmin(x, y, h, eps, p, **kw)  # the fused value + gradient pass
                (f * d["g"]).sum().backward()
                return dict(value=f0, value_fused=f, grad_x=x.grad, grad_y=y.grad, grad_h=h.grad)

            def reference(d, x, y):
                x, y, h = _leaves(x.double(), y.double(), d["h"].double())
                C = cost64(x, y, p)
                f = -eps * torch.logsumexp(h[:, None, :] - C / eps, -1)
                (f * d["g"].double()).sum().backward()
                return dict(value=f, value_fused=f, grad_x=x.grad, grad_y=y.grad, grad_h=h.grad)
            rows.append(_compare(job, "softmin", dict(p=p, eps=eps), run, reference))
    return rows


def _check_kernel_sum(job):
    from otkernels.backends.triton import ops
    rows, blur = [], 0.5
    for kernel in ("gaussian", "laplacian", "energy"):
        def run(d, kw):
            x, y, b = _leaves(d["x"], d["y"], d["b"])
            k = ops.kernel_sum(x, y, b, kernel, blur, **kw)
            (k * d["g"]).sum().backward()
            return dict(value=k, grad_x=x.grad, grad_y=y.grad, grad_b=b.grad)

        def reference(d, x, y):
            x, y, b = _leaves(x.double(), y.double(), d["b"].double())
            d2 = sqdist64(x, y)
            K = {"gaussian": lambda: (-d2 / (2 * blur ** 2)).exp(),
                 "laplacian": lambda: (-d2.clamp_min(1e-8).sqrt() / blur).exp(),
                 "energy": lambda: -d2.clamp_min(1e-8).sqrt()}[kernel]()
            k = (K @ b[:, :, None])[:, :, 0]
            (k * d["g"].double()).sum().backward()
            return dict(value=k, grad_x=x.grad, grad_y=y.grad, grad_b=b.grad)
        rows.append(_compare(job, "kernel_sum", dict(kernel=kernel, blur=blur), run, reference))
    return rows


def _check_argbest(job):
    """Values and the chosen entries: ``chosen`` is s at the returned index, which must be the
    best value to the tolerance (near ties may pick another index)."""
    from otkernels.backends.triton import ops
    rows = []
    for name, cost in (("argmin", "sqdist"), ("argmax", "dot")):
        def scores(d, x, y):
            s = sqdist64(x, y) if cost == "sqdist" else x.double() @ y.double().transpose(1, 2)
            return s + d["h"].double()[:, None, :]

        def run(d, kw):
            with torch.no_grad():
                val, idx = getattr(ops, name)(d["x"], d["y"], d["h"], cost, **kw)
            return dict(value=val, chosen=scores(d, d["x"], d["y"]).gather(-1, idx[..., None])[..., 0])

        def reference(d, x, y):  # the best value; on rounded points, the exact entry they pick
            s = scores(d, d["x"], d["y"])
            sr = s if x is d["x"] else scores(d, x, y)
            best = sr.min(-1) if name == "argmin" else sr.max(-1)
            return dict(value=best.values, chosen=s.gather(-1, best.indices[..., None])[..., 0])
        rows.append(_compare(job, name, dict(cost=cost), run, reference))
    return rows


def _check_plan_apply(job):
    """``plan_apply`` (the transport plan applied to V, K = 64) against the dense float64 plan,
    with u the row normaliser (each row of the plan sums to 1, as with Sinkhorn's potentials;
    with u = 0 the entries e^{h − C/ε} ~ e^-140 at p = 1, ε = 0.01 lie below float32's range)."""
    rows = []
    for p in (1, 2):
        for eps in job["eps"]:
            def row_lse(d):  # u_i = −log Σ_j exp(h_j − C_ij/ε) on the points passed, float64
                return -torch.logsumexp(d["h"].double()[:, None, :] - cost64(d["x"], d["y"], p) / eps, -1)

            def run(d, kw):
                from otkernels.backends.triton import ops
                V = _plan_values(d)
                with torch.no_grad():
                    u = row_lse(d).to(d["h"].dtype)
                    return dict(value=ops.plan_apply(d["x"], d["y"], u, d["h"], V, eps, p, **kw))

            def reference(d, x, y):
                P = (row_lse(d)[:, :, None] + d["h"].double()[:, None, :] - cost64(x, y, p) / eps).exp()
                return dict(value=P @ _plan_values(d).double())
            rows.append(_compare(job, "plan_apply", dict(p=p, eps=eps, K=64), run, reference))
    return rows


def _plan_values(d):
    g = torch.Generator().manual_seed(7)
    B, M = d["y"].shape[0], d["y"].shape[1]
    return torch.randn(B, M, 64, generator=g, dtype=torch.float64).to(d["y"].device, d["y"].dtype)


def section_correctness(cfg):
    jobs = correctness_jobs(cfg)
    rows = []
    from tqdm.auto import tqdm
    done = set()
    if cfg["workers"] <= 1:
        for i, job in enumerate(tqdm(jobs, desc="correctness", leave=False)):
            if time_left(cfg) <= 0:
                break
            rows += run_job(job)
            done.add(i)
    else:
        import multiprocessing as mp
        from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
        pool = ProcessPoolExecutor(cfg["workers"], mp_context=mp.get_context("spawn"))
        futures = {pool.submit(run_job, job): i for i, job in enumerate(jobs)}
        pending, bar = set(futures), tqdm(total=len(jobs), desc="correctness", leave=False)
        while pending and time_left(cfg) > 0:
            finished, pending = wait(pending, timeout=time_left(cfg), return_when=FIRST_COMPLETED)
            for fut in finished:
                rows += fut.result()
                done.add(futures[fut])
                bar.update()
        bar.close()
        if pending:  # past the deadline: stop the workers, record what did not run
            for proc in list(getattr(pool, "_processes", {}).values()):
                proc.terminate()
        pool.shutdown(wait=not pending, cancel_futures=True)
    skipped = [dict(D=j["D"], variant=j["variant"]) for i, j in enumerate(jobs) if i not in done]
    checked = [r for r in rows if "pass" in r]
    return dict(N=cfg["corr_n"], M=cfg["corr_n"] + 1, B=2, eps=list(cfg["corr_eps"]), autotune="one config per kernel",
                checked=len(checked), passed=sum(r["pass"] for r in checked), skipped_at_deadline=skipped, rows=rows)


# ----------------------------------------------------------------------------- section 3
def parity_configs():
    """20 configurations: (SamplesLoss kwargs, with weights?, batch size or 0)."""
    s = dict(loss="sinkhorn")
    cases = [(dict(s, p=p, blur=blur, debias=debias), False, 0)
             for p in (2, 1) for blur in (0.05, 0.5) for debias in (True, False)]  # 8
    cases += [(dict(s, p=2, blur=0.05, reach=0.5), False, 0), (dict(s, p=1, blur=0.05, reach=0.5), False, 0),
              (dict(s, p=2, blur=0.5, reach=0.5, debias=False), False, 0), (dict(s, p=2, blur=0.05), True, 0),
              (dict(s, p=1, blur=0.5, reach=0.5), True, 0), (dict(s, p=2, blur=0.05), False, 3),
              (dict(s, p=2, blur=0.5, reach=0.5), True, 3)]  # 15
    cases += [(dict(loss="gaussian", blur=0.5), False, 0), (dict(loss="gaussian", blur=0.5), True, 3),
              (dict(loss="energy"), False, 0), (dict(loss="laplacian", blur=0.5), False, 0),
              (dict(loss="laplacian", blur=0.05), True, 3)]  # 20
    return cases


def section_parity(cfg):
    """Values and x-gradients of otkernels (triton, float32) and geomloss (float32) against
    geomloss tensorized in float64; the float32 rule of the test-suite: our error ≤ max(floor,
    2 × geomloss's float32 error).  With reach, otkernels's point gradients are geomloss's ×
    (ρ+ε)/(ρ+ε/2) by design (geomloss's unbalanced gradient misses that factor; see
    tests/test_samples_loss.py): geomloss's gradients are rescaled before the comparison."""
    import geomloss
    import otkernels
    ok, why = keops_status(cfg)  # without KeOps: geomloss tensorized, and the reason
    ref_backend = "online" if ok else "tensorized"
    (N, M), D, dev = cfg["parity_n"], cfg["parity_d"], cfg["device"]
    rows = []
    with one_config_per_kernel():
        for i, (kw, weighted, B) in enumerate(parity_configs()):
            g = torch.Generator().manual_seed(i)
            shape = (B,) if B else ()
            x = torch.randn(*shape, N, D, generator=g, dtype=torch.float64).to(dev)
            y = (0.8 * torch.randn(*shape, M, D, generator=g, dtype=torch.float64) + 0.3).to(dev)
            a = torch.rand(*shape, N, generator=g, dtype=torch.float64) + 0.1
            b = torch.rand(*shape, M, generator=g, dtype=torch.float64) + 0.1
            a, b = (a / a.sum(-1, keepdim=True)).to(dev), (b / b.sum(-1, keepdim=True)).to(dev)
            row = dict(config=kw, weights=weighted, batch=B, N=N, M=M, D=D)
            factor = 1.0
            if kw.get("reach") is not None:
                p = kw["p"]
                rho, eps = kw["reach"] ** p, kw["blur"] ** p
                factor = row["geomloss_grad_factor"] = (rho + eps) / (rho + eps / 2)

            def value_grad(loss, dtype, scale=1.0):
                xg = x.to(dtype).clone().requires_grad_()
                args = (a.to(dtype), xg, b.to(dtype), y.to(dtype)) if weighted else (xg, y.to(dtype))
                v = loss(*args)
                v.sum().backward()
                return v.detach().double(), xg.grad.double() * scale
            try:
                v, gx = value_grad(otkernels.SamplesLoss(**kw, backend="triton"), torch.float32)
            except Exception:
                rows.append(dict(row, status="error", traceback=traceback.format_exc(), **{"pass": False}))
                continue
            try:
                v64, g64 = value_grad(geomloss.SamplesLoss(**kw, backend="tensorized"), torch.float64, factor)
                v32, g32 = value_grad(geomloss.SamplesLoss(**kw, backend=ref_backend), torch.float32, factor)
            except Exception as e:  # geomloss's own limits are not our failures
                rows.append(dict(row, status="reference failed", reason=repr(e)[:300]))
                continue

            def rel(u, w, norm=False):
                return ((u - w).norm() / w.norm() if norm else (u - w).abs().max() / w.abs().max()).item()
            err = dict(value=rel(v, v64), grad=rel(gx, g64, True))
            err_geo = dict(value=rel(v32, v64), grad=rel(g32, g64, True))
            bound = {k: max(PARITY_TOL[k], 2 * err_geo[k]) for k in err}
            row.update(value=v.tolist(), value_float64=v64.tolist(), value_geomloss=v32.tolist(),
                       vs_geomloss=dict(value=rel(v, v32), grad=rel(gx, g32, True)),
                       err_vs_float64=err, geomloss_err_vs_float64=err_geo, bound=bound,
                       **{"pass": all(err[k] <= bound[k] for k in err)})
            rows.append(row)
    return dict(reference=f"geomloss {geomloss.__version__} {ref_backend} (float32), tensorized (float64)",
                online=why if not ok else "used",
                rule="err_vs_float64 <= max(PARITY_TOL, 2 x geomloss float32 err_vs_float64); "
                     "value: max|v - v64| / max|v64|; grad: ||g - g64|| / ||g64||", rows=rows)


# ----------------------------------------------------------------------------- section 4
class AutotuneLog:
    """Records, for every autotuning that happens inside the block, the kernel, its key, the
    winning config and each config's time (triton's ``configs_timings``, ms; measured on the
    bounded proxy launch, see ``ops._launch``): the data for tuning the tile shapes later."""

    def __enter__(self):
        from otkernels.backends.triton import kernels
        from otkernels.backends.triton.resources import config_label
        self.entries, self.saved, label = [], [], config_label
        for name, tuner in getattr(kernels, "KERNELS", {}).items():
            original = tuner.run

            def run(*args, _t=tuner, _name=name, _orig=original, **kwargs):
                before = set(getattr(_t, "cache", {}))
                out = _orig(*args, **kwargs)
                for key in set(getattr(_t, "cache", {})) - before:
                    timings = getattr(_t, "configs_timings", None) or {}
                    self.entries.append(dict(
                        kernel=_name, key=[str(k) for k in key], best=label(_t.cache[key]),
                        bench_s=getattr(_t, "bench_time", None),
                        timings_ms={label(c): (t if isinstance(t, (int, float)) else list(t)) for c, t in timings.items()}))
                return out
            tuner.run = run
            self.saved.append((tuner, original))
        return self

    def __exit__(self, *exc):
        for tuner, original in self.saved:
            tuner.run = original


class LaunchCounter:
    """Counts the Triton kernel launches by name inside the block (information next to the
    roofline's model of the work).  ``keep_first``: ``first`` also holds the first launch of
    every kernel variant (name × constexprs) with its arguments, tensors included
    (``benchmarks/gpu_tune.py`` replays them)."""

    def __init__(self, keep_first=False):
        self.keep_first, self.counts, self.first = keep_first, {}, {}

    def __enter__(self):
        from otkernels.backends.triton import ops
        self.ops, self.original = ops, ops._launch

        def launch(name, B, N, device, args, consts, grid=None, before_full=None, cols=None, shrink=True):
            self.counts[name] = self.counts.get(name, 0) + 1
            if self.keep_first:
                self.first.setdefault((name, tuple(sorted(consts.items()))), dict(
                    name=name, B=B, N=N, device=device, args=args, consts=consts, grid=grid, cols=cols))
            return self.original(name, B, N, device, args, consts, grid, before_full, cols, shrink)
        ops._launch = launch
        return self

    def __exit__(self, *exc):
        self.ops._launch = self.original


def peak_table(device):
    """The device's row of ``bench_gpu.PEAKS`` (bf16/tf32/fp32 FLOP/s, MUFU exp2/s), or None."""
    if device != "cuda":
        return None, "no GPU: no roofline"
    from bench_gpu import PEAKS
    name = torch.cuda.get_device_name()
    for key, peak in PEAKS.items():
        if key in name:
            return peak, key
    return None, f"no peak table for {name} in bench_gpu.PEAKS"


def roofline_s(N, M, D, precision, peak, passes=1, grad_passes=0):
    """``passes·max(2NMD·k / F, NM / E) + grad_passes·max(4NMD·k / F, NM / E)`` (see ROOFLINE)."""
    kinds = {"ieee": ("fp32", 1), "tf32": ("tf32", 1), "tf32x3": ("tf32", 3), "bf16": ("bf16", 1)}
    kind, k = kinds.get(precision, (None, 1))
    if peak is None or kind is None:
        return None
    one = lambda dots: max(dots * 2.0 * N * M * D * k / peak[kind], N * M / peak["exp"])  # noqa: E731
    return passes * one(1) + grad_passes * one(2)


ROOFLINE = ("roofline_s of one pass over N×M = max(2·N·M·D·k / F, N·M / E): F = peak FLOP/s of the dots' "
            "precision (fp32 for ieee, tf32 for tf32 and tf32x3, bf16 for bf16 and bfloat16 points), k = 3 for "
            "tf32x3 (three TF32 products) else 1, E = the MUFU exp2 rate; a gradient pass (value + Σ_j P_ij y_j) "
            "has two dots (4·N·M·D·k flops).  Sinkhorn divergence forward + backward = 4·(len(ε-schedule) + 2) "
            "reductions over N×M (the four potentials at the initialisation, at each ε of the schedule, whose "
            "first value appears twice, and at the extrapolation), of which the extrapolation's two "
            "x-differentiable ones are gradient passes; the backward only scales their stored output.  Each "
            "reduction is counted with its own dots and exponentials, whichever kernels run it (launches: "
            "what one call launched).")


def section_timings(cfg):
    import otkernels
    from common import make_data
    from otkernels.backends.triton import ops
    from otkernels.sinkhorn import epsilon_schedule, max_diameter
    N, D, dev, rounds = cfg["time_n"], cfg["time_d"], cfg["device"], cfg["rounds"]
    x32, y32 = (t.to(dev) for t in make_data(N, N, D))
    h = torch.full((N,), -math.log(N), device=dev)
    eps = SINKHORN["blur"] ** 2
    peak, peak_name = peak_table(dev)
    n_eps = len(epsilon_schedule(2, max_diameter(x32, y32), SINKHORN["blur"], SINKHORN["scaling"]))
    out = dict(N=N, M=N, D=D, eps=eps, sinkhorn=SINKHORN, peaks=peak, peak_row=peak_name, eps_steps=n_eps,
               roofline_formula=ROOFLINE, passes=dict(plain=4 * (n_eps + 2) - 2, gradient=2),
               rounds=rounds, rows=[])
    rows_ref = 256 if N > 256 else N  # softmin rows checked against float64
    C = sqdist64(x32[:rows_ref], y32) / 2
    f_ref = -eps * torch.logsumexp(h.double()[None, :] - C / eps, -1)
    del C
    ref64 = divergence(otkernels, x32.double(), y32, {})  # value, grad in float64
    out["divergence_float64"] = ref64[0]

    variants = [("fp32 default", torch.float32, None), ("tf32", torch.float32, "tf32"),
                ("bf16", torch.float32, "bf16"), ("bfloat16 points", torch.bfloat16, None)]
    ours = {}
    for label, dtype, precision in variants:
        row = dict(variant=label, dtype=str(dtype), precision=precision)
        try:
            kw, via = precision_call(ops.softmin_rows, precision)
            kw_loss, _ = precision_call(otkernels.SamplesLoss, precision)
            row.update(via=via, resolved_precision=resolved_precision(ops, precision, dtype))
            xd, yd = x32.to(dtype), y32.to(dtype)
            x, y = xd[None], yd[None]
            xx, yy = ops.sqnorms(x, **kw), ops.sqnorms(y, **kw)  # the norms of the points as the dots see them
            with AutotuneLog() as tuning:
                f, first = first_call(lambda: ops.softmin_rows(x, y, h[None], eps, 2, xx, yy, **kw), dev)
            row["autotune_pass"] = tuning.entries
            t = median_time(lambda: ops.softmin_rows(x, y, h[None], eps, 2, xx, yy, **kw), dev, rounds)
            r = roofline_s(N, N, D, row["resolved_precision"], peak)
            row["softmin"] = dict(first_call_s=first, median_s=t, roofline_s=r, ratio=None if r is None else t / r,
                                  rel_err_first_rows=rel_errors(f[0, :rows_ref], f_ref)["max_rel"])
            with LaunchCounter() as lc, AutotuneLog() as tuning:
                (v, g), first = first_call(lambda: divergence(otkernels, xd, yd, kw_loss), dev)
            row["autotune"] = tuning.entries
            t = median_time(lambda: divergence(otkernels, xd, yd, kw_loss), dev, rounds)
            # SamplesLoss computes float16/bfloat16 points in float32 (at ``precision``'s dots)
            loss_dtype = torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype
            row["loss_precision"] = resolved_precision(ops, precision, loss_dtype)
            r = roofline_s(N, N, D, row["loss_precision"], peak, out["passes"]["plain"],
                           out["passes"]["gradient"])
            row["divergence"] = dict(first_call_s=first, median_s=t, roofline_s=r, ratio=None if r is None else t / r,
                                     launches=lc.counts, value=v, rel_err_value=abs(v - ref64[0]) / abs(ref64[0]),
                                     rel_err_grad=((g - ref64[1]).norm() / ref64[1].norm()).item())
            ours[label] = row
        except Unsupported as e:
            row.update(status="unsupported", reason=str(e))
        except Exception:
            row.update(status="error", traceback=traceback.format_exc(), **{"pass": False})
        out["rows"].append(row)
    out["competitor"] = competitor(cfg, x32, y32, h, eps)
    for kind in ("softmin", "divergence"):
        t_ref = out["competitor"].get(kind, {}).get("median_s")
        if t_ref:
            out[f"speedup_{kind}"] = {k: t_ref / r[kind]["median_s"] for k, r in ours.items()}
    return out


def divergence(otkernels, x, y, kw):
    """Sinkhorn divergence forward + backward w.r.t. x (triton backend): (value, grad float64)."""
    xg = x.detach().clone().requires_grad_()
    v = otkernels.SamplesLoss(**SINKHORN, backend="triton", **kw)(xg, y.to(x.dtype))
    v.backward()
    return v.item(), xg.grad.double()


def competitor(cfg, x, y, h, eps):
    """geomloss's KeOps backend ("online": softmin_online + SamplesLoss) at the same size; where
    KeOps cannot run (the reason is recorded), geomloss tensorized on the GPU if its matrices fit;
    dense torch / geomloss tensorized with --tiny.  One warm-up + median of 3."""
    import geomloss
    dev = cfg["device"]
    softmin = lambda: -eps * (h[None, :] - torch.cdist(x, y).square() / (2 * eps)).logsumexp(1)  # noqa: E731
    if cfg["tiny"]:
        name, backend = "dense torch softmin / geomloss tensorized", "tensorized"
    else:
        ok, why = keops_status(cfg)
        if ok:
            from geomloss._legacy.sinkhorn_samples import lse_genred, softmin_online
            lse = lse_genred("(SqDist(X,Y) / IntCst(2))", x.shape[1])
            name, backend = f"geomloss {geomloss.__version__} online (KeOps)", "online"
            softmin = lambda: softmin_online(eps, (x, y), h, log_conv=lse)  # noqa: E731
        else:  # geomloss's dense backend on the GPU, where its N×M matrices fit
            need = 8 * x.shape[0] * y.shape[0] * 4  # ≈ C_xy, C_yx, C_xx, C_yy and temporaries, float32
            if need > 0.8 * torch.cuda.mem_get_info()[0]:
                return dict(status="skipped", reason=f"KeOps unusable ({why}); tensorized needs ~{need / 2**30:.0f} GiB")
            name, backend = f"geomloss {geomloss.__version__} tensorized (KeOps unusable: {why})", "tensorized"
    loss = geomloss.SamplesLoss(**SINKHORN, backend=backend)

    def div():
        xg = x.clone().requires_grad_()
        loss(xg, y).backward()
    out = dict(name=name)
    for kind, fn in (("softmin", softmin), ("divergence", div)):
        _, warm = first_call(fn, dev)
        reps = 3 if warm < 60 else 1  # bounded wall time
        out[kind] = dict(first_call_s=warm, median_s=median_time(fn, dev, reps), rounds=reps)
    return out


# ----------------------------------------------------------------------------- section 5
def section_large_offsets(cfg):
    from otkernels.backends.triton import ops
    N, D, M, dev = cfg["big_n"], cfg["big_d"], cfg["big_m"], cfg["device"]
    g = torch.Generator(dev).manual_seed(0)
    if cfg["tiny"]:  # a strided view: rows 9·D elements apart, coordinates 3 apart
        x = torch.randn(N, 3 * D * 3, device=dev, generator=g)[:, ::3][:, :D]
        note = f"strided view {tuple(x.stride())} of a ({N}, {9 * D}) storage"
    else:
        x = torch.randn(N, D, device=dev, generator=g)
        note = f"x {N}×{D} float32 = {x.numel() * 4 / 2**30:.1f} GiB; last row offset {(N - 1) * D} (2^31 = {2**31})"
    y = torch.randn(M, D, device=dev, generator=g)
    h = -math.log(M) + 0.1 * torch.randn(M, device=dev, generator=g)
    eps = 0.05 * D
    f, t_soft = first_call(lambda: ops.softmin_rows(x[None], y[None], h[None], eps, 2)[0], dev)
    with torch.no_grad():
        (val, idx), t_arg = first_call(lambda: ops.argmin(x, y, h), dev)
    above = -(-2**31 // D)  # first row whose offset passes 2^31 elements
    picks = sorted({0, 1, N // 2, min(above, N - 1), min(above + 1, N - 1), N - 2, N - 1}
                   | set(torch.randint(0, N, (8,), generator=torch.Generator().manual_seed(1)).tolist()))
    rows = torch.tensor(picks, device=dev)
    xr = x[rows].double()
    d2 = ((xr[:, None, :] - y.double()[None]) ** 2).sum(-1)
    s = d2 + h.double()
    f_ref = -eps * torch.logsumexp(h.double() - d2 / 2 / eps, -1)
    chosen = s.gather(1, idx[rows][:, None])[:, 0]
    tol = TOLERANCES["default"]["value"]
    res = dict(N=N, M=M, D=D, note=note, rows_checked=picks, softmin_first_call_s=t_soft, argmin_first_call_s=t_arg,
               softmin=rel_errors(f[rows], f_ref), argmin_value=rel_errors(val[rows], s.min(1).values),
               argmin_chosen_gap=((chosen - s.min(1).values).abs().max() / s.abs().max()).item(), tol=tol)
    res["pass"] = (res["softmin"]["max_rel"] <= tol and res["argmin_value"]["max_rel"] <= tol
                   and res["argmin_chosen_gap"] <= tol)
    return res


# ----------------------------------------------------------------------------- section 6
def section_fronts(cfg):
    from diffusion.model import Unet
    from diffusion.process import GaussianDiffusion
    from diffusion.sample import ddim_sample_with_ot
    from otkernels import backends, metrics
    dev, tiny = cfg["device"], cfg["tiny"]
    g = torch.Generator().manual_seed(0)
    side, batch = (8, 4) if tiny else (16, 32)
    torch.manual_seed(0)
    model = Unet(dim=8 if tiny else 16, dim_mults=(1, 2), channels=1, resnet_blocks=1).to(dev).eval()
    ref = (torch.rand(64, 1, side, side, generator=g) * 2 - 1).to(dev)
    out, t = first_call(lambda: ddim_sample_with_ot(model, GaussianDiffusion(timesteps=100), ref, steps=3,
                                                    shape=(batch, 1, side, side), ot_ref_n=32, generator=g), dev)
    sample = dict(shape=list(out.shape), device=str(out.device), seconds=t, finite=bool(torch.isfinite(out).all()),
                  in_range=bool(out.abs().max() <= 1), auto_backend=backends.select(1, batch, 32, side * side, dev))
    sample["pass"] = sample["finite"] and sample["in_range"] and list(out.shape) == [batch, 1, side, side]

    n, d = (60, 8) if tiny else (4000, 64)
    real = torch.randn(n, d, generator=g)
    fake = 1.1 * torch.randn(n, d, generator=g) + 0.1
    kw = dict(kid_subsets=10 if tiny else 100, kid_subset_size=min(n, 1000))
    scores, t = first_call(lambda: metrics.evaluate(real.to(dev), fake.to(dev), **kw), dev)
    cpu = metrics.evaluate(real, fake, **kw)
    diffs = {k: abs(scores[k] - cpu[k]) / max(abs(cpu[k]), 1e-12) for k in ("sinkhorn", "mmd2", "fid")}
    ev = dict(n=n, d=d, seconds=t, scores=scores, cpu_scores=cpu, rel_diff_vs_cpu=diffs, tol=1e-3,
              **{"pass": all(math.isfinite(v) for v in scores.values()) and max(diffs.values()) <= 1e-3})
    from otkernels.coupling import sample_pairs
    from otkernels.plan import transport_plan
    n, d = (50, 8) if tiny else (4096, 64)
    x0, x1 = torch.randn(n, d, generator=g), torch.randn(n, d, generator=g) + 0.3
    V = torch.randn(n, 16, generator=g)
    out, t = first_call(lambda: transport_plan(x0.to(dev), x1.to(dev), blur=0.5) @ V.to(dev), dev)
    ref = transport_plan(x0.double(), x1.double(), blur=0.5, backend="tensorized" if tiny else "auto") @ V.double()
    err = rel_errors(out, ref)["max_rel"]
    (_, j), t2 = first_call(lambda: sample_pairs(x0.to(dev), x1.to(dev), "sinkhorn", blur=0.5), dev)
    plan = dict(n=n, d=d, seconds=t, rel_err_vs_float64_cpu=err, sample_pairs_seconds=t2, tol=1e-3,
                sample_device=str(j.device), **{"pass": err <= 1e-3 and j.device.type == torch.device(dev).type})
    return dict(ddim_sample_with_ot=sample, evaluate=ev, transport_plan=plan)


def section_ragged(cfg):
    """Ragged batches (issue 21): ``SamplesLoss(backend="triton")`` on S segments of different
    sizes in one launch per reduction against the Python loop over the segments (the same
    backend) and against padding to the largest segment with zero weights: forward+backward
    time (first call apart), and the values' and x-gradients' difference from the loop."""
    from otkernels import SamplesLoss
    dev, tiny = cfg["device"], cfg["tiny"]
    g = torch.Generator().manual_seed(0)
    S, lo, hi = (6, 5, 40) if tiny else (256, 50, 2000)
    n = torch.randint(lo, hi + 1, (S,), generator=g).tolist()
    m = torch.randint(lo, hi + 1, (S,), generator=g).tolist()
    xs = [torch.randn(k, 3, generator=g).to(dev) for k in n]
    ys = [(torch.randn(k, 3, generator=g) + 0.5).to(dev) for k in m]
    L = SamplesLoss("sinkhorn", p=2, blur=0.05, scaling=0.5, diameter=8.0, backend="triton")

    def ragged():
        x = torch.cat(xs).requires_grad_(True)
        v = L(x, torch.cat(ys), x_offsets=[0, *torch.tensor(n).cumsum(0).tolist()],
              y_offsets=[0, *torch.tensor(m).cumsum(0).tolist()])
        return v, torch.autograd.grad(v.sum(), x)[0], L.last_info.get("segments")

    def loop():
        xl = [t.clone().requires_grad_(True) for t in xs]
        v = torch.stack([L(a, b) for a, b in zip(xl, ys)])
        return v, torch.cat(torch.autograd.grad(v.sum(), xl))

    def padded():
        N, M = max(n), max(m)
        X = torch.zeros(S, N, 3, device=dev)
        Y = torch.zeros(S, M, 3, device=dev)
        A = torch.zeros(S, N, device=dev)
        B = torch.zeros(S, M, device=dev)
        for q in range(S):
            X[q, :n[q]], Y[q, :m[q]], A[q, :n[q]], B[q, :m[q]] = xs[q], ys[q], 1.0 / n[q], 1.0 / m[q]
        X.requires_grad_(True)
        v = L(A, X, B, Y)
        return v, torch.autograd.grad(v.sum(), X)[0]

    out = dict(segments=S, sizes=[lo, hi], D=3, dtype="float32")
    (v1, g1, fused), out["ragged_first_s"] = first_call(ragged, dev)
    (v0, g0), out["loop_first_s"] = first_call(loop, dev)
    (v2, _), out["padded_first_s"] = first_call(padded, dev)
    rounds = 1 if tiny else 3
    for name, fn in (("ragged", ragged), ("loop", loop), ("padded", padded)):
        out[f"{name}_median_s"] = median_time(fn, dev, rounds)
    out["one_launch_path"] = fused == S
    out["value_rel_vs_loop"] = rel_errors(v1, v0)["max_rel"]
    out["grad_rel_vs_loop"] = rel_errors(g1, g0)["max_rel"]
    out["padded_value_rel_vs_loop"] = rel_errors(v2, v0)["max_rel"]
    out["speedup_vs_loop"] = out["loop_median_s"] / out["ragged_median_s"]
    out["tol"] = dict(value=1e-4, grad=1e-3)
    out["pass"] = out["one_launch_path"] and out["value_rel_vs_loop"] <= 1e-4 and out["grad_rel_vs_loop"] <= 1e-3
    return out


def section_cuda_graph(cfg):
    """The Sinkhorn divergence (``diameter=`` given, Triton backend) forward + backward captured
    in one CUDA graph after two eager warm-up calls (autotuning), replayed on new points copied
    into the static input, against the eager loss on those points: value and x-gradient
    errors, and the replay's time against the eager call's."""
    from otkernels import SamplesLoss
    dev = cfg["device"]
    if dev != "cuda":
        return dict(skipped="CUDA graphs need a GPU (tests/test_capture.py counts the host reads on CPU)")
    n, d = (64, 16) if cfg["tiny"] else (10_000, 128)
    g = torch.Generator().manual_seed(0)
    x0, x1 = (torch.randn(n, d, generator=g).to(dev) for _ in range(2))
    y = (torch.randn(n, d, generator=g) + 0.5).to(dev)
    L = SamplesLoss("sinkhorn", p=2, blur=0.05, scaling=0.7, diameter=12.0, backend="triton")
    xs = x0.clone().requires_grad_(True)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(2):
            xs.grad = None
            L(xs, y).backward()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    xs.grad = None
    with torch.cuda.graph(graph):
        v_static = L(xs, y)
        v_static.backward()
    with torch.no_grad():
        xs.copy_(x1)
    replay_s = median_time(graph.replay, dev, cfg["rounds"])
    xe = x1.clone().requires_grad_(True)

    def eager():
        xe.grad = None
        v = L(xe, y)
        v.backward()
        return v
    eager_s = median_time(eager, dev, cfg["rounds"])
    ref = eager()
    out = dict(N=n, D=d, replay_s=replay_s, eager_s=eager_s, speedup=eager_s / replay_s,
               value_rel=abs(v_static.item() - ref.item()) / abs(ref.item()),
               grad_rel=rel_errors(xs.grad, xe.grad)["max_rel"], tol=dict(value=1e-6, grad=1e-5))
    out["pass"] = out["value_rel"] <= 1e-6 and out["grad_rel"] <= 1e-5
    return out


def _dist_worker(rank, world, port, backend, device, n, d, out_dir):
    """One rank of :func:`section_distributed`: its shards of x and y, the sharded loss, and the
    single-process loss on everything (on this rank's device), compared."""
    import torch.distributed as dist
    from datetime import timedelta
    dev = f"cuda:{rank}" if device == "cuda" else "cpu"
    if device == "cuda":
        torch.cuda.set_device(rank)
    dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                            timeout=timedelta(seconds=300))
    try:
        from otkernels import SamplesLoss
        from otkernels import distributed as otd
        g = torch.Generator().manual_seed(0)
        x = torch.randn(n, d, generator=g).to(dev)
        y = (torch.randn(n + 7, d, generator=g) + 0.5).to(dev)
        sx = slice(rank * n // world, (rank + 1) * n // world)
        sy = slice(rank * (n + 7) // world, (rank + 1) * (n + 7) // world)
        kw = dict(loss="sinkhorn", p=2, blur=0.05, scaling=0.7)
        xr = x[sx].clone().requires_grad_(True)
        sync(device)
        t = time.perf_counter()
        v = otd.SamplesLoss(**kw)(xr, y[sy])
        v.backward()
        sync(device)
        t = time.perf_counter() - t
        xf = x.clone().requires_grad_(True)
        ref = SamplesLoss(**kw)(xf, y)
        ref.backward()
        res = dict(rank=rank, seconds=t, value_rel=abs(v.item() - ref.item()) / abs(ref.item()),
                   grad_rel=rel_errors(xr.grad, xf.grad[sx])["max_rel"], device=str(xr.device))
        with open(os.path.join(out_dir, f"{rank}.json"), "w") as fh:
            json.dump(res, fh)
    finally:
        dist.destroy_process_group()


def section_distributed(cfg):
    """``otkernels.distributed.SamplesLoss`` on every visible GPU with NCCL (one rank per GPU;
    one GPU gives a 1-rank NCCL group: the collectives on CUDA tensors still run), or on 2 CPU
    processes with gloo in ``--tiny`` without CUDA: forward + backward time per rank, and the
    value and x-gradient against the single-process loss on the whole clouds (float32)."""
    import socket
    import tempfile
    import torch.multiprocessing as mp
    dev, tiny = cfg["device"], cfg["tiny"]
    world = torch.cuda.device_count() if dev == "cuda" else 2
    backend = "nccl" if dev == "cuda" else "gloo"
    n, d = (60, 3) if tiny else (20_000, 128)
    with socket.socket() as sk:
        sk.bind(("127.0.0.1", 0))
        port = sk.getsockname()[1]
    with tempfile.TemporaryDirectory() as out:
        mp.spawn(_dist_worker, args=(world, port, backend, dev, n, d, out), nprocs=world, join=True)
        ranks = [json.load(open(os.path.join(out, f"{r}.json"))) for r in range(world)]
    tol = dict(value=1e-4, grad=1e-3)
    ok = all(r["value_rel"] <= tol["value"] and r["grad_rel"] <= tol["grad"] for r in ranks)
    return dict(backend=backend, world=world, N=n, M=n + 7, D=d, ranks=ranks, tol=tol, **{"pass": ok})


# ----------------------------------------------------------------------------- driver
SECTIONS = (("versions", section_versions), ("correctness", section_correctness), ("parity", section_parity),
            ("timings", section_timings), ("large_offsets", section_large_offsets), ("fronts", section_fronts),
            ("ragged", section_ragged), ("distributed", section_distributed), ("cuda_graph", section_cuda_graph))


def time_left(cfg):
    """Seconds before ``--deadline`` (infinite without one)."""
    if cfg.get("deadline") is None:
        return math.inf
    return cfg["deadline"] - (time.perf_counter() - cfg["t0"])


def failures(report):
    """Names of the failed checks (rows with ``pass: false``) and of the sections that raised."""
    out = []

    def walk(obj, path):
        if isinstance(obj, dict):
            if obj.get("pass") is False:
                out.append(path)
            for k, v in obj.items():
                walk(v, f"{path}.{k}")
        elif isinstance(obj, list):
            for i, v in enumerate(obj):
                walk(v, f"{path}[{i}]")
    for name, sec in report["sections"].items():
        if sec["status"] in ("error", "skipped"):
            out.append(f"{name}: section {'raised' if sec['status'] == 'error' else 'skipped (deadline)'}")
        walk(sec.get("result"), name)
        res = sec.get("result")
        if isinstance(res, dict) and res.get("skipped_at_deadline"):
            out.append(f"{name}: {len(res['skipped_at_deadline'])} job(s) skipped (deadline)")
    return out


def print_table(report):
    """Sections, the worst error/bound per (op, variant) of section 2, the timings, the failures."""
    secs = report["sections"]
    print(f"\n{'section':<15}{'status':<8}{'seconds':>8}")
    for name, sec in secs.items():
        print(f"{name:<15}{sec['status']:<8}{sec['seconds']:>8.1f}  {sec.get('error', '')[:100]}")
    worst = {}
    for r in (secs.get("correctness", {}).get("result") or {}).get("rows", []):
        for k, e in r.get("errors", {}).items():
            key = (r["op"], r["variant"])
            worst[key] = max(worst.get(key, 0.0), e["max_rel"] / r["bound"][k])
    print(f"\n{'op':<12}{'variant':<10}{'worst error / bound':>20}")
    for (op, v), ratio in sorted(worst.items()):
        print(f"{op:<12}{v:<10}{ratio:>20.3f}")
    tim = secs.get("timings", {}).get("result") or {}
    ms = lambda v: "-" if v is None else f"{v * 1e3:.2f}"  # noqa: E731
    rat = lambda v: "-" if v is None else f"{v:.2f}"  # noqa: E731
    print(f"\ntimings N=M={tim.get('N')} D={tim.get('D')}: ms (first call, median), measured / roofline")
    for r in tim.get("rows", []):
        if "divergence" in r:
            s, d = r["softmin"], r["divergence"]
            print(f"{r['variant']:<17} pass {ms(s['first_call_s']):>9} {ms(s['median_s']):>9} {rat(s['ratio']):>6}"
                  f"   divergence {ms(d['first_call_s']):>9} {ms(d['median_s']):>9} {rat(d['ratio']):>6}")
        else:
            print(f"{r['variant']:<17} {r.get('reason') or r.get('status')}")
    comp = tim.get("competitor", {})
    if "divergence" in comp:
        speedup = {k: round(v, 2) for k, v in tim["speedup_divergence"].items()}
        print(f"{comp['name']}: pass {ms(comp['softmin']['median_s'])}, "
              f"divergence {ms(comp['divergence']['median_s'])}; divergence speed-up {speedup}")
    for f in report["failures"]:
        print(f"FAILED {f}")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tiny", action="store_true", help="small sizes (CPU: Triton interpreter, < 2 min)")
    ap.add_argument("--json", type=Path, default=None,
                    help="output (default benchmarks/results/gpu-check-<device>[-tiny].json)")
    ap.add_argument("--skip-keops", action="store_true", help="no geomloss-KeOps references")
    ap.add_argument("--workers", type=int, default=None,
                    help="processes for section 2 (default on CUDA: CPU count − 2, at most 14; on CPU: 1)")
    ap.add_argument("--sections", default=None,
                    help=f"comma-separated, run in this order (default all: {','.join(n for n, _ in SECTIONS)})")
    ap.add_argument("--deadline", type=float, default=None,
                    help="seconds: no section starts later; section 2 stops its jobs then")
    ap.add_argument("--jobs-from", type=Path, default=None,
                    help="section 2 runs only the (D, variant) jobs this earlier JSON lists as skipped_at_deadline")
    args = ap.parse_args(argv)
    known = dict(SECTIONS)
    order = args.sections.split(",") if args.sections else [n for n, _ in SECTIONS]
    unknown = [n for n in order if n not in known]
    if unknown:
        ap.error(f"--sections: unknown {unknown}; known: {list(known)}")
    device = pick_device(args.tiny)  # before anything imports triton
    from tqdm.auto import tqdm

    cfg = dict(TINY if args.tiny else FULL, tiny=args.tiny, device=device, skip_keops=args.skip_keops,
               workers=args.workers or (min(14, max(1, (os.cpu_count() or 2) - 2)) if device == "cuda" else 1),
               deadline=args.deadline, t0=time.perf_counter(), only_jobs=None)
    if args.jobs_from:
        earlier = json.loads(args.jobs_from.read_text())["sections"]["correctness"]["result"]
        cfg["only_jobs"] = {(j["D"], j["variant"]) for j in earlier["skipped_at_deadline"]}
    name = torch.cuda.get_device_name() if device == "cuda" else "cpu"
    slug = re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-") + ("-tiny" if args.tiny else "")
    path = args.json or ROOT / "benchmarks" / "results" / f"gpu-check-{slug}.json"
    report = dict(script="benchmarks/gpu_check.py", mode="tiny" if args.tiny else "full", device=device,
                  device_name=name, argv=sys.argv[1:], workers=cfg["workers"], tolerances=TOLERANCES,
                  parity_tolerances=PARITY_TOL, sections={})
    t_all = cfg["t0"]
    path.parent.mkdir(parents=True, exist_ok=True)
    bar = tqdm(order, desc="gpu_check", file=sys.stderr)
    for sec_name in bar:
        bar.set_postfix_str(sec_name)
        t = time.perf_counter()
        if time_left(cfg) <= 0:
            sec = dict(status="skipped", error=f"--deadline {args.deadline:g} s passed before it started")
        else:
            try:
                sec = dict(status="ok", result=known[sec_name](cfg))
            except Exception as e:
                sec = dict(status="error", error=f"{type(e).__name__}: {e}", traceback=traceback.format_exc())
        sec["seconds"] = time.perf_counter() - t
        report["sections"][sec_name] = sec
        if device == "cuda":
            torch.cuda.empty_cache()
        report.update(wall_s=time.perf_counter() - t_all, complete=False)
        path.write_text(json.dumps(report, indent=1, default=str))  # kept if the run is killed
    report.update(wall_s=time.perf_counter() - t_all, complete=True, failures=failures(report))
    path.write_text(json.dumps(report, indent=1, default=str))
    print_table(report)
    print(f"\nwrote {path} ({report['wall_s']:.0f} s); {len(report['failures'])} failure(s)")
    return 1 if report["failures"] else 0


if __name__ == "__main__":
    sys.exit(main())
