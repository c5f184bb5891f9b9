"""SamplesLoss(cost="cosine"): 1 − cos(x, y) = ½‖x̂ − ŷ‖² (issue 21), on every backend through
the backend fixture, against the same cost as a dense callable."""
import pytest
import torch

from otkernels import SamplesLoss


def _cos_cost(x, y):
    """1 − cos(x_i, y_j), batched (B,N,D), (B,M,D) -> (B,N,M)."""
    xn, yn = x / x.norm(dim=-1, keepdim=True), y / y.norm(dim=-1, keepdim=True)
    return 1 - xn @ yn.transpose(-1, -2)


@pytest.mark.parametrize("debias", [True, False])
def test_cosine_matches_the_dense_callable(backend, debias):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 20, 5, generator=g, dtype=torch.float64) + 0.3
    y = torch.randn(2, 24, 5, generator=g, dtype=torch.float64) * 2
    xg, xr = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    v = SamplesLoss("sinkhorn", blur=0.2, cost="cosine", debias=debias, diameter=2.0, backend=backend)(xg, y)
    (g1,) = torch.autograd.grad(v.sum(), xg)
    ref = SamplesLoss("sinkhorn", blur=0.2, cost=_cos_cost, debias=debias, diameter=2.0, backend="tensorized")(xr, y)
    (g2,) = torch.autograd.grad(ref.sum(), xr)
    torch.testing.assert_close(v, ref, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(g1, g2, rtol=1e-7, atol=1e-10)
    # scale invariance: the cost sees directions only
    torch.testing.assert_close(SamplesLoss("sinkhorn", blur=0.2, cost="cosine", debias=debias, diameter=2.0,
                                           backend=backend)(
        3 * x, 0.5 * y), v.detach(), rtol=1e-9, atol=1e-12)


def test_cosine_bad_input():
    with pytest.raises(ValueError, match="use p=2"):
        SamplesLoss("sinkhorn", p=1, cost="cosine")
    with pytest.raises(ValueError, match="applies to loss='sinkhorn' or 'hausdorff'"):
        SamplesLoss("gaussian", cost="cosine")
    x = torch.randn(5, 3, dtype=torch.float64)
    x[2] = 0
    with pytest.raises(ValueError, match="x has zero vectors"):
        SamplesLoss("sinkhorn", cost="cosine")(x, torch.randn(4, 3, dtype=torch.float64))
