"""SamplesLoss(p=…) for any p ≥ 1: the cost ‖x−y‖^p / p (issue 21), on every backend through the
backend fixture (native, Triton and KeOps hand such costs to the torch tiles)."""
import pytest
import torch

from otkernels import SamplesLoss

ot = pytest.importorskip("ot")


def _clouds(N=25, M=31, D=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(N, D, generator=g, dtype=torch.float64)
    y = torch.randn(M, D, generator=g, dtype=torch.float64) * 0.7 + 0.8
    return x, y


def _cost(x, y, p):
    return torch.cdist(x, y, compute_mode="donot_use_mm_for_euclid_dist") ** p / p


@pytest.mark.parametrize("p", [1.5, 3])
def test_converged_value_matches_pot(backend, p):
    """Converged OT_ε (early stopping, debias=False) equals POT's log-domain Sinkhorn with the
    cost ‖x−y‖^p/p and reg ε = blur^p: ⟨π, C⟩ + ε KL(π | a⊗b), to 1e-9."""
    x, y = _clouds()
    blur = 0.6
    eps = blur ** p
    L = SamplesLoss("sinkhorn", p=p, blur=blur, debias=False, tol=1e-12, max_iter=5000, backend=backend)
    value = L(x, y)
    a, b = torch.full((25,), 1 / 25, dtype=torch.float64), torch.full((31,), 1 / 31, dtype=torch.float64)
    C = _cost(x, y, p)
    P = torch.as_tensor(ot.sinkhorn(a.numpy(), b.numpy(), C.numpy(), reg=eps, method="sinkhorn_log",
                                    numItermax=50_000, stopThr=1e-14))
    want = (P * C).sum() + eps * ((P * (P / (a[:, None] * b[None, :])).log()).sum() - P.sum() + 1)
    torch.testing.assert_close(value, want, rtol=1e-9, atol=0)


@pytest.mark.parametrize("p", [1.5, 3])
def test_default_loop_matches_the_dense_callable(backend, p):
    """geomloss's loop with the built-in ‖x−y‖^p/p equals the same loop with that cost as a
    callable on the dense backend: values, potentials and gradients (float64)."""
    x, y = _clouds(seed=1)
    xg = x.clone().requires_grad_(True)
    v = SamplesLoss("sinkhorn", p=p, blur=0.3, backend=backend)(xg, y)
    (g,) = torch.autograd.grad(v, xg)
    xr = x.clone().requires_grad_(True)
    ref = SamplesLoss("sinkhorn", p=p, blur=0.3, cost=lambda a, b: _cost_b(a, b, p), backend="tensorized")(xr, y)
    (gr,) = torch.autograd.grad(ref, xr)
    torch.testing.assert_close(v, ref, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(g, gr, rtol=1e-8, atol=1e-10)


def _cost_b(x, y, p):
    """Batched ‖x−y‖^p / p from coordinate differences (B,N,D), (B,M,D) -> (B,N,M)."""
    return (x[:, :, None, :] - y[:, None, :, :]).square().sum(-1).clamp_min(1e-8).sqrt() ** p / p


def test_gradient_of_converged_value(backend):
    x, y = _clouds(N=6, M=7, seed=2)
    L = SamplesLoss("sinkhorn", p=3, blur=0.7, tol=1e-13, max_iter=10000, backend=backend)
    xg = x.clone().requires_grad_(True)
    (grad,) = torch.autograd.grad(L(xg, y), xg)
    d = torch.randn(x.shape, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    h = 1e-5
    fd = (L(x + h * d, y) - L(x - h * d, y)) / (2 * h)
    torch.testing.assert_close((grad * d).sum(), fd, rtol=1e-7, atol=1e-10)


@pytest.mark.parametrize("p", [0.5, 0, "2", float("inf"), float("nan"), True])
def test_bad_p(p):
    with pytest.raises(ValueError, match="expected a finite number >= 1"):
        SamplesLoss("sinkhorn", p=p)


@pytest.mark.parametrize("p,cost", [(3, None), (2, "callable")])
def test_fused_backends_say_they_run_torch_tiles(p, cost):
    """native/Triton/KeOps have p = 1, 2: another p or a callable cost runs on the blocked
    backend's torch tiles, with a warning (once per backend and cost) and blocked's result."""
    import warnings

    from otkernels import samples_loss
    fn = (lambda a, b: ((a[:, :, None] - b[:, None]) ** 2).sum(-1) / 2) if cost else None  # noqa: E731
    g = torch.Generator().manual_seed(3)
    x, y = torch.randn(30, 2, generator=g, dtype=torch.float64), torch.randn(20, 2, generator=g, dtype=torch.float64)
    samples_loss._WARNED.clear()
    with pytest.warns(UserWarning, match=r"backend='native' has fused kernels for p=1 and p=2 only.*torch tiles"):
        v = SamplesLoss(p=p, blur=0.4, cost=fn, backend="native")(x, y)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # once
        SamplesLoss(p=p, blur=0.4, cost=fn, backend="native")(x, y)
    torch.testing.assert_close(v, SamplesLoss(p=p, blur=0.4, cost=fn, backend="blocked")(x, y), rtol=1e-14, atol=0)
