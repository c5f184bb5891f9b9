"""The Triton kernels as a GPU would compile them, checked on a machine without one.

``python -m otkernels.backends.triton.resources`` compiles every config the autotuner's
pruner keeps, for each kernel variant the library launches by default, D ∈ {2, 3, 8, 64,
128, 129, 256, 512, 1000, 2048}, float32 points (default precision tf32x3) and bfloat16
points, for sm_80, sm_86 and sm_90 — with the JIT's own specialisation (its binder on CPU
tensors shaped like the problem: ``stride_d == 1`` constant, divisibility by 16), then reads
registers and spills from Triton's own ``ptxas -v`` log and shared memory from the compiled
kernel.  That run (tens of minutes on 2 cores) is saved in
``benchmarks/results/triton-resources.json``; here:

* the table is current: each row measured on its kernel's current code (Triton's cache key, per
  kernel), and the pruner still
  keeps exactly the configs it measured (a pruner or kernel change without a new table fails);
* every row fits: compiled without error, shared memory ≤ the architecture's limit, tensor-core
  instructions where they are promised, ``ex2.approx`` in the exponentials, and no spilled
  registers on the default paths at D ≤ 256 on sm_80 and sm_90 (except the configs measured
  fastest on an H200, ``kernels.HOPPER_FIRST``, timed by the autotuner against spill-free ones
  kept beside them);
* the table is authentic: a sample of its rows, recompiled now, gives the same registers,
  spills and shared memory.

Skipped (with the reason) only when triton or its NVIDIA backend/ptxas is missing.
"""
from __future__ import annotations

import json
import os
import random

import pytest

triton = pytest.importorskip("triton", reason="triton is not installed")

from otkernels.backends.triton import kernels as K  # noqa: E402
from otkernels.backends.triton import resources as R  # noqa: E402

TABLE = os.path.join(os.path.dirname(__file__), "..", "..", "benchmarks", "results", "triton-resources.json")
ARCHS = (80, 86, 90)
DTYPES = (("fp32", "tf32x3"), ("bf16", "ieee"))
SPILL_FREE_ARCHS = (80, 90)  # the "paths users hit by default", D ≤ 256


@pytest.fixture(scope="module")
def table():
    if not hasattr(K._softmin_fwd.fn, "cache_key"):
        pytest.skip("triton was imported with TRITON_INTERPRET=1: the kernels are interpreted functions")
    from triton.backends.nvidia.compiler import get_ptxas  # the NVIDIA backend ships with triton
    if not os.path.exists(get_ptxas(90).path):
        pytest.skip("no ptxas for the NVIDIA target in this triton install")
    with open(TABLE) as fh:
        return json.load(fh)


def _groups(rows):
    out = {}
    for r in rows:
        out.setdefault((r["variant"], r["D"], r["dtype"], r["precision"], r["cc"]), []).append(r)
    return out


def test_table_is_current(table):
    now = R.kernel_hashes()
    stale = sorted({r["kernel"] for r in table["rows"] if table["kernel_hashes"].get(r["kernel"]) != now[r["kernel"]]})
    assert not stale, (
        f"{stale} changed since benchmarks/results/triton-resources.json was measured: rerun "
        "python -m otkernels.backends.triton.resources --default-only --arch 80 86 90 --dtypes fp32 bf16 "
        "--precisions tf32x3 --merge benchmarks/results/triton-resources.json "
        "--json benchmarks/results/triton-resources.json (re-measures the changed kernels' rows)")
    for (v, D, dtype, prec, cc), rows in _groups(table["rows"]).items():
        name, args, consts = R.launch_of(v, D, dtype, prec)
        kept = sorted(R.config_label(c) for c in R.kept_configs(name, args, consts, cc))
        assert kept == sorted(r["config"] for r in rows), f"{v} D={D} {dtype} sm_{cc}: the pruner changed"


def test_table_covers_the_default_paths(table):
    cases = set(_groups(table["rows"]))
    want = {(v, D, dt, pr, cc) for v in R.DEFAULT_VARIANTS for D in R.DIMS for dt, pr in DTYPES for cc in ARCHS}
    assert want <= cases, f"missing: {sorted(want - cases)[:5]}"


def test_every_kept_config_fits(table):
    bad = []
    for r in table["rows"]:
        where = f"{r['variant']} D={r['D']} {r['dtype']}/{r['precision']} sm_{r['cc']} [{r['config']}]"
        if "error" in r:
            bad.append(f"{where}: {r['error']}")
            continue
        if r["shared"] > r["limit"]:
            bad.append(f"{where}: {r['shared']} B shared > {r['limit']}")
        if not r["ex2"] and "argmin" not in r["variant"] and "argmax" not in r["variant"]:
            bad.append(f"{where}: no ex2.approx")
        dot = r["direct"] == 0 or "grad" in r["variant"]  # direct tiles (D ≤ 8) have no cost dot
        if dot and not r["mma"]:
            bad.append(f"{where}: no tensor-core instruction")
        if dot and r["dtype"] == "fp32" and not any("tf32" in m for m in r["mma"]):
            bad.append(f"{where}: float32 dots are not TF32 tensor-core ops: {r['mma']}")
        if r["D"] <= 256 and r["cc"] in SPILL_FREE_ARCHS and r["spill_stores"] > 0 and not _hopper_measured(r):
            bad.append(f"{where}: {r['spill_stores']} B of spill stores")
    for (v, D, dtype, prec, cc), rows in _groups(table["rows"]).items():  # the autotuner can always avoid spills
        if D <= 256 and cc in SPILL_FREE_ARCHS and all(r.get("spill_stores", 1) > 0 for r in rows):
            bad.append(f"{v} D={D} {dtype}/{prec} sm_{cc}: every kept config spills")
    assert not bad, f"{len(bad)} problems:\n" + "\n".join(bad[:40])


def _hopper_measured(r):
    """A config of ``kernels.HOPPER_FIRST``, kept on sm_90 because it was the fastest on an H200
    (the tf32x3 gradient's winner spills there too, and ran in half the time of any config that
    does not); the autotuner times it against the spill-free configs kept beside it."""
    if r["cc"] != 90:
        return False
    name, args, consts = R.launch_of(r["variant"], r["D"], r["dtype"], r["precision"])
    D_PAD, BLOCK_D = consts["D_PAD"], consts["BLOCK_D"]
    first = K.hopper_first(name, 90, D_PAD, BLOCK_D, consts["DIRECT"], args[0].element_size(), r["D"],
                           consts.get("DIFF", False), consts["PRECISION"])
    return R.label_key(r["config"]) in {K.config_key(c) for c in first}


def test_the_table_reproduces():
    """Recompile a fixed sample of rows: the same registers, spills and shared memory."""
    with open(TABLE) as fh:
        rows = json.load(fh)["rows"]
    if not hasattr(K._softmin_fwd.fn, "cache_key"):
        pytest.skip("triton was imported with TRITON_INTERPRET=1")
    sample = random.Random(14).sample([r for r in rows if "error" not in r], 6)
    for r in sample:
        name, args, consts = R.launch_of(r["variant"], r["D"], r["dtype"], r["precision"])
        (config,) = [c for c in R.kept_configs(name, args, consts, r["cc"]) if R.config_label(c) == r["config"]]
        now = R.compile_config(name, args, consts, config, r["cc"])
        for k in ("registers", "spill_stores", "shared"):
            assert now[k] == r[k], f"{r['variant']} D={r['D']} sm_{r['cc']} [{r['config']}]: {k} {now[k]} != {r[k]}"


def test_ieee_float32_has_no_tf32_and_float64_compiles():
    if not hasattr(K._softmin_fwd.fn, "cache_key"):
        pytest.skip("triton was imported with TRITON_INTERPRET=1")
    name, args, consts = R.launch_of("softmin p=2", 64, "fp32", "ieee")
    config = R.kept_configs(name, args, consts, 80)[0]
    assert not R.compile_config(name, args, consts, config, 80)["tf32"]
    for v in ("softmin p=2", "softmin+grad p=2"):
        name, args, consts = R.launch_of(v, 32, "fp64")
        assert consts["ACC"].primitive_bitwidth == 64
        info = R.compile_config(name, args, consts, R.kept_configs(name, args, consts, 80)[0], 80)
        assert info["registers"] and info["shared"] <= info["limit"]


# ----------------------------------------------------------------------------- transport plan (issue 19)
PLAN_CASES = ((64, 64), (128, 1), (512, 128))  # (D, K) compiled here, float32 at the default precision


def plan_launch(D, Kc, dtype="fp32", precision=None, N=4096, M=4096):
    """``(name, args, consts)`` of ``plan_apply`` for (1,N,D) × (1,M,D) points and V (1,M,K)."""
    import torch
    from otkernels.backends.triton import ops
    dt = R.DTYPES[dtype]
    x, y, V = R._cloud(1, N, D, dt), R._cloud(1, M, D, dt), R._cloud(1, M, Kc, dt)
    z = torch.zeros(1, max(N, M), dtype=ops.acc_dtype(dt))
    with ops.capture() as log:
        ops.plan_apply(x, y, z[:, :N], z[:, :M], V, 0.1, 2, precision=precision)
    return log[0]


@pytest.mark.parametrize("cc", ARCHS)
def test_plan_apply_compiles_and_fits(cc):
    """Every config the pruner keeps for ``_plan_apply`` (D, K in :data:`PLAN_CASES`, float32,
    tf32x3), compiled for ``sm_<cc>`` with the JIT's own specialisation: no error, shared memory
    ≤ the limit, TF32 tensor cores, ``ex2.approx``, and no spilled registers.

    The wider matrix, compiled once by hand (triton 3.9, float32, tf32x3, every kept config:
    configs, registers min–max, spill stores in bytes, Triton's shared memory min–max; 80
    configs, none failed, spilled or exceeded the limit or the pruner's estimate;
    ``pytest -s`` prints this test's own rows)::

        D    K    sm_80                      sm_86                      sm_90
        64   1    4 cfg 103-205 r, 0, 24-40 KB   3 cfg  94-204 r, 0, 24-36 KB   4 cfg  94-210 r, 0, 24-40 KB
        64   64   4 cfg 154-205 r, 0, 28-64 KB   4 cfg  96-204 r, 0, 24-40 KB   4 cfg 164-192 r, 0, 64-97 KB
        64   128  4 cfg 154-205 r, 0, 28-64 KB   4 cfg  96-204 r, 0, 24-40 KB   4 cfg 164-199 r, 0, 64-97 KB
        128  1    2 cfg 160-160 r, 0, 40-60 KB   2 cfg 157-158 r, 0, 40-60 KB   2 cfg 156-156 r, 0, 40-60 KB
        128  64   3 cfg 162-164 r, 0, 40-60 KB   2 cfg 158-160 r, 0, 40-44 KB   4 cfg 155-158 r, 0, 40-68 KB
        128  128  3 cfg 162-164 r, 0, 40-60 KB   2 cfg 158-160 r, 0, 40-44 KB   4 cfg 158-173 r, 0, 44-84 KB
        512  1    1 cfg 238-238 r, 0, 24-24 KB   2 cfg 224-225 r, 0, 24-48 KB   2 cfg 228-229 r, 0, 24-48 KB
        512  64   2 cfg 233-236 r, 0, 24-24 KB   2 cfg 228-232 r, 0, 24-24 KB   4 cfg 228-232 r, 0, 24-48 KB
        512  128  2 cfg 233-236 r, 0, 24-24 KB   2 cfg 228-232 r, 0, 24-24 KB   4 cfg 228-245 r, 0, 24-48 KB

    (limits 163 / 99 / 227 KB.)  Before the rules of ``kernels._prune_plan``, BLOCK_DV = 16
    (K = 1) spilled 184–2384 B at D = 128 on every architecture, 8 warps with BLOCK_DV ≤ 32
    340–2788 B, and sm_86's fallback 32×32 tiles 368–1576 B.  bfloat16 points (same matrix):
    no spill except 4 B in 64×64 dv128 w8 s3 at D = 64, K = 128 on sm_80/86.
    """
    if not hasattr(K._plan_apply.fn, "cache_key"):
        pytest.skip("triton was imported with TRITON_INTERPRET=1: the kernels are interpreted functions")
    from triton.backends.nvidia.compiler import get_ptxas
    if not os.path.exists(get_ptxas(cc).path):
        pytest.skip("no ptxas for the NVIDIA target in this triton install")
    bad = []
    for D, Kc in PLAN_CASES:
        name, args, consts = plan_launch(D, Kc)
        kept = R.kept_configs(name, args, consts, cc)
        assert kept
        for c in kept:
            where = f"plan D={D} K={Kc} sm_{cc} [{R.config_label(c)}]"
            try:
                r = R.compile_config(name, args, consts, c, cc)
            except Exception as e:  # noqa: BLE001 - reported with the others below
                bad.append(f"{where}: {type(e).__name__}: {str(e)[:200]}")
                continue
            print(f"{where}: {r['registers']} registers, {r['spill_stores']} B spilled, "
                  f"{r['shared']} B shared (limit {r['limit']}, estimate {r['estimate']})")
            if r["shared"] > r["limit"]:
                bad.append(f"{where}: {r['shared']} B shared > {r['limit']}")
            if r["shared"] > r["estimate"]:
                bad.append(f"{where}: {r['shared']} B shared > the pruner's estimate {r['estimate']}")
            if not any("tf32" in m for m in r["mma"]) or not r["ex2"]:
                bad.append(f"{where}: tensor cores {r['mma']}, ex2.approx {r['ex2']}")
            if r["spill_stores"] > 0:
                bad.append(f"{where}: {r['spill_stores']} B of spill stores")
    assert not bad, "\n".join(bad)
