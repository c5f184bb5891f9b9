"""Native backend (csrc/, issue 4): one softmin pass and a full Sinkhorn divergence
(forward + backward w.r.t. x), native vs blocked torch vs geomloss tensorized vs geomloss
online (KeOps), plus this machine's peaks measured in the same run.

    pytest benchmarks/bench_native.py --benchmark-only            # peaks and softmin passes, a few min
    pytest benchmarks/bench_native.py --benchmark-only --large    # + the divergences (~1 h or more)

(The divergences are ``--large`` only: the default run's divergence comparison is
bench_sinkhorn.py's groups at 5k and 10k, the same problem, data and geomloss competitors,
with ``auto`` running ``native``.)

* Data: float32 ``x ~ randn(N, D)``, ``y ~ randn(N, D) + 0.5`` (seed 0), N = M ∈ {5k, 10k},
  D ∈ {3, 128}, 2 torch threads.  Sinkhorn: p=2, blur=0.05, scaling=0.5, debias=True.
* Softmin pass: ``−ε log Σ_j exp(h_j − C_ij/ε)`` at the last ε of the schedule (blur² =
  0.0025) with uniform log-weights h, each backend's own way: native and blocked on the
  cost they cache (and with tiles recomputed, "-online"/"-recompute"), geomloss tensorized
  ``softmin_tensorized`` on its dense cost matrix, geomloss online its KeOps LazyTensor
  reduction (compiled before timing).  Caches are built outside the timed region.
* Every configuration shares one pytest-benchmark group (``native softmin N=.. D=..``,
  ``native divergence N=.. D=..``), so ratios come from one run; the module prints a summary
  (ratios, achieved exp/s, GB/s, GFLOP/s against the peaks of group ``native peaks``) and
  writes it to ``.benchmarks/native_summary.json``.
* Correctness: each softmin pass is checked against geomloss's ``softmin_tensorized`` in
  float64 (row blocks), each divergence against geomloss ``tensorized`` in float64 (value and
  gradient w.r.t. x), 1e-4 relative (gradients 2e-2: float32's own conditioning at C/ε ~ 1e5):
  a fast wrong answer fails.
* Timing rule (``common.Rounds``, the same for every competitor of a group; the figure is the
  median of the rounds): peaks and softmin passes warm-up 1, median of 3; divergences at 5k
  warm-up 1 (full size), 1 round; at 10k no full-size warm-up (geomloss's KeOps run alone
  takes ~30 min there), 1 round.  Before the timing, every competitor runs once on 64 points
  (KeOps compiles, the native extension loads).
* Self-costs (issue 23, default run): C(x, x) at N ∈ {4k, 10k}, D = 128 stored whole or as
  its packed triangle: the sym pass and the cache build, groups ``native self-cost pass|build
  N=..``, warm-up 1, median of 5, with stored bytes, bytes read per pass and GB/s; with
  ``--large`` also the 10k divergence with either layout (warm-up 1, 1 round).
  ``OTKERNELS_BENCH_THREADS=1`` runs every benchmark on one thread (a shared machine).
* Plan form (issue 23, default run): the cached two-way C(x, y) pass and packed C(x, x) pass
  at N = 10k, D = 128, final ε, with the loop's own potentials, in the log-sum-exp and the plan
  form (``native.PLAN_FORM``), groups ``native plan form: ... pass`` (warm-up 1, median of 5,
  GB/s, rows and columns recomputed per pass), and the 10k divergence with either form
  (``native plan form: divergence``, warm-up 1, median of 3; value and gradient against the
  native float64 divergence, the same tolerances as the other divergences).
* Cache budget: the divergences run with an explicit ``CACHE_BUDGET`` (2 GiB, the default
  cap: every float32 cost of N ≤ 10k cached, on any machine; recorded as ``cache_budget``).
"""
from __future__ import annotations

import contextlib
import json
import os
import warnings

import pytest
import torch

import otkernels
from common import THREADS, Rounds, keops_status, make_data, measure, rel
from otkernels import backends
from otkernels.backends import blocked, native
from otkernels.costs import Cost

SIZES = (5000, 10000)
DIMS = (3, 128)
BLUR = 0.05
EPS = BLUR ** 2
PARAMS = dict(loss="sinkhorn", p=2, blur=BLUR, scaling=0.5, debias=True)
REL_TOL = 1e-4       # value, and softmin pass, vs float64
GRAD_REL_TOL = 2e-2  # float32 gradient vs float64: at C/ε ~ 1e5 (D=128, ε=0.0025) float32's
                     # 6e-8 relative rounding of C/ε moves the plan P by ~0.5% (geomloss's own
                     # float32 gradient is 7e-3 away from the float64 one at N=10k, D=128)

CACHE_BUDGET = 2 << 30  # bytes, for the divergences (see the docstring)
PEAK_RULE = SOFTMIN_RULE = Rounds(warmup=1, rounds=3)
DIVERGENCE_RULE = {5000: Rounds(warmup=1, rounds=1), 10000: Rounds(warmup=0, rounds=1)}
SOFTMIN = ("native", "native-online", "blocked", "blocked-recompute", "geomloss-tensorized", "geomloss-online")
DIVERGENCE = ("geomloss-tensorized", "geomloss-online", "blocked", "native")

# softmin passes (competitor, N, D) that take many seconds per round: only with --large
LARGE_ONLY = {
    ("softmin", "blocked-recompute", 10000, 128): "blocked recompute pass ~6 s, several rounds",
    ("softmin", "geomloss-online", 10000, 128): "KeOps pass ~10 s at N=10k D=128",
}
DIVERGENCE_WHY = ("the divergences take many minutes (geomloss tensorized ~25 s per call at 5k, "
                  "its KeOps backend up to ~30 min at 10k); the default run compares them in "
                  "bench_sinkhorn.py's groups")

_RESULTS: dict = {}   # (kind, N, D, competitor) -> seconds (median over rounds)
_EXTRA: dict = {}     # peaks and derived rates
_DATA: dict = {}


# ----------------------------------------------------------------------------- helpers
def set_threads():
    torch.set_num_threads(THREADS)


def data(N, D):
    if (N, D) not in _DATA:
        _DATA.clear()  # keep one configuration's tensors (and caches) alive at a time
        _DATA[N, D] = make_data(N, N, D)
    return _DATA[N, D]


def skip_if_needed(kind, name, N, D, large):
    if not native.available()[0] and name.startswith("native"):
        pytest.skip(f"native backend unavailable: {native.available()[1]}")
    if name == "geomloss-online":
        ok, why = keops_status()
        if not ok:
            pytest.skip(why)
    why = DIVERGENCE_WHY if kind == "divergence" else LARGE_ONLY.get((kind, name, N, D))
    if why and not large:
        pytest.skip(f"{why}: run with --large")


@contextlib.contextmanager
def _native_setting(flag, value):
    """``native.<flag> = value`` and the divergences' cache budget (``CACHE_BUDGET``), both
    restored after."""
    old = getattr(native, flag)
    setattr(native, flag, value)
    backends.set_cache_budget(CACHE_BUDGET)
    try:
        yield
    finally:
        setattr(native, flag, old)
        backends.set_cache_budget(None)


def run(benchmark, fn, rule, kind, N, D, name):
    """Time ``fn`` under ``rule`` (the group's, the same for every competitor) and record the median."""
    set_threads()
    out, _RESULTS[kind, N, D, name] = measure(benchmark, fn, rule)
    return out


# ----------------------------------------------------------------------------- peaks
@pytest.mark.benchmark(group="native peaks")
@pytest.mark.parametrize("what", ["matmul", "exp", "copy", "read"])
def test_peak(benchmark, what):
    """This machine's reference rates: torch GEMM (GFLOP/s), torch.exp (exp/s), memory copy
    and read (GB/s), on 2 threads, measured in the same run as the kernels."""
    set_threads()
    if what == "matmul":
        a, b = torch.randn(10000, 128), torch.randn(128, 10000)
        out = torch.empty(10000, 10000)
        run(benchmark, lambda: torch.mm(a, b, out=out), PEAK_RULE, "peak", 0, 0, what)
        _EXTRA["peak GFLOP/s (torch matmul 10k x 128 x 10k)"] = 2 * 1e8 * 128 / _RESULTS["peak", 0, 0, what] / 1e9
    elif what == "exp":
        x = torch.rand(10 ** 8) * -20.0  # no denormals: arguments in [−20, 0]
        out = torch.empty_like(x)
        run(benchmark, lambda: torch.exp(x, out=out), PEAK_RULE, "peak", 0, 0, what)
        _EXTRA["peak exp/s (torch.exp, 1e8 float32)"] = 1e8 / _RESULTS["peak", 0, 0, what]
    elif what == "copy":
        x = torch.rand(10 ** 8)
        out = torch.empty_like(x)
        out.copy_(x)  # fault the pages in first
        run(benchmark, lambda: out.copy_(x), PEAK_RULE, "peak", 0, 0, what)
        _EXTRA["peak GB/s (400 MB copy, read + write)"] = 8e8 / _RESULTS["peak", 0, 0, what] / 1e9
    else:
        x = torch.rand(10 ** 8)
        run(benchmark, lambda: x.sum(), PEAK_RULE, "peak", 0, 0, what)
        _EXTRA["peak GB/s (400 MB read, torch.sum)"] = 4e8 / _RESULTS["peak", 0, 0, what] / 1e9


# ----------------------------------------------------------------------------- softmin pass
def _softmin_case(name, N, D):
    """(callable, description) for one softmin pass of competitor ``name``."""
    x, y = data(N, D)
    xb, yb = x[None], y[None]
    h = torch.full((1, N), -float(torch.log(torch.tensor(float(N)))))
    cost = Cost(2)
    if name in ("native", "native-online"):
        hs = native.cost_handles(xb, yb, cost, debias=False, cache=(name == "native"))
        return (lambda: hs[0].softmin(EPS, h)), hs
    if name in ("blocked", "blocked-recompute"):
        hs = blocked.cost_handles(xb, yb, cost, debias=False, cache=(name == "blocked"))
        return (lambda: hs[0].softmin(EPS, h)), hs
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from geomloss._legacy import sinkhorn_samples as gs
    if name == "geomloss-tensorized":
        C = gs.cost_routines[2](xb, yb)
        return (lambda: gs.softmin_tensorized(EPS, C, h)), C
    fn = lambda: gs.softmin_online_lazytensor(EPS, (xb, yb), h, p=2)  # noqa: E731
    fn()  # compile the KeOps formula outside the timing
    return fn, None


def _softmin_reference(N, D):
    """geomloss's ``softmin_tensorized`` in float64 for the pass (blocks of 500 rows)."""
    key = ("ref", N, D)
    if key not in _EXTRA:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            from geomloss._legacy import sinkhorn_samples as gs
        x, y = (t.double()[None] for t in data(N, D))
        h = torch.full((1, N), -float(torch.log(torch.tensor(float(N), dtype=torch.float64))), dtype=torch.float64)
        _EXTRA[key] = torch.cat([gs.softmin_tensorized(EPS, gs.cost_routines[2](x[:, i:i + 500], y), h)
                                 for i in range(0, N, 500)], 1).reshape(-1)
    return _EXTRA[key]


def _softmin_params():
    for N in SIZES:
        for D in DIMS:
            for name in SOFTMIN:
                yield pytest.param(N, D, name, id=f"n{N}-d{D}-{name}")


@pytest.mark.parametrize("N,D,name", list(_softmin_params()))
def test_softmin_pass(benchmark, request, N, D, name):
    skip_if_needed("softmin", name, N, D, request.config.getoption("--large"))
    benchmark.group = f"native softmin N={N} D={D}"
    fn, keep = _softmin_case(name, N, D)
    out = run(benchmark, fn, SOFTMIN_RULE, "softmin", N, D, name)
    err = rel(out.reshape(-1), _softmin_reference(N, D))
    benchmark.extra_info.update(rel_err_vs_float64=err, reference="geomloss softmin_tensorized float64",
                                role="reference" if name == "geomloss-tensorized" else "competitor")
    assert err <= REL_TOL, f"{name}: softmin relative error {err:.2e} vs the float64 reference"
    t = _RESULTS["softmin", N, D, name]
    benchmark.extra_info["exp_per_s"] = N * N / t
    if name == "native":
        benchmark.extra_info["cache_GB_per_s"] = 4 * N * N / t / 1e9
    if name == "native-online" and D > 8:
        benchmark.extra_info["GEMM_GFLOP_per_s"] = 2 * N * N * D / t / 1e9
    del keep


# ----------------------------------------------------------------------------- divergence
def _divergence_loss(name):
    if name.startswith("geomloss"):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            import geomloss
        return geomloss.SamplesLoss(**PARAMS, backend=name.split("-")[1])
    return otkernels.SamplesLoss(**PARAMS, backend=name)


def _fwd_bwd(loss, x, y):
    xg = x.detach().clone().requires_grad_()
    v = loss(xg, y)
    v.backward()
    return v.detach(), xg.grad


def _divergence_reference(N, D):
    """geomloss tensorized in float64: value and gradient w.r.t. x (cached)."""
    key = ("div-ref", N, D)
    if key not in _EXTRA:
        x, y = data(N, D)
        v, g = _fwd_bwd(_divergence_loss("geomloss-tensorized"), x.double(), y.double())
        _EXTRA[key] = (v.item(), g.float(), "geomloss tensorized float64")
    return _EXTRA[key]


def _divergence_params():
    for N in SIZES:
        for D in DIMS:
            for name in DIVERGENCE:
                yield pytest.param(N, D, name, id=f"n{N}-d{D}-{name}")


@pytest.mark.parametrize("N,D,name", list(_divergence_params()))
def test_divergence(benchmark, request, N, D, name):
    skip_if_needed("divergence", name, N, D, request.config.getoption("--large"))
    benchmark.group = f"native divergence N={N} D={D}"
    x, y = data(N, D)
    loss = _divergence_loss(name)
    backends.available()
    _fwd_bwd(loss, x[:64], y[:64])  # every competitor: KeOps compiles, extensions load, outside the timing
    backends.set_cache_budget(CACHE_BUDGET)
    try:
        v, g = run(benchmark, lambda: _fwd_bwd(loss, x, y), DIVERGENCE_RULE[N], "divergence", N, D, name)
    finally:
        backends.set_cache_budget(None)
    benchmark.extra_info["cache_budget"] = CACHE_BUDGET
    rv, rg, what = _divergence_reference(N, D)
    err_v, err_g = abs(v.item() - rv) / abs(rv), rel(g, rg)
    benchmark.extra_info.update(value=v.item(), reference=what, rel_err_value=err_v, rel_err_grad=err_g,
                                role="reference" if name == "geomloss-tensorized" else "competitor")
    assert err_v <= REL_TOL, f"{name}: value {v.item()} vs {what} {rv}: {err_v:.2e}"
    assert err_g <= GRAD_REL_TOL, f"{name}: gradient relative error {err_g:.2e} vs {what}"


# ----------------------------------------------------------------------------- self-costs (issue 23)
# C(x, x) stored whole (B·N·N) or as its packed triangle (csrc/tiles.h, Packed: ≈ N²/2 + 32·N),
# D = 128, float32: the sym pass (the rows' softmin from the stored triangle, the mirrored half
# through column sums) and the cache's build (the GEMM tiles that fill it).  Both layouts' passes
# read the same entries (row blocks of 64 from their diagonal at these N): the packed one saves
# memory (the cache footprint, what the budget counts), not bytes per pass.
SELF_SIZES = (4000, 10000)
SELF_D = 128
SELF_RULE = Rounds(warmup=1, rounds=5)


def _self_cache(layout, N):
    xb = data(N, SELF_D)[0][None]  # one object: cost_matrix(xb, xb) sets the exact diagonal
    return native.cost_packed(xb, 2) if layout == "packed" else native.cost_matrix(xb, xb, 2)


def _self_reference(N):
    """float64 ``−ε log Σ_j exp(h_j − C(x_i, x_j)/ε)``, uniform h, in row blocks of 500."""
    key = ("self-ref", N)
    if key not in _EXTRA:
        x = data(N, SELF_D)[0].double()
        h = -torch.log(torch.tensor(float(N), dtype=torch.float64))
        _EXTRA[key] = torch.cat([-EPS * (h - 0.5 * torch.cdist(x[i:i + 500], x).pow(2) / EPS).logsumexp(1)
                                 for i in range(0, N, 500)])
    return _EXTRA[key]


@pytest.mark.parametrize("kind", ["pass", "build"])
@pytest.mark.parametrize("N", SELF_SIZES)
@pytest.mark.parametrize("layout", ["full", "packed"])
def test_self_cost(benchmark, kind, N, layout):
    if not native.available()[0] or not native.packed_supported():
        pytest.skip("native packed kernels unavailable")
    benchmark.group = f"native self-cost {kind} N={N} D={SELF_D}"
    if kind == "build":
        K, _ = run(benchmark, lambda: _self_cache(layout, N), SELF_RULE, "self-build", N, SELF_D, layout)
    else:
        K, s = _self_cache(layout, N)
        h = torch.full((1, N), -float(torch.log(torch.tensor(float(N)))))
        if layout == "packed":
            fn = lambda: native.lse_packed(K, s, h, EPS)  # noqa: E731
        else:
            fn = lambda: native.lse_cached_two(K, s, h, None, EPS, sym=True)[0]  # noqa: E731
        out = run(benchmark, fn, SELF_RULE, "self-pass", N, SELF_D, layout)
        err = rel(-EPS * out.reshape(-1), _self_reference(N))
        benchmark.extra_info["rel_err_vs_float64"] = err
        assert err <= REL_TOL, f"{layout}: sym softmin relative error {err:.2e} vs float64"
        read = 4 * native.packed_numel(N)  # the triangle in row blocks of 64, either layout
        benchmark.extra_info.update(read_bytes=read, GB_per_s=read / _RESULTS["self-pass", N, SELF_D, layout] / 1e9)
    benchmark.extra_info["stored_bytes"] = K.numel() * K.element_size()
    benchmark.extra_info["threads"] = THREADS


@pytest.mark.parametrize("layout", ["full", "packed"])
def test_self_cost_divergence(benchmark, request, layout):
    """The divergence at N = M = 10k, D = 128 (fwd + bwd, 2 GiB budget: all three costs cached)
    with C(x, x), C(y, y) stored whole or packed (``native.PACKED_SELF``); --large only (~1 min)."""
    if not native.available()[0] or not native.packed_supported():
        pytest.skip("native packed kernels unavailable")
    if not request.config.getoption("--large"):
        pytest.skip("~30 s a layout: run with --large")
    N = 10000
    benchmark.group = f"native self-cost divergence N={N} D={SELF_D}"
    x, y = data(N, SELF_D)
    loss = _divergence_loss("native")
    with _native_setting("PACKED_SELF", layout == "packed"):
        stored = backends.describe_cache(native.cost_handles(x[None], y[None], Cost(2)))
        v, g = run(benchmark, lambda: _fwd_bwd(loss, x, y), Rounds(warmup=1, rounds=1), "self-div", N, SELF_D, layout)
    benchmark.extra_info.update(value=v.item(), caches=stored, threads=THREADS)
    _EXTRA["self-div", layout] = (v, g)
    other = _EXTRA.get(("self-div", "full" if layout == "packed" else "packed"))
    if other is not None:  # the same value and gradient from either layout
        assert abs(v.item() - other[0].item()) <= 1e-6 * abs(v.item()) and rel(g, other[1]) <= 1e-5


# ----------------------------------------------------------------------------- plan form (issue 23)
# The cached passes in their log-sum-exp form (an exp per entry and direction, running maxima)
# and their plan form (one exp per entry for both directions: native.PLAN_FORM), at the final
# ε of the 10k, D = 128 divergence with its own potentials (a few rows and columns may be
# recomputed: plan_counts, recorded); then the divergence itself with either form.
PLAN_N, PLAN_D = 10000, 128
PLAN_RULE = Rounds(warmup=1, rounds=5)


def _final_potentials():
    """(hr, hc) of C(x, y) and h of C(x, x) at the final ε: the potentials of the loop
    (OT without debias, native, float32), (1, N) each."""
    key = "plan-potentials"
    if key not in _EXTRA:
        x, y = data(PLAN_N, PLAN_D)
        ot = otkernels.SamplesLoss(**{**PARAMS, "debias": False}, potentials=True, backend="native")
        F, G = ot(x, y)
        Fx, _ = ot(x, x)
        lw = -float(torch.log(torch.tensor(float(PLAN_N))))
        _EXTRA[key] = ((lw + G / EPS)[None], (lw + F / EPS)[None], (lw + Fx / EPS)[None])
    return _EXTRA[key]


@pytest.mark.parametrize("form", ["lse", "plan"])
@pytest.mark.parametrize("what", ["two-way C_xy", "packed C_xx"])
def test_plan_form_pass(benchmark, what, form):
    if not native.available()[0] or not hasattr(native._ext(), "plan_counts"):
        pytest.skip("native plan form unavailable")
    benchmark.group = f"native plan form: {what} pass N={PLAN_N} D={PLAN_D}"
    x, y = data(PLAN_N, PLAN_D)
    hr, hc, hs = _final_potentials()
    if what == "two-way C_xy":
        K, s = native.cost_matrix(x[None], y[None], 2)
        fn = lambda: native.lse_cached_two(K, s, hr, hc, EPS, plan=form == "plan")  # noqa: E731
    else:
        K, s = native.cost_packed(x[None], 2)
        fn = lambda: (native.lse_packed(K, s, hs, EPS, plan=form == "plan"),)  # noqa: E731
    native.plan_counts(reset=True)
    out = run(benchmark, fn, PLAN_RULE, "plan-pass", what, PLAN_D, form)
    counts = native.plan_counts(reset=True)
    _EXTRA["plan-pass", what, form] = out
    read = K.numel() * K.element_size()
    t = _RESULTS["plan-pass", what, PLAN_D, form]
    benchmark.extra_info.update(read_bytes=read, GB_per_s=read / t / 1e9, threads=THREADS,
                                recomputed_per_pass={k: v / max(counts["passes"], 1) for k, v in counts.items()
                                                     if k != "passes"})
    other = _EXTRA.get(("plan-pass", what, "lse" if form == "plan" else "plan"))
    if other is not None:  # the same log-sum-exps from either form
        for a, b in zip(out, other):
            assert rel(-EPS * a, -EPS * b) <= 2e-6


@pytest.mark.parametrize("form", ["lse", "plan"])
def test_plan_form_divergence(benchmark, form):
    """The divergence at 10k, D = 128 (fwd + bwd, 2 GiB budget: every cost cached) with the
    cached passes in either form; ~15 s a form."""
    if not native.available()[0] or not hasattr(native._ext(), "plan_counts"):
        pytest.skip("native plan form unavailable")
    benchmark.group = f"native plan form: divergence N={PLAN_N} D={PLAN_D}"
    x, y = data(PLAN_N, PLAN_D)
    loss = _divergence_loss("native")
    with _native_setting("PLAN_FORM", form == "plan"):
        native.plan_counts(reset=True)
        v, g = run(benchmark, lambda: _fwd_bwd(loss, x, y), Rounds(warmup=1, rounds=3), "plan-div", PLAN_N, PLAN_D,
                   form)
        counts = native.plan_counts(reset=True)
    calls = 4  # warm-up + 3 rounds
    rv, rg = _plan_reference()
    err_v, err_g = abs(v.item() - rv) / abs(rv), rel(g, rg)
    benchmark.extra_info.update(value=v.item(), threads=THREADS, rel_err_value=err_v, rel_err_grad=err_g,
                                reference="native float64 (equal to geomloss to 1e-9: tests)",
                                plan_counts_per_call={k: v_ / calls for k, v_ in counts.items()})
    # either form within float32's floor of the float64 answer (the two float32 answers differ
    # from each other by as much as from it: 16 seeded cases at 3k, docs/benchmarks.md)
    assert err_v <= REL_TOL, f"{form}: value {v.item()} vs float64 {rv}: {err_v:.2e}"
    assert err_g <= GRAD_REL_TOL, f"{form}: gradient relative error {err_g:.2e} vs float64"


def _plan_reference():
    key = "plan-ref"
    if key not in _EXTRA:
        x, y = data(PLAN_N, PLAN_D)
        backends.set_cache_budget(CACHE_BUDGET)
        try:
            v, g = _fwd_bwd(_divergence_loss("native"), x.double(), y.double())
        finally:
            backends.set_cache_budget(None)
        _EXTRA[key] = (v.item(), g.float())
    return _EXTRA[key]


# ----------------------------------------------------------------------------- summary
@pytest.fixture(scope="module", autouse=True)
def _summary(request):
    yield
    if not _RESULTS:
        return
    lines, summary = [], {"results_s": {" ".join(map(str, k)): v for k, v in _RESULTS.items()}}
    peaks = {k: v for k, v in _EXTRA.items() if isinstance(k, str) and k.startswith("peak")}
    summary["peaks"] = peaks
    lines.append(f"native backend summary (median seconds; softmin {SOFTMIN_RULE}; {THREADS} thread(s))")
    for k, v in peaks.items():
        lines.append(f"  {k}: {v:.3g}")
    for N in SIZES:
        for D in DIMS:
            r = {n: _RESULTS.get(("softmin", N, D, n)) for n in SOFTMIN}
            if r["native"]:
                parts = [f"{n} {t * 1e3:.1f} ms" for n, t in r.items() if t]
                lines.append(f"  softmin N={N} D={D}: " + ", ".join(parts))
                if r["blocked"]:
                    lines.append(f"    native / blocked speed-up: {r['blocked'] / r['native']:.1f}x")
                t = r["native"]
                lines.append(f"    native cached pass: {N * N / t:.3g} exp/s, {4 * N * N / t / 1e9:.2f} GB/s of cache")
                if r["native-online"] and D > 8:
                    lines.append(f"    native online pass: {2 * N * N * D / r['native-online'] / 1e9:.1f} GFLOP/s (GEMM)"
                                 f", {N * N / r['native-online']:.3g} exp/s")
            d = {n: _RESULTS.get(("divergence", N, D, n)) for n in DIVERGENCE}
            if d["native"]:
                parts = [f"{n} {t:.2f} s" for n, t in d.items() if t]
                lines.append(f"  divergence fwd+bwd N={N} D={D}: " + ", ".join(parts))
                geo = [t for n, t in d.items() if n.startswith("geomloss") and t]
                if geo:
                    lines.append(f"    native vs fastest geomloss: {min(geo) / d['native']:.1f}x")
    for N in SELF_SIZES:
        for kind in ("self-pass", "self-build", "self-div"):
            r = {lay: _RESULTS.get((kind, N, SELF_D, lay)) for lay in ("full", "packed")}
            if all(r.values()):
                store = {"full": 4 * N * N, "packed": 4 * native.packed_numel(N)}
                mib = {k: v / 2 ** 20 for k, v in store.items()}
                lines.append(f"  C(x,x) {kind[5:]} N={N} D={SELF_D}: full {r['full'] * 1e3:.1f} ms "
                             f"({mib['full']:.1f} MiB stored), packed {r['packed'] * 1e3:.1f} ms "
                             f"({mib['packed']:.1f} MiB stored), packed / full {r['packed'] / r['full']:.2f}")
    for what in ("two-way C_xy", "packed C_xx"):
        r = {f: _RESULTS.get(("plan-pass", what, PLAN_D, f)) for f in ("lse", "plan")}
        if all(r.values()):
            lines.append(f"  {what} pass N={PLAN_N} D={PLAN_D}: log-sum-exp form {r['lse'] * 1e3:.1f} ms, plan form "
                         f"{r['plan'] * 1e3:.1f} ms, plan / lse {r['plan'] / r['lse']:.2f}")
    r = {f: _RESULTS.get(("plan-div", PLAN_N, PLAN_D, f)) for f in ("lse", "plan")}
    if all(r.values()):
        lines.append(f"  divergence N={PLAN_N} D={PLAN_D}: log-sum-exp form {r['lse']:.2f} s, plan form "
                     f"{r['plan']:.2f} s, plan / lse {r['plan'] / r['lse']:.2f}")
    summary["lines"] = lines
    tr = request.config.pluginmanager.get_plugin("terminalreporter")
    for line in lines:
        (tr.write_line if tr else print)(line)
    os.makedirs(".benchmarks", exist_ok=True)
    with open(os.path.join(".benchmarks", "native_summary.json"), "w") as fh:
        json.dump(summary, fh, indent=1, default=str)
