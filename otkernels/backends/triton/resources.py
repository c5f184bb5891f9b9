"""What the Triton kernels cost on each GPU architecture, measured without a GPU.

For a problem (kernel variant, D, dtype, precision) this module records the launch the
backend would make (``ops.capture()``: the same launchers, on small CPU tensors shaped like a
real problem), asks the *autotuner's own pruner* which configs it would try on ``sm_<cc>``,
and compiles each of them exactly as Triton's JIT would: the arguments go through the JIT's
binder for a CUDA target (``create_function_from_signature`` + ``_pack_args``), so the
specialisation is the real one — ``stride_d == 1`` becomes a constant, sizes, strides and
pointers divisible by 16 get ``tt.divisibility`` — then ``triton.compile`` to PTX and cubin,
and ``ptxas -v`` on the PTX for registers and spills.  Triton's own shared-memory figure
(``metadata.shared``) is compared with the device's limit.

``python -m otkernels.backends.triton.resources`` prints the per-architecture table
(see ``--help``); tests/backends/test_triton_compile.py asserts it.
"""
from __future__ import annotations

import argparse
import contextlib
import functools
import json
import os
import re
import sys
import time

import torch
import triton

from . import kernels as K
from . import ops

ARCHS = (80, 86, 90)
DIMS = (2, 3, 8, 64, 128, 129, 256, 512, 1000, 2048)
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16, "fp64": torch.float64}


# ----------------------------------------------------------------------------- the launches
def _cloud(B, n, D, dtype):
    return torch.randn(B, n, D, dtype=torch.float64).to(dtype)


def _ragged(x, y):
    """(B,N,D), (B,M,D) clouds as a ragged batch of two halves: stacked points, offsets, padded h."""
    N, M = x.shape[1], y.shape[1]
    xo, yo = torch.tensor([0, N // 2, N]), torch.tensor([0, M // 2, M])
    return x[0], y[0], xo, yo, torch.zeros(2, M - M // 2, dtype=ops.acc_dtype(x.dtype))


def _variants():
    """``{label: fn(x, y, precision)}``: every kernel variant the backend launches."""
    P2, P1 = K.SOFTMIN_P2, K.SOFTMIN_P1

    def vec(x, n):
        return torch.zeros(x.shape[0], n, dtype=ops.acc_dtype(x.dtype))

    return {
        "softmin p=2": lambda x, y, pr: ops.softmin_rows(x, y, vec(x, y.shape[1]), 0.1, 2, precision=pr),
        "softmin p=1": lambda x, y, pr: ops.softmin_rows(x, y, vec(x, y.shape[1]), 0.1, 1, precision=pr),
        "two p=2": lambda x, y, pr: ops.softmin_two(x, y, vec(x, y.shape[1]), vec(x, x.shape[1]), 0.1, 2, precision=pr),
        "two p=2 sym": lambda x, y, pr: ops.softmin_two(x, x, vec(x, x.shape[1]), None, 0.1, 2, precision=pr, sym=True),
        "softmin+grad p=2": lambda x, y, pr: ops.softmin_and_grad(x, y, vec(x, y.shape[1]), 0.1, 2, precision=pr),
        "softmin+grad p=1": lambda x, y, pr: ops.softmin_and_grad(x, y, vec(x, y.shape[1]), 0.1, 1, precision=pr),
        "grad p=2 +cw,rs": lambda x, y, pr: ops.weighted_grad(x, y, P2, 0.1, hc=vec(x, y.shape[1]), rr=vec(x, x.shape[1]),
                                                               cw=vec(x, y.shape[1]), rowsum=True, precision=pr),
        "grad p=1 +cw,rs": lambda x, y, pr: ops.weighted_grad(x, y, P1, 0.1, hc=vec(x, y.shape[1]), rr=vec(x, x.shape[1]),
                                                               cw=vec(x, y.shape[1]), rowsum=True, precision=pr),
        "grad gaussian": lambda x, y, pr: ops.weighted_grad(x, y, K.GAUSSIAN, 1.0, cw=vec(x, y.shape[1]), precision=pr),
        "grad laplacian": lambda x, y, pr: ops.weighted_grad(x, y, K.LAPLACIAN, 1.0, cw=vec(x, y.shape[1]), precision=pr),
        "grad energy": lambda x, y, pr: ops.weighted_grad(x, y, K.ENERGY, 1.0, cw=vec(x, y.shape[1]), precision=pr),
        "kernel sum gaussian": lambda x, y, pr: ops.kernel_sum_rows(x, y, vec(x, y.shape[1]), "gaussian", 1.0, precision=pr),
        "kernel sum laplacian": lambda x, y, pr: ops.kernel_sum_rows(x, y, vec(x, y.shape[1]), "laplacian", 1.0, precision=pr),
        "kernel sum energy": lambda x, y, pr: ops.kernel_sum_rows(x, y, vec(x, y.shape[1]), "energy", 1.0, precision=pr),
        "argmin sqdist": lambda x, y, pr: ops.argminmax_rows(x, y, None, "sqdist", False, precision=pr),
        "argmax dot": lambda x, y, pr: ops.argminmax_rows(x, y, None, "dot", True, precision=pr),
        "ragged softmin p=2": lambda x, y, pr: ops.softmin_ragged(*_ragged(x, y), 0.1, x.shape[1] // 2, 2,
                                                                 precision=pr),
        "ragged softmin+grad p=2": lambda x, y, pr: ops.softmin_grad_ragged(*_ragged(x, y), 0.1, x.shape[1] // 2, 2,
                                                                           precision=pr),
        **{f"plan p=2 K={k}": (lambda k: lambda x, y, pr: ops.plan_apply(  # issue 19: π·V, V (B,M,K)
            x, y, vec(x, x.shape[1]), vec(x, y.shape[1]), _cloud(x.shape[0], y.shape[1], k, x.dtype), 0.1, 2,
            precision=pr))(k) for k in (1, 64)},
    }


VARIANTS = tuple(_variants())
DEFAULT_VARIANTS = ("softmin p=2", "two p=2", "softmin+grad p=2", "grad p=2 +cw,rs", "kernel sum gaussian",
                    "grad gaussian", "argmin sqdist")  # what SamplesLoss/metrics/assign run most
RAGGED_VARIANTS = ("ragged softmin p=2", "ragged softmin+grad p=2")  # issue 21 (the table: D ≤ 512)
RAGGED_DIMS = (3, 64, 128, 256, 512)


def launch_of(variant, D, dtype="fp32", precision=None, N=4096, M=4096, B=1):
    """``(kernel name, args, consts)`` of the launch ``variant`` makes for (B,N,D) × (B,M,D)
    points of ``dtype`` (sizes only matter through divisibility by 16 and equality to 1)."""
    x, y = _cloud(B, N, D, DTYPES[dtype]), _cloud(B, M, D, DTYPES[dtype])
    with ops.capture() as log:
        _variants()[variant](x, y, precision)
    name, args, consts = log[0]
    return name, args, consts


def kept_configs(name, args, consts, cc):
    """The configs the autotuner's pruner keeps for this launch on ``sm_<cc>``."""
    tuner = K.KERNELS[name]
    named = dict(zip(tuner.fn.arg_names, args))
    token = K.TARGET_CC.set(cc)
    try:
        return tuner.early_config_prune(tuner.configs, named, **consts)
    finally:
        K.TARGET_CC.reset(token)


# ----------------------------------------------------------------------------- compiling
@functools.lru_cache(maxsize=None)
def _backend(cc):
    from triton.backends.compiler import GPUTarget
    from triton.compiler import make_backend
    target = GPUTarget("cuda", cc, 32)
    return target, make_backend(target)


def specialise(name, args, consts, config, cc):
    """``(ASTSource, options)`` as Triton's JIT builds them for this launch on ``sm_<cc>``."""
    from triton.compiler import ASTSource
    from triton.runtime.jit import create_function_from_signature
    fn = K.KERNELS[name].fn
    target, backend = _backend(cc)
    binder = create_function_from_signature(fn.signature, fn.params, backend)
    kwargs = dict(consts, **config.kwargs, num_warps=config.num_warps, num_stages=config.num_stages)
    bound, specialization, options = binder(*args, **kwargs)
    options, signature, constexprs, attrs = fn._pack_args(backend, kwargs, bound, specialization, options)
    return ASTSource(fn, signature, constexprs, attrs), options


def ptxas_info(log):
    """Registers and spill stores/loads (bytes) from a ``ptxas -v`` log."""
    regs = re.search(r"Used (\d+) registers", log)
    spills = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", log)
    return {"registers": int(regs.group(1)) if regs else None,
            "spill_stores": int(spills.group(1)) if spills else 0,
            "spill_loads": int(spills.group(2)) if spills else 0}


def tensor_core_ops(ptx):
    """Sorted kinds of tensor-core instructions in the PTX (``mma.sync`` ``…f32.tf32`` etc., ``wgmma``)."""
    kinds = set()
    for m in re.findall(r"\b((?:wgmma\.mma_async|mma\.sync)[\w.]*)", ptx):
        parts = m.split(".")
        kinds.add("wgmma." + parts[-1] if m.startswith("wgmma") else "mma." + ".".join(parts[-3:]))
    return sorted(kinds)


@contextlib.contextmanager
def _ptxas_log():
    """Capture the ``ptxas -v`` log of Triton's own ptxas run (its flags, e.g.
    ``--regAllocOptLevel=2``, change the register allocation), via ``dump_ptxas_log``."""
    import io
    knobs, comp = triton.knobs.nvidia, triton.knobs.compilation
    old_dump, old_always, old_fusion = knobs.dump_ptxas_log, comp.always_compile, os.environ.get("TRITON_DEFAULT_FP_FUSION")
    os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # the JIT's default; silences 3.9's notice
    knobs.dump_ptxas_log, comp.always_compile = True, True  # a cached cubin would run no ptxas
    buf = io.StringIO()
    try:
        with contextlib.redirect_stdout(buf):
            yield buf
    finally:
        knobs.dump_ptxas_log, comp.always_compile = old_dump, old_always
        if old_fusion is None:
            os.environ.pop("TRITON_DEFAULT_FP_FUSION", None)


def compile_config(name, args, consts, config, cc):
    """Compile one config for ``sm_<cc>`` with the JIT's specialisation; a dict with
    registers, spills, shared memory, tensor-core ops, ``ex2.approx`` presence, compile time."""
    src, options = specialise(name, args, consts, config, cc)
    target, _ = _backend(cc)
    t0 = time.perf_counter()
    with _ptxas_log() as log:
        kernel = triton.compile(src, target=target, options=options.__dict__)
    ptx = kernel.asm["ptx"]
    if not kernel.asm.get("cubin"):
        raise RuntimeError("no cubin: ptxas did not run")
    info = ptxas_info(log.getvalue())
    return dict(info, shared=int(kernel.metadata.shared), limit=K.shared_limit(cc),
                estimate=K.shared_bytes(name, config.kwargs["BLOCK_N"], config.kwargs["BLOCK_M"], config.num_stages,
                                        consts["D_PAD"], consts["BLOCK_D"], consts["DIRECT"],
                                        config.kwargs.get("BLOCK_DV"), args[0].element_size(), consts["PRECISION"]),
                mma=tensor_core_ops(ptx), ex2="ex2.approx" in ptx, tf32="tf32" in ptx,
                seconds=round(time.perf_counter() - t0, 2))


def config_label(config):
    k = config.kwargs
    dv = f" dv{k['BLOCK_DV']}" if "BLOCK_DV" in k else ""
    return f"{k['BLOCK_N']}x{k['BLOCK_M']}{dv} w{config.num_warps} s{config.num_stages}"


def cases(variants=VARIANTS, dims=DIMS, dtypes=("fp32", "fp16", "bf16", "fp64"), precisions=None, archs=ARCHS):
    """Every (variant, D, dtype, precision, cc) to measure; precisions apply to float32."""
    precisions = precisions or ops.PRECISIONS
    for cc in archs:
        for dtype in dtypes:
            for prec in (precisions if dtype == "fp32" else ("ieee",)):
                for D in dims:
                    for v in variants:
                        yield v, D, dtype, prec, cc


def measure(case):
    """All kept configs of one case, compiled: a list of row dicts."""
    v, D, dtype, prec, cc = case
    name, args, consts = launch_of(v, D, dtype, prec)
    rows = []
    try:
        kept = kept_configs(name, args, consts, cc)
    except Exception as e:  # noqa: BLE001 - recorded: a pruner that fails is a finding
        return [dict(variant=v, kernel=name, D=D, dtype=dtype, precision=prec, cc=cc, config="-",
                     limit=K.shared_limit(cc), error=f"pruner: {type(e).__name__}: {str(e)[:300]}")]
    for config in kept:
        row = dict(variant=v, kernel=name, D=D, dtype=dtype, precision=prec, cc=cc, config=config_label(config),
                   D_PAD=consts["D_PAD"], BLOCK_D=consts["BLOCK_D"], direct=consts["DIRECT"])
        try:
            row.update(compile_config(name, args, consts, config, cc))
        except Exception as e:  # noqa: BLE001 - recorded: the table shows what failed to compile
            row["error"] = f"{type(e).__name__}: {str(e)[:300]}"
        rows.append(row)
    return rows


def table(rows):
    """One line per (variant, D, dtype, precision, cc): kept configs, worst registers, spills,
    shared memory vs limit, tensor-core ops."""
    groups = {}
    for r in rows:
        groups.setdefault((r["cc"], r["dtype"], r["precision"], r["variant"], r["D"]), []).append(r)
    out = [f"{'sm':>3} {'dtype':>5} {'prec':>6} {'variant':<22} {'D':>5} {'cfgs':>4} {'regs':>4} "
           f"{'spill':>6} {'smem KB':>8} {'limit':>6}  tensor cores"]
    for (cc, dtype, prec, v, D), rs in sorted(groups.items(), key=lambda kv: (kv[0][0], kv[0][1], kv[0][2], kv[0][3], kv[0][4])):
        ok = [r for r in rs if "error" not in r]
        err = len(rs) - len(ok)
        regs = max((r["registers"] or 0) for r in ok) if ok else 0
        spill = max(r["spill_stores"] for r in ok) if ok else 0
        smem = max(r["shared"] for r in ok) if ok else 0
        mma = ",".join(sorted({m for r in ok for m in r["mma"]})) or "-"
        out.append(f"{cc:>3} {dtype:>5} {prec:>6} {v:<22} {D:>5} {len(rs):>4} {regs:>4} {spill:>6} "
                   f"{smem / 1024:>8.1f} {rs[0]['limit'] / 1024 if ok else 0:>6.0f}  {mma}"
                   + (f"  {err} FAILED" if err else ""))
    return "\n".join(out)


def main(argv=None):
    ap = argparse.ArgumentParser(prog="python -m otkernels.backends.triton.resources", description=__doc__.split("\n")[0])
    ap.add_argument("--arch", type=int, nargs="*", default=list(ARCHS))
    ap.add_argument("--dims", type=int, nargs="*", default=list(DIMS))
    ap.add_argument("--dtypes", nargs="*", default=["fp32", "fp16", "bf16", "fp64"])
    ap.add_argument("--precisions", nargs="*", default=list(ops.PRECISIONS))
    ap.add_argument("--variants", nargs="*", default=list(VARIANTS))
    ap.add_argument("--default-only", action="store_true", help=f"only {DEFAULT_VARIANTS}")
    ap.add_argument("--jobs", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--json", help="write the rows to this file")
    ap.add_argument("--show", metavar="JSON", help="print the table of a saved run and exit")
    ap.add_argument("--write-measured", metavar="JSON", help="add the spilling configs of a saved run to "
                    "_measured.py (the pruner drops them) and exit")
    ap.add_argument("--merge", metavar="JSON", help="re-measure only the cases whose kept configs changed "
                    "since this saved run, keep its other rows, and write the result to --json")
    a = ap.parse_args(argv)
    if a.write_measured:
        with open(a.write_measured) as fh:
            saved = json.load(fh)
        # with the entries already there: wider runs (other dtypes and precisions) found them too
        entries = sorted(spilled_entries(saved["rows"]) | set(K.SPILLED), key=repr)
        path = os.path.join(os.path.dirname(K.__file__), "_measured.py")
        with open(path, "w") as fh:
            fh.write('"""Configs that ptxas measured to spill registers (generated by\n'
                     '``python -m otkernels.backends.triton.resources --write-measured '
                     'benchmarks/results/triton-resources.json``; do not edit).\n\n'
                     'Entries: (compute capability, kernel, (element size, variant constexprs...), '
                     '(BLOCK_N, BLOCK_M, BLOCK_DV, warps, stages)).\n"""\n')
            fh.write("SPILLED = frozenset({\n")
            for e in entries:
                fh.write(f"    {e!r},\n")
            fh.write("})\n")
        print(f"{len(entries)} spilling configs written to {path}")
        return 0
    if a.show:
        with open(a.show) as fh:
            saved = json.load(fh)
        print(table(saved["rows"]))
        print(f"\n{len(saved['rows'])} configs, triton {saved['triton']}, kernels.py {saved['kernels_source_hash']} "
              f"(current: {source_hash()})")
        return 0
    variants = DEFAULT_VARIANTS if a.default_only else tuple(a.variants)
    todo = list(cases(variants, a.dims, a.dtypes, a.precisions, a.arch))
    reused = []
    if a.merge:  # keep the saved rows of cases whose kernel code is unchanged and kept configs measured
        with open(a.merge) as fh:
            saved_run = json.load(fh)
        saved_hashes, now_hashes = saved_run.get("kernel_hashes", {}), kernel_hashes()
        saved = {}
        for r in saved_run["rows"]:
            saved.setdefault((r["variant"], r["D"], r["dtype"], r["precision"], r["cc"]), {})[r["config"]] = r
        again = []
        for c in todo:
            v, D, dtype, prec, cc = c
            name, args, consts = launch_of(v, D, dtype, prec)
            kept = [config_label(k) for k in kept_configs(name, args, consts, cc)]
            old = saved.get(c, {}) if saved_hashes.get(name) == now_hashes[name] else {}
            if kept and all(k in old for k in kept):
                reused.extend(old[k] for k in kept)
            else:
                again.append(c)
        listed = set(todo)
        others = [r for c, rs in saved.items() if c not in listed for r in rs.values()  # still current
                  if saved_hashes.get(r["kernel"]) == now_hashes.get(r["kernel"])]
        print(f"merge: {len(todo) - len(again)} cases reused, {len(again)} to measure, "
              f"{len(others)} rows of other cases kept", file=sys.stderr)
        todo = again
        reused = others + reused
    from tqdm import tqdm
    rows = []
    t0 = time.perf_counter()
    if a.jobs > 1:
        import multiprocessing
        from concurrent.futures import ProcessPoolExecutor
        # spawn: a forked worker can inherit a lock held by one of torch's threads and hang
        with ProcessPoolExecutor(a.jobs, mp_context=multiprocessing.get_context("spawn")) as pool:
            for rs in tqdm(pool.map(measure, todo, chunksize=1), total=len(todo), file=sys.stderr):
                rows.extend(rs)
    else:
        for c in tqdm(todo, file=sys.stderr):
            rows.extend(measure(c))
    rows = reused + rows
    print(table(rows))
    bad = [r for r in rows if "error" in r or r["shared"] > r["limit"]]
    print(f"\n{len(rows)} compiled configs in {time.perf_counter() - t0:.0f} s; {len(bad)} over the shared-memory "
          f"limit or failed; triton {triton.__version__}")
    if a.json:
        with open(a.json, "w") as fh:
            json.dump(dict(triton=triton.__version__, kernels_source_hash=source_hash(),
                           kernel_hashes=kernel_hashes(), rows=rows), fh, indent=1)
    return 1 if bad else 0


def _code_of(fn, seen):
    """The code of a ``@triton.jit`` function (its syntax tree without the docstring) and,
    recursively, of the jit helpers and the values of the ``tl.constexpr`` globals of
    ``kernels.py`` it names; not its line numbers, comments or docstring: code moved by an
    edit elsewhere in the file, or documented anew, compiles to the same kernel."""
    import ast
    import textwrap

    import triton.language as tl
    from triton.runtime.jit import JITFunction
    tree = ast.parse(textwrap.dedent(fn.src))
    body = tree.body[0].body
    if body and isinstance(body[0], ast.Expr) and isinstance(getattr(body[0], "value", None), ast.Constant):
        del body[0]
    parts = [ast.dump(tree)]
    for name in sorted(set(re.findall(r"\b[A-Za-z_]\w*\b", fn.src))):
        obj = getattr(K, name, None)
        if isinstance(obj, JITFunction) and obj is not fn and name not in seen:
            seen.add(name)
            parts.append(_code_of(obj, seen))
        elif isinstance(obj, tl.constexpr):
            parts.append(f"{name}={obj.value!r}")
    return "\n".join(parts)


def kernel_hashes():
    """``{kernel: hash of its code}`` (:func:`_code_of`: its source, the jit helpers it calls,
    the constants it reads), so a row is current only while its kernel's code is unchanged."""
    import hashlib
    return {name: hashlib.sha256(_code_of(K.KERNELS[name].fn, {name}).encode()).hexdigest()[:16]
            for name in sorted(K.KERNELS)}


def source_hash():
    """Hash of every kernel's code (:func:`kernel_hashes`): a table is current only for that
    code.  The pruner is checked separately (the configs it keeps must be the measured ones)."""
    import hashlib
    return hashlib.sha256(json.dumps(kernel_hashes(), sort_keys=True).encode()).hexdigest()[:16]


def spilled_entries(rows):
    """``(cc, kernel, variant key, config key)`` of the measured rows that spilled registers:
    the pruner's ``SPILLED`` set (written to ``_measured.py`` by ``--write-measured``)."""
    out = set()
    for r in rows:
        if "error" in r or r["spill_stores"] == 0:
            continue
        name, args, consts = launch_of(r["variant"], r["D"], r["dtype"], r["precision"])
        named = {**dict(zip(K.KERNELS[name].fn.arg_names, args)), **consts}
        variant = (args[0].element_size(),) + K.variant_key(named)
        out.add((r["cc"], name, variant, label_key(r["config"])))
    return out


def label_key(label):
    """:func:`config_label`'s text back to ``kernels.config_key``: ``"128x64 dv64 w8 s1"`` →
    ``(128, 64, 64, 8, 1)`` (configs outside the autotuning space too: ``kernels.HOPPER_FIRST``)."""
    parts = label.split()
    bn, bm = (int(v) for v in parts[0].split("x"))
    dv = next((int(p[2:]) for p in parts if p.startswith("dv")), None)
    w = next(int(p[1:]) for p in parts if p.startswith("w"))
    st = next(int(p[1:]) for p in parts if p.startswith("s"))
    return bn, bm, dv, w, st


if __name__ == "__main__":
    sys.exit(main())
