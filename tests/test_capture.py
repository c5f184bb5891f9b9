"""CUDA-graph readiness (issue 21): a Sinkhorn loss with ``diameter=`` given makes no host read
(``.item()``, ``bool(tensor)``: ``aten._local_scalar_dense``, a device sync on CUDA, which
ends a graph capture) once the input checks stand aside during a capture
(``otkernels._checks.capturing``).  Counted here on CPU tensors with a dispatch mode, capture
simulated; ``benchmarks/gpu_check.py`` captures and replays the loss on a GPU."""
import collections
import traceback

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from otkernels import SamplesLoss, _checks
from otk_testing import require_backend


class HostReads(TorchDispatchMode):
    """Counts ``aten._local_scalar_dense`` calls and the otkernels line that made each."""

    def __init__(self):
        super().__init__()
        self.where = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.aten._local_scalar_dense.default:
            ours = [f for f in traceback.extract_stack() if "otkernels" in f.filename and "tests" not in f.filename]
            self.where[f"{ours[-1].filename.rsplit('/', 1)[-1]}:{ours[-1].lineno}" if ours else "?"] += 1
        return func(*args, **(kwargs or {}))


def _problem():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 40, 3, generator=g, dtype=torch.float64).requires_grad_()
    y = torch.randn(2, 30, 3, generator=g, dtype=torch.float64) + 0.5
    a = torch.rand(2, 40, generator=g, dtype=torch.float64) + 0.1
    b = torch.rand(2, 30, generator=g, dtype=torch.float64) + 0.1
    return a / a.sum(-1, keepdim=True), x, b / b.sum(-1, keepdim=True), y


@pytest.mark.parametrize("name", ["tensorized", "blocked", "triton"])
@pytest.mark.parametrize("kw", [dict(), dict(reach=0.8), dict(p=1, debias=False)])
def test_no_host_read_while_capturing(name, kw, monkeypatch):
    require_backend(name)
    a, x, b, y = _problem()
    L = SamplesLoss("sinkhorn", blur=0.1, diameter=6.0, backend=name, **kw)
    with HostReads() as eager:  # outside a capture: the input checks read (and must)
        v0 = L(a, x, b, y)
    assert sum(eager.where.values()) > 0
    (g0,) = torch.autograd.grad(v0.sum(), x)
    monkeypatch.setattr(_checks, "capturing", lambda t: True)
    with HostReads() as captured:
        v = L(a, x, b, y)
        (g,) = torch.autograd.grad(v.sum(), x)
    assert not captured.where, f"host reads during a capture: {dict(captured.where)}"
    torch.testing.assert_close(v, v0, rtol=0, atol=0)
    torch.testing.assert_close(g, g0, rtol=0, atol=0)


def test_the_diameter_is_a_host_read_without_diameter(monkeypatch):
    """Without ``diameter=`` the ε-schedule needs the clouds' extent on the host: one read
    (documented: pass ``diameter=`` to capture the loss)."""
    monkeypatch.setattr(_checks, "capturing", lambda t: True)
    a, x, b, y = _problem()
    with HostReads() as reads:
        SamplesLoss("sinkhorn", blur=0.1, backend="tensorized")(a, x, b, y)
    assert sum(reads.where.values()) >= 1 and all(k.startswith("sinkhorn.py") for k in reads.where), reads.where
