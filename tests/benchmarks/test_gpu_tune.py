"""``benchmarks/gpu_tune.py --tiny`` end to end (Triton's interpreter on CPU): every step is
recorded, every swept config reproduces the autotuned launch's output, and pinning a config
reaches the pruner; ``gpu_check.py --jobs-from`` runs only the jobs an earlier run skipped."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("triton")

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "benchmarks"))


def run(script, *args, tmp):
    env = dict(os.environ, TRITON_INTERPRET="1")
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / script), *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, f"exit code {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"


@pytest.mark.slow
def test_tune_tiny_end_to_end(tmp_path):
    out = tmp_path / "tune.json"
    run("gpu_tune.py", "--tiny", "--precisions", "tf32x3", "--dim", "24", "--json", str(out), tmp=tmp_path)
    rep = json.loads(out.read_text())
    assert rep["D"] == 24
    steps = rep["steps"]
    assert {"baseline", "variants", "sweep", "programs", "forced", "done"} <= set(steps)
    kernels = {v["kernel"] for v in steps["variants"]}
    assert {"_softmin_two", "_weighted_grad"} <= kernels  # the divergence's passes were recorded
    swept = [(v["kernel"], k, e) for v in steps["sweep"] for k, e in v["configs"].items()]
    assert swept and all("error" not in e for _, _, e in swept), swept
    assert all(e["max_rel_vs_autotuned"] <= 1e-5 and e["seconds"] > 0 for _, _, e in swept)
    forced = steps["forced"]["tf32x3"]
    assert forced["value_rel_change"] < 1e-6 and forced["grad_rel_change"] < 1e-5


def test_pinned_config_reaches_the_pruner():
    import triton
    import gpu_tune
    from otkernels.backends.triton import kernels, ops
    configs = kernels._configs()
    variant = (4, ("P", 2), ("SYM", False), ("D_PAD", 128), ("BLOCK_D", 128), ("DIRECT", 0), ("PRECISION", "tf32x3"))
    before = kernels.keep_configs("_softmin_two", configs, 90, 128, 128, 0, 4, 128, False, "tf32x3", variant, None)
    pin = dict(BLOCK_N=128, BLOCK_M=32, num_warps=4, num_stages=1)
    with gpu_tune.Pinned({("_softmin_two", variant): pin}, programs=7):
        kept = kernels.keep_configs("_softmin_two", configs, 90, 128, 128, 0, 4, 128, False, "tf32x3", variant, None)
        other = kernels.keep_configs("_softmin_fwd", configs, 90, 128, 128, 0, 4, 128, False, "tf32x3", variant, None)
        assert ops._two_programs("cpu", 1000, 1, 1000) == 7
    assert [(c.kwargs, c.num_warps, c.num_stages) for c in kept] == [(dict(BLOCK_N=128, BLOCK_M=32), 4, 1)]
    assert all(isinstance(c, triton.Config) for c in other) and other
    after = kernels.keep_configs("_softmin_two", configs, 90, 128, 128, 0, 4, 128, False, "tf32x3", variant, None)
    assert [gpu_tune.label(dict(c.kwargs, num_warps=c.num_warps, num_stages=c.num_stages)) for c in after] == \
        [gpu_tune.label(dict(c.kwargs, num_warps=c.num_warps, num_stages=c.num_stages)) for c in before]


@pytest.mark.slow
def test_check_jobs_from_runs_only_the_skipped_jobs(tmp_path):
    earlier = tmp_path / "earlier.json"
    earlier.write_text(json.dumps({"sections": {"correctness": {"result": {
        "skipped_at_deadline": [{"D": 3, "variant": "tf32"}]}}}}))
    out = tmp_path / "check.json"
    run("gpu_check.py", "--tiny", "--sections", "correctness", "--jobs-from", str(earlier), "--json", str(out),
        tmp=tmp_path)
    rows = json.loads(out.read_text())["sections"]["correctness"]["result"]["rows"]
    assert rows and {(r["D"], r["variant"]) for r in rows} == {(3, "tf32")}
    assert all(r["pass"] for r in rows if "pass" in r)
