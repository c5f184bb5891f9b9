"""Bad inputs give a clear ValueError/TypeError that names the offending argument."""
from __future__ import annotations

import math

import pytest
import torch

from otk_testing import clouds, otk_loss


def good(B=None, N=12, M=9, D=3, dtype=torch.float64):
    x, y, a, b = clouds(N=N, M=M, D=D, B=B, dtype=dtype)
    return a, x, b, y


def call(backend, *args, **kw):
    kw.setdefault("loss", "sinkhorn")
    return otk_loss(backend=backend, blur=0.3, **kw)(*args)


# ----------------------------------------------------------------------------- shapes
def test_mismatched_dimension(backend):
    a, x, b, y = good()
    with pytest.raises(ValueError, match=r"x and y .*dimension D"):
        call(backend, x, torch.randn(9, 4, dtype=x.dtype))
    with pytest.raises(ValueError, match=r"x and y .*dimension D"):
        call(backend, a, x, b, torch.randn(9, 2, dtype=x.dtype))


def test_mismatched_batch_sizes(backend):
    a, x, b, y = good(B=2)
    with pytest.raises(ValueError, match=r"x and y .*batch size"):
        call(backend, x, torch.randn(3, 9, 3, dtype=x.dtype))


def test_mismatched_number_of_dims(backend):
    a, x, b, y = good()
    with pytest.raises(ValueError, match=r"x and y must both be"):
        call(backend, x, y[None])
    with pytest.raises(ValueError, match=r"x and y must both be"):
        call(backend, x[None], y)


@pytest.mark.parametrize("shape", [(12,), (1, 2, 12, 3)], ids=["1d", "4d"])
def test_x_wrong_number_of_dims(backend, shape):
    with pytest.raises(ValueError, match=r"x must be \(N,D\) or \(B,N,D\)"):
        call(backend, torch.randn(shape, dtype=torch.float64), torch.randn(shape, dtype=torch.float64))


@pytest.mark.parametrize("which", ["x", "y"])
def test_empty_cloud(backend, which):
    a, x, b, y = good()
    if which == "x":
        x = x[:0]
    else:
        y = y[:0]
    with pytest.raises(ValueError, match=rf"empty point cloud.*\b{which} has 0\b"):
        call(backend, x, y)


def test_zero_dimension(backend):
    with pytest.raises(ValueError, match=r"dimension D = 0"):
        call(backend, torch.randn(5, 0, dtype=torch.float64), torch.randn(4, 0, dtype=torch.float64))


@pytest.mark.parametrize("which", ["a", "b"])
@pytest.mark.parametrize("batched", [False, True])
def test_weights_wrong_shape(backend, which, batched):
    a, x, b, y = good(B=2 if batched else None)
    bad = {"a": a, "b": b}
    w = bad[which]
    for wrong in (w[..., :-1], w[..., None].expand(*w.shape, 2), w.reshape(-1) if batched else w[None, None]):
        bad[which] = wrong.contiguous()
        with pytest.raises(ValueError, match=rf"weights {which} have shape"):
            call(backend, bad["a"], x, bad["b"], y)
    if batched:  # wrong batch size in the weights
        bad[which] = w[:1]
        with pytest.raises(ValueError, match=rf"weights {which} have shape"):
            call(backend, bad["a"], x, bad["b"], y)


def test_only_one_weight_given(backend):
    a, x, b, y = good()
    with pytest.raises(ValueError, match=r"weights a and b"):
        call(backend, None, x, b, y)
    with pytest.raises(ValueError, match=r"weights a and b"):
        call(backend, a, x, None, y)


# ----------------------------------------------------------------------------- values
@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf], ids=["nan", "inf", "-inf"])
@pytest.mark.parametrize("which", ["x", "y", "a", "b"])
def test_non_finite_inputs(backend, which, bad):
    args = dict(zip("axby", good()))
    t = args[which].clone()
    t.view(-1)[3] = bad
    args[which] = t
    kind = "NaN" if math.isnan(bad) else "Inf"
    with pytest.raises(ValueError, match=rf"\b{which} contains {kind}"):
        call(backend, *args.values())


@pytest.mark.parametrize("which", ["a", "b"])
def test_negative_weights(backend, which):
    args = dict(zip("axby", good()))
    args[which] = args[which].clone()
    args[which][2] = -0.1
    with pytest.raises(ValueError, match=rf"\b{which} has negative weights"):
        call(backend, *args.values())


@pytest.mark.parametrize("batched", [False, True])
@pytest.mark.parametrize("which", ["a", "b"])
def test_all_zero_weights(backend, which, batched):
    args = dict(zip("axby", good(B=2 if batched else None)))
    args[which] = args[which].clone()
    if batched:
        args[which][-1] = 0  # the last batch's measure is zero
    else:
        args[which].zero_()
    with pytest.raises(ValueError, match=rf"\b{which} has a measure with all-zero weights"):
        call(backend, *args.values())


# ----------------------------------------------------------------------------- dtypes, devices, types
@pytest.mark.parametrize("which", ["x", "y"])
@pytest.mark.parametrize("dtype", [torch.int64, torch.int32, torch.bool])
def test_integer_points(backend, which, dtype):
    args = dict(zip("axby", good()))
    args[which] = args[which].round().to(dtype)
    with pytest.raises(TypeError, match=rf"\b{which} must be a floating-point tensor"):
        call(backend, args["x"], args["y"])


@pytest.mark.parametrize("which", ["a", "b"])
def test_integer_weights(backend, which):
    args = dict(zip("axby", good()))
    args[which] = torch.ones(args[which].shape, dtype=torch.int64)
    with pytest.raises(TypeError, match=rf"\b{which} must be a floating-point tensor"):
        call(backend, *args.values())


def test_mixed_dtypes(backend):
    a, x, b, y = good()
    with pytest.raises(TypeError, match=r"x and y must have the same dtype"):
        call(backend, x, y.float())
    with pytest.raises(TypeError, match=r"\ba must have the dtype of the points"):
        call(backend, a.float(), x, b, y)
    with pytest.raises(TypeError, match=r"\bb must have the dtype of the points"):
        call(backend, a, x, b.float(), y)


def test_not_a_tensor(backend):
    a, x, b, y = good()
    with pytest.raises(TypeError, match=r"\bx must be a torch.Tensor"):
        call(backend, x.numpy(), y)
    with pytest.raises(TypeError, match=r"\by must be a torch.Tensor"):
        call(backend, x, y.tolist())
    with pytest.raises(TypeError, match=r"\ba must be a torch.Tensor"):
        call(backend, a.numpy(), x, b, y)


def test_mixed_devices(backend):
    """Needs a second device: the 'meta' device (no data) stands in for CUDA."""
    a, x, b, y = good()
    y_meta = y.to("meta")  # torch >= 2.0 always has the meta device
    with pytest.raises(ValueError, match=r"same device") as e:
        call(backend, x, y_meta)
    assert "y on meta" in str(e.value), f"unclear device error: {e.value}"
    with pytest.raises(ValueError, match=r"same device.*b on meta"):
        call(backend, a, x, b.to("meta"), y)


# ----------------------------------------------------------------------------- constructor
@pytest.mark.parametrize("blur", [0, -0.1, math.nan, math.inf])
def test_bad_blur(backend, blur):
    with pytest.raises(ValueError, match=r"\bblur must be"):
        otk_loss(loss="sinkhorn", blur=blur, backend=backend)


@pytest.mark.parametrize("reach", [0, -1.0, math.nan])
def test_bad_reach(backend, reach):
    with pytest.raises(ValueError, match=r"\breach must be"):
        otk_loss(loss="sinkhorn", reach=reach, backend=backend)


@pytest.mark.parametrize("scaling", [0, -0.5, 1, 1.5, math.nan])
def test_bad_scaling(backend, scaling):
    with pytest.raises(ValueError, match=r"\bscaling must be"):
        otk_loss(loss="sinkhorn", scaling=scaling, backend=backend)


@pytest.mark.parametrize("diameter", [0, -2.0, math.inf])
def test_bad_diameter(backend, diameter):
    with pytest.raises(ValueError, match=r"\bdiameter must be"):
        otk_loss(loss="sinkhorn", diameter=diameter, backend=backend)


@pytest.mark.parametrize("name", ["blur", "reach", "scaling", "diameter"])
def test_non_numeric_parameters(backend, name):
    with pytest.raises(TypeError, match=rf"\b{name} must be a number"):
        otk_loss(loss="sinkhorn", backend=backend, **{name: "0.5"})


@pytest.mark.parametrize("loss", ["sinkhorn", "hausdorff"])
@pytest.mark.parametrize("p", [0, 0.5, "2"])   # p ≥ 1 is accepted (‖x−y‖^p/p: tests/test_general_p.py)
def test_bad_p(backend, loss, p):
    with pytest.raises(ValueError, match=rf"p={p!r} is not supported"):
        otk_loss(loss=loss, p=p, backend=backend)


def test_unknown_loss(backend):
    with pytest.raises(ValueError, match=r"loss='wasserstein' is unknown"):
        otk_loss(loss="wasserstein", backend=backend)


@pytest.mark.parametrize("name", ["no-such-backend", "GPU", "", None])
def test_unknown_backend(name):
    with pytest.raises(ValueError, match=r"backend=.* is unknown"):
        otk_loss(loss="sinkhorn", backend=name)


def test_reach_with_hausdorff(backend):
    with pytest.raises(ValueError, match=r"\breach is not supported for loss='hausdorff'"):
        otk_loss(loss="hausdorff", reach=0.5, backend=backend)


def test_bad_cost(backend):
    with pytest.raises(ValueError, match=r"cost='Norm3\(X-Y\)' is not a cost"):
        otk_loss(loss="sinkhorn", cost="Norm3(X-Y)", backend=backend)
    with pytest.raises(TypeError, match=r"\bcost must be"):
        otk_loss(loss="sinkhorn", cost=3, backend=backend)


def test_bad_kernel(backend):
    with pytest.raises(TypeError, match=r"\bkernel must be a callable"):
        otk_loss(loss="gaussian", kernel="gaussian", backend=backend)


@pytest.mark.parametrize("n", [0, 1, 3, 5, 7])
def test_wrong_number_of_arguments(backend, n):
    a, x, b, y = good()
    args = [x, y, a, b, x, y, a][:n]
    with pytest.raises(ValueError, match=r"takes two \(x, y\), four \(a, x, b, y\) or six"):
        otk_loss(loss="sinkhorn", blur=0.3, backend=backend)(*args)


def test_labels_with_batches(backend):
    a, x, b, y = good(B=2)
    lab = torch.zeros(12, dtype=torch.long)
    with pytest.raises(ValueError, match=r"cluster labels l_x"):
        call(backend, lab, a, x, torch.zeros(9, dtype=torch.long), b, y)


def test_labels_wrong_length(backend):
    a, x, b, y = good()
    with pytest.raises(ValueError, match=r"cluster labels l_y must be a tensor of 9 labels"):
        call(backend, torch.zeros(12, dtype=torch.long), a, x, torch.zeros(4, dtype=torch.long), b, y)
