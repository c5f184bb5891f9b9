"""Samplers: DDPM ancestral, DDIM (Song et al. 2021; from any ``t_start``), its deterministic
inversion, and OT-guided DDIM.  DPM-OT (OT map from noise to data latents + a few DDIM steps)
is in :mod:`diffusion.dpm_ot`.

All take a trained ε-network ``model(x, t, y)`` and a :class:`GaussianDiffusion`, start from
``noise`` (B,C,H,W) (or draw it from ``generator``), and return images (B,C,H,W) in [-1, 1].
Class-conditional models take ``y`` (B,) and a classifier-free ``guidance_scale``.
"""
from __future__ import annotations

import hashlib
import operator

import torch

from otkernels import SamplesLoss

from .process import GaussianDiffusion, _extract


def _start(shape, noise, generator, device):
    if noise is not None:
        return noise.to(device).clone()
    return torch.randn(shape, generator=generator, device="cpu").to(device)


def _device(model):
    return next(model.parameters()).device


@torch.no_grad()
def ddpm_sample(model, diffusion: GaussianDiffusion, shape=None, noise=None, y=None, guidance_scale: float = 1.0,
                generator: torch.Generator | None = None, clip: bool = True) -> torch.Tensor:
    """Ancestral sampling through all T steps: x_{t-1} ~ q(x_{t-1} | x_t, x̂0(x_t))."""
    dev = _device(model)
    x = _start(shape, noise, generator, dev)
    for i in reversed(range(diffusion.T)):
        t = torch.full((x.shape[0],), i, device=dev, dtype=torch.long)
        _, x0 = diffusion.model_predictions(model, x, t, y, guidance_scale, clip=clip)
        mean, _, log_var = diffusion.q_posterior(x0, x, t)
        z = torch.randn(x.shape, generator=generator).to(dev) if i > 0 else torch.zeros_like(x)
        x = mean + (0.5 * log_var).exp() * z
    return x.clamp(-1, 1)


def _as_int(v, name):
    if isinstance(v, bool):
        raise TypeError(f"{name} must be an int, got {v!r}")
    try:
        return operator.index(v)
    except TypeError:
        raise TypeError(f"{name} must be an int, got {type(v).__name__} {v!r}") from None


def ddim_timesteps(T: int, steps: int, t_start: int | None = None) -> list[int]:
    """``steps`` strictly decreasing timesteps, one network evaluation each, with the
    "trailing" spacing of common DDIM samplers (diffusers' ``timestep_spacing="trailing"``):
    with n = t_start + 1 (default T), t_i = round(n − i·n/steps) − 1 for i = 0..steps−1, so the
    first is ``t_start`` and the last is one stride above 0 (round(n/steps) − 1; 0 only when
    steps > 2n/3) and the last step goes from it to the clean image.  (A linspace down to 0 spent
    its last evaluation at t = 0, where it removes almost nothing: issue 17.)  ``t_start`` is an
    index of the schedule tables (x_t has ᾱ[t_start]), so at most t_start + 1 distinct steps
    fit.  Rounding is half up, in integers."""
    t_start = T - 1 if t_start is None else _as_int(t_start, "t_start")
    if not 0 <= t_start < T:
        raise ValueError(f"t_start must be in [0, T-1={T - 1}], got {t_start}")
    steps = _as_int(steps, "steps")
    if not 1 <= steps <= t_start + 1:
        raise ValueError(f"steps must be in [1, t_start+1={t_start + 1}] (T={T}), got {steps}")
    n = t_start + 1
    return [(2 * n * (steps - i) + steps) // (2 * steps) - 1 for i in range(steps)]


def _ddim_step(diffusion, x, t, t_prev, x0, eps, eta, generator):
    """x_{t_prev} from (x̂0, ε̂): √ᾱ'·x̂0 + √(1−ᾱ'−σ²)·ε̂ + σ·z, σ = η·√((1−ᾱ')/(1−ᾱ)·(1−ᾱ/ᾱ'))."""
    abar = _extract(diffusion.alphas_cumprod, t, x)
    abar_prev = _extract(diffusion.alphas_cumprod, t_prev, x) if t_prev[0] >= 0 else torch.ones_like(abar)
    sigma = eta * ((1 - abar_prev) / (1 - abar) * (1 - abar / abar_prev)).clamp(min=0).sqrt()
    x = abar_prev.sqrt() * x0 + (1 - abar_prev - sigma ** 2).clamp(min=0).sqrt() * eps
    if eta > 0 and t_prev[0] >= 0:
        x = x + sigma * torch.randn(x.shape, generator=generator).to(x.device)
    return x


@torch.no_grad()
def ddim_sample(model, diffusion: GaussianDiffusion, shape=None, steps: int = 50, eta: float = 0.0, noise=None,
                y=None, guidance_scale: float = 1.0, generator: torch.Generator | None = None,
                clip: bool = True, t_start: int | None = None) -> torch.Tensor:
    """DDIM with ``steps`` steps (= network evaluations); ``eta=0`` is deterministic given the
    noise, ``eta=1`` ~ DDPM.  ``t_start``: begin at that timestep instead of T-1, with
    ``noise`` the latent x_{t_start} (not white noise then), as SDEdit / DPM-OT do."""
    dev = _device(model)
    x = _start(shape, noise, generator, dev)
    ts = ddim_timesteps(diffusion.T, steps, t_start)
    for i, s in enumerate(ts):
        t = torch.full((x.shape[0],), s, device=dev, dtype=torch.long)
        t_prev = torch.full_like(t, ts[i + 1] if i + 1 < len(ts) else -1)
        eps, x0 = diffusion.model_predictions(model, x, t, y, guidance_scale, clip=clip)
        x = _ddim_step(diffusion, x, t, t_prev, x0, eps, eta, generator)
    return x.clamp(-1, 1)


@torch.no_grad()
def ddim_invert(model, diffusion: GaussianDiffusion, x0: torch.Tensor, t_start: int, steps: int = 10, y=None,
                clip: bool = False) -> torch.Tensor:
    """Deterministic DDIM inversion (η = 0) of images x0 (B,C,H,W) to x_{t_start}: the DDIM
    update run upward along the reversed timesteps of ``ddim_timesteps(T, steps, t_start)``,
    ``steps`` network evaluations, ε̂ taken at the point the step leaves (at the clean image:
    ε̂(x0, t=0)).  ``ddim_sample(..., t_start=t_start, steps=steps, eta=0)`` from the result
    returns ≈ x0, exactly in the limit of small steps (the probability-flow ODE's two ways);
    the error of a few steps is the ODE discretisation's.  ``clip``: clamp x̂0 to [-1, 1] on
    the way (off by default: the inverse should not saturate)."""
    dev = _device(model)
    x = x0.to(dev).clone()
    ts = ddim_timesteps(diffusion.T, steps, t_start)[::-1]  # t_{k-1}, ..., t_start
    src = [0] + ts[:-1]  # timestep at which ε̂ of the point being left is evaluated (clean image: 0)
    for s_from, s_to in zip(src, ts):
        t = torch.full((x.shape[0],), s_from, device=dev, dtype=torch.long)
        eps, x0_hat = diffusion.model_predictions(model, x, t, y, clip=clip)
        abar_to = _extract(diffusion.alphas_cumprod, torch.full_like(t, s_to), x)
        x = abar_to.sqrt() * x0_hat + (1 - abar_to).sqrt() * eps
    return x


def ot_move(x0: torch.Tensor, ref: torch.Tensor, loss: SamplesLoss, scale: float = 0.1, iters: int = 1,
            optimizer: str = "sgd", lr: float = 0.05, feature_fn=None, clip: bool = False) -> torch.Tensor:
    """Move x̂0 (B,C,H,W) toward the reference images ref (M,C,H,W) by reducing ``loss``
    between them (flattened, or through ``feature_fn``).

    ``optimizer="sgd"``: ``iters`` steps x ← x − scale·B·∇L.  With p=2 and uniform weights
    B·∇_{x_i}L ≈ x_i − T(x_i) (T the entropic transport map), so ``scale`` is the fraction of
    the way to the matched reference.  ``optimizer="adam"``: ``iters`` Adam steps of learning
    rate ``scale·lr`` (Adam's step does not depend on the gradient's scale, so ``scale``
    multiplies the step instead; ``scale=0`` leaves x̂0 unchanged for both optimizers; the
    Adam of before issue 17, which ignored ``scale``, is ``scale=1``).  ``clip``: clamp x to
    [-1, 1] after every step (the next gradient is taken at the clamped point)."""
    if optimizer not in ("sgd", "adam"):
        raise ValueError(f"optimizer must be 'sgd' or 'adam', got {optimizer!r}")
    B = x0.shape[0]
    y = ref if feature_fn is None else feature_fn(ref)
    y = y.reshape(len(y), -1).detach()
    x = x0.detach().clone()
    if clip:
        x = x.clamp(-1, 1)
    x.requires_grad_(True)
    opt = torch.optim.Adam([x], lr=scale * lr) if optimizer == "adam" else None
    for _ in range(iters):
        with torch.enable_grad():
            fx = x if feature_fn is None else feature_fn(x)
            L = loss(fx.reshape(B, -1).float(), y.float())
            (g,) = torch.autograd.grad(L, x)
        if opt is None:
            x = (x - scale * B * g).detach()
            if clip:
                x = x.clamp(-1, 1)
            x.requires_grad_(True)
        else:
            x.grad = g
            opt.step()
            if clip:
                with torch.no_grad():
                    x.clamp_(-1, 1)
    return x.detach()


OT_UNITS = ("minibatch", "all")


def _ref_generator(base: int, step: int, group: int) -> torch.Generator:
    """The generator of the references of (``step``, ``group``) under the call's ``base`` seed."""
    h = hashlib.blake2b(f"{base}/{step}/{group}".encode(), digest_size=8).digest()
    return torch.Generator().manual_seed(int.from_bytes(h, "little") & ((1 << 63) - 1))


@torch.no_grad()
def ddim_sample_with_ot(model, diffusion: GaussianDiffusion, ref: torch.Tensor, shape=None, steps: int = 50,
                        ot_scale: float = 0.1, ot_ref_n: int = 128, ot_inner_iters: int = 1, eta: float = 0.0,
                        ot_blur: float = 0.35, ot_p: int = 2, ot_optimizer: str = "sgd", ot_lr: float = 0.05,
                        ot_first_k: int | None = None, feature_fn=None, noise=None, y=None,
                        guidance_scale: float = 1.0, generator: torch.Generator | None = None,
                        ot_unit: str = "minibatch", ot_group_offset: int = 0) -> torch.Tensor:
    """DDIM in which each step's x̂0 is moved toward fresh real images from ``ref`` (M,C,H,W) by
    reducing the Sinkhorn loss (see :func:`ot_move`), clipped to [-1, 1] after every inner
    step; ε is recomputed from the moved x̂0 before the DDIM update.  ``ot_p``: the exponent
    of the Sinkhorn cost |x − y|^p (1 or 2).  ``ot_first_k``: guide only the first k steps
    (None: all).  ``feature_fn``: measure the loss in that space (e.g. the guide feature net's
    ``embed``) instead of pixels.

    ``ot_unit``, the unit of guidance (what is balanced against what at each step):

    * ``"minibatch"`` (default): the samples are split into consecutive groups of ``ot_ref_n``
      (the last may be smaller), and each group is balanced against its own fresh draw of as
      many references as it has samples.  The draw of group j at step i comes from a generator
      seeded by (a base seed drawn once per call from ``generator``, i, j + ``ot_group_offset``),
      so with η = 0 the result does not depend on how a caller splits one set of samples
      across calls, as long as every call but the last has a multiple of ``ot_ref_n`` samples
      and passes ``ot_group_offset`` = the number of groups before it (and the same
      ``generator`` seed).  (Before issue 17 all samples of the call were balanced against
      ``ot_ref_n`` references: the result depended on the sampling batch size.)
    * ``"all"``: all samples of the call against one fresh reference set of the same size
      (``len(x)``, at most M) per step; ``ot_ref_n`` is ignored.  The unit is the call: pass all
      samples in one call."""
    if ot_unit not in OT_UNITS:
        raise ValueError(f"ot_unit must be one of {OT_UNITS}, got {ot_unit!r}")
    ot_ref_n = _as_int(ot_ref_n, "ot_ref_n")
    if ot_unit == "minibatch" and ot_ref_n < 1:
        raise ValueError(f"ot_ref_n must be >= 1, got {ot_ref_n}")
    dev = _device(model)
    x = _start(shape, noise, generator, dev)
    ref = ref.to(dev)
    loss = SamplesLoss("sinkhorn", p=ot_p, blur=ot_blur)
    base = int(torch.randint(0, 1 << 62, (1,), generator=generator).item())
    B = x.shape[0]
    group = B if ot_unit == "all" else ot_ref_n
    ts = ddim_timesteps(diffusion.T, steps)
    for i, s in enumerate(ts):
        t = torch.full((B,), s, device=dev, dtype=torch.long)
        t_prev = torch.full_like(t, ts[i + 1] if i + 1 < len(ts) else -1)
        eps, x0 = diffusion.model_predictions(model, x, t, y, guidance_scale, clip=True)
        if ot_first_k is None or i < ot_first_k:
            moved = []
            for j, g0 in enumerate(range(0, B, group)):
                xg = x0[g0:g0 + group]
                pick = torch.randperm(len(ref), generator=_ref_generator(base, i, ot_group_offset + j))[:len(xg)]
                moved.append(ot_move(xg, ref[pick.to(dev)], loss, ot_scale, ot_inner_iters, ot_optimizer, ot_lr,
                                     feature_fn, clip=True))
            x0 = torch.cat(moved)
            eps = diffusion.predict_noise_from_start(x, t, x0)
        x = _ddim_step(diffusion, x, t, t_prev, x0, eps, eta, generator)
    return x.clamp(-1, 1)


SAMPLERS = ("ddpm", "ddim", "ddim-ot")
