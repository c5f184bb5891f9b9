"""Parity of otkernels.SamplesLoss with geomloss.SamplesLoss (backend="tensorized" reference):
values, potentials and gradients, every call form and argument geomloss accepts.

Every test runs on every backend through the ``backend`` fixture (tests/conftest.py).

Unbalanced OT (reach≠None): values and potentials equal geomloss's; otkernels's gradients
w.r.t. the points are geomloss's × (ρ+ε)/(ρ+ε/2) (geomloss's unbalanced gradient is wrong by
that factor, see otkernels/sinkhorn.py::_UnbalancedValue); the weights' gradients are checked
against finite differences in test_gradients.py.
"""
from __future__ import annotations

import warnings

import pytest
import torch

from otk_testing import (TOL64, assert_fp32, assert_rel, clouds, geomloss_loss, otk_loss,
                         unbalanced_grad_factor, value_and_grads)

BLUR = 0.3
SINKHORN = [dict(loss="sinkhorn", p=p, debias=d, reach=r)
            for p in (1, 2) for d in (True, False) for r in (None, 0.5)]
KERNELS = [dict(loss=name, p=p) for name in ("energy", "gaussian", "laplacian") for p in (1, 2)]
CONFIGS = SINKHORN + KERNELS


def cfg_id(cfg):
    s = f"{cfg['loss']}-p{cfg['p']}"
    if cfg["loss"] == "sinkhorn":
        s += ("-debias" if cfg["debias"] else "-biased") + ("" if cfg["reach"] is None else f"-reach{cfg['reach']}")
    return s


def make_inputs(weights, batched, D=3, dtype=torch.float64, N=37, M=29, seed=0, **kw):
    x, y, a, b = clouds(N=N, M=M, D=D, B=2 if batched else None, dtype=dtype, seed=seed, **kw)
    return dict(a=a, x=x, b=b, y=y) if weights else dict(x=x, y=y)


def compare(backend, cfg, inputs, dtype_check, blur=BLUR, extra=None, geo_inputs=None):
    """Compare otkernels (backend) with geomloss on values, potentials and gradients.

    ``dtype_check(ours, geo, what, ref64=None)`` asserts one comparison.  ``geo_inputs``: the
    inputs geomloss receives (default: the same).
    """
    kw = dict(cfg, blur=blur, **(extra or {}))
    reach = kw.get("reach")
    geo_inputs = geo_inputs or inputs
    ours_v, ours_g = value_and_grads(otk_loss(**kw, backend=backend), inputs)
    geo_v, geo_g = value_and_grads(geomloss_loss(**kw), geo_inputs)
    dtype_check(ours_v, geo_v, "value")
    for k in ("x", "y"):
        expected = geo_g[k]
        if reach is not None:
            expected = expected * unbalanced_grad_factor(kw["p"], blur, reach)
        dtype_check(ours_g[k], expected, f"grad {k}")
    if reach is None:  # weights' gradients with reach: finite differences, test_gradients.py
        for k in ("a", "b"):
            if k in inputs:
                dtype_check(ours_g[k], geo_g[k], f"grad {k}")
    with torch.no_grad():
        F, G = otk_loss(**kw, backend=backend, potentials=True)(*inputs.values())
        Fg, Gg = geomloss_loss(**kw, potentials=True)(*geo_inputs.values())
    # potentials are shaped like the weights (geomloss's tensorized backend returns (1,N)
    # for unbatched inputs: we compare the values, and the shapes in their own test)
    F_shape, G_shape = weight_shapes(inputs)
    assert F.shape == F_shape and G.shape == G_shape, (F.shape, G.shape, F_shape, G_shape)
    dtype_check(F, Fg.reshape(F_shape), "potential F")
    dtype_check(G, Gg.reshape(G_shape), "potential G")
    return ours_v


def weight_shapes(inputs):
    """Shapes of the potentials: those of the weights if given, else (N,) or (B,N)."""
    if "a" in inputs:
        return inputs["a"].shape, inputs["b"].shape
    return inputs["x"].shape[:-1], inputs["y"].shape[:-1]


def check64(ours, geo, what):
    assert ours.dtype == torch.float64, f"{what}: dtype {ours.dtype}"
    assert_rel(ours, geo, TOL64, what)


# ----------------------------------------------------------------------------- float64 parity
@pytest.mark.parametrize("batched", [False, True], ids=["single", "batched"])
@pytest.mark.parametrize("weights", [False, True], ids=["uniform", "weights"])
@pytest.mark.parametrize("cfg", CONFIGS, ids=cfg_id)
def test_parity_float64(backend, cfg, weights, batched):
    compare(backend, cfg, make_inputs(weights, batched), check64)


# ----------------------------------------------------------------------------- float32 parity
def fp32_checker(backend, cfg, inputs64, blur=BLUR, extra=None):
    """Run geomloss in float64 (the reference) and float32, and check the fp32 rule."""
    kw = dict(cfg, blur=blur, **(extra or {}))
    reach = kw.get("reach")
    inputs32 = {k: v.float() for k, v in inputs64.items()}
    fac = 1.0 if reach is None else unbalanced_grad_factor(kw["p"], blur, reach)
    ref_v, ref_g = value_and_grads(geomloss_loss(**kw), inputs64)
    geo_v, geo_g = value_and_grads(geomloss_loss(**kw), inputs32)
    our_v, our_g = value_and_grads(otk_loss(**kw, backend=backend), inputs32)
    assert our_v.dtype == torch.float32
    assert_fp32(our_v, geo_v, ref_v, "value")
    for k in ("x", "y") + (("a", "b") if reach is None else ()):
        if k in inputs64:
            assert our_g[k].dtype == torch.float32, f"grad {k} dtype {our_g[k].dtype}"
            assert_fp32(our_g[k], fac * geo_g[k] if k in "xy" else geo_g[k],
                        fac * ref_g[k] if k in "xy" else ref_g[k], f"grad {k}")
    with torch.no_grad():
        pots = [L(*inp.values()) for L, inp in (
            (otk_loss(**kw, backend=backend, potentials=True), inputs32),
            (geomloss_loss(**kw, potentials=True), inputs32),
            (geomloss_loss(**kw, potentials=True), inputs64))]
    for i, (name, shape) in enumerate(zip("FG", weight_shapes(inputs64))):
        assert pots[0][i].dtype == torch.float32
        assert_fp32(pots[0][i], pots[1][i].reshape(shape), pots[2][i].reshape(shape), f"potential {name}")


@pytest.mark.parametrize("batched", [False, True], ids=["single", "batched"])
@pytest.mark.parametrize("weights", [False, True], ids=["uniform", "weights"])
@pytest.mark.parametrize("cfg", CONFIGS, ids=cfg_id)
def test_parity_float32(backend, cfg, weights, batched):
    fp32_checker(backend, cfg, make_inputs(weights, batched))


# ----------------------------------------------------------------------------- sweep over D
D_CONFIGS = [dict(loss="sinkhorn", p=2, debias=True, reach=None),
             dict(loss="sinkhorn", p=1, debias=False, reach=0.5),
             dict(loss="gaussian", p=2),
             dict(loss="energy", p=2)]


def blur_for(cfg, D):
    """Distances grow like sqrt(D): keep the problem meaningful (a gaussian kernel of blur 1
    in D=128 is ~e^-128 off the diagonal, with gradients ~1e-38)."""
    if D <= 3:
        return BLUR
    return D ** 0.5 if cfg["loss"] == "gaussian" else 1.0


@pytest.mark.parametrize("D", [1, 2, 3, 17, 128])
@pytest.mark.parametrize("cfg", D_CONFIGS, ids=cfg_id)
def test_parity_dimensions_float64(backend, cfg, D):
    blur = blur_for(cfg, D)
    compare(backend, cfg, make_inputs(True, False, D=D, N=23, M=31), check64, blur=blur)


@pytest.mark.parametrize("D", [1, 2, 3, 17, 128])
@pytest.mark.parametrize("cfg", D_CONFIGS, ids=cfg_id)
def test_parity_dimensions_float32(backend, cfg, D):
    blur = blur_for(cfg, D)
    fp32_checker(backend, cfg, make_inputs(True, True, D=D, N=23, M=31), blur=blur)


# ----------------------------------------------------------------------------- arguments
@pytest.mark.parametrize("p", [1, 2])
@pytest.mark.parametrize("scaling", [0.3, 0.9])
@pytest.mark.parametrize("diameter", [None, 0.8, 4.0, 50.0])
def test_diameter_and_scaling(backend, diameter, scaling, p):
    cfg = dict(loss="sinkhorn", p=p, debias=True, reach=None)
    compare(backend, cfg, make_inputs(True, False), check64,
            extra=dict(diameter=diameter, scaling=scaling))


@pytest.mark.parametrize("cfg", [c for c in CONFIGS if c["p"] == 2 or c["loss"] == "sinkhorn"], ids=cfg_id)
def test_zero_weights(backend, cfg):
    """Some points with zero weight (log-weight −1e5 in the Sinkhorn loop)."""
    inputs = make_inputs(True, False, zero_a=5, zero_b=3)
    compare(backend, cfg, inputs, check64)
    inputs = make_inputs(True, True, zero_a=4, zero_b=6)
    compare(backend, cfg, inputs, check64)


def test_unbalanced_gradient_factor_is_applied(backend):
    """The unbalanced gradient differs from geomloss's (by design): make sure the parity
    tests above would notice if it did not, i.e. the factor is far from 1."""
    x, y, a, b = clouds()
    kw = dict(loss="sinkhorn", p=2, blur=BLUR, reach=0.5)
    _, ours = value_and_grads(otk_loss(**kw, backend=backend), dict(x=x, y=y))
    _, geo = value_and_grads(geomloss_loss(**kw), dict(x=x, y=y))
    fac = unbalanced_grad_factor(2, BLUR, 0.5)
    assert fac > 1.05
    assert_rel(ours["x"], fac * geo["x"], TOL64, "grad x")
    err = (ours["x"] - geo["x"]).abs().max() / geo["x"].abs().max()
    assert err > 0.04, f"otkernels's unbalanced gradient equals geomloss's (rel diff {err:.2e})"


# ----------------------------------------------------------------------------- call forms
def test_two_and_four_argument_forms_agree(backend):
    for batched in (False, True):
        x, y, _, _ = clouds(B=2 if batched else None)
        lead = x.shape[:-2]
        a = torch.full((*lead, x.shape[-2]), 1.0 / x.shape[-2], dtype=x.dtype)
        b = torch.full((*lead, y.shape[-2]), 1.0 / y.shape[-2], dtype=y.dtype)
        L = otk_loss(loss="sinkhorn", blur=BLUR, backend=backend)
        v2, v4 = L(x, y), L(a, x, b, y)
        torch.testing.assert_close(v2, v4, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("loss", ["sinkhorn", "gaussian", "hausdorff"])
def test_weight_shapes_and_return_shapes(backend, loss):
    x, y, a, b = clouds(N=11, M=7)
    xb, yb, ab, bb = clouds(N=11, M=7, B=2)
    # a fixed diameter: by default it is computed over all the batches together (geomloss)
    L = otk_loss(loss=loss, blur=BLUR, backend=backend, diameter=5.0)
    P = otk_loss(loss=loss, blur=BLUR, backend=backend, diameter=5.0, potentials=True)
    # unbatched: scalar; (N,) and (N,1) weights give the same value, potentials shaped like them
    ref = L(a, x, b, y)
    assert ref.shape == torch.Size([]), f"unbatched value has shape {tuple(ref.shape)}"
    assert L(x, y).shape == torch.Size([])
    for aa, bbw in ((a, b), (a[:, None], b[:, None]), (a, b[:, None])):
        torch.testing.assert_close(L(aa, x, bbw, y), ref, rtol=1e-13, atol=0)
        F, G = P(aa, x, bbw, y)
        assert F.shape == aa.shape and G.shape == bbw.shape, (F.shape, G.shape, aa.shape, bbw.shape)
        al, bl = aa.clone().requires_grad_(), bbw.clone().requires_grad_()
        ga, gb = torch.autograd.grad(L(al, x, bl, y), [al, bl])
        assert ga.shape == aa.shape and gb.shape == bbw.shape
    F, G = P(x, y)
    assert F.shape == (11,) and G.shape == (7,)
    # batched: (B,), (B,N) and (B,N,1) weights
    refb = L(ab, xb, bb, yb)
    assert refb.shape == (2,), f"batched value has shape {tuple(refb.shape)}"
    assert L(xb, yb).shape == (2,)
    for aa, bbw in ((ab, bb), (ab[..., None], bb[..., None])):
        torch.testing.assert_close(L(aa, xb, bbw, yb), refb, rtol=1e-13, atol=0)
        F, G = P(aa, xb, bbw, yb)
        assert F.shape == aa.shape and G.shape == bbw.shape
    F, G = P(xb, yb)
    assert F.shape == (2, 11) and G.shape == (2, 7)
    # each batch entry is the unbatched problem
    for i in range(2):
        torch.testing.assert_close(refb[i], L(ab[i], xb[i], bb[i], yb[i]), rtol=1e-12, atol=1e-15)


def test_batch_entries_are_independent(backend):
    """A batched call equals the stack of unbatched calls (values and gradients), given a
    fixed diameter (by default it is computed over all the batches together, as geomloss)."""
    xb, yb, ab, bb = clouds(B=3, N=20, M=15)
    L = otk_loss(loss="sinkhorn", blur=BLUR, backend=backend, reach=0.8, diameter=6.0)
    inputs = dict(a=ab, x=xb, b=bb, y=yb)
    vb, gb = value_and_grads(L, inputs)
    for i in range(3):
        vi, gi = value_and_grads(L, {k: v[i] for k, v in inputs.items()})
        assert_rel(vb[i], vi, 1e-12, f"value batch {i}")
        for k in inputs:
            assert_rel(gb[k][i], gi[k], 1e-10, f"grad {k} batch {i}")


def test_labels_six_argument_form(backend):
    """L(l_x, a, x, l_y, b, y): geomloss's multiscale cluster labels.  otkernels ignores them
    (warning) and returns the exact value."""
    x, y, a, b = clouds()
    l_x = torch.zeros(x.shape[0], dtype=torch.long)
    l_y = torch.arange(y.shape[0]) % 3
    L = otk_loss(loss="sinkhorn", blur=BLUR, backend=backend)
    exact = L(a, x, b, y)
    with pytest.warns(UserWarning, match="multiscale"):
        v = L(l_x, a, x, l_y, b, y)
    torch.testing.assert_close(v, exact, rtol=1e-13, atol=0)
    ref = geomloss_loss(loss="sinkhorn", blur=BLUR)(a, x, b, y)
    assert_rel(v, ref, TOL64, "value with labels vs geomloss exact")


def test_backend_aliases(backend):
    """geomloss's backend names: "online" is accepted silently, "multiscale" with a warning;
    both give the exact value."""
    x, y, a, b = clouds()
    exact = otk_loss(loss="sinkhorn", blur=BLUR, backend=backend)(a, x, b, y)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        online = otk_loss(loss="sinkhorn", blur=BLUR, backend="online")(a, x, b, y)
    with pytest.warns(UserWarning, match="multiscale"):
        multi = otk_loss(loss="sinkhorn", blur=BLUR, backend="multiscale")(a, x, b, y)
    auto = otk_loss(loss="sinkhorn", blur=BLUR, backend="auto")(a, x, b, y)
    for name, v in (("online", online), ("multiscale", multi), ("auto", auto)):
        torch.testing.assert_close(v, exact, rtol=1e-12, atol=0, msg=lambda m: f"{name}: {m}")


def sqdist_half(x, y):
    return ((x[:, :, None, :] - y[:, None, :, :]) ** 2).sum(-1) / 2


def l1_cost(x, y):
    return (x[:, :, None, :] - y[:, None, :, :]).abs().sum(-1)


@pytest.mark.parametrize("debias", [True, False])
def test_cost_callable_equals_p2(backend, debias):
    x, y, a, b = clouds()
    inputs = dict(a=a, x=x, b=b, y=y)
    kw = dict(loss="sinkhorn", p=2, blur=BLUR, debias=debias)
    v_ref, g_ref = value_and_grads(otk_loss(**kw, backend=backend), inputs)
    v, g = value_and_grads(otk_loss(**kw, backend=backend, cost=lambda x, y: ((x[:, :, None, :] - y[:, None, :, :]) ** 2).sum(-1) / 2), inputs)
    assert_rel(v, v_ref, TOL64, "value, cost callable vs p=2")
    for k in inputs:
        assert_rel(g[k], g_ref[k], TOL64, f"grad {k}, cost callable vs p=2")


@pytest.mark.parametrize("reach", [None, 0.5])
def test_cost_callable_parity(backend, reach):
    """A non-Euclidean cost callable (L1) matches geomloss given the same callable."""
    cfg = dict(loss="sinkhorn", p=1, debias=True, reach=reach)
    compare(backend, cfg, make_inputs(True, False), check64, extra=dict(cost=l1_cost))
    compare(backend, cfg, make_inputs(False, True), check64, extra=dict(cost=l1_cost))


@pytest.mark.parametrize("cost,p", [("(SqDist(X,Y) / IntCst(2))", 2), ("Norm2(X-Y)", 1),
                                    ("sqeuclidean", 2), ("euclidean", 1),
                                    (("(SqDist(X,Y) / IntCst(2))", sqdist_half), 2)])
def test_cost_strings(backend, cost, p):
    x, y, a, b = clouds()
    inputs = dict(a=a, x=x, b=b, y=y)
    kw = dict(loss="sinkhorn", p=p, blur=BLUR)
    v_ref, g_ref = value_and_grads(otk_loss(**kw, backend=backend), inputs)
    v, g = value_and_grads(otk_loss(**kw, backend=backend, cost=cost), inputs)
    assert_rel(v, v_ref, TOL64, f"value cost={cost!r}")
    for k in inputs:
        assert_rel(g[k], g_ref[k], TOL64, f"grad {k} cost={cost!r}")
    geo = geomloss_loss(**kw)(a, x, b, y)
    assert_rel(v, geo, TOL64, f"value cost={cost!r} vs geomloss p={p}")


def my_gaussian(x, y, blur=0.05, use_keops=False, ranges=None):
    d2 = ((x[:, :, None, :] - y[:, None, :, :]) ** 2).sum(-1)
    return (-d2 / (2 * blur ** 2)).exp()


def my_cauchy(x, y, blur=0.05, **kwargs):
    d2 = ((x[:, :, None, :] - y[:, None, :, :]) ** 2).sum(-1)
    return 1 / (1 + d2 / blur ** 2)


@pytest.mark.parametrize("loss", ["gaussian", "energy"])
@pytest.mark.parametrize("kernel", [my_gaussian, my_cauchy])
def test_custom_kernel(backend, kernel, loss):
    """A geomloss-style kernel callable kernel(x, y, blur=, use_keops=, ranges=) replaces the
    named kernel.  otkernels runs it on the dense backend ('tensorized' or 'auto'); other
    backends refuse it with a ValueError that names the kernel."""
    x, y, a, b = clouds()
    kw = dict(loss=loss, blur=0.5, kernel=kernel)
    if backend != "tensorized":
        with pytest.raises(ValueError, match="kernel"):
            otk_loss(**kw, backend=backend)(a, x, b, y)
        backend = "auto"
    compare(backend, dict(loss=loss, p=2), dict(a=a, x=x, b=b, y=y), check64, blur=0.5,
            extra=dict(kernel=kernel))
    if kernel is my_gaussian:  # equals the built-in gaussian loss
        v = otk_loss(**kw, backend=backend)(a, x, b, y)
        ref = otk_loss(loss="gaussian", blur=0.5, backend="tensorized")(a, x, b, y)
        assert_rel(v, ref, TOL64, "custom gaussian vs loss='gaussian'")


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("loss", ["sinkhorn", "gaussian", "hausdorff"])
def test_half_precision_inputs(backend, dtype, loss):
    """float16/bfloat16 inputs are computed in float32 and returned in the input dtype."""
    x, y, a, b = clouds(N=20, M=15, dtype=dtype)
    L = otk_loss(loss=loss, blur=BLUR, backend=backend)
    leaves = [t.clone().requires_grad_() for t in (a, x, b, y)]
    v = L(*leaves)
    assert v.dtype == dtype, f"value dtype {v.dtype} != {dtype}"
    grads = torch.autograd.grad(v, leaves)
    for name, g, t in zip("axby", grads, leaves):
        assert g.dtype == dtype and g.shape == t.shape, f"grad {name}: {g.dtype} {tuple(g.shape)}"
        assert bool(torch.isfinite(g).all()), f"grad {name} not finite"
    ref32 = L(*(t.float() for t in (a, x, b, y)))
    torch.testing.assert_close(v, ref32.to(dtype), rtol=0, atol=0,
                               msg=lambda m: f"half-precision value is not the float32 value cast: {m}")
    # and the float32 value is close to the float64 one on the same (rounded) data
    ref64 = L(*(t.double() for t in (a, x, b, y)))
    assert_rel(ref32, ref64, 1e-4, "float32 vs float64 on the rounded data")
    F, G = otk_loss(loss=loss, blur=BLUR, backend=backend, potentials=True)(a, x, b, y)
    assert F.dtype == dtype and G.dtype == dtype
    assert F.shape == a.shape and G.shape == b.shape


def test_verbose_prints(backend, capsys):
    x, y, a, b = clouds(N=10, M=8)
    otk_loss(loss="sinkhorn", blur=BLUR, backend=backend, verbose=True)(x, y)
    assert capsys.readouterr().out.strip(), "verbose=True printed nothing"


def test_module_is_a_torch_module(backend):
    L = otk_loss(loss="sinkhorn", blur=BLUR, backend=backend)
    assert isinstance(L, torch.nn.Module)
    assert "sinkhorn" in repr(L)
