"""``SamplesLoss``: a drop-in replacement for ``geomloss.SamplesLoss``.

Same constructor, call forms ``L(x, y)``, ``L(a, x, b, y)``, ``L(l_x, a, x, l_y, b, y)``,
shapes ``(N,D)`` or batched ``(B,N,D)``, and return shapes (scalar / ``(B,)``, or potentials
shaped like the weights) as geomloss 0.3.  The work is done by the backends in
``otkernels.backends`` through one Sinkhorn loop (``sinkhorn.py``), one kernel-norm routine
(``kernel_losses.py``) and the ε-Hausdorff divergence (``hausdorff.py``).

``backend="auto"`` rule (:func:`otkernels.backends.select`): dense ``tensorized`` when
``B·N·M ≤ 1500²`` (or for a custom ``kernel`` callable), else on CPU ``native`` (the fused
C++ kernels, when built) or ``blocked`` (cost cached on CPU when it fits the memory budget,
tiles recomputed otherwise); see :func:`otkernels.backends.select` for GPUs.  geomloss's ``"online"`` and
``"multiscale"`` map to ``backends/online.py`` (never an N×M matrix: native's uncached passes on
CPU, else ``blocked`` without a cache); ``multiscale``'s kernel truncation and cluster labels
are not implemented: otkernels computes the exact (online) value and says so in a warning.
"""
from __future__ import annotations

import warnings

import torch
from torch.nn import Module

from . import _precision, backends
from ._checks import (check_finite, check_float_param, check_same_device, check_tensor,
                      check_weights)
from .costs import Kernel, make_cost
from .hausdorff import hausdorff
from .kernel_losses import CallableKernel, kernel_loss
from .sinkhorn import Stopping, epsilon_schedule, max_diameter, sinkhorn

LOSSES = ("sinkhorn", "hausdorff", "energy", "gaussian", "laplacian")
BACKENDS = ("auto", "tensorized", "blocked", "online", "multiscale")



class SamplesLoss(Module):
    """Loss between sampled measures ``α = Σ a_i δ_{x_i}``, ``β = Σ b_j δ_{y_j}``.

    Args (as geomloss): loss ("sinkhorn", "hausdorff", "energy", "gaussian", "laplacian"),
    p (1 or 2: cost |x−y| or ½|x−y|²; otkernels also takes any p ≥ 1: ‖x−y‖^p / p, computed
    by torch tiles — ``blocked`` — on the backends whose fused kernels have only p = 1, 2;
    and ``cost="cosine"``: 1 − cos(x, y) = ½‖x̂ − ŷ‖², p = 2 on L2-normalised points, every
    backend's fused kernels), blur (σ; ε = blur^p), reach (None = balanced, else
    ρ = reach^p; otkernels also takes a pair ``(reach_x, reach_y)``, either None: the KL
    penalty ρ_x = reach_x^p on α's marginal (x), ρ_y on β's, None = that marginal is a hard
    constraint — semi-unbalanced OT, POT's ``reg_m=(ρ_x, ρ_y)``, OTT's ``tau_a, tau_b`` =
    ρ/(ρ+ε)), diameter (None = bounding-box diagonal), scaling (ε-annealing ratio in
    (0, 1)), truncate, cluster_scale (multiscale only: ignored), cost (None, a geomloss cost
    string or a callable (x, y) -> (B,N,M)), kernel (callable for kernel losses), debias,
    potentials, verbose, backend; and ``precision`` (otkernels only): the float32 dots of the
    ``triton`` backend — None (default ``"tf32x3"``: three TF32 tensor-core products,
    float32 accuracy, geomloss parity), ``"ieee"`` (float32 FMA, no tensor cores), ``"tf32"``
    (operands rounded to TF32, norms of the same points: values within ~5e-6 of float64,
    gradients at small blur within ~7e-2) or ``"bf16"`` (values within ~1e-2; speed only).
    Other backends compute in the input dtype and ignore it.

    Early stopping (otkernels only; off by default, so the loop is geomloss's): ``tol`` — after
    the ε-annealing, the same averaged Sinkhorn updates continue at the final ε until the
    marginal error ``max |f̃ − f|/ε`` of every loop (OT(α,β), and the debias loops) is ≤ tol,
    checked every ``check_every`` iterations from the updates' own passes; ``max_iter`` — at
    most that many more iterations (default 1000 with ``tol``; without ``tol``: exactly that
    many).  After a call, ``loss.last_info`` says what ran: ``{"annealing": iterations of the
    schedule, "pair"/"xx"/"yy": {"iterations", "marginal_error"}}``; ``verbose`` prints it.

    Call: ``L(x, y)``, ``L(a, x, b, y)``: x (N,D) or (B,N,D), a (N,), (N,1), (B,N) or (B,N,1).
    Returns a scalar or (B,), or ``(F, G)`` shaped like a and b when ``potentials=True``.
    """

    def __init__(self, loss="sinkhorn", p=2, blur=0.05, reach=None, diameter=None, scaling=0.5,
                 truncate=5, cost=None, kernel=None, cluster_scale=None, debias=True,
                 potentials=False, verbose=False, backend="auto", precision=None, tol=None, max_iter=None,
                 check_every=5):
        super().__init__()
        self.precision = _precision.check(precision)
        self.tol = check_float_param("tol", tol, allow_none=True)
        if max_iter is not None and (isinstance(max_iter, bool) or not isinstance(max_iter, int) or max_iter < 0):
            raise ValueError(f"max_iter must be None or an int >= 0, got {max_iter!r}")
        if isinstance(check_every, bool) or not isinstance(check_every, int) or check_every < 1:
            raise ValueError(f"check_every must be an int >= 1, got {check_every!r}")
        if (tol is not None or max_iter is not None) and loss != "sinkhorn":
            raise ValueError(f"tol and max_iter apply to loss='sinkhorn', not {loss!r}")
        self.max_iter, self.check_every, self.last_info = max_iter, check_every, None
        if loss not in LOSSES:
            raise ValueError(f"loss={loss!r} is unknown: expected one of {LOSSES}")
        if not isinstance(backend, str) or backend not in BACKENDS:
            known = set(BACKENDS) | set(backends.available())
            if backend not in known:
                raise ValueError(f"backend={backend!r} is unknown: expected one of {sorted(known)}")
        if loss in ("sinkhorn", "hausdorff"):
            if isinstance(p, bool) or not isinstance(p, (int, float)) or not p >= 1 or p != p or p == float("inf"):
                raise ValueError(f"p={p!r} is not supported for loss={loss!r}: expected a finite number >= 1 "
                                 "(cost ‖x−y‖^p / p; p = 1 and 2 are geomloss's, on every backend's fused kernels)")
            p = int(p) if float(p) in (1.0, 2.0) else float(p)
        self.blur = check_float_param("blur", blur)
        self.reach = _reach(reach)
        self.diameter = check_float_param("diameter", diameter, allow_none=True)
        self.scaling = check_float_param("scaling", scaling)
        if not self.scaling < 1:
            raise ValueError(f"scaling must be in (0, 1), got {scaling}")
        if loss == "hausdorff" and reach is not None:
            raise ValueError("reach is not supported for loss='hausdorff' (a balanced divergence)")
        self.loss, self.p, self.backend = loss, p, backend
        self.sphere = isinstance(cost, str) and cost.replace(" ", "").lower() == "cosine"
        if self.sphere:  # 1 − cos(x, y) = ½‖x/‖x‖ − y/‖y‖‖²: the p = 2 cost on the unit sphere
            if loss not in ("sinkhorn", "hausdorff"):
                raise ValueError(f"cost='cosine' applies to loss='sinkhorn' or 'hausdorff', not {loss!r}")
            if p != 2:
                raise ValueError(f"cost='cosine' is 1 − cos(x, y) = ½‖x̂ − ŷ‖² on the unit sphere: use p=2 "
                                 f"(ε = blur²), got p={p!r}")
            cost = None
        self.cost = make_cost(p, cost)
        self.kernel = kernel
        if kernel is not None and not callable(kernel):
            raise TypeError(f"kernel must be a callable (x, y, blur=...) -> (B,N,M), got {type(kernel).__name__}")
        self.truncate, self.cluster_scale = truncate, cluster_scale
        self.debias, self.potentials, self.verbose = bool(debias), bool(potentials), verbose
        from ._compile import config
        self._op_config = config(self)  # the arguments as the custom op takes them (torch.compile)

    def __setattr__(self, name, value):
        super().__setattr__(name, value)
        if not name.startswith("_") and "_op_config" in self.__dict__:  # a changed argument: the op's too
            from ._compile import config
            super().__setattr__("_op_config", config(self))

    # ------------------------------------------------------------------ parsing and checks
    def _parse(self, args):
        if len(args) == 2:
            x, y = args
            return None, None, x, None, None, y
        if len(args) == 4:
            a, x, b, y = args
            return None, a, x, None, b, y
        if len(args) == 6:
            return args
        raise ValueError("SamplesLoss takes two (x, y), four (a, x, b, y) or six "
                         f"(l_x, a, x, l_y, b, y) arguments, got {len(args)}")

    def _check(self, l_x, a, x, l_y, b, y):
        check_tensor("x", x)
        check_tensor("y", y)
        if x.dim() not in (2, 3):
            raise ValueError(f"x must be (N,D) or (B,N,D), got shape {tuple(x.shape)}")
        if y.dim() != x.dim():
            raise ValueError(f"x and y must both be (N,D) or both (B,N,D), got shapes "
                             f"{tuple(x.shape)} and {tuple(y.shape)}")
        if x.shape[-1] != y.shape[-1]:
            raise ValueError(f"x and y must have the same dimension D, got {x.shape[-1]} and {y.shape[-1]}")
        if x.dtype != y.dtype:
            raise TypeError(f"x and y must have the same dtype, got {x.dtype} and {y.dtype}")
        batched = x.dim() == 3
        if batched and x.shape[0] != y.shape[0]:
            raise ValueError(f"x and y must have the same batch size, got {x.shape[0]} and {y.shape[0]}")
        N, M, D = x.shape[-2], y.shape[-2], x.shape[-1]
        if N == 0 or M == 0:
            raise ValueError(f"empty point cloud: x has {N} points, y has {M}")
        if D == 0:
            raise ValueError("points have dimension D = 0")
        if (a is None) != (b is None):
            raise ValueError("give both weights a and b, or neither")
        shapes = {}
        for name, w, n, cloud in (("a", a, N, "x"), ("b", b, M, "y")):
            if w is None:
                continue
            check_tensor(name, w)
            if w.dtype != x.dtype:
                raise TypeError(f"{name} must have the dtype of the points ({x.dtype}), got {w.dtype}")
            ok = (w.shape in ((n,), (n, 1)) if not batched
                  else w.shape in ((x.shape[0], n), (x.shape[0], n, 1)))
            if not ok:
                want = f"({n},) or ({n},1)" if not batched else f"({x.shape[0]},{n}) or ({x.shape[0]},{n},1)"
                raise ValueError(f"weights {name} have shape {tuple(w.shape)}, expected {want} to match {cloud}")
            shapes[name] = w.shape
        check_same_device(x=x, y=y, a=a, b=b)
        check_finite("x", x)
        check_finite("y", y)
        xb, yb = (x, y) if batched else (x[None], y[None])
        B = xb.shape[0]
        ab = (a.reshape(B, N) if a is not None else torch.full((B, N), 1.0 / N, dtype=x.dtype, device=x.device))
        bb = (b.reshape(B, M) if b is not None else torch.full((B, M), 1.0 / M, dtype=x.dtype, device=x.device))
        if a is not None:
            check_weights("a", ab)
            check_weights("b", bb)
        for name, lab, n in (("l_x", l_x, N), ("l_y", l_y, M)):
            if lab is not None:
                if batched:
                    raise ValueError(f"cluster labels {name} are only defined without batches (geomloss)")
                if not isinstance(lab, torch.Tensor) or lab.numel() != n:
                    raise ValueError(f"cluster labels {name} must be a tensor of {n} labels")
        return batched, shapes, ab, xb, bb, yb

    def _backend(self, B, N, M, D, device, labels):
        name = self.backend
        if name == "multiscale" or labels:
            warnings.warn("otkernels has no multiscale kernel truncation: computing the exact "
                          "(online) value, with no N×M matrix; cluster_scale, truncate and "
                          "cluster labels are ignored", stacklevel=3)
        need_dense = self.kernel is not None and self.loss in ("energy", "gaussian", "laplacian")
        if name == "auto":
            kind = "kernel" if self.loss in ("energy", "gaussian", "laplacian") else "sinkhorn"
            name = backends.select(B, N, M, D, device, need="dense" if need_dense else None, kind=kind)
        elif need_dense and backends.ALIASES.get(name, name) != "tensorized":
            raise ValueError(f"a custom kernel callable runs on backend='tensorized' or 'auto', not {name!r}")
        return backends.get(name)

    # ------------------------------------------------------------------ forward
    def forward(self, *args, x_batch=None, y_batch=None, x_offsets=None, y_offsets=None):
        """``L(x, y)``, ``L(a, x, b, y)``, ``L(l_x, a, x, l_y, b, y)`` as geomloss; and ragged
        batches (an otkernels extension): x (N,D), y (M,D) cut into S segments by sorted
        ``x_batch`` (N,) / ``y_batch`` (M,) segment ids (torch_geometric's convention) or by
        ``x_offsets`` / ``y_offsets`` (S+1,) (``cu_seqlens``), or lists of (n_s, D) clouds (and
        of weights): returns (S,) values, or with ``potentials`` (F, G) laid out like the
        inputs.  Each segment is its own problem (its own diameter and ε-schedule), solved one
        after the other: the results equal a Python loop over the segments."""
        if torch.compiler.is_compiling():  # one custom op in the graph, or one clean graph break
            from . import _compile
            ragged_kw = dict(x_batch=x_batch, y_batch=y_batch, x_offsets=x_offsets, y_offsets=y_offsets)
            ragged_kw = {k: v for k, v in ragged_kw.items() if v is not None}
            if _compile.compilable(self, args, ragged_kw):
                return _compile.call(self, args)
            return _eager(self, args, ragged_kw)
        return self._call(args, x_batch, y_batch, x_offsets, y_offsets)

    def _call(self, args, x_batch=None, y_batch=None, x_offsets=None, y_offsets=None):
        ragged = any(t is not None for t in (x_batch, y_batch, x_offsets, y_offsets))
        with _precision.scope(self.precision):
            if ragged or (args and _clouds_list(args[-1])):
                return self._ragged(args, x_batch, y_batch, x_offsets, y_offsets)
            return self._forward(*args)

    def _ragged(self, args, x_batch, y_batch, x_offsets, y_offsets):
        if len(args) not in (2, 4):
            raise ValueError("ragged batches take (x, y) or (a, x, b, y)")
        a, x, b, y = (None, args[0], None, args[1]) if len(args) == 2 else args
        if isinstance(x, (list, tuple)) or isinstance(y, (list, tuple)):
            if x_batch is not None or y_batch is not None or x_offsets is not None or y_offsets is not None:
                raise ValueError("give lists of clouds or batch vectors / offsets, not both")
            if not (isinstance(x, (list, tuple)) and isinstance(y, (list, tuple))) or len(x) != len(y) or not x:
                raise ValueError("ragged lists: x and y must be non-empty lists of the same length")
            xs, ys = list(x), list(y)
            as_ = list(a) if a is not None else [None] * len(xs)
            bs_ = list(b) if b is not None else [None] * len(ys)
            if len(as_) != len(xs) or len(bs_) != len(ys):
                raise ValueError("ragged lists: one weight vector per cloud")
            cat = False
        else:
            xo = _offsets("x", x, x_batch, x_offsets)
            yo = _offsets("y", y, y_batch, y_offsets)
            if len(xo) != len(yo):
                raise ValueError(f"x has {len(xo) - 1} segments and y {len(yo) - 1}: they must match")
            xs = [x[i:j] for i, j in zip(xo[:-1], xo[1:])]
            ys = [y[i:j] for i, j in zip(yo[:-1], yo[1:])]
            as_ = [None] * len(xs) if a is None else [a[i:j] for i, j in zip(xo[:-1], xo[1:])]
            bs_ = [None] * len(ys) if b is None else [b[i:j] for i, j in zip(yo[:-1], yo[1:])]
            cat = True
        for k, (xk, yk) in enumerate(zip(xs, ys)):
            for name, t in (("x", xk), ("y", yk)):
                if isinstance(t, torch.Tensor) and (t.dim() != 2 or t.shape[0] == 0):
                    raise ValueError(f"ragged segment {k}: {name} must be a non-empty (n, D) cloud, got shape "
                                     f"{tuple(t.shape)}")
        fused = self._ragged_fused(as_, xs, bs_, ys, (a, x, b, y, xo, yo) if cat else None)
        if fused is not None:
            return fused
        outs = [self._forward(xk, yk) if ak is None and bk is None else self._forward(ak, xk, bk, yk)
                for ak, xk, bk, yk in zip(as_, xs, bs_, ys)]
        if not self.potentials:
            return torch.stack(outs)
        F, G = [o[0] for o in outs], [o[1] for o in outs]
        return (torch.cat(F), torch.cat(G)) if cat else (F, G)

    def _ragged_backend(self, x):
        """The backend module when the segments may run in one launch per reduction (Sinkhorn, a
        fused cost, float32/64, a backend with ragged kernels), else None; its
        ``ragged_supported`` has the last word on the tensors."""
        if self.loss != "sinkhorn" or not self.cost.fused or x.dtype not in (torch.float32, torch.float64):
            return None
        if self.backend == "auto":
            name = "triton" if x.device.type == "cuda" else "native"
            if not backends.available().get(name, (False,))[0]:
                return None
        else:
            name = self.backend
        mod = backends.get(name)
        return mod if hasattr(mod, "ragged_handles") else None

    def _ragged_fused(self, as_, xs, bs_, ys, stacked):
        """The segments through :func:`otkernels.ragged.ragged_sinkhorn` (one launch per
        reduction), or None: the loop.  ``stacked``: the caller's ``(a, x, b, y, xo, yo)``, or
        None for lists of clouds."""
        mod = self._ragged_backend(xs[0])
        weighted = as_[0] is not None
        if mod is None or any(w is not None and w.dtype != xs[0].dtype for w in as_ + bs_) \
                or any(t.dtype != xs[0].dtype or t.dim() != 2 or t.shape[-1] != xs[0].shape[-1] for t in xs + ys) \
                or any((w is not None) != weighted or (w is not None and w.numel() != len(t))
                       for w, t in zip(as_ + bs_, xs + ys)):
            return None  # the loop checks each segment and names the problem
        if stacked is None:  # lists of clouds
            x, y = torch.cat(xs), torch.cat(ys)
            a = torch.cat([w.reshape(-1) for w in as_]) if weighted else None
            b = torch.cat([w.reshape(-1) for w in bs_]) if weighted else None
            xo = [0] + torch.tensor([len(t) for t in xs]).cumsum(0).tolist()
            yo = [0] + torch.tensor([len(t) for t in ys]).cumsum(0).tolist()
        else:
            a, x, b, y, xo, yo = stacked
        check_same_device(x=x, y=y, a=a, b=b)
        check_finite("x", x)
        check_finite("y", y)
        if self.sphere:
            x, y = _unit("x", x), _unit("y", y)
        if not mod.ragged_supported(x, y, self.cost):
            return None
        from .ragged import ragged_sinkhorn
        out = ragged_sinkhorn(self, mod.ragged_handles, a, x, xo, b, y, yo, _rho(self.reach, self.p))
        if not self.potentials:
            return out
        F, G = out
        if stacked is not None:
            return (F, G) if a is None else (F.reshape(a.shape), G.reshape(b.shape))
        shape = lambda w, t: (len(t),) if w is None else w.shape  # noqa: E731
        return ([f.reshape(shape(w, t)) for f, w, t in zip(F.split([len(t) for t in xs]), as_, xs)],
                [g.reshape(shape(w, t)) for g, w, t in zip(G.split([len(t) for t in ys]), bs_, ys)])

    def _forward(self, *args):
        l_x, a, x, l_y, b, y = self._parse(args)
        batched, shapes, a, x, b, y = self._check(l_x, a, x, l_y, b, y)
        B, N, M, D = x.shape[0], x.shape[1], y.shape[1], x.shape[2]
        out_dtype = x.dtype
        if x.dtype in (torch.float16, torch.bfloat16):  # compute in float32, return in the input dtype
            a, x, b, y = a.float(), x.float(), b.float(), y.float()
        backend = self._backend(B, N, M, D, x.device, l_x is not None or l_y is not None)
        if self.loss in ("energy", "gaussian", "laplacian"):
            kernel = (CallableKernel(self.kernel, self.blur) if self.kernel is not None
                      else Kernel(self.loss, self.blur))
            if self.cost.builtin and self.kernel is None:
                x, y = _center(x, y)
            values = kernel_loss(backend, a, x, b, y, kernel, potentials=self.potentials)
        else:
            if self.sphere:
                x, y = _unit("x", x), _unit("y", y)
            if self.cost.builtin:
                x, y = _center(x, y)
            if not self.cost.fused and backend.NAME in ("native", "triton", "keops"):
                _warn_tiles(backend.NAME, self.cost)
            diameter = self.diameter if self.diameter is not None else max_diameter(x.detach(), y.detach())
            eps_list = epsilon_schedule(self.p, diameter, self.blur, self.scaling)
            rho = _rho(self.reach, self.p)
            handles = backend.cost_handles(x, y, self.cost, debias=self.debias or self.loss == "hausdorff")
            if self.verbose:  # the schedule, and what the handles store (cache budget)
                print(f"otkernels: {backend.NAME} backend, {len(eps_list)} iterations, blur schedule "
                      + ", ".join(f"{e ** (1 / self.p):.3g}" for e in eps_list)
                      + "\n  " + backends.describe_cache(handles))
            if self.loss == "sinkhorn":
                stop = (Stopping(self.tol, self.max_iter, self.check_every)
                        if self.tol is not None or self.max_iter is not None else None)
                values = sinkhorn(a, b, handles, eps_list, rho=rho, debias=self.debias,
                                  potentials=self.potentials, stop=stop)
                self.last_info = {"annealing": len(eps_list), **(stop.info if stop is not None else {})}
                if self.verbose and stop is not None:
                    print(f"otkernels: early stopping at ε = {eps_list[-1]:.3g}: {stop.info}")
            else:
                values = hausdorff(handles, a, x, b, y, eps_list, potentials=self.potentials)
        return _outputs(values, self.potentials, shapes, batched, out_dtype)

    def extra_repr(self):
        return (f"loss={self.loss!r}, p={self.p}, blur={self.blur}, reach={self.reach}, "
                f"scaling={self.scaling}, debias={self.debias}, backend={self.backend!r}")


def _outputs(values, potentials, shapes, batched, out_dtype):
    """The loop's (B,) values, or (F, G) potentials, in the caller's dtype and layout."""
    if potentials:
        F, G = values
        F = F.to(out_dtype).reshape(shapes.get("a", F.shape if batched else F.shape[1:]))
        G = G.to(out_dtype).reshape(shapes.get("b", G.shape if batched else G.shape[1:]))
        return F, G
    values = values.to(out_dtype)
    return values if batched else values[0]


_WARNED = set()


def _warn_tiles(name, cost):
    """Once per (backend, cost): the fused kernels have p = 1, 2 only; other costs run on torch tiles."""
    key = (name, cost.name)
    if key not in _WARNED:
        _WARNED.add(key)
        what = "a callable cost" if not cost.builtin else f"p={cost.p}"
        warnings.warn(f"backend={name!r} has fused kernels for p=1 and p=2 only: {what} runs on torch tiles "
                      "(the 'blocked' backend: the cost is called on (B,n,D) x (B,m,D) tiles of at most "
                      "2^18 entries, differentiated by autograd; same memory bound)", stacklevel=4)


@torch.compiler.disable
def _eager(loss, args, kwargs):
    """The eager loss inside a compiled model (potentials, callables, ragged batches): one graph break."""
    return loss._call(args, **kwargs)


def _reach(reach):
    """None, a number, or a pair ``(reach_x, reach_y)`` whose items are None or numbers."""
    if isinstance(reach, (tuple, list)):
        if len(reach) != 2:
            raise ValueError(f"reach must be None, a number or a pair (reach_x, reach_y), got {len(reach)} items")
        pair = tuple(check_float_param(f"reach[{i}]", r, allow_none=True) for i, r in enumerate(reach))
        return None if pair == (None, None) else pair
    return check_float_param("reach", reach, allow_none=True)


def _rho(reach, p):
    """ρ = reach^p, per side for a pair (None stays None: a hard marginal)."""
    if isinstance(reach, tuple):
        return tuple(None if r is None else r ** p for r in reach)
    return None if reach is None else reach ** p


def _clouds_list(t):
    """A list / tuple of tensors: ragged clouds (a nested list of numbers is not)."""
    return isinstance(t, (list, tuple)) and len(t) > 0 and all(isinstance(c, torch.Tensor) for c in t)


def _offsets(name, x, batch, offsets, allow_empty=False):
    """Segment boundaries (S+1 ints) of the rows of x (N,D) from a sorted batch vector or offsets.
    ``allow_empty``: segments may be empty (a shard of a ragged batch, otkernels.distributed)."""
    check_tensor(name, x)
    if x.dim() != 2:
        raise ValueError(f"ragged batches: {name} must be (N, D) (all segments stacked), got {tuple(x.shape)}")
    N = x.shape[0]
    if (batch is None) == (offsets is None):
        raise ValueError(f"give exactly one of {name}_batch and {name}_offsets")
    if batch is not None:
        if not isinstance(batch, torch.Tensor) or batch.dtype not in (torch.int32, torch.int64) or tuple(batch.shape) != (N,):
            raise ValueError(f"{name}_batch must be an integer tensor of shape ({N},): one segment id per point")
        batch = batch.cpu()
        if N and (bool((batch[1:] < batch[:-1]).any()) or int(batch[0]) < 0
                  or (not allow_empty and int(batch[0]) != 0)):
            raise ValueError(f"{name}_batch must be sorted " + ("non-negative segment ids" if allow_empty else
                             "and start at 0 (segment ids 0, 0, 1, 1, 1, 2, ...)"))
        counts = torch.bincount(batch)
        if not allow_empty and bool((counts == 0).any()):
            raise ValueError(f"{name}_batch skips segment {int((counts == 0).nonzero()[0])}: every segment needs a point")
        return [0] + torch.cumsum(counts, 0).tolist()
    o = torch.as_tensor(offsets).cpu()
    step = (o[1:] < o[:-1]) if allow_empty else (o[1:] <= o[:-1])
    if o.dim() != 1 or len(o) < 2 or int(o[0]) != 0 or int(o[-1]) != N or bool(step.any()):
        raise ValueError(f"{name}_offsets must be non-decreasing (S+1,) boundaries from 0 to {N}" if allow_empty else
                         f"{name}_offsets must be increasing (S+1,) boundaries from 0 to {N} (empty segments "
                         "are not allowed)")
    return o.tolist()


def _unit(name, x):
    """x / ‖x‖ along the last dim (differentiable); a zero vector has no direction: ValueError."""
    n = x.norm(dim=-1, keepdim=True)
    if bool((n == 0).any()):
        raise ValueError(f"cost='cosine': {name} has zero vectors (no direction); drop them or use another cost")
    return x / n


def _center(x, y):
    """Translate both clouds by their common mean (a constant): built-in costs and kernels are
    translation invariant, and float32 costs lose far less to cancellation near the origin."""
    with torch.no_grad():
        D = x.shape[-1]
        c = torch.cat([x.reshape(-1, D), y.reshape(-1, D)]).mean(0)
    return x - c, y - c
