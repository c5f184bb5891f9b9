import json
import os

import pytest
import torch

from diffusion.cli import main
from diffusion.config import DiffusionConfig, apply_overrides, preset
from diffusion.data import load_data
from diffusion.flow import FlowMatching, flow_sample, integrate, path_straightness, straightness
from diffusion.flow_compare import compare_couplings
from diffusion.model import Unet
from diffusion.train import Trainer, load_model


class Field(torch.nn.Module):
    """A 'network' v(x, t) given as a function of (x, s) with s = 1 − t/(T−1); counts its calls."""

    def __init__(self, fn, T):
        super().__init__()
        self.fn, self.T, self.calls, self.w = fn, T, 0, torch.nn.Parameter(torch.zeros(()))
        self.seen = []

    def forward(self, x, t, y=None):
        self.calls += 1
        self.seen.append((x.detach().clone(), t.detach().clone()))
        s = 1 - t.double() / (self.T - 1)
        return self.fn(x, s.to(x.dtype).reshape(-1, *([1] * (x.dim() - 1)))) + self.w


def _batch(n=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = load_data("digits").x_train
    x1 = x[torch.randperm(len(x), generator=g)[:n]]
    return x1, torch.randn(x1.shape, generator=g)


@pytest.mark.parametrize("coupling", ["independent", "exact"])
def test_path_ends_and_target(coupling):
    """x_t is the (paired) noise at t = T−1 (s = 0) and the data at t = 0 (s = 1); a network
    that outputs the target u = x1 − x0 has zero loss and a perfect one-step estimate x̂1."""
    T = 50
    flow = FlowMatching(coupling=coupling, T=T)
    x1, noise = _batch(8)
    x0 = flow.pair(x1, noise)
    assert sorted(x0.flatten(1).tolist()) == sorted(noise.flatten(1).tolist())  # a re-ordering of the noise
    zero = Field(lambda x, s: torch.zeros_like(x), T)
    for t_val, want in ((T - 1, x0), (0, x1)):
        zero.seen.clear()
        loss, x1_hat = flow.training_loss(zero, x1, torch.full((8,), t_val), noise)
        xt, t_in = zero.seen[0]
        torch.testing.assert_close(xt, want, rtol=0, atol=1e-6)
        assert torch.equal(t_in, torch.full((8,), t_val))  # the network sees the integer t
        torch.testing.assert_close(loss, (x1 - x0).square().mean())
        torch.testing.assert_close(x1_hat, xt)
    t = torch.randint(0, T, (8,))
    oracle = Field(lambda x, s: x1 - x0, T)
    loss, x1_hat = flow.training_loss(oracle, x1, t, noise)
    assert loss.item() < 1e-12
    torch.testing.assert_close(x1_hat, x1, rtol=0, atol=1e-5)
    s = (1 - t.double() / (T - 1)).float().reshape(-1, 1, 1, 1)
    torch.testing.assert_close(oracle.seen[0][0], (1 - s) * x0 + s * x1, rtol=0, atol=1e-6)


def test_sigma_min_adds_gaussian_tube():
    flow = FlowMatching(sigma_min=0.1, coupling="independent", T=10)
    x1, noise = _batch(4)
    probe = Field(lambda x, s: torch.zeros_like(x), 10)
    flow.training_loss(probe, x1, torch.full((4,), 9), noise, generator=torch.Generator().manual_seed(3))
    z = torch.randn(x1.shape, generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(probe.seen[0][0], noise + 0.1 * z)


def test_exact_coupling_shortens_the_pairs():
    x1, noise = _batch(64, seed=1)
    cost = {c: (x1 - FlowMatching(coupling=c, coupling_blur=1.0).pair(x1, noise, torch.Generator().manual_seed(0)))
            .flatten(1).square().sum(1).mean().item() for c in ("independent", "sinkhorn", "exact")}
    assert cost["exact"] <= cost["sinkhorn"] < 0.95 * cost["independent"]


def test_euler_integrates_straight_fields_exactly():
    """A constant field x1* − x0* (and the single-target CFM field (x1* − x)/(1 − s), which
    also checks the time the sampler passes) carries x0* to x1* in any number of steps;
    its path is straight (straightness 1)."""
    T = 1000
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(3, 1, 8, 8, generator=g), torch.rand(3, 1, 8, 8, generator=g) * 2 - 1
    flow = FlowMatching(T=T)
    for steps in (1, 3, 10):
        for method, field in (("euler", lambda x, s: b - a), ("heun", lambda x, s: b - a),
                              ("midpoint", lambda x, s: b - a), ("euler", lambda x, s: (b - x) / (1 - s)),
                              ("midpoint", lambda x, s: (b - x) / (1 - s))):
            model = Field(field, T)
            x, energy = integrate(model, flow, a, steps, method)
            torch.testing.assert_close(x, b, rtol=0, atol=1e-5)
            ones = torch.ones(3, dtype=torch.float64)
            torch.testing.assert_close(straightness(a, x, energy), ones, rtol=0, atol=1e-5)
            assert model.calls == steps * (1 if method == "euler" else 2)


def test_solver_orders_on_a_curved_field():
    """dx/ds = −x: x(1) = x(0)/e.  Halving h divides the error by ~2 (Euler) or ~4 (midpoint,
    Heun); the path is straight but not at constant speed, so straightness < 1."""
    x0 = torch.randn(2, 1, 4, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    flow = FlowMatching(T=1000)
    for method, ratio in (("euler", 2), ("midpoint", 4), ("heun", 4)):
        err = [(integrate(Field(lambda x, s: -x, 1000), flow, x0, n, method)[0] - x0 / torch.e).abs().max().item()
               for n in (8, 16)]
        assert ratio * 0.85 < err[0] / err[1] < ratio * 1.15, (method, err)
    x, e = integrate(Field(lambda x, s: -x, 1000), flow, x0, 50, "euler")
    assert (straightness(x0, x, e) < 0.95).all()


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    return Unet(8, (1, 2), resnet_blocks=1).eval(), FlowMatching(T=50)


def test_flow_sampler_shapes_ranges_determinism(tiny):
    model, flow = tiny
    noise = torch.randn(5, 1, 8, 8, generator=torch.Generator().manual_seed(1))
    for method in ("euler", "midpoint", "heun"):
        x = flow_sample(model, flow, (5, 1, 8, 8), steps=4, method=method, generator=torch.Generator().manual_seed(1))
        assert x.shape == (5, 1, 8, 8) and torch.isfinite(x).all() and x.min() >= -1 and x.max() <= 1
        assert torch.equal(x, flow_sample(model, flow, steps=4, method=method, noise=noise))  # same start
    stats = path_straightness(model, flow, noise, steps=5)
    assert 0 < stats["straightness"] <= 1 + 1e-9 and stats["kinetic_energy"] > 0
    with pytest.raises(ValueError, match="method must be one of"):
        flow_sample(model, flow, (1, 1, 8, 8), steps=2, method="rk4")
    with pytest.raises(ValueError, match="steps must be an int >= 1"):
        flow_sample(model, flow, (1, 1, 8, 8), steps=0)


@pytest.mark.parametrize("coupling,sigma", [("exact", 0.0), ("sinkhorn", 0.05)])
def test_flow_training_resume_reproduces_uninterrupted_run(tiny_cfg, tmp_path, check_resume, coupling, sigma):
    cfg = tiny_cfg.replace(method="flow", flow_coupling=coupling, flow_sigma=sigma, flow_blur=1.0, ot_lambda=0.1,
                           ot_ref_batch=16, dropout=0.1)  # every RNG stream in use
    straight, _ = check_resume(cfg)
    assert isinstance(straight.diffusion, FlowMatching) and straight.diffusion.coupling == coupling
    assert all(h["loss_ot"] is not None for h in straight.history)  # x̂1 feeds the OT term
    model, flow, c2 = load_model(os.path.join(str(tmp_path / "a"), "checkpoint.pt"))
    assert isinstance(flow, FlowMatching) and c2 == cfg.replace(out_dir=str(tmp_path / "a"))
    assert (flow.coupling, flow.sigma_min, flow.T) == (coupling, sigma, cfg.timesteps)
    x = straight.generate(4, seed=0)
    assert x.shape == (4, 1, 8, 8) and x.min() >= -1 and x.max() <= 1
    assert torch.equal(x, straight.generate(4, seed=0))


def test_flow_checkpoint_cli_sample_and_experiment(tiny_cfg, tmp_path):
    cfg = tiny_cfg.replace(method="flow", epochs=1, eval_final=True, eval_n=32)
    tr = Trainer(cfg)
    rec = tr.train()[-1]
    assert rec["ot_train"] is not None and rec["classes_present"] >= 1
    ck = tr.ckpt_path
    out = tmp_path / "grid.png"
    assert main(["sample", "--ckpt", ck, "--n", "4", "--steps", "3", "--out", str(out)]) == 0
    assert out.exists()
    res = compare_couplings({"exact": ck}, nfes=(1, 2), n=24, straightness_steps=3, out_json=str(tmp_path / "r.json"),
                            out_png=str(tmp_path / "r.png"), grid_png=str(tmp_path / "g.png"), grid_n=4,
                            ddim_ckpt=str(tmp_path / "missing.pt"), log=lambda *a: None)
    saved = json.load(open(tmp_path / "r.json"))
    assert set(saved["methods"]["exact"]["nfe"]) == {"1", "2"} and "ddim" not in saved["methods"]
    row = res["methods"]["exact"]["nfe"]["1"]
    assert row["straightness"] == pytest.approx(1.0)  # one Euler step is a straight segment
    for k in ("ot_train", "fid_train", "classes_present", "max_class_share", "mean_confidence"):
        assert row[k] is not None
    assert res["coupling_cost"]["exact"] < res["coupling_cost"]["independent"]
    assert (tmp_path / "r.png").exists() and (tmp_path / "g.png").exists()
    with pytest.raises(ValueError, match="multiple of 2"):
        compare_couplings({"exact": ck}, nfes=(3,), n=4, solver="heun")


@pytest.mark.parametrize("changes,match", [
    (dict(method="score"), "method must be one of"),
    (dict(flow_coupling="greedy"), "flow_coupling must be one of"),
    (dict(flow_solver="rk4"), "flow_solver must be one of"),
    (dict(flow_blur=0.0), "flow_blur must be > 0"),
    (dict(flow_sigma=-0.1), "flow_sigma must be >= 0"),
    (dict(flow_sigma=float("nan")), "flow_sigma must be >= 0"),
    (dict(method="flow", timesteps=1, sample_steps=1), "timesteps must be >= 2"),
])
def test_flow_config_errors_name_the_field(changes, match):
    with pytest.raises(ValueError, match=match):
        DiffusionConfig(**changes)


def test_flow_preset_overrides_and_arguments():
    c = preset("digits-flow")
    assert (c.method, c.flow_coupling, c.out_dir) == ("flow", "exact", "runs/digits-flow")
    assert (c.dim, c.epochs, c.lr) == (preset("digits").dim, preset("digits").epochs, preset("digits").lr)
    c = apply_overrides(c, ["flow_coupling=independent", "flow_sigma=0.01", "flow_solver=heun"])
    assert (c.flow_coupling, c.flow_sigma, c.flow_solver) == ("independent", 0.01, "heun")
    with pytest.raises(TypeError, match="flow_blur must be a number"):
        DiffusionConfig(flow_blur="wide")
    for kw, match in ((dict(coupling="greedy"), "coupling must be one of"), (dict(sigma_min=-1), "sigma_min"),
                      (dict(coupling_blur=0), "coupling_blur"), (dict(T=1), "T must be an int >= 2")):
        with pytest.raises(ValueError, match=match):
            FlowMatching(**kw)
    with pytest.raises(ValueError, match="timestep sampler"):
        FlowMatching().sample_timesteps(3, "cubic")
    q = FlowMatching(T=1000).sample_timesteps(20000, "quadratic", generator=torch.Generator().manual_seed(0))
    assert q.min() >= 0 and q.max() < 1000 and (q < 250).float().mean() > 0.45
