"""otkernels.distributed (Sinkhorn, ε-Hausdorff and kernel losses, MMD², KID, prdc, FID,
assignment) on 2 and 3 CPU processes (gloo on 127.0.0.1), against the single-process
functions on the concatenated clouds: values, potentials and every gradient within 1e-10
relative in float64.

One ``torch.multiprocessing.spawn`` per world size runs every case (process start-up and
imports dominate: ~3 s per spawn); each rank computes the single-process reference on the
full data itself, compares its own shard, and writes its errors to a JSON file the tests read.
Shards are uneven (N not divisible by the world size) and some cases give a rank no points.
"""
import json
import os
import socket
import zlib
from datetime import timedelta

import pytest
import torch

TOL = 1e-10


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _split(n, world, rank, empty=False):
    """Row range of ``rank``: rank 0 gets nothing with ``empty``, the rest as evenly as possible."""
    owners = list(range(1, world)) if empty and world > 1 else list(range(world))
    sizes = [0] * world
    for k, r in enumerate(owners):
        sizes[r] = n // len(owners) + (1 if k < n % len(owners) else 0)
    start = sum(sizes[:rank])
    return slice(start, start + sizes[rank])


def _rel(a, b):
    a, b = a.detach().double(), b.detach().double()
    if a.shape != b.shape:
        return float("inf")
    if b.numel() == 0:
        return 0.0
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-300))


def _grads(ts):
    return [torch.zeros_like(t) if t.grad is None else t.grad for t in ts]


def _loss_case(rank, world, name, kw, B=None, weights=False, empty_x=False, empty_y=False, N=23, M=17, D=3,
               potentials=False):
    """The distributed loss on this rank's shards vs otkernels.SamplesLoss on everything."""
    from otkernels import SamplesLoss
    from otkernels import distributed as otd

    g = torch.Generator().manual_seed(zlib.crc32(name.encode()))
    shape = (lambda n: (B, n, D)) if B else (lambda n: (n, D))
    x = torch.randn(shape(N), generator=g, dtype=torch.float64)
    y = torch.randn(shape(M), generator=g, dtype=torch.float64) + 0.5
    wshape = (lambda n: (B, n)) if B else (lambda n: (n,))
    a = torch.rand(wshape(N), generator=g, dtype=torch.float64) + 0.1 if weights else None
    b = torch.rand(wshape(M), generator=g, dtype=torch.float64) + 0.1 if weights else None
    if weights:
        a, b = a / a.sum(-1, keepdim=True), b / b.sum(-1, keepdim=True)
    sx, sy = _split(N, world, rank, empty_x), _split(M, world, rank, empty_y)
    cut = (lambda t, s: t[:, s]) if B else (lambda t, s: t[s])

    def leaves(*ts):
        return [None if t is None else t.clone().requires_grad_() for t in ts]

    full = leaves(a, x, b, y)
    shard = leaves(*(None if t is None else cut(t, s) for t, s in zip((a, x, b, y), (sx, sx, sy, sy))))
    args = (lambda t: t if weights else (t[1], t[3]))
    ref = SamplesLoss(**kw, potentials=potentials)(*args(full))
    out = otd.SamplesLoss(**kw, potentials=potentials)(*args(shard))
    errs = {}
    if potentials:
        errs["F"], errs["G"] = _rel(out[0], cut(ref[0], sx)), _rel(out[1], cut(ref[1], sy))
        return errs
    errs["value"] = _rel(out, ref)
    ref.sum().backward()
    out.sum().backward()
    ts = [(n, f, s, sl) for n, f, s, sl in zip("axby", full, shard, (sx, sx, sy, sy)) if f is not None]
    for n, f, s, sl in ts:
        errs[f"grad_{n}"] = _rel(_grads([s])[0], cut(f.grad, sl))
    return errs


SINKHORN = {
    "p2_debias": (dict(p=2, blur=0.3, backend="tensorized"), {}),
    "p1_debias": (dict(p=1, blur=0.3, backend="tensorized"), {}),
    "p2_no_debias": (dict(p=2, blur=0.3, debias=False, backend="tensorized"), {}),
    "p1_no_debias_weighted": (dict(p=1, blur=0.3, debias=False, backend="tensorized"), dict(weights=True)),
    "p2_batched_weighted": (dict(p=2, blur=0.2, backend="tensorized"), dict(B=2, weights=True)),
    "p2_reach_debias": (dict(p=2, blur=0.3, reach=0.7, backend="tensorized"), dict(weights=True)),
    "p1_reach_no_debias": (dict(p=1, blur=0.3, reach=0.7, debias=False, backend="tensorized"), dict(B=2)),
    "p2_empty_x_shard": (dict(p=2, blur=0.3, backend="tensorized"), dict(empty_x=True, weights=True)),
    "p1_empty_y_shard_batched": (dict(p=1, blur=0.3, backend="tensorized"), dict(empty_y=True, B=2)),
    "p2_blocked": (dict(p=2, blur=0.1, backend="blocked"), dict(D=5)),
    "p2_online_reach_empty": (dict(p=2, blur=0.2, reach=1.0, backend="online"), dict(empty_x=True)),
    "p2_native": (dict(p=2, blur=0.1, backend="native"), dict(weights=True)),
    "p2_triton_weighted": (dict(p=2, blur=0.2, backend="triton"), dict(weights=True)),
    "p1_keops_no_debias": (dict(p=1, blur=0.3, debias=False, backend="keops"), dict(empty_y=True)),
    "p2_auto_float64_large_blur": (dict(p=2, blur=2.0), dict(N=40, M=31)),
    "p2_early_stopping": (dict(p=2, blur=0.1, tol=1e-9, backend="tensorized"), {}),
    "p2_cosine": (dict(p=2, blur=0.3, cost="cosine", backend="tensorized"), dict(weights=True)),
    "p1.5_general_blocked": (dict(p=1.5, blur=0.3, backend="blocked"), dict(empty_y=True)),
    "potentials_p2": (dict(p=2, blur=0.3, backend="tensorized"), dict(potentials=True, weights=True)),
    "potentials_p1_no_debias_empty": (dict(p=1, blur=0.3, debias=False, backend="tensorized"),
                                      dict(potentials=True, empty_x=True)),
    "potentials_reach_batched": (dict(p=2, blur=0.3, reach=0.5, backend="blocked"), dict(potentials=True, B=2)),
}
KERNELS = {
    "energy": (dict(loss="energy", backend="tensorized"), dict(weights=True)),
    "gaussian_batched": (dict(loss="gaussian", blur=0.7, backend="tensorized"), dict(B=2)),
    "laplacian_blocked_empty": (dict(loss="laplacian", blur=0.7, backend="blocked"), dict(empty_y=True, weights=True)),
    "energy_native": (dict(loss="energy", backend="native"), dict(D=4)),
    "gaussian_triton_batched": (dict(loss="gaussian", blur=0.7, backend="triton"), dict(B=2)),
    "gaussian_potentials": (dict(loss="gaussian", blur=0.7, backend="tensorized"), dict(potentials=True, empty_x=True)),
}


HAUSDORFF = {
    "p2": (dict(loss="hausdorff", p=2, blur=0.3, backend="tensorized"), {}),
    "p1_weighted_empty_x": (dict(loss="hausdorff", p=1, blur=0.3, backend="tensorized"),
                            dict(weights=True, empty_x=True)),
    "p2_batched_blocked_empty_y": (dict(loss="hausdorff", p=2, blur=0.2, backend="blocked"), dict(B=2, empty_y=True)),
    "p2_native": (dict(loss="hausdorff", p=2, blur=0.1, backend="native"), dict(weights=True, D=5)),
    "p2_online_cosine": (dict(loss="hausdorff", p=2, blur=0.3, cost="cosine", backend="online"), {}),
    "potentials": (dict(loss="hausdorff", p=2, blur=0.3, backend="tensorized"), dict(potentials=True, empty_x=True)),
}


RAGGED = {  # S = 3 segments; form: batch ids, offsets or lists of clouds
    "batch_ids": (dict(p=2, blur=0.3, backend="tensorized"), dict(form="batch")),
    "offsets_weighted_empty": (dict(p=1, blur=0.3, backend="tensorized"), dict(form="offsets", weights=True,
                                                                               empty=True)),
    "lists_hausdorff": (dict(loss="hausdorff", p=2, blur=0.3, backend="blocked"), dict(form="list")),
    "batch_ids_empty_potentials": (dict(p=2, blur=0.3, backend="tensorized"), dict(form="batch", empty=True,
                                                                                   potentials=True)),
    "lists_potentials": (dict(loss="gaussian", blur=0.7, backend="tensorized"), dict(form="list", potentials=True)),
}


def _ragged_case(rank, world, name, kw, form, weights=False, empty=False, potentials=False):
    """A ragged batch (segments of 9, 4 and 13 points of x; 7, 11, 5 of y) whose every segment
    is split over the ranks (rank 0 holds nothing of segments 1, 2 with ``empty``) vs the
    single-process ragged call on everything."""
    from otkernels import SamplesLoss
    from otkernels import distributed as otd

    g = torch.Generator().manual_seed(zlib.crc32(name.encode()))
    nx, ny = [9, 4, 13], [7, 11, 5]
    x = torch.randn(sum(nx), 3, generator=g, dtype=torch.float64)
    y = torch.randn(sum(ny), 3, generator=g, dtype=torch.float64) + 0.5
    ids = [torch.repeat_interleave(torch.arange(3), torch.tensor(ns)) for ns in (nx, ny)]
    a, b = (torch.rand(sum(ns), generator=g, dtype=torch.float64) + 0.1 for ns in (nx, ny))
    a, b = (w / torch.zeros(3, dtype=w.dtype).index_add(0, i, w)[i] for w, i in zip((a, b), ids))  # mass 1 each

    def rows(ns):  # this rank's global rows of each segment
        starts = [sum(ns[:k]) for k in range(len(ns))]
        return [torch.arange(n)[_split(n, world, rank, empty and k >= 1)] + s0
                for k, (n, s0) in enumerate(zip(ns, starts))]
    rx, ry = rows(nx), rows(ny)
    ix, iy = torch.cat(rx), torch.cat(ry)
    full = [t.clone().requires_grad_() for t in (a, x, b, y)]
    shard = [t[i].clone().requires_grad_() for t, i in zip((a, x, b, y), (ix, ix, iy, iy))]
    ref_kw = dict(x_batch=ids[0], y_batch=ids[1])
    args_full = full if weights else [full[1], full[3]]
    ref = SamplesLoss(**kw, potentials=potentials)(*args_full, **ref_kw)
    if form == "list":
        pieces = [[shard[k][sum(len(q) for q in r[:j]):sum(len(q) for q in r[:j + 1])] for j in range(3)]
                  for k, r in ((0, rx), (1, rx), (2, ry), (3, ry))]
        out = otd.SamplesLoss(**kw, potentials=potentials)(*(pieces if weights else [pieces[1], pieces[3]]))
        if potentials:
            out = (torch.cat(out[0]), torch.cat(out[1]))
    else:
        if form == "batch":
            kwargs = dict(x_batch=ids[0][ix], y_batch=ids[1][iy])
        else:
            kwargs = {f"{c}_offsets": torch.tensor([0] + [len(q) for q in r]).cumsum(0)
                      for c, r in (("x", rx), ("y", ry))}
        out = otd.SamplesLoss(**kw, potentials=potentials)(*(shard if weights else [shard[1], shard[3]]), **kwargs)
    if potentials:
        return {"F": _rel(out[0], ref[0][ix]), "G": _rel(out[1], ref[1][iy])}
    errs = {"value": _rel(out, ref)}
    ref.sum().backward()
    out.sum().backward()
    for n, f, t, i in zip("axby", full, shard, (ix, ix, iy, iy)):
        if weights or n in "xy":
            errs[f"grad_{n}"] = _rel(_grads([t])[0], f.grad[i])
    return errs


def _mmd_cases(rank, world):
    """The sharded mmd2 (biased, unbiased, median bandwidth, polynomial) and KID."""
    from otkernels import metrics
    from otkernels import distributed as otd

    out = {}
    g = torch.Generator().manual_seed(11)
    real = torch.randn(61, 4, generator=g, dtype=torch.float64)
    fake = torch.randn(47, 4, generator=g, dtype=torch.float64) * 1.2 + 0.3
    big_r = torch.randn(620, 3, generator=g, dtype=torch.float64)  # pooled > max_points: the subsample
    big_f = torch.randn(450, 3, generator=g, dtype=torch.float64) + 0.2
    cases = [("gaussian_biased", "gaussian", [0.5, 1.5], False, False, real, fake),
             ("energy_biased_empty", "energy", 1.0, False, True, real, fake),
             ("laplacian_biased", "laplacian", 0.8, False, False, real, fake),
             ("gaussian_unbiased", "gaussian", 0.7, True, False, real, fake),
             ("laplacian_unbiased_median_empty", "laplacian", "median", True, True, real, fake),
             ("energy_unbiased", "energy", "median", True, False, real, fake),
             ("gaussian_median_subsampled", "gaussian", "median", True, False, big_r, big_f),
             ("polynomial_unbiased_empty", "polynomial", None, True, True, real, fake),
             ("polynomial_biased", "polynomial", None, False, False, real, fake)]
    for name, kernel, bw, unbiased, empty, r, f in cases:
        n, m = r.shape[0], f.shape[0]
        xr, yr = r.clone().requires_grad_(), f.clone().requires_grad_()
        ref = metrics.mmd2(xr, yr, kernel, bw, unbiased=unbiased)
        ref.backward()
        sx, sy = _split(n, world, rank, empty), _split(m, world, rank)
        xs, ys = r[sx].clone().requires_grad_(), f[sy].clone().requires_grad_()
        got = otd.mmd2(xs, ys, kernel, bw, unbiased=unbiased)
        got.backward()
        out[name] = {"value": _rel(got, ref), "grad_x": _rel(xs.grad, xr.grad[sx]),
                     "grad_y": _rel(ys.grad, yr.grad[sy])}
    xr, yr = real.clone().requires_grad_(), fake.clone().requires_grad_()
    ref = metrics.polynomial_mmd2(xr, yr, degree=2, gamma=0.3, coef0=0.5)
    ref.backward()
    sx, sy = _split(61, world, rank), _split(47, world, rank, True)
    xs, ys = real[sx].clone().requires_grad_(), fake[sy].clone().requires_grad_()
    got = otd.polynomial_mmd2(xs, ys, degree=2, gamma=0.3, coef0=0.5)
    got.backward()
    out["polynomial_degree2"] = {"value": _rel(got, ref), "grad_x": _rel(xs.grad, xr.grad[sx]),
                                 "grad_y": _rel(ys.grad, yr.grad[sy])}
    # KID: the same subsets (seeded, or a generator left in the single-process state), S not divisible
    # by the world size, S < world size (a rank without subsets), an empty shard
    for name, kw, empty in (("kid_7", dict(subsets=7, subset_size=20), False),
                            ("kid_2_empty", dict(subsets=2, subset_size=30, seed=5), True),
                            ("kid_5_float32", dict(subsets=5, subset_size=15, degree=2), False)):
        r, f = (real.float(), fake.float()) if "float32" in name else (real, fake)
        ref = metrics.kid(r, f, **kw)
        got = otd.kid(r[_split(61, world, rank, empty)], f[_split(47, world, rank)], **kw)
        out[name] = {"mean": abs(got[0] - ref[0]) / abs(ref[0]), "std": abs(got[1] - ref[1]) / abs(ref[1])}
    g1, g2 = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    ref = metrics.kid(real, fake, subsets=4, subset_size=10, generator=g1)
    got = otd.kid(real[_split(61, world, rank)], fake[_split(47, world, rank)], subsets=4, subset_size=10,
                  generator=g2)
    out["kid_generator"] = {"mean": abs(got[0] - ref[0]) / abs(ref[0]), "std": abs(got[1] - ref[1]) / abs(ref[1]),
                            "state": float(not torch.equal(g1.get_state(), g2.get_state()))}
    return out


def _metric_cases(rank, world):
    """prdc, fid and the sharded argmax / argmin vs the single-process functions."""
    from otkernels import assign, metrics
    from otkernels import distributed as otd

    out = {}
    g = torch.Generator().manual_seed(7)
    real = torch.randn(61, 4, generator=g, dtype=torch.float64)
    fake = torch.randn(47, 4, generator=g, dtype=torch.float64) * 1.2 + 0.3
    for name, kw, empty in (("prdc_k3", dict(k=3), False), ("prdc_kpr3_kdc5_empty", dict(k_pr=3, k_dc=5), True)):
        ref = metrics.prdc(real, fake, **kw)
        got = otd.prdc(real[_split(61, world, rank, empty)], fake[_split(47, world, rank)], **kw)
        out[name] = {k: abs(got[k] - ref[k]) for k in ref}
        out[name]["keys"] = float(sorted(got) != sorted(ref))
    ref = metrics.fid(real, fake)
    got = otd.fid(real[_split(61, world, rank)], fake[_split(47, world, rank, True)])
    out["fid"] = {"value": abs(got - ref) / abs(ref)}
    # float32 features: the sharded prdc centres like the single-process one
    r32, f32 = real.float() * 10 + 100, fake.float() * 10 + 100
    ref = metrics.prdc(r32, f32, k=4)
    got = otd.prdc(r32[_split(61, world, rank)], f32[_split(47, world, rank)], k=4)
    out["prdc_float32"] = {k: abs(got[k] - ref[k]) for k in ref}
    # assignment with the targets sharded (ties included: duplicated targets)
    x = torch.randn(2, 50, 3, generator=g, dtype=torch.float64)
    y = torch.randn(2, 29, 3, generator=g, dtype=torch.float64)
    y[:, 20] = y[:, 3]
    h = torch.randn(2, 29, generator=g, dtype=torch.float64)
    h[:, 20] = h[:, 3]
    for fn, name in ((assign.argmax_inner, "argmax_inner"), (assign.argmin_sqdist, "argmin_sqdist")):
        for empty in (False, True):
            s = _split(29, world, rank, empty)
            for backend in ("torch", "native") if "native" in _usable() else ("torch",):
                rv, ri = fn(x, y, h, backend=backend)
                gv, gi = getattr(otd, name)(x, y[:, s], h[:, s], backend=backend)
                out[f"{name}_{backend}_{'empty' if empty else 'full'}"] = {
                    "value": _rel(gv, rv), "index_mismatch": float((gi != ri).sum())}
            rv, ri = fn(x[0], y[0])  # unbatched, no h
            gv, gi = getattr(otd, name)(x[0], y[0, s])
            out[f"{name}_unbatched_{'empty' if empty else 'full'}"] = {"value": _rel(gv, rv),
                                                                         "index_mismatch": float((gi != ri).sum())}
    # the gather helper: uneven shards, rank order
    t = torch.arange(10.0).reshape(5, 2)
    out["gather"] = {"error": float((otd.gather(t[_split(5, world, rank, True)], 0) != t).sum())}
    return out


def _errors(rank, world):
    """Expected errors raised on every rank alike (no rank left waiting in a collective)."""
    from otkernels import distributed as otd

    out = {}
    x = torch.randn(4 if rank else 0, 2, dtype=torch.float64)
    y = torch.randn(3, 2, dtype=torch.float64)
    try:
        otd.SamplesLoss(p=2, blur=0.3, tol=1e-6)(x, y)
        out["tol_empty_shard"] = "no error"
    except NotImplementedError as e:
        out["tol_empty_shard"] = str(e)
    try:
        otd.SamplesLoss(p=2)(torch.randn(3, 2 + (rank == 1), dtype=torch.float64),
                             torch.randn(3, 2 + (rank == 1), dtype=torch.float64))
        out["dimension_mismatch"] = "no error"
    except ValueError as e:
        out["dimension_mismatch"] = str(e)
    try:
        otd.SamplesLoss(p=2)(torch.randn(0, 2, dtype=torch.float64), torch.randn(3, 2, dtype=torch.float64))
        out["all_empty"] = "no error"
    except ValueError as e:
        out["all_empty"] = str(e)
    pts = torch.randn(4, 2, dtype=torch.float64)
    try:  # rank 1's segment ids are not sorted: every rank raises
        otd.SamplesLoss(p=2)(pts, pts, x_batch=torch.tensor([0, 1, 0, 1] if rank == 1 else [0, 0, 1, 1]),
                             y_batch=torch.tensor([0, 0, 1, 1]))
        out["ragged_unsorted"] = "no error"
    except ValueError as e:
        out["ragged_unsorted"] = str(e)
    try:  # lists of different lengths on different ranks
        otd.SamplesLoss(p=2)([pts] * (2 + (rank == 0)), [pts] * (2 + (rank == 0)))
        out["ragged_lists"] = "no error"
    except ValueError as e:
        out["ragged_lists"] = str(e)
    feats = torch.randn(5 if rank else 0, 2, dtype=torch.float64)
    try:  # rank 0 draws no subset (2 subsets on 2-3 ranks) but raises too
        otd.kid(feats, feats, subsets=2, subset_size=11)
        out["kid_subset_size"] = "no error"
    except ValueError as e:
        out["kid_subset_size"] = str(e)
    try:
        otd.mmd2(feats[:1] if rank == 1 else feats[:0], feats, unbiased=True)  # 1 point of x
        out["mmd2_too_few"] = "no error"
    except ValueError as e:
        out["mmd2_too_few"] = str(e)
    return out


def _usable():
    """The backends that run here (the same on every rank): the cases of the others are skipped."""
    from otkernels import backends

    return {name for name, (ok, _) in backends.available().items() if ok}


def _worker(rank, world, port, outdir):
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                            timeout=timedelta(seconds=120))
    try:
        res = {"sinkhorn": {}, "kernel": {}, "hausdorff": {}}
        usable = _usable() | {"online"}  # online: blocked without a cache
        for group, cases in (("sinkhorn", SINKHORN), ("kernel", KERNELS), ("hausdorff", HAUSDORFF)):
            for name, (kw, opts) in cases.items():
                skip = kw.get("backend", "auto") not in usable | {"auto"}
                res[group][name] = None if skip else _loss_case(rank, world, name, kw, **opts)
        res["ragged"] = {name: _ragged_case(rank, world, name, kw, **opts) for name, (kw, opts) in RAGGED.items()}
        res["metrics"] = _metric_cases(rank, world)
        res["mmd"] = _mmd_cases(rank, world)
        res["errors"] = _errors(rank, world)
        with open(os.path.join(outdir, f"{rank}.json"), "w") as f:
            json.dump(res, f)
    finally:
        dist.destroy_process_group()


_RESULTS = {}


def _require(kw):
    """Fail where the case's backend is expected here but unavailable, skip where it is not
    installed (tests/otk_testing.py); the workers record None for a backend they cannot run."""
    from otk_testing import require_backend

    name = kw.get("backend", "auto")
    if name not in ("auto", "online"):
        require_backend(name)


def _results(world, tmp_path_factory):
    if world not in _RESULTS:
        import torch.multiprocessing as mp

        out = tmp_path_factory.mktemp(f"dist{world}")
        mp.spawn(_worker, args=(world, _free_port(), str(out)), nprocs=world, join=True)
        _RESULTS[world] = [json.load(open(out / f"{r}.json")) for r in range(world)]
    return _RESULTS[world]


@pytest.fixture(scope="module", params=[2, 3], ids=["2ranks", "3ranks"])
def results(request, tmp_path_factory):
    return _results(request.param, tmp_path_factory)


@pytest.mark.parametrize("case", list(SINKHORN))
def test_sinkhorn_matches_single_process(results, case):
    _require(SINKHORN[case][0])
    for rank, res in enumerate(results):
        errs = res["sinkhorn"][case]
        assert errs, case
        for what, e in errs.items():
            assert e <= TOL, f"rank {rank}, {case}: {what} relative error {e:.3g}"
        if "potentials" not in case:
            assert "grad_x" in errs and "grad_y" in errs


@pytest.mark.parametrize("case", list(KERNELS))
def test_kernel_losses_match_single_process(results, case):
    _require(KERNELS[case][0])
    for rank, res in enumerate(results):
        for what, e in res["kernel"][case].items():
            assert e <= TOL, f"rank {rank}, {case}: {what} relative error {e:.3g}"


def test_metrics_and_assignment_match_single_process(results):
    for rank, res in enumerate(results):
        m = res["metrics"]
        for name in ("prdc_k3", "prdc_kpr3_kdc5_empty", "prdc_float32"):
            assert set(m[name]) >= {"precision", "recall", "density", "coverage"}
            for k, e in m[name].items():
                assert e == 0.0, f"rank {rank}: {name} {k} differs by {e}"
        assert m["fid"]["value"] <= 1e-10
        argbest = [k for k in m if k.startswith("arg")]
        assert len(argbest) >= 8  # 12 with the native backend
        for k in argbest:
            assert m[k]["index_mismatch"] == 0 and m[k]["value"] <= TOL, (rank, k, m[k])
        assert m["gather"]["error"] == 0


@pytest.mark.parametrize("case", list(HAUSDORFF))
def test_hausdorff_matches_single_process(results, case):
    _require(HAUSDORFF[case][0])
    for rank, res in enumerate(results):
        errs = res["hausdorff"][case]
        assert errs
        for what, e in errs.items():
            assert e <= TOL, f"rank {rank}, {case}: {what} relative error {e:.3g}"
        if "potentials" not in case:
            assert "grad_x" in errs and "grad_y" in errs


@pytest.mark.parametrize("case", list(RAGGED))
def test_ragged_matches_single_process(results, case):
    for rank, res in enumerate(results):
        errs = res["ragged"][case]
        assert len(errs) >= 2
        for what, e in errs.items():
            assert e <= TOL, f"rank {rank}, {case}: {what} relative error {e:.3g}"


def test_mmd_and_kid_match_single_process(results):
    for rank, res in enumerate(results):
        m = res["mmd"]
        assert len(m) == 14
        for name, errs in m.items():
            if name.startswith("kid"):
                assert errs.get("state", 0.0) == 0.0, f"rank {rank}: {name}: generator state differs"
                assert errs["mean"] <= TOL and errs["std"] <= TOL, (rank, name, errs)
                continue
            assert set(errs) == {"value", "grad_x", "grad_y"}
            for what, e in errs.items():
                assert e <= TOL, f"rank {rank}: mmd2 {name} {what} relative error {e:.3g}"


def test_errors_raised_on_every_rank(results):
    for res in results:
        e = res["errors"]
        assert "non-empty shard" in e["tol_empty_shard"]
        assert "same batch size B and dimension D" in e["dimension_mismatch"]
        assert "empty point cloud" in e["all_empty"]
        assert "subset_size=11 exceeds" in e["kid_subset_size"]
        assert "invalid input on rank 1" in e["ragged_unsorted"] or "must be sorted" in e["ragged_unsorted"]
        assert "same number (> 0) of segments" in e["ragged_lists"]
        assert "needs at least 2" in e["mmd2_too_few"]


def test_single_process_fallback():
    """Without a process group the distributed functions are the plain ones."""
    from otkernels import SamplesLoss, metrics
    from otkernels import distributed as otd

    x, y = torch.randn(9, 2, dtype=torch.float64), torch.randn(7, 2, dtype=torch.float64)
    assert otd.world() == (0, 1) and not otd.is_sharded()
    assert torch.equal(otd.SamplesLoss(p=2, blur=0.3)(x, y), SamplesLoss(p=2, blur=0.3)(x, y))
    v, i = otd.argmax_inner(x, y)
    assert i.shape == (9,) and torch.equal(otd.gather(x), x)
    assert torch.equal(otd.SamplesLoss("hausdorff", blur=0.3)(x, y), SamplesLoss("hausdorff", blur=0.3)(x, y))
    assert otd.kid(x, y, subsets=3, subset_size=5) == metrics.kid(x, y, subsets=3, subset_size=5)
    assert torch.equal(otd.mmd2(x, y, unbiased=True, bandwidth="median"),
                       metrics.mmd2(x, y, unbiased=True, bandwidth="median"))
