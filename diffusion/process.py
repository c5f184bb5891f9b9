"""Gaussian diffusion: β schedules, the forward process q(x_t | x_0), the posterior
q(x_{t-1} | x_t, x_0), conversions between ε, x̂0 and v, and timestep samplers.

Shapes: images ``x`` are ``(B, C, H, W)``; timesteps ``t`` are ``(B,)`` long tensors in
``[0, T)``.  All schedule tables are float64 internally and cast to ``x``'s dtype on use.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

BETA_SCHEDULES = ("linear", "cosine")
OBJECTIVES = ("eps", "x0", "v")
TIMESTEP_SAMPLERS = ("uniform", "quadratic")


def linear_beta_schedule(T: int) -> torch.Tensor:
    """Ho et al. (2020): β from 1e-4 to 0.02 over 1000 steps, rescaled for other T.  (T,)"""
    scale = 1000.0 / T
    return torch.linspace(scale * 1e-4, scale * 0.02, T, dtype=torch.float64)


def cosine_beta_schedule(T: int, s: float = 0.008) -> torch.Tensor:
    """Nichol & Dhariwal (2021): ᾱ(t) = cos²(((t/T)+s)/(1+s)·π/2), β clipped at 0.999.  (T,)"""
    steps = torch.arange(T + 1, dtype=torch.float64) / T
    abar = torch.cos((steps + s) / (1 + s) * math.pi / 2) ** 2
    abar = abar / abar[0]
    return (1 - abar[1:] / abar[:-1]).clamp(0, 0.999)


def _extract(a: torch.Tensor, t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """a[t] reshaped to (B, 1, 1, 1) to broadcast against x, in x's dtype and device."""
    out = a.to(x.device)[t.to(x.device)]
    return out.to(x.dtype).reshape(-1, *([1] * (x.dim() - 1)))


class GaussianDiffusion:
    """The DDPM forward process and the algebra the samplers and losses need.

    ``objective`` says what the network predicts: ``"eps"`` (the noise, default), ``"x0"``
    (the clean image) or ``"v"`` (√ᾱ·ε − √(1−ᾱ)·x0, Salimans & Ho 2022).
    """

    def __init__(self, timesteps: int = 1000, beta_schedule: str = "linear", objective: str = "eps"):
        if beta_schedule not in BETA_SCHEDULES:
            raise ValueError(f"beta_schedule must be one of {BETA_SCHEDULES}, got {beta_schedule!r}")
        if objective not in OBJECTIVES:
            raise ValueError(f"objective must be one of {OBJECTIVES}, got {objective!r}")
        if int(timesteps) < 1:
            raise ValueError(f"timesteps must be >= 1, got {timesteps}")
        self.T = int(timesteps)
        self.beta_schedule, self.objective = beta_schedule, objective
        betas = linear_beta_schedule(self.T) if beta_schedule == "linear" else cosine_beta_schedule(self.T)
        alphas = 1.0 - betas
        abar = torch.cumprod(alphas, 0)
        abar_prev = torch.cat([torch.ones(1, dtype=torch.float64), abar[:-1]])
        self.betas, self.alphas_cumprod, self.alphas_cumprod_prev = betas, abar, abar_prev
        self.sqrt_abar, self.sqrt_one_minus_abar = abar.sqrt(), (1 - abar).sqrt()
        self.sqrt_recip_abar, self.sqrt_recipm1_abar = (1 / abar).sqrt(), (1 / abar - 1).sqrt()
        # posterior q(x_{t-1} | x_t, x0) = N(c0·x0 + ct·x_t, σ̃²)
        self.posterior_variance = betas * (1 - abar_prev) / (1 - abar)
        self.posterior_log_variance = torch.log(torch.cat([self.posterior_variance[1:2], self.posterior_variance[1:]]))
        self.posterior_mean_coef1 = betas * abar_prev.sqrt() / (1 - abar)
        self.posterior_mean_coef2 = (1 - abar_prev) * alphas.sqrt() / (1 - abar)

    # ------------------------------------------------------------------ forward process
    def q_sample(self, x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """x_t = √ᾱ_t·x0 + √(1−ᾱ_t)·ε.  (B,C,H,W)"""
        return _extract(self.sqrt_abar, t, x0) * x0 + _extract(self.sqrt_one_minus_abar, t, x0) * noise

    def predict_start_from_noise(self, x_t, t, noise):
        """x̂0 = (x_t − √(1−ᾱ_t)·ε) / √ᾱ_t."""
        return _extract(self.sqrt_recip_abar, t, x_t) * x_t - _extract(self.sqrt_recipm1_abar, t, x_t) * noise

    def predict_noise_from_start(self, x_t, t, x0):
        """ε = (x_t/√ᾱ_t − x̂0) / √(1/ᾱ_t − 1)."""
        return (_extract(self.sqrt_recip_abar, t, x_t) * x_t - x0) / _extract(self.sqrt_recipm1_abar, t, x_t)

    def predict_v(self, x0, t, noise):
        """v = √ᾱ_t·ε − √(1−ᾱ_t)·x0."""
        return _extract(self.sqrt_abar, t, x0) * noise - _extract(self.sqrt_one_minus_abar, t, x0) * x0

    def predict_start_from_v(self, x_t, t, v):
        """x0 = √ᾱ_t·x_t − √(1−ᾱ_t)·v."""
        return _extract(self.sqrt_abar, t, x_t) * x_t - _extract(self.sqrt_one_minus_abar, t, x_t) * v

    def q_posterior(self, x0, x_t, t):
        """Mean, variance and log-variance of q(x_{t-1} | x_t, x0), each broadcastable to x_t."""
        mean = _extract(self.posterior_mean_coef1, t, x_t) * x0 + _extract(self.posterior_mean_coef2, t, x_t) * x_t
        return mean, _extract(self.posterior_variance, t, x_t), _extract(self.posterior_log_variance, t, x_t)

    # ------------------------------------------------------------------ model outputs
    def target(self, x0, t, noise):
        """What the network is trained to output for ``objective``."""
        if self.objective == "eps":
            return noise
        if self.objective == "x0":
            return x0
        return self.predict_v(x0, t, noise)

    def split_output(self, out, x_t, t, clip: bool = False):
        """Network output → (ε̂, x̂0); with ``clip`` x̂0 is clamped to [-1, 1] and ε̂ recomputed."""
        if self.objective == "eps":
            eps, x0 = out, self.predict_start_from_noise(x_t, t, out)
        elif self.objective == "x0":
            x0, eps = out, self.predict_noise_from_start(x_t, t, out)
        else:
            x0 = self.predict_start_from_v(x_t, t, out)
            eps = self.predict_noise_from_start(x_t, t, x0)
        if clip:
            x0 = x0.clamp(-1, 1)
            eps = self.predict_noise_from_start(x_t, t, x0)
        return eps, x0

    def model_predictions(self, model, x_t, t, y=None, guidance_scale: float = 1.0, clip: bool = False):
        """(ε̂, x̂0) from ``model(x_t, t, y)``; classifier-free guidance when ``guidance_scale != 1``
        (out = out_uncond + s·(out_cond − out_uncond), needs a class-conditional model and y)."""
        if y is not None and guidance_scale != 1.0:
            both = model(torch.cat([x_t, x_t]), torch.cat([t, t]), torch.cat([y, y]),
                         cond_drop_mask=torch.cat([torch.zeros_like(y, dtype=torch.bool),
                                                   torch.ones_like(y, dtype=torch.bool)]))
            cond, uncond = both.chunk(2)
            out = uncond + guidance_scale * (cond - uncond)
        else:
            out = model(x_t, t, y)
        return self.split_output(out, x_t, t, clip=clip)

    def training_loss(self, model, x0, t, noise, y=None):
        """MSE between the network output and its target, and x̂0 (for extra losses).
        Returns (loss scalar, x̂0 (B,C,H,W) carrying gradients to the model)."""
        x_t = self.q_sample(x0, t, noise)
        out = model(x_t, t, y)
        loss = F.mse_loss(out.float(), self.target(x0, t, noise).float())
        _, x0_hat = self.split_output(out, x_t, t)
        return loss, x0_hat

    # ------------------------------------------------------------------ timesteps
    def sample_timesteps(self, n: int, sampler: str = "uniform", device=None, generator=None) -> torch.Tensor:
        """(n,) long timesteps on [0, T): see :func:`sample_timesteps`."""
        return sample_timesteps(self.T, n, sampler, device, generator)


def sample_timesteps(T: int, n: int, sampler: str = "uniform", device=None, generator=None) -> torch.Tensor:
    """(n,) long timesteps: ``"uniform"`` on [0, T), or ``"quadratic"`` t = ⌊T·u²⌋
    (density ∝ 1/√t: more weight on small t, where detail is decided)."""
    if sampler not in TIMESTEP_SAMPLERS:
        raise ValueError(f"timestep sampler must be one of {TIMESTEP_SAMPLERS}, got {sampler!r}")
    if sampler == "uniform":
        return torch.randint(0, T, (n,), device=device, generator=generator)
    u = torch.rand(n, device=device, generator=generator)
    return (u * u * T).long().clamp_(0, T - 1)
