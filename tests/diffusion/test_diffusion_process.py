import pytest
import torch

from diffusion.process import GaussianDiffusion, cosine_beta_schedule, linear_beta_schedule


@pytest.mark.parametrize("schedule", ["linear", "cosine"])
def test_schedule_identities(schedule):
    d = GaussianDiffusion(1000, schedule)
    g = torch.Generator().manual_seed(0)
    x0 = torch.rand(16, 1, 8, 8, generator=g, dtype=torch.float64) * 2 - 1
    eps = torch.randn(x0.shape, generator=g, dtype=torch.float64)
    t = torch.tensor([0, 1, 2, 10, 100, 250, 500, 750, 900, 990, 998, 999, 0, 5, 50, 999])
    xt = d.q_sample(x0, t, eps)
    torch.testing.assert_close(d.predict_start_from_noise(xt, t, eps), x0, rtol=0, atol=1e-9)
    torch.testing.assert_close(d.predict_noise_from_start(xt, t, x0), eps, rtol=0, atol=1e-9)
    v = d.predict_v(x0, t, eps)
    torch.testing.assert_close(d.predict_start_from_v(xt, t, v), x0, rtol=0, atol=1e-9)
    # the posterior mean with the true x0 is E[x_{t-1} | x_t, x0]; its variance is β̃_t
    mean, var, log_var = d.q_posterior(x0, xt, t)
    abar, abar_prev = d.alphas_cumprod[t], d.alphas_cumprod_prev[t]
    ref_var = (1 - abar_prev) / (1 - abar) * d.betas[t]
    torch.testing.assert_close(var.flatten(), ref_var)
    assert torch.isfinite(log_var).all()
    assert torch.all(d.alphas_cumprod[1:] < d.alphas_cumprod[:-1])


@pytest.mark.parametrize("objective", ["eps", "x0", "v"])
def test_split_output_consistent(objective):
    """Feeding the exact target gives back the true (ε, x0) for every objective."""
    d = GaussianDiffusion(100, "linear", objective)
    x0 = torch.rand(8, 1, 4, 4, dtype=torch.float64) * 2 - 1
    eps = torch.randn_like(x0)
    t = torch.randint(0, 100, (8,))
    xt = d.q_sample(x0, t, eps)
    e, x = d.split_output(d.target(x0, t, eps), xt, t)
    torch.testing.assert_close(x, x0)
    torch.testing.assert_close(e, eps)


def test_beta_schedules():
    b = linear_beta_schedule(1000)
    assert b[0] == pytest.approx(1e-4) and b[-1] == pytest.approx(0.02)
    c = cosine_beta_schedule(1000)
    assert c.shape == (1000,) and (c > 0).all() and (c <= 0.999).all()
    assert linear_beta_schedule(100)[-1] == pytest.approx(0.2)  # rescaled for shorter T


def test_timestep_samplers():
    d = GaussianDiffusion(1000)
    g = torch.Generator().manual_seed(0)
    u = d.sample_timesteps(20000, "uniform", generator=g)
    q = d.sample_timesteps(20000, "quadratic", generator=g)
    assert u.min() >= 0 and u.max() < 1000 and q.min() >= 0 and q.max() < 1000
    assert (q < 250).float().mean() > 0.45 > (u < 250).float().mean()  # P(t < T/4) = 1/2 vs 1/4
    with pytest.raises(ValueError, match="timestep sampler"):
        d.sample_timesteps(4, "cubic")


def test_bad_process_arguments():
    with pytest.raises(ValueError, match="beta_schedule"):
        GaussianDiffusion(1000, "sigmoid")
    with pytest.raises(ValueError, match="objective"):
        GaussianDiffusion(1000, objective="score")
