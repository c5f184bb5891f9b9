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
  registers on the default paths at D ≤ 256 on sm_80 and sm_90;
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
        if r["D"] <= 256 and r["cc"] in SPILL_FREE_ARCHS and r["spill_stores"] > 0:
            bad.append(f"{where}: {r['spill_stores']} B of spill stores")
    assert not bad, f"{len(bad)} problems:\n" + "\n".join(bad[:40])


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
