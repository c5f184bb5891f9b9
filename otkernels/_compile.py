"""``SamplesLoss`` inside ``torch.compile``: one custom op, no graph break.

Under ``torch.compile`` (``torch.compiler.is_compiling()``), a call ``L(x, y)`` or
``L(a, x, b, y)`` becomes the custom op ``otkernels::samples_loss``: TorchDynamo sees one opaque
node with a fake-tensor implementation (output shapes only), so ``fullgraph=True`` works and
the model around the loss compiles into one graph.  The op runs the eager loss (any backend,
its ``.item()`` reads of the diameter and stopping test included: they happen inside the op,
not in the traced graph) and, when an input needs a gradient, the gradients of the value in
the same call — the envelope gradients the eager backward would give.  Its registered
backward multiplies them by the incoming gradient.

Not through the op (a graph break, then the eager loss: same values and gradients):
``potentials=True``, a callable ``cost``/``kernel``, cluster labels, ragged batches.  A
gradient of the compiled loss is not differentiable again: a double backward raises (torch's
"does not currently support double backward", or this module's NotImplementedError).  CUDA graphs:
the op synchronises (the diameter, the stopping test): not capturable.
"""
from __future__ import annotations

import json

import torch

_OP = "otkernels::samples_loss"


def config(loss) -> str:
    """The constructor arguments of a compilable SamplesLoss, as JSON (a custom op takes str;
    computed at construction: JSON is not traceable)."""
    return json.dumps(dict(loss=loss.loss, p=loss.p, blur=loss.blur, reach=loss.reach, diameter=loss.diameter,
                           scaling=loss.scaling, cost="cosine" if loss.sphere else None, debias=loss.debias,
                           backend=loss.backend, precision=loss.precision, tol=loss.tol, max_iter=loss.max_iter,
                           check_every=loss.check_every, truncate=loss.truncate))


def compilable(loss, args, kwargs) -> bool:
    """True when ``loss(*args, **kwargs)`` can run as the custom op."""
    return (len(args) in (2, 4) and not kwargs and not loss.potentials and loss.kernel is None
            and (loss.cost.builtin or loss.sphere) and all(isinstance(t, torch.Tensor) for t in args))


def _autograd_on():
    """A custom op's implementation runs below the autograd dispatch keys; the loss's own
    backward (the envelope gradients) needs them: lift that exclusion for the op's body."""
    K = torch._C.DispatchKey
    exclude = torch._C._dispatch_tls_local_exclude_set()
    for key in (K.AutogradFunctionality, K.AutogradOther, K.ADInplaceOrView):
        exclude = exclude.remove(key)
    return torch._C._ForceDispatchKeyGuard(torch._C._dispatch_tls_local_include_set(), exclude)


@torch.library.custom_op(_OP, mutates_args=())
def samples_loss(x: torch.Tensor, y: torch.Tensor, a: torch.Tensor, b: torch.Tensor, config: str,
                 need_grad: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(value (B,) or (), ∂value/∂x, ∂/∂y, ∂/∂a, ∂/∂b): zeros when ``need_grad`` is False.
    a, b: the weights (uniform when the call had none)."""
    from .samples_loss import SamplesLoss

    L = SamplesLoss(**json.loads(config))
    with _autograd_on(), torch.enable_grad():
        leaves = [t.detach().requires_grad_(need_grad) for t in (x, y, a, b)]
        value = L(leaves[2], leaves[0], leaves[3], leaves[1])
        if need_grad:  # the value of batch k depends on batch k's inputs only: one backward for all
            grads = torch.autograd.grad(value.sum(), leaves, allow_unused=True)
            grads = [torch.zeros_like(t) if g is None else g for g, t in zip(grads, leaves)]
        else:
            grads = [torch.zeros_like(t) for t in leaves]
    return (value.detach(), *grads)


@samples_loss.register_fake
def _(x, y, a, b, config, need_grad):
    value = x.new_empty(x.shape[:1] if x.dim() == 3 else ())
    return value, torch.empty_like(x), torch.empty_like(y), torch.empty_like(a), torch.empty_like(b)


def _setup(ctx, inputs, output):
    ctx.save_for_backward(*output[1:], *inputs[:4])


def _backward(ctx, g_value, *_):
    """The saved gradients of x, y, a, b times the incoming (B,) or () gradient (:func:`scaled`)."""
    return (*scaled(g_value, *ctx.saved_tensors), None, None)


samples_loss.register_autograd(_backward, setup_context=_setup)


@torch.library.custom_op("otkernels::samples_loss_backward", mutates_args=())
def scaled(g: torch.Tensor, gx: torch.Tensor, gy: torch.Tensor, ga: torch.Tensor, gb: torch.Tensor, x: torch.Tensor,
           y: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor,
                                                                       torch.Tensor]:
    """The backward of :func:`samples_loss`: gx, gy, ga, gb times g (B,) or (), broadcast.  x, y,
    a, b are inputs (unread) so that a gradient of these gradients (double backward) reaches
    this op and raises: the saved gradients are constants, and without that link AOTAutograd
    would return the second derivative without the loss's terms, silently."""
    return tuple(g.reshape(g.shape + (1,) * (t.dim() - g.dim())) * t for t in (gx, gy, ga, gb))


@scaled.register_fake
def _(g, gx, gy, ga, gb, x, y, a, b):
    return tuple(torch.empty_like(t) for t in (gx, gy, ga, gb))


def _no_double_backward(ctx, *grads):
    raise NotImplementedError(
        "otkernels: double backward (a gradient of the gradient, e.g. a gradient penalty) through SamplesLoss "
        "inside torch.compile is not supported; call the loss outside the compiled region "
        "(torch.compiler.disable) for higher-order derivatives")


scaled.register_autograd(_no_double_backward)


def call(loss, args):
    """``loss(*args)`` through the custom op (args: (x, y) or (a, x, b, y))."""
    if len(args) == 2:
        (x, y), a, b = args, None, None
    else:
        a, x, b, y = args
    need = any(t is not None and t.requires_grad for t in (x, y, a, b)) and torch.is_grad_enabled()
    if a is None:  # uniform weights, as the eager loss
        n, m = x.shape[-2], y.shape[-2]
        a = torch.full(x.shape[:-1], 1.0 / n, dtype=x.dtype, device=x.device)
        b = torch.full(y.shape[:-1], 1.0 / m, dtype=y.dtype, device=y.device)
    return samples_loss(x, y, a, b, loss._op_config, need)[0]
