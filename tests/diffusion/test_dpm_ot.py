"""DPM-OT: latents, DDIM inversion, the OT map, sampling, NFE count, persistence, errors."""
import math

import pytest
import torch

from diffusion.data import load_data
from diffusion.dpm_ot import DPMOTSampler, dpm_ot_latents
from diffusion.process import GaussianDiffusion, _extract
from diffusion.sample import ddim_invert, ddim_sample, ddim_timesteps
from diffusion.train import build_model


class GaussianEps(torch.nn.Module):
    """The exact ε-predictor E[ε | x_t] for data x0 ~ N(mu, s² I):
    ε̂ = √(1−ᾱ)(x_t − √ᾱ·mu) / (ᾱ s² + 1 − ᾱ).  Its probability-flow ODE is known in closed
    form: with x̄ = x/√ᾱ and σ² = (1−ᾱ)/ᾱ, x̄(σ) − mu = (x0 − mu)·√(s² + σ²)/s."""

    def __init__(self, diffusion, mu=0.1, s=0.3):
        super().__init__()
        self.abar = diffusion.alphas_cumprod
        self.mu, self.s = mu, s
        self.dummy = torch.nn.Parameter(torch.zeros(()))  # a device for the samplers

    def forward(self, x, t, y=None):
        a = _extract(self.abar, t, x)
        return (1 - a).sqrt() * (x - a.sqrt() * self.mu) / (a * self.s ** 2 + 1 - a)

    def ode_latent(self, x0, t):
        a = self.abar[t].item()
        sig2 = (1 - a) / a
        return math.sqrt(a) * (self.mu + (x0 - self.mu) * math.sqrt(self.s ** 2 + sig2) / self.s)


class Counting(torch.nn.Module):
    """Counts the network evaluations (forward calls) of the wrapped model."""

    def __init__(self, model):
        super().__init__()
        self.model, self.calls = model, 0

    def forward(self, x, t, y=None, **kw):
        self.calls += 1
        return self.model(x, t, y, **kw)


def _other_model(model):
    """A model of the same architecture with other (fresh random) weights."""
    return type(model)(8, (1, 2), 1, resnet_blocks=1).eval()


@pytest.fixture
def tiny(tiny_cfg):
    """An untrained tiny UNet (T=50) and 24 digits images: enough for the mechanics."""
    torch.manual_seed(0)
    data = load_data(tiny_cfg.dataset, None, False, tiny_cfg.n_train, tiny_cfg.n_test, tiny_cfg.seed)
    model = build_model(tiny_cfg, 1).eval().requires_grad_(False)
    return model, GaussianDiffusion(tiny_cfg.timesteps), data.x_train[:24]


@pytest.fixture
def fitted(tiny):
    model, d, x0 = tiny
    return DPMOTSampler(model, d, x0, t_start=30, method="q", seed=1).fit(tol=0.1, progress=False)


# ---------------------------------------------------------------------- latents
def test_q_latents_shape_and_marginal():
    d = GaussianDiffusion(1000)
    x0 = torch.full((2000, 1, 8, 8), 0.5)
    t = 400
    lat = dpm_ot_latents(None, d, x0, t, method="q", generator=torch.Generator().manual_seed(0))
    assert lat.shape == x0.shape
    a = d.alphas_cumprod[t].item()
    assert lat.mean().item() == pytest.approx(math.sqrt(a) * 0.5, abs=0.01)
    assert lat.std().item() == pytest.approx(math.sqrt(1 - a), rel=0.01)
    # given noise: exactly the forward process
    noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(dpm_ot_latents(None, d, x0, t, method="q", noise=noise),
                               math.sqrt(a) * x0 + math.sqrt(1 - a) * noise)


def test_q_latent_noise_is_not_the_sampling_stream(tiny):
    """Sampling noise drawn from the sampler's own seed must not be the latents' noise (else z_i
    lands in latent i's cell and every sample re-decodes its own training latent)."""
    model, d, x0 = tiny
    s = DPMOTSampler(model, d, x0, t_start=30, method="q", seed=0)
    a = d.alphas_cumprod[30].item()
    eps = (s.latents - math.sqrt(a) * s.x0) / math.sqrt(1 - a)
    z = torch.randn(x0.shape, generator=torch.Generator().manual_seed(0))
    assert (eps - z).abs().max() > 0.5
    assert abs(eps.mean().item()) < 0.1 and eps.std().item() == pytest.approx(1, abs=0.1)


def test_ddim_inversion_matches_the_closed_form_ode():
    """With the exact ε of Gaussian data, DDIM inversion converges (first order) to the
    probability-flow ODE's latent, and DDIM from it returns to x0."""
    d = GaussianDiffusion(1000)
    model = GaussianEps(d)
    x0 = 0.1 + 0.3 * torch.randn(64, 1, 4, 4, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    t = 600
    exact = model.ode_latent(x0, t)
    errs = {}
    for k in (5, 50, 500):
        lat = ddim_invert(model, d, x0, t, steps=k)
        errs[k] = (lat - exact).abs().max().item()
    # first order: 1.55, 0.16, 0.019 (the latent's scale is ~3: 0.6% at 500 steps)
    assert errs[50] < errs[5] / 5 and errs[500] < errs[50] / 5 and errs[500] < 0.03
    back = ddim_sample(model, d, steps=500, noise=exact, t_start=t, clip=False)
    assert (back - x0).abs().max().item() < 0.01
    # the round trip through dpm_ot_latents (method="ddim") with the sampler's own steps
    rt = {}
    for k in (20, 200):
        lat = dpm_ot_latents(model, d, x0, t, method="ddim", steps=k)
        rt[k] = (ddim_sample(model, d, steps=k, noise=lat, t_start=t, clip=False) - x0).abs().max().item()
    assert rt[200] < 0.05 and rt[200] < rt[20] / 5


def test_ddim_latents_nfe(tiny):
    model, d, x0 = tiny
    m = Counting(model)
    lat = dpm_ot_latents(m, d, x0, 30, method="ddim", steps=4, batch_size=10)
    assert lat.shape == x0.shape and torch.isfinite(lat).all()
    assert m.calls == 4 * 3  # 4 evaluations per batch of 10, 3 batches


# ---------------------------------------------------------------------- the map
def test_map_assigns_each_noise_to_its_cell(fitted):
    s = fitted
    assert s.ot.converged and s.fit_time > 0
    z = torch.randn(500, 1, 8, 8, generator=torch.Generator().manual_seed(3))
    y, idx = s.map(z)
    # dense reference: argmin_j ½|z − y_j|² − h_j
    Y = s.latents.flatten(1).double()
    cost = 0.5 * torch.cdist(z.flatten(1).double(), Y) ** 2 - s.ot.h[None, :]
    ref = cost.argmin(1)
    assert (idx == ref).float().mean().item() > 0.998  # ties / float32 rounding at cell boundaries
    torch.testing.assert_close(y, s.latents[idx])
    # every target is reached, and the cell masses are near 1/N
    assert s.mass_error(1 << 16) < 0.25
    # the independent re-measure agrees with a direct count (N=24: noise ~0.6% per cell)
    e = s.mass_error(1 << 16, seed=7)
    z = torch.randn(1 << 16, 64, generator=torch.Generator().manual_seed(7))
    counts = torch.bincount(s.ot.assign(z), minlength=s.N).double() / (1 << 16)
    assert e == pytest.approx(((counts - 1 / s.N).abs() * s.N).max().item(), rel=1e-6) and e < 0.25


# ---------------------------------------------------------------------- sampling
def test_samples_shape_range_and_determinism(fitted):
    s = fitted
    a = s.sample(12, steps=3, generator=torch.Generator().manual_seed(0))
    b = s.sample(12, steps=3, generator=torch.Generator().manual_seed(0))
    assert a.shape == (12, 1, 8, 8) and torch.isfinite(a).all() and a.min() >= -1 and a.max() <= 1
    assert torch.equal(a, b)
    z = torch.randn(12, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(s.sample(noise=z, steps=3), a)
    torch.testing.assert_close(s.sample(noise=z.flatten(1), steps=3), a)  # (n, D) noise
    # eta=0, mix=0: a function of the cell only
    x, idx = s.sample(noise=z, steps=3, return_index=True)
    y, _ = s.map(z)
    torch.testing.assert_close(x, ddim_sample(s.model, s.diffusion, steps=3, noise=y, t_start=30))
    # eta > 0: the generator's noise matters; mix > 0 moves the start
    e1 = s.sample(noise=z, steps=3, eta=1.0, generator=torch.Generator().manual_seed(1))
    e2 = s.sample(noise=z, steps=3, eta=1.0, generator=torch.Generator().manual_seed(2))
    assert not torch.equal(e1, e2)
    assert not torch.allclose(s.sample(noise=z, steps=3, mix=0.5), a)


def test_mix_keeps_the_forward_marginal(fitted):
    """x_{t'} − √ᾱ'·x0_j = √(1−ᾱ')·(√(1−λ²)ε_j + λε'): N(0, (1−ᾱ')I) for fresh ε'."""
    s = fitted
    z = torch.randn(4000, 1, 8, 8, generator=torch.Generator().manual_seed(5))
    a = s.diffusion.alphas_cumprod[s.t_start].item()
    for mix, noise in ((0.0, "z"), (0.6, "fresh"), (1.0, "fresh")):
        x, idx = s.start(z, mix=mix, mix_noise=noise, generator=torch.Generator().manual_seed(6))
        r = (x - math.sqrt(a) * s.x0[idx]) / math.sqrt(1 - a)
        assert abs(r.mean().item()) < 0.05 and r.std().item() == pytest.approx(1.0, abs=0.05)
    x, idx = s.start(z, mix=1.0, mix_noise="z")
    torch.testing.assert_close(x, math.sqrt(a) * s.x0[idx] + math.sqrt(1 - a) * z)


@pytest.mark.parametrize("steps", [1, 2, 5])
def test_network_evaluations_equal_steps(tiny, steps):
    model, d, x0 = tiny
    m = Counting(model)
    s = DPMOTSampler(m, d, x0, t_start=20, method="q").fit(tol=0.2, progress=False)
    assert m.calls == 0  # "q" latents and the OT fit use no network evaluation
    for kw in ({}, {"eta": 0.5}, {"mix": 1.0}, {"mix": 0.5, "mix_noise": "fresh", "eta": 1.0}):
        m.calls = 0
        x = s.sample(7, steps=steps, generator=torch.Generator().manual_seed(0), **kw)
        assert m.calls == steps and x.shape == (7, 1, 8, 8)
    ts = ddim_timesteps(d.T, steps, 20)  # trailing spacing from t_start: 21 positions, last one stride above 0
    assert len(set(ts)) == steps and ts[0] == 20 and ts[-1] == {1: 20, 2: 10, 5: 3}[steps]


# ---------------------------------------------------------------------- persistence
def test_save_load_round_trip(fitted, tmp_path):
    s = fitted
    path = tmp_path / "dpm_ot.pt"
    s.save(path)
    r = DPMOTSampler.load(path, s.model)
    assert r.t_start == s.t_start and r.method == "q" and r.fit_time == s.fit_time
    torch.testing.assert_close(r.ot.h, s.ot.h, rtol=0, atol=0)
    torch.testing.assert_close(r.latents, s.latents, rtol=0, atol=0)
    z = torch.randn(9, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(r.sample(noise=z, steps=4), s.sample(noise=z, steps=4), rtol=0, atol=0)
    assert list(tmp_path.iterdir()) == [path]  # no temporary file left behind
    with pytest.raises(ValueError, match="schedule"):
        DPMOTSampler.load(path, s.model, GaussianDiffusion(60))
    other = _other_model(s.model)
    with pytest.warns(UserWarning, match="weights differ"):
        DPMOTSampler.load(path, other)


def test_ddim_sampler_refuses_another_model(tiny, tmp_path):
    model, d, x0 = tiny
    s = DPMOTSampler(model, d, x0[:8], t_start=10, method="ddim", latent_steps=3).fit(tol=0.3, progress=False)
    s.save(tmp_path / "s.pt")
    with pytest.raises(ValueError, match="weights differ"):
        DPMOTSampler.load(tmp_path / "s.pt", _other_model(model))


# ---------------------------------------------------------------------- errors
def test_bad_arguments(tiny, fitted):
    model, d, x0 = tiny
    with pytest.raises(ValueError, match="t_start"):
        DPMOTSampler(model, d, x0, t_start=d.T)
    with pytest.raises(ValueError, match="t_start"):
        dpm_ot_latents(model, d, x0, -1, method="q")
    with pytest.raises(ValueError, match="method"):
        DPMOTSampler(model, d, x0, t_start=10, method="sde")
    with pytest.raises(ValueError, match="shape"):
        DPMOTSampler(model, d, x0, t_start=10, latents=torch.zeros(5, 1, 8, 8))
    with pytest.raises(ValueError, match="shape"):
        dpm_ot_latents(model, d, x0, 10, method="q", noise=torch.zeros(3, 1, 8, 8))
    with pytest.raises(ValueError, match=r"\(N, C, H, W\)"):
        DPMOTSampler(model, d, x0.flatten(1), t_start=10)
    with pytest.raises(ValueError, match="needs the model"):
        dpm_ot_latents(None, d, x0, 10, method="ddim")
    s = fitted  # t_start = 30
    with pytest.raises(ValueError, match="steps"):
        s.sample(4, steps=32)
    with pytest.raises(ValueError, match="steps"):
        s.sample(4, steps=0)
    with pytest.raises(ValueError, match="noise must have shape"):
        s.sample(noise=torch.zeros(4, 1, 7, 7), steps=2)
    with pytest.raises(ValueError, match="n=5"):
        s.sample(5, noise=torch.zeros(4, 1, 8, 8), steps=2)
    with pytest.raises(ValueError, match="mix"):
        s.sample(4, steps=2, mix=1.5)
    with pytest.raises(ValueError, match="mix_noise"):
        s.sample(4, steps=2, mix=0.5, mix_noise="other")
    with pytest.raises(ValueError, match="pass n"):
        s.sample(steps=2)
    s.sample(2, steps=31)  # t_start + 1 distinct timesteps is the most that fits


# ---------------------------------------------------------------------- experiment and CLI
def test_memorisation_metrics():
    from diffusion.experiments import memorisation

    g = torch.Generator().manual_seed(0)
    train = torch.rand(50, 1, 4, 4, generator=g) * 2 - 1
    m = memorisation(torch.cat([train[:5], train[:5]]), train, target=torch.arange(10) % 5)
    assert m["nn_train_mean"] < 1e-3 and m["below_train_p5"] == 1.0 and m["duplicate_frac"] == 1.0
    assert m["nn_is_target"] == 1.0 and m["target_dist_mean"] < 1e-3
    far = memorisation(train[:5] + 3.0, train)
    assert far["nn_train_mean"] > 1 and far["below_train_p5"] == 0.0 and far["duplicate_frac"] == 0.0


def test_cli_sample_and_evaluate_dpm_ot(tiny_cfg, tmp_path):
    import json

    from diffusion.cli import main
    from diffusion.train import Trainer

    Trainer(tiny_cfg.replace(epochs=1)).train()
    ckpt = str(tmp_path / "run" / "checkpoint.pt")
    common = ["--dpm-ot-tol", "0.3", "--dpm-ot-cache", str(tmp_path / "cache")]
    assert main(["sample", "--ckpt", ckpt, "--sampler", "dpm-ot", "--steps", "3", "--t-start", "30", "--n", "8",
                 "--out", str(tmp_path / "g.png"), "--save-tensor", str(tmp_path / "x.pt")] + common) == 0
    x = torch.load(tmp_path / "x.pt")
    assert x.shape == (8, 1, 8, 8) and x.abs().max() <= 1
    assert len(list((tmp_path / "cache").iterdir())) == 1  # the fitted sampler, reused below
    out = tmp_path / "r.json"
    assert main(["evaluate", "--ckpt", ckpt, "--n", "16", "--steps", "4", "--dpm-ot", "--dpm-ot-steps", "2,3",
                 "--dpm-ot-t-start", "30", "--dpm-ot-mix", "0,1", "--dpm-ot-mix-noise", "z,fresh", "--dpm-ot-control",
                 "--dpm-ot-check-samples", "4096", "--dpm-ot-grid", str(tmp_path / "cmp.png"), "--json", str(out)]
                + common) == 0
    full = json.loads(out.read_text())
    assert full["run"]["command"].startswith("python -m diffusion evaluate --ckpt ") and full["run"]["wall_seconds"] > 0
    r = full["dpm_ot"]
    assert set(r["ddim"]) == {"4", "2", "3"}
    v = r["dpm_ot"]["30"]["variants"]
    assert set(v) == {"mix0_eta0", "mix1_eta0_z", "mix1_eta0_fresh", "random_target"}
    assert v["mix0_eta0"]["3"]["distinct_targets"] <= 16 and "nn_is_target" in v["mix0_eta0"]["3"]["memorisation"]
    assert (tmp_path / "cmp.png").stat().st_size > 0
    assert main(["evaluate", "--ckpt", ckpt, "--dpm-ot", "--dpm-ot-mix-noise", "bad"] + common) == 2
