"""diffusion.moons: couplings, ODE solvers, guidance, shapes and bad input, a tiny end-to-end run.

Seeded and small (the whole file runs in well under a minute on 2 CPU cores)."""
import json
import math

import pytest
import torch

from diffusion.moons import (COUPLINGS, MoonsConfig, MoonsMLP, _composition, batch_cost, build_streams, data_marginal,
                             guided, integrate, main, make_coupler, make_data, path_diagnostics, run, train_models, w2)
from otkernels.plan import transport_plan


def _cfg(**kw):
    base = dict(n_train=256, iters=20, batch=64, pool_size=256, pool_refresh=10, sd_time=0.5, n_eval=200,
                sinkhorn_prefetch=4, progress=False, seed=0)
    base.update(kw)
    return MoonsConfig(**base)


def _rows_of(a, b):
    """Every row of a is a row of b."""
    return bool((a[:, None, :] == b[None]).all(-1).any(1).all())


@pytest.fixture(scope="module")
def moons():
    x, y, _ = make_data(256, 0.05, seed=0)
    return x, y


# ---------------------------------------------------------------------- data
def test_make_data_standardised_and_labelled():
    x, y, stats = make_data(1000, 0.05, seed=3)
    assert x.shape == (1000, 2) and x.dtype == torch.float32 and y.shape == (1000,) and y.dtype == torch.long
    assert torch.allclose(x.mean(0), torch.zeros(2), atol=1e-5) and torch.allclose(x.std(0), torch.ones(2), atol=1e-4)
    assert set(y.tolist()) == {0, 1} and int((y == 0).sum()) == 500
    x2, _, _ = make_data(1000, 0.05, seed=4, stats=stats)          # fresh draw, the training set's scaling
    assert x2.mean(0).abs().max() < 0.1 and not torch.equal(x, x2)
    with pytest.raises(ValueError, match="n must be"):
        make_data(1)
    with pytest.raises(ValueError, match="noise"):
        make_data(10, noise=-1.0)


# ---------------------------------------------------------------------- couplings
@pytest.mark.parametrize("kind", [k for k in COUPLINGS if k != "independent"])
def test_coupling_lowers_batch_cost(kind, moons):
    """Every OT coupling pairs the same points at a much lower ½|x0 − x1|² than the identity
    pairing (a random permutation of the same rows)."""
    x, _ = moons
    gen = torch.Generator().manual_seed(1)
    c = make_coupler(kind, x, _cfg(), gen)
    x0, x1 = c(64)
    assert x0.shape == x1.shape == (64, 2)
    perm = torch.randperm(64, generator=gen)
    coupled, identity = batch_cost(x0, x1), batch_cost(x0, x1[perm])
    assert coupled < 0.4 * identity, (kind, coupled, identity)
    assert bool(torch.isfinite(x0).all() and torch.isfinite(x1).all())
    if kind != "sinkhorn":        # exact, pool and map pair data points with noise points, no averaging
        assert _rows_of(x1, x)


def test_independent_coupling_is_not_ot(moons):
    x, _ = moons
    gen = torch.Generator().manual_seed(2)
    x0, x1 = make_coupler("independent", x, _cfg(), gen)(256)
    perm = torch.randperm(256, generator=gen)
    assert abs(batch_cost(x0, x1) - batch_cost(x0, x1[perm])) < 0.25 * batch_cost(x0, x1[perm])


def test_exact_coupling_is_optimal_permutation(moons):
    """exact: the pairing's cost equals the exact W2² of the two minibatches (POT)."""
    x, _ = moons
    gen = torch.Generator().manual_seed(3)
    x0, x1 = make_coupler("exact", x, _cfg(), gen)(48)
    assert math.isclose(2 * batch_cost(x0, x1), w2(x0, x1, "emd") ** 2, rel_tol=1e-5)


def test_sinkhorn_coupling_draws_noise_rows(moons):
    x, _ = moons
    gen = torch.Generator().manual_seed(4)
    c = make_coupler("sinkhorn", x, _cfg(sinkhorn_prefetch=3), gen)
    batches = [c(32) for _ in range(4)]             # two batched solves (prefetch 3)
    assert all(b[0].shape == (32, 2) for b in batches)
    assert not torch.equal(batches[0][1], batches[1][1])


@pytest.mark.parametrize("kind,tol", [("sinkhorn", 1e-3), ("large_batch", 1e-2)])
def test_refined_couplings_have_exact_data_marginals(kind, tol, moons):
    """The entropic couplings draw from transport_plan's refined plan: the data marginal of
    "each noise point draws one data point from its row" is uniform to within the tolerance
    (SamplesLoss's potentials alone: 2 % mean / 11 % max at blur 0.2; the old argmin pool used
    84 % of its points), and the draws are a multiset of data points of the right size."""
    x, _ = moons
    cfg = _cfg(sinkhorn_tol=tol, pool_tol=tol, pool_max_iter=2000)
    c = make_coupler(kind, x, cfg, torch.Generator().manual_seed(6))
    x0, x1 = c(64)
    assert x0.shape == x1.shape == (64, 2) and _rows_of(x1, x)
    err = c.info["data_marginal_error"][0]
    assert c.info["plan_error"][0] <= tol and err["max"] <= 1.5 * tol, c.info


def test_data_marginal_against_dense_plan(moons):
    """data_marginal(plan) = (1/N) Σ_i π_ij / Σ_j' π_ij' of the dense plan (float64)."""
    x, _ = moons
    z = torch.randn(40, 2, generator=torch.Generator().manual_seed(7), dtype=torch.float64)
    y = x[:30].double()
    plan = transport_plan(z, y, blur=0.3, tol=1e-9)
    P = plan.dense()
    ref = (P / P.sum(1, keepdim=True)).mean(0)
    assert torch.allclose(data_marginal(plan), ref, rtol=1e-9, atol=0)
    assert abs(float(ref.sum()) - 1) < 1e-12 and float((ref * 30 - 1).abs().max()) < 1e-6


def test_conditional_stream_composition(moons):
    x, y = moons
    cfg = _cfg(batch=64, p_uncond=0.25)
    assert _composition(cfg, [128, 128]) == (16, [24, 24])
    uncond, cond, couplers = build_streams("exact", x, y, cfg, torch.Generator().manual_seed(5))
    x0, x1, yy = cond()
    assert x0.shape == x1.shape == (64, 2) and yy.shape == (64,)
    assert int((yy == -1).sum()) == 16 and int((yy == 0).sum()) == 24 and int((yy == 1).sum()) == 24
    for c in (0, 1):   # class rows end on that class's points
        assert _rows_of(x1[yy == c], x[y == c])
    assert set(couplers) == {"all", "class0", "class1"} and uncond()[2] is None


# ---------------------------------------------------------------------- solvers
@pytest.mark.parametrize("method,order", [("euler", 1), ("midpoint", 2), ("heun", 2)])
def test_integrator_order_on_linear_field(method, order):
    """dx/ds = A x: the error at s = 1 against expm(A) x0 falls as h^order."""
    A = torch.tensor([[-0.5, 2.0], [-1.5, 0.3]], dtype=torch.float64)
    x0 = torch.tensor([[1.0, -0.5], [0.3, 2.0]], dtype=torch.float64)
    exact = x0 @ torch.linalg.matrix_exp(A).T
    field = lambda x, s: x @ A.T  # noqa: E731
    errs = [(integrate(field, x0, n, method)[0] - exact).norm().item() for n in (40, 80)]
    assert math.isclose(errs[0] / errs[1], 2 ** order, rel_tol=0.1), errs


@pytest.mark.parametrize("method", ["euler", "midpoint", "heun"])
def test_integrator_exact_on_constant_field_and_energy(method):
    x0 = torch.randn(5, 2, generator=torch.Generator().manual_seed(0))
    u = torch.tensor([1.0, -2.0])
    x1, energy, path = integrate(lambda x, s: u.expand_as(x), x0, 1, method, path=True)
    assert torch.allclose(x1, x0 + u) and path.shape == (2, 5, 2)
    assert torch.allclose(energy, torch.full((5,), 5.0, dtype=torch.float64))
    d = path_diagnostics(lambda x, s: u.expand_as(x), x0, steps=10)
    assert math.isclose(d["straightness"], 1.0, rel_tol=1e-6) and d["curvature"] < 1e-10


def test_integrate_bad_input():
    f = lambda x, s: x  # noqa: E731
    with pytest.raises(ValueError, match="method"):
        integrate(f, torch.zeros(2, 2), 1, "rk4")
    for bad in (0, 1.5, True):
        with pytest.raises(ValueError, match="steps"):
            integrate(f, torch.zeros(2, 2), bad)


# ---------------------------------------------------------------------- model and guidance
@pytest.mark.parametrize("embedding", ["concat", "sinusoidal"])
def test_model_shapes(embedding):
    torch.manual_seed(0)
    m = MoonsMLP(embedding, num_classes=2)
    x = torch.randn(7, 2)
    assert m(x, 0.3).shape == (7, 2)
    assert m(x, torch.rand(7), torch.tensor([0, 1, -1, 0, 1, 1, -1])).shape == (7, 2)
    # no label and all-null labels are the same input
    assert torch.equal(m(x, 0.3), m(x, 0.3, torch.full((7,), -1)))
    hidden = [l for l in m.net if isinstance(l, torch.nn.Linear)]
    assert len(hidden) == 4 and all(l.out_features == 128 for l in hidden[:3])


def test_model_bad_input():
    m = MoonsMLP("concat", num_classes=2)
    with pytest.raises(ValueError, match="x must have shape"):
        m(torch.zeros(3, 3), 0.5)
    with pytest.raises(ValueError, match="s must be"):
        m(torch.zeros(3, 2), torch.zeros(4))
    with pytest.raises(ValueError, match="labels"):
        m(torch.zeros(3, 2), 0.5, torch.tensor([0, 2, 1]))
    with pytest.raises(ValueError, match="y must be"):
        m(torch.zeros(3, 2), 0.5, torch.tensor([0.0, 1.0, 1.0]))
    with pytest.raises(ValueError, match="unconditional"):
        MoonsMLP("concat")(torch.zeros(3, 2), 0.5, torch.tensor([0, 1, 1]))
    with pytest.raises(ValueError, match="embedding"):
        MoonsMLP("fourier")


def test_cfg_scale_one_is_conditional_model():
    torch.manual_seed(1)
    m = MoonsMLP("sinusoidal", num_classes=2)
    x, y = torch.randn(9, 2), torch.tensor([0, 1] * 4 + [0])
    with torch.no_grad():
        cond, unc = m(x, 0.4, y), m(x, 0.4, None)
        assert torch.equal(guided(m, y, 1.0)(x, 0.4), cond)
        assert torch.allclose(guided(m, y, 3.0)(x, 0.4), unc + 3 * (cond - unc))
        assert torch.allclose(guided(m, y, 0.0)(x, 0.4), unc)
        # the sampler with CFG 1 is the conditional model's ODE
        a = integrate(guided(m, y, 1.0), x, 3, "heun")[0]
        b = integrate(lambda z, s: m(z, s, y), x, 3, "heun")[0]
    assert torch.equal(a, b)


# ---------------------------------------------------------------------- config, training, end to end
def test_config_bad_input():
    with pytest.raises(ValueError, match="couplings"):
        MoonsConfig(couplings=("exact", "gromov"))
    with pytest.raises(ValueError, match="iters"):
        MoonsConfig(iters=0)
    with pytest.raises(ValueError, match="p_uncond"):
        MoonsConfig(p_uncond=1.0)
    with pytest.raises(ValueError, match="steps"):
        MoonsConfig(steps=(1, 0))
    with pytest.raises(ValueError, match="lr"):
        MoonsConfig(lr=-1.0)
    with pytest.raises(ValueError, match="workers"):
        MoonsConfig(workers=0)
    with pytest.raises(ValueError, match="pool_tol"):
        MoonsConfig(pool_tol=0.0)
    with pytest.raises(SystemExit):
        main(["--couplings", "exact,gromov", "--out", "unused"])


def test_ot_coupling_helps_one_step(moons):
    """A few hundred steps already separate the couplings at 1 Euler step (seeded)."""
    x, y = moons
    cfg = _cfg(iters=150, batch=128, conditional=False)
    real, _, _ = make_data(400, 0.05, seed=9)
    z = torch.randn(400, 2, generator=torch.Generator().manual_seed(9))
    out = {}
    for kind in ("independent", "exact"):
        torch.manual_seed(0)
        gen = torch.Generator().manual_seed(0)
        uncond, _, _ = build_streams(kind, x, y, cfg, gen)
        m = MoonsMLP("concat")
        train_models([m], uncond, cfg, gen)
        out[kind] = w2(real, integrate(guided(m), z, 1)[0], "emd")
    assert out["exact"] < 0.6 * out["independent"], out


def test_run_end_to_end(tmp_path):
    cfg = _cfg(couplings=("independent", "exact"), embeddings=("concat",), steps=(1, 2), solvers=("euler", "heun"),
               cfg_solvers=("euler",))
    res = run(cfg, str(tmp_path), plot=True)
    # uncond: 2 solvers × 2 steps; cond: 2 guidance scales × 1 solver × 2 steps; per coupling
    assert len(res["rows"]) == 2 * (4 + 4)
    assert {r["cfg"] for r in res["rows"]} == {"none", "1.0", "3.0"}
    assert all(r["w2"] > 0 and r["nfe"] == r["steps"] * (2 if r["solver"] == "heun" else 1) for r in res["rows"])
    assert res["couplings"]["exact"]["batch_cost"] < res["couplings"]["exact"]["identity_cost"]
    assert 0 < res["floor"]["w2"] < 0.2 and math.isclose(res["floor"]["w2"], res["floor"]["w2_assignment"],
                                                           rel_tol=1e-6)
    assert set(res["targets"]["w2_1step"]) == {"independent", "exact"}
    for name in ("moons.json", "moons.csv", "moons.png", "moons_cfg.png"):
        assert (tmp_path / name).stat().st_size > 0
    assert json.loads((tmp_path / "moons.json").read_text())["rows"][0]["coupling"] == "independent"
    assert (tmp_path / "moons.csv").read_text().count("\n") == len(res["rows"]) + 1


def test_workers_give_the_same_table(tmp_path):
    """Two worker processes (one coupling each) produce the serial run's rows exactly."""
    kw = dict(couplings=("independent", "large_batch"), embeddings=("concat",), steps=(1,), solvers=("euler",),
              cfg_solvers=("euler",), conditional=False, iters=10, threads=1)
    serial = run(_cfg(**kw), None, plot=False)
    par = run(_cfg(workers=2, **kw), None, plot=False)
    assert par["workers"] == 2 and set(par["per_coupling"]) == {"independent", "large_batch"}
    assert [r["w2"] for r in par["rows"]] == [r["w2"] for r in serial["rows"]]
    assert [r["coupling"] for r in par["rows"]] == ["independent", "large_batch"]
