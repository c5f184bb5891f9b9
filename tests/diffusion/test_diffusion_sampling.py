import inspect
import math

import pytest
import torch

from diffusion.model import Unet
from diffusion.process import GaussianDiffusion, _extract
from diffusion.sample import ddim_sample, ddim_sample_with_ot, ddim_timesteps, ddpm_sample, ot_move
from otkernels import SamplesLoss


@pytest.mark.parametrize("size,mults,attn,channels", [(8, (1, 2), (), 1), (8, (1, 2), (1,), 1),
                                                      (28, (1, 2, 2), (2,), 1), (32, (1, 2, 2), (), 3)])
def test_unet_shapes(size, mults, attn, channels):
    m = Unet(8, mults, channels, resnet_blocks=1, attn_levels=attn, heads=2, dim_head=8)
    x = torch.randn(2, channels, size, size)
    assert m(x, torch.tensor([0, 999])).shape == x.shape


def test_unet_class_conditioning():
    torch.manual_seed(0)
    m = Unet(8, (1, 2), resnet_blocks=1, num_classes=10, cond_drop_prob=0.5).eval()
    x, t = torch.randn(4, 1, 8, 8), torch.full((4,), 10)
    y = torch.tensor([0, 1, 2, 3])
    out_c, out_u = m(x, t, y), m(x, t)
    assert not torch.allclose(out_c, out_u)
    # y=None is the null class; a drop mask of all True is the same thing
    torch.testing.assert_close(m(x, t, y, cond_drop_mask=torch.ones(4, dtype=torch.bool)), out_u)


def test_ddim_eta0_deterministic(tiny_unet):
    model, d = tiny_unet
    noise = torch.randn(6, 1, 8, 8, generator=torch.Generator().manual_seed(1))
    a = ddim_sample(model, d, steps=10, eta=0.0, noise=noise, generator=torch.Generator().manual_seed(2))
    b = ddim_sample(model, d, steps=10, eta=0.0, noise=noise, generator=torch.Generator().manual_seed(3))
    assert torch.equal(a, b)
    c = ddim_sample(model, d, steps=10, eta=1.0, noise=noise, generator=torch.Generator().manual_seed(3))
    assert not torch.equal(a, c)


def test_sampler_shapes_and_ranges(tiny_unet):
    model, d = tiny_unet
    g = torch.Generator().manual_seed(0)
    for x in (ddpm_sample(model, d, (3, 1, 8, 8), generator=g),
              ddim_sample(model, d, (3, 1, 8, 8), steps=7, eta=0.5, generator=g),
              ddim_sample_with_ot(model, d, torch.rand(20, 1, 8, 8) * 2 - 1, (3, 1, 8, 8), steps=5, ot_ref_n=8,
                                  generator=g),
              ddim_sample_with_ot(model, d, torch.rand(20, 1, 8, 8) * 2 - 1, (3, 1, 8, 8), steps=5, ot_ref_n=8,
                                  ot_optimizer="adam", ot_inner_iters=2, ot_first_k=2, generator=g)):
        assert x.shape == (3, 1, 8, 8) and torch.isfinite(x).all()
        assert x.min() >= -1 and x.max() <= 1
    with pytest.raises(ValueError, match="steps"):
        ddim_timesteps(50, 51)


@pytest.mark.parametrize("T,steps,t_start", [(1000, 50, None), (1000, 10, None), (1000, 1, None), (1000, 7, 400),
                                             (50, 20, None), (50, 50, None), (21, 5, 20)])
def test_ddim_timesteps_trailing(T, steps, t_start):
    """Issue 17: k network calls run at k distinct, strictly decreasing timesteps, the first at
    t_start (T−1), the last one stride above 0 (diffusers' "trailing" spacing
    t_i = round(n − i·n/k) − 1, n = t_start + 1), not at t = 0 where a call removes almost nothing
    (0 only when steps > 2n/3)."""
    ts = ddim_timesteps(T, steps, t_start)
    n = T if t_start is None else t_start + 1
    assert len(ts) == len(set(ts)) == steps and ts[0] == n - 1
    assert all(a > b for a, b in zip(ts, ts[1:]))
    assert ts[-1] == math.floor(n / steps + 0.5) - 1 and (ts[-1] > 0 or 3 * steps > 2 * n)
    assert ts == [math.floor(n - i * n / steps + 0.5) - 1 for i in range(steps)]
    assert ddim_timesteps(1000, 50)[:2] == [999, 979] and ddim_timesteps(1000, 50)[-1] == 19


def test_ot_guidance_changes_only_what_it_should(tiny_unet):
    """ot_scale=0 is plain DDIM; a positive scale moves the samples."""
    model, d = tiny_unet
    noise = torch.randn(5, 1, 8, 8, generator=torch.Generator().manual_seed(1))
    ref = torch.rand(30, 1, 8, 8, generator=torch.Generator().manual_seed(2)) * 2 - 1
    plain = ddim_sample(model, d, steps=5, noise=noise)
    zero = ddim_sample_with_ot(model, d, ref, steps=5, ot_scale=0.0, noise=noise)
    torch.testing.assert_close(zero, plain, atol=1e-5, rtol=0)
    moved = ddim_sample_with_ot(model, d, ref, steps=5, ot_scale=0.5, noise=noise)
    assert (moved - plain).abs().max() > 1e-3


def test_ot_move_reduces_sinkhorn():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(40, 1, 4, 4, generator=g)
    ref = torch.randn(50, 1, 4, 4, generator=g) + 1.5
    loss = SamplesLoss("sinkhorn", p=2, blur=0.35)
    before = loss(x.flatten(1), ref.flatten(1)).item()
    for kw in (dict(scale=0.3), dict(optimizer="adam", scale=1.0, lr=0.1, iters=5)):  # Adam step: scale·lr
        after = loss(ot_move(x, ref, loss, **kw).flatten(1), ref.flatten(1)).item()
        assert after < 0.8 * before


def _saturating_case():
    """x̂0 in [-1, 1] and references beyond it: an unclamped step leaves [-1, 1]."""
    g = torch.Generator().manual_seed(0)
    x = torch.rand(16, 1, 4, 4, generator=g) * 2 - 1
    ref = torch.randn(24, 1, 4, 4, generator=g) + 2.0
    return x, ref, SamplesLoss("sinkhorn", p=2, blur=0.35)


@pytest.mark.parametrize("optimizer", ["adam", "sgd"])
def test_ot_move_clamps_after_every_inner_step(optimizer):
    """Issue 17: with ``clip`` x̂0 is in [-1, 1] after every inner step (the prefixes of a
    deterministic run are its steps), and that changes the trajectory, not only the end point:
    clamping once at the end is a different result."""
    x, ref, loss = _saturating_case()
    kw = dict(scale=1.0, optimizer=optimizer, lr=0.5) if optimizer == "adam" else dict(scale=2.0)
    assert ot_move(x, ref, loss, iters=1, **kw).max() > 1  # the references pull past the box
    for k in range(1, 6):
        xk = ot_move(x, ref, loss, iters=k, clip=True, **kw)
        assert xk.min() >= -1 and xk.max() <= 1 and not torch.equal(xk, x)
    once = ot_move(x, ref, loss, iters=5, **kw).clamp(-1, 1)
    assert (ot_move(x, ref, loss, iters=5, clip=True, **kw) - once).abs().max() > 1e-3


def test_ot_move_adam_uses_scale():
    """Issue 17: ot_scale multiplies the Adam step (lr·scale); Adam used to ignore it.  Scale 0
    leaves x̂0 as it was, as for SGD, and the scale-0.5 step is five times the scale-0.1 one
    (a first Adam step moves every coordinate by ≈ lr·scale)."""
    x, ref, loss = _saturating_case()
    step = {sc: ot_move(x, ref, loss, scale=sc, optimizer="adam", lr=0.2) - x for sc in (0.0, 0.1, 0.5)}
    assert torch.equal(step[0.0], torch.zeros_like(x))
    torch.testing.assert_close(step[0.5], 5 * step[0.1], rtol=1e-4, atol=1e-6)
    assert step[0.1].abs().max() == pytest.approx(0.02, rel=1e-3)


def test_ddim_sample_with_ot_p_and_adam(tiny_unet):
    """ot_p reaches the guidance loss (p=1 and p=2 guide differently), and Adam guidance keeps
    samples in [-1, 1]."""
    model, d = tiny_unet
    noise = torch.randn(4, 1, 8, 8, generator=torch.Generator().manual_seed(1))
    ref = torch.rand(30, 1, 8, 8, generator=torch.Generator().manual_seed(2)) * 2 - 1
    out = {p: ddim_sample_with_ot(model, d, ref, steps=4, ot_scale=0.5, ot_p=p, noise=noise,
                                  generator=torch.Generator().manual_seed(3)) for p in (1, 2)}
    assert (out[1] - out[2]).abs().max() > 1e-4
    xa = ddim_sample_with_ot(model, d, ref, steps=4, ot_optimizer="adam", ot_lr=0.5, ot_scale=1.0,
                             ot_inner_iters=3, noise=noise, generator=torch.Generator().manual_seed(3))
    assert xa.abs().max() <= 1 and not torch.equal(xa, out[2])


def test_cli_sample_accepts_the_guidance_flags():
    """Issue 17: ``sample`` takes the OT-guidance flags that ``evaluate`` has."""
    from diffusion.cli import _ot_guidance_kwargs, build_parser

    flags = ["--ot-optimizer", "adam", "--ot-lr", "0.2", "--ot-first-k", "3", "--ot-space", "feature", "--ot-p", "1",
             "--ot-scale", "0.3"]
    for cmd in (["sample", "--ckpt", "c.pt", "--sampler", "ddim-ot"], ["evaluate", "--ckpt", "c.pt", "--ot-guidance"]):
        a = build_parser().parse_args(cmd + flags)
        assert (a.ot_optimizer, a.ot_lr, a.ot_first_k, a.ot_space, a.ot_p) == ("adam", 0.2, 3, "feature", 1)
        kw = _ot_guidance_kwargs(a)
        assert kw["ot_p"] == 1 and kw["ot_optimizer"] == "adam" and kw["ot_scale"] == 0.3
        assert set(kw) <= set(inspect.signature(ddim_sample_with_ot).parameters)
    with pytest.raises(SystemExit):
        build_parser().parse_args(["sample", "--ckpt", "c.pt", "--ot-p", "3"])


# ---------------------------------------------------------------------- samplers against Gaussian data
class GaussianEps(torch.nn.Module):
    """The exact ε-predictor E[ε | x_t] for data x0 ~ N(mu, s²) per pixel (as in test_dpm_ot.py):
    ε̂ = √(1−ᾱ)(x_t − √ᾱ·mu) / (ᾱ s² + 1 − ᾱ), affine in x_t."""

    def __init__(self, diffusion, mu, s):
        super().__init__()
        self.abar, self.mu, self.s = diffusion.alphas_cumprod, mu, s
        self.dummy = torch.nn.Parameter(torch.zeros((), dtype=torch.float64))  # a device for the samplers

    def forward(self, x, t, y=None):
        a = _extract(self.abar, t, x)
        return (1 - a).sqrt() * (x - a.sqrt() * self.mu) / (a * self.s ** 2 + 1 - a)


def _reverse_gaussian(abar, ts, eta, mu, s):
    """Mean and variance of the output of DDIM(η) over timesteps ``ts`` (η = 1 over all T steps
    is DDPM) from x_T ~ N(0, 1), for the exact ε̂ of N(mu, s²) data, written from the papers'
    formulas (not the sampler's code): every step is affine in x plus independent Gaussian noise,
        x' = √ᾱ'·x̂0(x) + √(1−ᾱ'−σ²)·ε̂(x) + σz,  σ² = η²(1−ᾱ')/(1−ᾱ)·(1−ᾱ/ᾱ'),  x̂0 = (x − √(1−ᾱ)ε̂)/√ᾱ
    so the mean and variance follow exactly, m' = K m + c, V' = K² V + σ²."""
    m, V = 0.0, 1.0
    for i, t in enumerate(ts):
        a = abar[t].item()
        a1 = abar[ts[i + 1]].item() if i + 1 < len(ts) else 1.0
        ke = math.sqrt(1 - a) / (a * s * s + 1 - a)  # ε̂ = ke·x + ce
        ce = -ke * math.sqrt(a) * mu
        k0, c0 = (1 - math.sqrt(1 - a) * ke) / math.sqrt(a), -math.sqrt(1 - a) * ce / math.sqrt(a)
        sig2 = eta ** 2 * (1 - a1) / (1 - a) * (1 - a / a1)
        c = math.sqrt(max(1 - a1 - sig2, 0.0))
        K = math.sqrt(a1) * k0 + c * ke
        m, V = K * m + math.sqrt(a1) * c0 + c * ce, K * K * V + sig2
    return m, V


@pytest.mark.parametrize("sampler,steps,eta,spread_loss", [("ddpm", 1000, 1.0, 0.02), ("ddim", 200, 0.0, 0.036),
                                                           ("ddim", 20, 0.0, 0.30), ("ddim", 50, 1.0, 0.21)])
def test_samplers_reproduce_gaussian_data(sampler, steps, eta, spread_loss):
    """With the exact ε̂ of x0 ~ N(mu, s²), DDPM and DDIM samples have the mean and standard
    deviation that the samplers' update rules give (the exact linear-Gaussian recursion
    :func:`_reverse_gaussian`) within 5 standard errors of n = 32768 draws; and that target is
    the data's (mu, s) up to the method's own discretisation error, which the recursion gives
    exactly: the mean within 2e-4, the std low by a fraction ≤ ``spread_loss`` (1.85 % for DDPM
    over T = 1000 steps, 3.5 % for 200 DDIM steps, 29.9 % for 20 DDIM steps, 20.5 % for 50 steps
    at η = 1, on the trailing timesteps of :func:`ddim_timesteps` (3.2 %, 28.8 %, 20.8 % on the
    old linspace to 0 — for this Gaussian the spacing hardly matters): few steps shrink the spread, and the sampled std resolves that — 5 standard errors
    are 2.8 % of s).  mu, s keep every sample inside (−1, 1) (asserted): the final clamp
    changes nothing; clip=False: x̂0 is not clamped either."""
    mu, s, n = 0.1, 0.2, 1 << 15
    d = GaussianDiffusion(1000)
    model = GaussianEps(d, mu, s)
    noise = torch.randn(n // 16, 1, 4, 4, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    g = torch.Generator().manual_seed(1)
    if sampler == "ddpm":
        x = ddpm_sample(model, d, noise=noise, generator=g, clip=False)
        ts = list(range(d.T - 1, -1, -1))
    else:
        x = ddim_sample(model, d, steps=steps, eta=eta, noise=noise, generator=g, clip=False)
        ts = ddim_timesteps(d.T, steps)
    assert x.abs().max().item() < 1, "a sample reached the final clamp"
    m, V = _reverse_gaussian(d.alphas_cumprod, ts, eta, mu, s)
    se_mean, se_std = math.sqrt(V / n), math.sqrt(V / (2 * n))
    assert abs(x.mean().item() - m) < 5 * se_mean, (x.mean().item(), m, se_mean)
    assert abs(x.std().item() - math.sqrt(V)) < 5 * se_std, (x.std().item(), math.sqrt(V), se_std)
    assert abs(m - mu) < 2e-4, m
    assert 0 < 1 - math.sqrt(V) / s <= spread_loss, math.sqrt(V) / s
