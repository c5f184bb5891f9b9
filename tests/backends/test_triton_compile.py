"""The Triton kernels compile for NVIDIA GPUs on a machine without one.

``triton.compile(ASTSource(...), target=GPUTarget("cuda", cc, 32))`` lowers every kernel of
``otkernels/backends/triton/kernels.py`` to PTX and, with the ``ptxas`` bundled in the triton
wheel, to a cubin for sm_80 (A100) and sm_90 (H100).  Checked here:

* the cost tiles and ``P·Y`` products reach the tensor cores: ``mma.sync`` on sm_80,
  ``wgmma`` (or ``mma``) on sm_90, for float32 (TF32), float16 and bfloat16 points;
* ``exp2`` lowers to the hardware ``ex2.approx`` instruction;
* ``ptxas -v`` (registers, spill stores/loads) for each compiled variant: printed in a table
  at the end of the module (``pytest -s`` shows it) and asserted (almost) spill-free —
  ≤ ``MAX_SPILL`` bytes — for the most register-hungry configuration the autotuner keeps
  (``kernels._prune_for``) at D ≤ 128.

Skipped with the reason when triton is not installed or cannot compile for a GPU target here.
"""
from __future__ import annotations

import os
import re
import subprocess
import tempfile

import pytest

triton = pytest.importorskip("triton", reason="triton is not installed")
tl = pytest.importorskip("triton.language")

from otkernels.backends.triton import kernels as K  # noqa: E402

POINTER_ARGS = {"X", "Y", "XX", "YY", "H", "Hc", "Rr", "Cw", "Par", "Out", "RowSum", "Fout", "Bw", "Val", "Idx"}
_TL_NAME = {"fp32": tl.float32, "fp64": tl.float64}
REPORT: list = []
MAX_SPILL = 64  # bytes of spill stores tolerated for the configs the autotuner keeps at D ≤ 128


def _signature(fn, consts, dtype):
    """Triton signature of ``fn``: points in ``dtype``, vectors in the accumulator dtype,
    indices int64, sizes and strides i32, constexprs."""
    acc = "fp64" if dtype == "fp64" else "fp32"
    sig = {}
    for a in fn.arg_names:
        if a in consts:
            sig[a] = "constexpr"
        elif a in ("X", "Y"):
            sig[a] = f"*{dtype}"
        elif a == "Idx":
            sig[a] = "*i64"
        elif a in POINTER_ARGS:
            sig[a] = f"*{acc}"
        else:
            sig[a] = "i32"
    return sig


def compile_kernel(name, cc, dtype, meta, num_warps=4, num_stages=2, **consts):
    """Compile ``kernels.<name>`` for ``sm_<cc>``; returns (compiled kernel, ptxas -v log)."""
    fn = K.KERNELS[name].fn
    acc = "fp64" if dtype == "fp64" else "fp32"
    consts = dict(consts, ACC=_TL_NAME[acc], **meta)
    consts.setdefault("PRECISION", "tf32" if dtype == "fp32" else "ieee")
    consts.setdefault("DIRECT", 0)
    if name == "_weighted_grad":
        consts.setdefault("NORMALIZED", False)
    src = triton.compiler.ASTSource(fn=fn, signature=_signature(fn, consts, dtype), constexprs=consts)
    target = triton.backends.compiler.GPUTarget("cuda", cc, 32)
    kernel = triton.compile(src, target=target, options=dict(num_warps=num_warps, num_stages=num_stages))
    return kernel, ptxas_info(kernel.asm["ptx"], cc)


def ptxas_info(ptx, cc):
    """``ptxas -v`` on the PTX (the ptxas bundled with triton): {registers, spill_stores, spill_loads}."""
    from triton.backends.nvidia.compiler import get_ptxas
    arch = "sm_90a" if cc == 90 else f"sm_{cc}"
    with tempfile.TemporaryDirectory() as tmp:
        src = os.path.join(tmp, "k.ptx")
        with open(src, "w") as fh:
            fh.write(ptx)
        r = subprocess.run([get_ptxas(cc).path, "-v", f"--gpu-name={arch}", src, "-o", os.path.join(tmp, "k.cubin")],
                           capture_output=True, text=True)
    assert r.returncode == 0, f"ptxas failed: {r.stderr[-2000:]}"
    regs = re.search(r"Used (\d+) registers", r.stderr)
    spills = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", r.stderr)
    return {"registers": int(regs.group(1)) if regs else None,
            "spill_stores": int(spills.group(1)) if spills else None,
            "spill_loads": int(spills.group(2)) if spills else None}


@pytest.fixture(scope="module", autouse=True)
def _can_compile():
    """Skip the module (with the reason) if this triton cannot compile for a GPU target here."""
    os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # silences triton 3.9's notice
    if not hasattr(K._softmin_fwd.fn, "cache_key"):
        pytest.skip("triton was imported with TRITON_INTERPRET=1: the kernels are interpreted functions")
    try:
        compile_kernel("_softmin_fwd", 80, "fp32", dict(BLOCK_N=64, BLOCK_M=32), P=2, D_PAD=16, BLOCK_D=16)
    except Exception as e:  # no LLVM/ptxas for NVIDIA in this triton build, etc.
        pytest.skip(f"triton cannot compile for a CUDA target here: {type(e).__name__}: {str(e)[:300]}")
    yield
    if REPORT:
        lines = [f"{'kernel':<44} {'cc':>3} {'dtype':>5} {'regs':>5} {'spill st/ld':>12}  tensor-core ops"]
        for r in REPORT:
            lines.append(f"{r['what']:<44} {r['cc']:>3} {r['dtype']:>5} {r['registers']!s:>5} "
                         f"{r['spill_stores']!s:>5}/{r['spill_loads']!s:<6}  {r['mma']}")
        print("\n" + "\n".join(lines))


def _mma_kinds(ptx):
    return sorted({m.split(".")[0] + "." + m.split(".")[-1] if m.startswith("mma") else m.split(".")[0]
                   for m in re.findall(r"\b((?:wgmma|mma)\.[\w.]+)", ptx)
                   if "fence" not in m and "commit" not in m and "wait" not in m})


def hungriest_config(name, d_pad, direct=0):
    """The config the autotuner keeps at ``d_pad`` (``kernels._prune_for``) that needs the most
    registers by ``kernels.register_words``: if it does not spill, the others should not."""
    tuner = K.KERNELS[name]
    kept = tuner.early_config_prune(tuner.configs, {}, D_PAD=d_pad, DIRECT=direct)
    c = max(kept, key=lambda c: (K.register_words(name, c.kwargs["BLOCK_N"], c.kwargs["BLOCK_M"], c.num_warps,
                                                  d_pad, direct), c.num_stages))
    return dict(c.kwargs), c.num_warps, c.num_stages


# (kernel, constexprs besides ACC/PRECISION, label); tiles from hungriest_config
CASES = [
    ("_softmin_fwd", dict(P=2, D_PAD=128, BLOCK_D=128), "softmin p=2 D128"),
    ("_softmin_fwd", dict(P=1, D_PAD=128, BLOCK_D=128), "softmin p=1 D128"),
    ("_weighted_grad", dict(MODE=K.SOFTMIN_P2, HAS_CW=False, WRITE_RS=False, D_PAD=128), "grad softmin p=2 D128"),
    ("_weighted_grad", dict(MODE=K.SOFTMIN_P1, HAS_CW=True, WRITE_RS=True, D_PAD=128), "grad softmin p=1 D128 +cw,rs"),
    ("_weighted_grad", dict(MODE=K.SOFTMIN_P2, HAS_CW=False, WRITE_RS=False, NORMALIZED=True, D_PAD=128),
     "fused softmin+grad p=2 D128"),
    ("_weighted_grad", dict(MODE=K.SOFTMIN_P1, HAS_CW=False, WRITE_RS=False, NORMALIZED=True, D_PAD=128),
     "fused softmin+grad p=1 D128"),
    ("_weighted_grad", dict(MODE=K.GAUSSIAN, HAS_CW=True, WRITE_RS=False, D_PAD=64), "grad gaussian D64"),
    ("_kernel_sum_fwd", dict(MODE=K.LAPLACIAN, D_PAD=64, BLOCK_D=64), "kernel sum laplacian D64"),
    ("_argminmax", dict(SQDIST=True, MAXIMIZE=False, D_PAD=128, BLOCK_D=128), "argmin sqdist D128"),
]
# wide D: reported, not asserted (the tuner picks among the kept configs by timing)
WIDE = [
    ("_softmin_fwd", dict(P=2, D_PAD=256, BLOCK_D=256), "softmin p=2 D256"),
    ("_softmin_fwd", dict(P=2, D_PAD=512, BLOCK_D=K.block_d(512)), "softmin p=2 D512 (chunks of 128)"),
    ("_weighted_grad", dict(MODE=K.SOFTMIN_P2, HAS_CW=False, WRITE_RS=False, D_PAD=256), "grad softmin p=2 D256"),
]


def _check(name, consts, what, cc, dtype, strict):
    meta, warps, stages = hungriest_config(name, consts["D_PAD"])
    kernel, info = compile_kernel(name, cc, dtype, meta, warps, stages, **consts)
    ptx = kernel.asm["ptx"]
    assert kernel.asm.get("cubin"), "no cubin: ptxas did not run"
    kinds = _mma_kinds(ptx)
    tile = f"{meta['BLOCK_N']}x{meta['BLOCK_M']} w{warps} s{stages}"
    REPORT.append(dict(what=f"{what} [{tile}]", cc=cc, dtype=dtype, mma=",".join(kinds), **info))
    if cc == 80:
        assert any(k.startswith("mma") for k in kinds), f"{what}: no mma.sync in the sm_80 PTX"
    else:
        assert kinds, f"{what}: neither wgmma nor mma in the sm_90 PTX"
    assert "ex2.approx" in ptx or name == "_argminmax" or consts.get("MODE") == K.ENERGY
    if strict:  # a few spilled registers (served by L1) are tolerated, not hundreds of bytes
        assert info["spill_stores"] <= MAX_SPILL, \
            f"{what} [{tile}] sm_{cc} {dtype}: {info['spill_stores']} bytes of spill stores"


@pytest.mark.parametrize("dtype", ["fp32", "bf16", "fp16"])
@pytest.mark.parametrize("cc", [80, 90])
@pytest.mark.parametrize("case", CASES, ids=[c[-1] for c in CASES])
def test_compiles_to_tensor_cores(case, cc, dtype):
    """Tensor-core instructions, ex2.approx, and (almost) no spills for the most
    register-hungry config the autotuner keeps at D ≤ 128."""
    name, consts, what = case
    if dtype == "fp16" and what not in ("softmin p=2 D128", "grad softmin p=2 D128"):
        pytest.skip("float16: checked on the p=2 softmin kernels (same code path as bfloat16)")
    _check(name, consts, what, cc, dtype, strict=True)


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
@pytest.mark.parametrize("case", WIDE, ids=[c[-1] for c in WIDE])
def test_wide_d_compiles(case, dtype):
    name, consts, what = case
    _check(name, consts, what, 90, dtype, strict=False)


@pytest.mark.parametrize("cc", [80, 90])
def test_direct_small_d_compiles(cc):
    """D ≤ 8: distances from coordinate differences (no ``tl.dot`` for the cost tile); the
    gradient's P·Y product still uses the tensor cores."""
    for name, consts in (("_softmin_fwd", dict(P=1, D_PAD=16, BLOCK_D=16, DIRECT=3)),
                         ("_weighted_grad", dict(MODE=K.SOFTMIN_P1, HAS_CW=True, WRITE_RS=True, D_PAD=16, DIRECT=3))):
        meta, warps, stages = hungriest_config(name, 16, direct=3)
        kernel, info = compile_kernel(name, cc, "fp32", meta, warps, stages, **consts)
        ptx = kernel.asm["ptx"]
        kinds = _mma_kinds(ptx)
        REPORT.append(dict(what=f"{name} D=3 direct", cc=cc, dtype="fp32", mma=",".join(kinds), **info))
        assert "ex2.approx" in ptx
        assert info["spill_stores"] <= MAX_SPILL
        if name == "_weighted_grad":
            assert kinds, "the P·Y product should use the tensor cores"


@pytest.mark.parametrize("name, consts, meta", [
    ("_softmin_fwd", dict(P=2, D_PAD=32, BLOCK_D=32), dict(BLOCK_N=64, BLOCK_M=64)),
    ("_weighted_grad", dict(MODE=K.SOFTMIN_P1, HAS_CW=True, WRITE_RS=True, D_PAD=32), dict(BLOCK_N=64, BLOCK_M=32)),
])
def test_float64_compiles(name, consts, meta):
    """float64 problems (the reference precision) also compile: ``tl.dot`` on fp64, exp2/log2
    through libdevice."""
    kernel, info = compile_kernel(name, 80, "fp64", meta, 4, 2, **consts)
    REPORT.append(dict(what=f"{name} fp64", cc=80, dtype="fp64", mma=",".join(_mma_kinds(kernel.asm["ptx"])), **info))
    assert kernel.asm.get("cubin")


def test_ieee_float32_has_no_tf32():
    """The default float32 precision ("ieee") must not use TF32 tensor cores."""
    kernel, _ = compile_kernel("_softmin_fwd", 80, "fp32", dict(BLOCK_N=64, BLOCK_M=64),
                               4, 2, P=2, D_PAD=32, BLOCK_D=32, PRECISION="ieee")
    assert "tf32" not in kernel.asm["ptx"]


def test_configs_pruned_for_wide_d():
    """The autotuning space adapts to D_PAD: at least one config, no duplicates, the kept
    configs fit the register budget when any does, and the D chunk stays ≤ D_PAD."""
    for d_pad in (16, 32, 64, 128, 256, 512, 1024):
        assert K.block_d(d_pad) <= d_pad and d_pad % K.block_d(d_pad) == 0
        for name, tuner in K.KERNELS.items():
            kept = tuner.early_config_prune(tuner.configs, {}, D_PAD=d_pad)
            assert kept
            keys = [(tuple(sorted(c.kwargs.items())), c.num_warps, c.num_stages) for c in kept]
            assert len(keys) == len(set(keys))
            budget = K.BUDGET.get(name, K.BUDGET["fwd"])
            words = [K.register_words(name, c.kwargs["BLOCK_N"], c.kwargs["BLOCK_M"], c.num_warps, d_pad)
                     for c in tuner.configs]
            if min(words) <= budget:
                assert all(K.register_words(name, c.kwargs["BLOCK_N"], c.kwargs["BLOCK_M"], c.num_warps, d_pad)
                           <= budget for c in kept)
