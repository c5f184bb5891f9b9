"""Ragged batches (issue 21): SamplesLoss(...)(x, y, x_batch=, y_batch=) / offsets / lists equal
a Python loop over the segments, on every backend through the backend fixture."""
import pytest
import torch

from otkernels import SamplesLoss

SIZES_X, SIZES_Y = [7, 12, 3], [9, 4, 11]


def _data(dtype=torch.float64):
    g = torch.Generator().manual_seed(0)
    xs = [torch.randn(n, 3, generator=g, dtype=dtype) + k for k, n in enumerate(SIZES_X)]
    ys = [torch.randn(m, 3, generator=g, dtype=dtype) * 0.5 + k for k, m in enumerate(SIZES_Y)]
    as_ = [torch.rand(n, generator=g, dtype=dtype) + 0.1 for n in SIZES_X]
    bs_ = [torch.rand(m, generator=g, dtype=dtype) + 0.1 for m in SIZES_Y]
    return xs, ys, [a / a.sum() for a in as_], [b / b.sum() for b in bs_]


def _ids(sizes):
    return torch.repeat_interleave(torch.arange(len(sizes)), torch.tensor(sizes))


@pytest.mark.parametrize("loss,kw", [("sinkhorn", dict(blur=0.3)), ("sinkhorn", dict(blur=0.5, debias=False)),
                                     ("gaussian", dict(blur=0.7))])
def test_ragged_equals_a_loop(backend, loss, kw):
    xs, ys, as_, bs_ = _data()
    L = SamplesLoss(loss, backend=backend, **kw)
    loop = torch.stack([L(a, x, b, y) for a, x, b, y in zip(as_, xs, bs_, ys)])
    x, y, a, b = torch.cat(xs), torch.cat(ys), torch.cat(as_), torch.cat(bs_)
    got = L(a, x, b, y, x_batch=_ids(SIZES_X), y_batch=_ids(SIZES_Y))
    torch.testing.assert_close(got, loop, rtol=1e-12, atol=1e-14)
    xo = torch.tensor([0, 7, 19, 22])
    yo = torch.tensor([0, 9, 13, 24])
    torch.testing.assert_close(L(a, x, b, y, x_offsets=xo, y_offsets=yo), loop, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(L(as_, xs, bs_, ys), loop, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(L(xs, ys), torch.stack([L(x_, y_) for x_, y_ in zip(xs, ys)]), rtol=1e-12, atol=1e-14)


def test_ragged_gradients_and_potentials_equal_a_loop(backend):
    xs, ys, _, _ = _data()
    L = SamplesLoss("sinkhorn", blur=0.3, backend=backend)
    x = torch.cat(xs).requires_grad_(True)
    (gx,) = torch.autograd.grad(L(x, torch.cat(ys), x_batch=_ids(SIZES_X), y_batch=_ids(SIZES_Y)).sum(), x)
    xl = [t.clone().requires_grad_(True) for t in xs]
    grads = torch.autograd.grad(sum(L(xk, yk) for xk, yk in zip(xl, ys)), xl)
    torch.testing.assert_close(gx, torch.cat(grads), rtol=1e-12, atol=1e-14)
    P = SamplesLoss("sinkhorn", blur=0.3, potentials=True, backend=backend)
    F, G = P(torch.cat(xs), torch.cat(ys), x_batch=_ids(SIZES_X), y_batch=_ids(SIZES_Y))
    loop = [P(xk, yk) for xk, yk in zip(xs, ys)]
    torch.testing.assert_close(F, torch.cat([f for f, _ in loop]), rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(G, torch.cat([g for _, g in loop]), rtol=1e-12, atol=1e-14)


X, Y = torch.randn(6, 2), torch.randn(5, 2)


@pytest.mark.parametrize("call,match", [
    (lambda L: L(X, Y, x_batch=torch.tensor([0, 0, 1, 1, 0, 1]), y_batch=torch.tensor([0, 0, 1, 1, 1])),
     "x_batch must be sorted"),
    (lambda L: L(X, Y, x_batch=torch.tensor([0, 0, 0, 1, 1, 1]), y_batch=torch.tensor([0, 0, 0, 0, 0])),
     "x has 2 segments and y 1"),
    (lambda L: L(X, Y, x_batch=torch.tensor([0, 0, 2, 2, 2, 2]), y_batch=torch.tensor([0, 1, 1, 2, 2])),
     "x_batch skips segment 1"),
    (lambda L: L(X, Y, x_batch=torch.tensor([0, 1]), y_batch=torch.tensor([0, 0, 0, 1, 1])), r"shape \(6,\)"),
    (lambda L: L(X, Y, x_offsets=torch.tensor([0, 3, 3, 6]), y_offsets=torch.tensor([0, 1, 2, 5])),
     "x_offsets must be increasing"),
    (lambda L: L(X, Y, x_batch=torch.tensor([0, 0, 0, 1, 1, 1])), "exactly one of y_batch and y_offsets"),
    (lambda L: L([X, X[:0]], [Y, Y]), "ragged segment 1: x must be a non-empty"),
    (lambda L: L([X], [Y, Y]), "same length"),
])
def test_ragged_bad_input(call, match):
    with pytest.raises(ValueError, match=match):
        call(SamplesLoss("sinkhorn", blur=0.5))


# ---------------------------------------------------------------- one launch over the segments (native, triton)
FUSED = ["native", "triton"]  # the backends with ragged kernels (``ragged_handles``)


def _fused(name):
    """Require backend ``name``; the loss must then take the one-launch path (``segments``)."""
    from otk_testing import require_backend
    require_backend(name)


def _spread(dtype=torch.float64):
    """Segments of very different sizes and scales: their ε-schedules differ in length."""
    g = torch.Generator().manual_seed(1)
    sizes, msz, sc = [7, 12, 3, 1, 30], [9, 4, 11, 2, 25], [1.0, 4.0, 0.1, 3.0, 1.0]
    xs = [torch.randn(n, 3, generator=g, dtype=dtype) * s for n, s in zip(sizes, sc)]
    ys = [torch.randn(m, 3, generator=g, dtype=dtype) * s + 1 for m, s in zip(msz, sc)]
    return xs, ys


@pytest.mark.parametrize("kw", [dict(blur=0.3), dict(blur=0.1, reach=0.5), dict(blur=0.1, reach=(None, 0.7)),
                                dict(p=1, blur=0.2), dict(blur=0.2, debias=False), dict(blur=0.2, scaling=0.8)])
@pytest.mark.parametrize("name", FUSED)
def test_fused_ragged_equals_a_loop(kw, name):
    _fused(name)
    xs, ys = _spread()
    L = SamplesLoss("sinkhorn", backend=name, **kw)
    xl = [t.clone().requires_grad_(True) for t in xs]
    loop = torch.stack([L(x, y) for x, y in zip(xl, ys)])
    gl = torch.autograd.grad(loop.sum(), xl)
    x = torch.cat(xs).requires_grad_(True)
    got = L(x, torch.cat(ys), x_offsets=[0, 7, 19, 22, 23, 53], y_offsets=[0, 9, 13, 24, 26, 51])
    assert L.last_info["segments"] == 5  # the one-launch path ran
    torch.testing.assert_close(got, loop, rtol=1e-12, atol=1e-12)
    (gx,) = torch.autograd.grad(got.sum(), x)
    torch.testing.assert_close(gx, torch.cat(gl), rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("name", FUSED)
def test_fused_ragged_weights_potentials_float32(name):
    _fused(name)
    xs, ys = _spread()
    g = torch.Generator().manual_seed(2)
    as_ = [(torch.rand(len(t), 1, generator=g, dtype=torch.float64) + 0.1) for t in xs]
    bs_ = [(torch.rand(len(t), 1, generator=g, dtype=torch.float64) + 0.1) for t in ys]
    P = SamplesLoss("sinkhorn", blur=0.3, potentials=True, backend=name)
    F, G = P(as_, xs, bs_, ys)
    assert P.last_info["segments"] == 5
    for k in range(5):
        f, gg = P(as_[k], xs[k], bs_[k], ys[k])
        assert F[k].shape == f.shape and G[k].shape == gg.shape
        torch.testing.assert_close(F[k], f, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(G[k], gg, rtol=1e-12, atol=1e-12)
    # weights get gradients; float32 stays float32 and close to the loop
    a = torch.cat(as_).squeeze(1).requires_grad_(True)
    L = SamplesLoss("sinkhorn", blur=0.3, backend=name)
    off = dict(x_offsets=[0, 7, 19, 22, 23, 53], y_offsets=[0, 9, 13, 24, 26, 51])
    (ga,) = torch.autograd.grad(L(a, torch.cat(xs), torch.cat(bs_).squeeze(1), torch.cat(ys), **off).sum(), a)
    al = [w.squeeze(1).clone().requires_grad_(True) for w in as_]
    gl = torch.autograd.grad(sum(L(w, x, v.squeeze(1), y) for w, x, v, y in zip(al, xs, bs_, ys)), al)
    torch.testing.assert_close(ga, torch.cat(gl), rtol=1e-10, atol=1e-12)
    x32, y32 = [t.float() for t in xs], [t.float() for t in ys]
    got = L(x32, y32)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, torch.stack([L(x, y) for x, y in zip(x32, y32)]), rtol=2e-5, atol=1e-5)


@pytest.mark.parametrize("name", FUSED)
def test_fused_ragged_double_backward_equals_a_loop(name):
    """``create_graph=True`` through the one-launch path (a gradient penalty's gradient, i.e. a
    Hessian-vector product): equal to the loop's; the second-order pass runs segment by segment."""
    _fused(name)
    xs, ys = _spread()
    xs, ys = xs[:3], ys[:3]
    L = SamplesLoss("sinkhorn", blur=0.3, backend=name)

    def penalty_grad(values, leaves):
        gs = torch.autograd.grad(values().sum(), leaves, create_graph=True)
        return torch.autograd.grad(sum((g ** 2).sum() for g in gs), leaves)

    x = torch.cat(xs).requires_grad_(True)
    (hx,) = penalty_grad(lambda: L(x, torch.cat(ys), x_offsets=[0, 7, 19, 22], y_offsets=[0, 9, 13, 24]), [x])
    assert L.last_info["segments"] == 3
    xl = [t.clone().requires_grad_(True) for t in xs]
    hl = penalty_grad(lambda: torch.stack([L(a, b) for a, b in zip(xl, ys)]), xl)
    assert hx.abs().max() > 0
    torch.testing.assert_close(hx, torch.cat(hl), rtol=1e-10, atol=1e-12)
