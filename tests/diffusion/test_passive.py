"""The passive experiments of issue 18: set builders, degradations, and the expected orders on
digits (a small eval feature net, trained here in a few seconds)."""
import json
import os
import shutil

import pytest
import torch

from diffusion.passive_sets import (PM, Metrics, add_noise, beyond_noise, class_sets, combine_seeds, diversity_sets,
                                    gaussian_blur, missing_class_sets, mixture_sets, reversals, spearman)


def _labels(per=50, classes=10):
    return torch.arange(classes).repeat_interleave(per)


# ---------------------------------------------------------------------- set builders
def test_diversity_sets_class_counts_and_distinctness():
    y = _labels(50)
    sets = dict(diversity_sets(y, 40, seed=3))
    assert list(sets) == [f"D{k}" for k in range(1, 11)]
    expect_classes = {1: 1, 2: 1, 3: 2, 4: 3, 5: 4, 6: 5, 7: 6, 8: 8, 9: 10, 10: 10}
    for k, nc in expect_classes.items():
        idx = sets[f"D{k}"]
        assert len(idx) == 40
        counts = torch.bincount(y[idx], minlength=10)
        assert int((counts > 0).sum()) == nc, k
        assert counts[counts > 0].max() - counts[counts > 0].min() <= 1, k  # balanced
        if k == 1:
            assert len(torch.unique(idx)) == 1
        elif k == 9:
            assert len(torch.unique(idx)) < 40  # drawn with replacement: a bootstrap
        else:
            assert len(torch.unique(idx)) == 40, k
    # nested classes: D3's classes ⊂ D4's ⊂ ... ⊂ D8's
    cls = [set(y[sets[f"D{k}"]].tolist()) for k in range(2, 9)]
    assert all(a <= b for a, b in zip(cls, cls[1:]))
    again = dict(diversity_sets(y, 40, seed=3))
    assert all(torch.equal(sets[k], again[k]) for k in sets)  # seeded


def test_diversity_sets_need_a_big_enough_class():
    with pytest.raises(ValueError, match="D2"):
        diversity_sets(_labels(5), 20)
    with pytest.raises(ValueError, match="distinct"):
        class_sets(_labels(5), [0, 1], 20, torch.Generator().manual_seed(0))


def test_mixture_sets_proportions():
    sets = mixture_sets(300, 200, 100, seed=1)
    assert [k for k, _, _ in sets] == list(range(11))
    for k, tr, he in sets:
        assert len(tr) == 10 * k and len(he) == 100 - 10 * k
        assert len(torch.unique(tr)) == len(tr) and len(torch.unique(he)) == len(he)
        assert (tr < 300).all() and (he < 200).all()
    # nested: D_k's training part is in D_{k+1}'s, its held-out part contains D_{k+1}'s
    for (_, t0, h0), (_, t1, h1) in zip(sets, sets[1:]):
        assert set(t0.tolist()) <= set(t1.tolist()) and set(h1.tolist()) <= set(h0.tolist())
    with pytest.raises(ValueError):
        mixture_sets(50, 200, 100)


def test_missing_class_sets():
    y = _labels(7)
    sets = missing_class_sets(y, 8, seed=2)
    assert [k for k, _, _ in sets] == list(range(9))
    for k, removed, idx in sets:
        assert len(removed) == k and len(set(removed)) == k
        assert set(y[idx].tolist()) == set(range(10)) - set(removed)
        assert len(idx) == 7 * (10 - k)


def test_degradations_and_spearman():
    x = torch.randn(4, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    assert torch.equal(gaussian_blur(x, 0.0), x)
    const = torch.full((2, 1, 8, 8), 0.3)
    assert torch.allclose(gaussian_blur(const, 1.5), const, atol=1e-6)  # mass-preserving, replicate padding
    assert gaussian_blur(x, 1.0).var() < x.var()
    assert torch.equal(add_noise(x, 0.1, 5), add_noise(x, 0.1, 5))
    assert abs((add_noise(x, 0.5, 5) - x).std().item() - 0.5) < 0.1
    assert spearman([1, 2, 3, 4], [10, 20, 30, 40]) == pytest.approx(1.0)
    assert spearman([1, 2, 3, 4], [4, 3, 2, 1]) == pytest.approx(-1.0)
    assert spearman([1, 2, 3], [1, 1, 2]) == pytest.approx(0.8660254)


def test_metrics_bundle_keys():
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(60, 8, generator=g), torch.randn(50, 8, generator=g) + 1
    m = Metrics(blurs=(0.05, 0.35), p=1, scaling=0.9, normalize=True)
    out = m(a, b)
    assert {"ot", "ot_b0.05", "ot_b0.35", "mmd2", "fid", "precision", "recall", "density", "coverage"} <= set(out)
    assert out["ot"] == out["ot_b0.05"] and m.bandwidth > 0
    assert m(a, a[:40], light=True)["ot"] < out["ot"]


# ---------------------------------------------------------------------- seed noise
def test_combine_seeds_and_noise_rules():
    runs = [{"set": "D1", "ot": 1.0, "rows": [{"k": 0, "fid": 2.0}], "removed": [3]},
            {"set": "D1", "ot": 3.0, "rows": [{"k": 0, "fid": 4.0}], "removed": [5]}]
    c = combine_seeds(runs)
    assert isinstance(c["ot"], PM) and c["ot"] == 2.0 and c["ot"].values == [1.0, 3.0]
    assert c["ot"].sd == pytest.approx(2 ** 0.5) and (c["ot"].lo, c["ot"].hi) == (1.0, 3.0)
    assert c["rows"][0]["fid"] == 3.0 and c["rows"][0]["k"].sd == 0.0
    assert c["set"] == "D1" and c["removed"] == [3]  # non-numbers: the first run's
    assert PM([5.0]).sd == 0.0
    # beyond noise: one sign in every seed and |mean| > 2 sd
    assert beyond_noise([1.0, 1.1, 0.9]) == 1 and beyond_noise([-1.0, -1.1, -0.9]) == -1
    assert beyond_noise([1.0, -0.1, 1.0]) == 0  # a seed disagrees
    assert beyond_noise([0.1, 1.0, 2.0]) == 0   # same sign, but the mean (1.03) < 2 sd (1.90)
    assert beyond_noise([-0.5]) == -1 and beyond_noise([0.0, 0.0]) == 0
    # a rising curve with one real dip (step 1 → 2, every seed) and one noisy one (step 2 → 3)
    curve = [[1, 1, 1], [2, 2.1, 1.9], [1.5, 1.6, 1.4], [1.45, 1.0, 2.0]]
    assert reversals(curve, +1) == [(1, -1), (2, 0)]
    assert reversals([PM(v) for v in curve], -1) == [(0, -1)]  # 2 → 3 falls on average: no reversal


def test_seeds_spread_and_verdicts(ctx):
    """``--seeds``: each seed its own reference and sets (the data split and features shared),
    seeded (same seeds, same figures), and the verdicts read the spread."""
    from diffusion.passive import _check_lines, run_seeds, seed_view

    c1 = ctx.reseeded(1)
    assert c1.data is ctx.data and c1.train_f is ctx.train_f and ctx.seed == 0
    assert not torch.equal(c1.ref_idx, ctx.ref_idx)
    assert not set(c1.ref_idx.tolist()) & set(c1.pool_idx.tolist())
    assert torch.equal(ctx.reseeded(0).ref_idx, ctx.ref_idx)
    res = run_seeds("missing-classes", ctx, None, None, [0, 1])
    assert res["seeds"] == [0, 1] and [r["seed"] for r in res["seed_runs"]] == [1]
    again = run_seeds("missing-classes", ctx, None, None, [0, 1])
    assert again["seed_runs"][0]["rows"][3]["ot"] == res["seed_runs"][0]["rows"][3]["ot"]  # seeded
    view = seed_view({**res, "experiment": "missing-classes"})
    ot = view["rows"][4]["ot"]
    assert len(ot.values) == 2 and ot.values[0] != ot.values[1] and ot.sd > 0
    assert ot.values[0] == res["rows"][4]["ot"]
    assert len(view["orders"]["ot"].values) == 2
    lines = _check_lines(view)
    assert any("over 2 seeds" in line and "as expected" in line for line in lines), lines
    with pytest.raises(ValueError, match="seed"):
        run_seeds("noise", ctx, None, None, [1, 0])


# ---------------------------------------------------------------------- the orders on digits
@pytest.fixture(scope="module")
def ctx(tmp_path_factory):
    from diffusion.passive import Context

    torch.manual_seed(0)
    return Context("digits", quick=True, seed=0, work=str(tmp_path_factory.mktemp("passive")), feature_epochs=5)


def test_diversity_order(ctx):
    from diffusion.passive import exp_diversity

    res = exp_diversity(ctx)
    assert [r["set"] for r in res["rows"]] == [f"D{k}" for k in range(1, 11)]
    assert res["orders"]["ot"] <= -0.9, [round(r["ot"], 2) for r in res["rows"]]
    assert res["rows"][0]["distinct"] == 1 and res["rows"][-1]["classes"] == 10


def test_blur_noise_missing_orders(ctx):
    from diffusion.passive import exp_blur, exp_missing, exp_noise

    assert exp_blur(ctx)["orders"]["ot"] >= 0.9
    noise = exp_noise(ctx)
    assert noise["orders"]["pixel"]["ot"] >= 0.9 and noise["orders"]["feature"]["ot"] >= 0.9
    miss = exp_missing(ctx)
    assert miss["orders"]["ot"] >= 0.9, [round(r["ot"], 2) for r in miss["rows"]]


def test_memorization_flags_near_copies(ctx, tmp_path):
    from diffusion.passive import exp_memorization, plot_experiment

    res = exp_memorization(ctx)
    rows = {r["set"]: r for r in res["rows"]}
    for sp in ("pixel", "feature"):
        assert rows["near_copies"][sp]["near_copy_share"] >= 0.9
        assert rows["copies"][sp]["near_copy_share"] == 1.0
        assert rows["held_out"][sp]["near_copy_share"] <= 0.1
        assert 0.35 <= rows["half_near_copies"][sp]["near_copy_share"] <= 0.65
    assert rows["copies"]["pixel"]["exact_copy_share"] == 1.0
    assert rows["near_copies"]["pixel"]["ratio"] < 0.5 < rows["held_out"]["pixel"]["ratio"]
    plot_experiment("memorization", {**res, "experiment": "memorization"}, str(tmp_path / "m.png"))
    assert os.path.getsize(tmp_path / "m.png") > 0


def test_epochs_cli_and_report(tiny_cfg, tmp_path):
    """A two-checkpoint series of a tiny run, through the CLI: the epochs experiment (with
    novelty per checkpoint), the mixture one with the generated set, and the report."""
    from diffusion.cli import main
    from diffusion.train import Trainer

    cfg = tiny_cfg.replace(epochs=1)
    Trainer(cfg, log=lambda *a: None).train()
    shutil.copy(os.path.join(cfg.out_dir, "checkpoint.pt"), tmp_path / "ckpt_1.pt")
    Trainer(cfg.replace(epochs=2), resume=True, log=lambda *a: None).train()
    shutil.copy(os.path.join(cfg.out_dir, "checkpoint.pt"), tmp_path / "ckpt_2.pt")
    out, work = tmp_path / "rep" / "passive", tmp_path / "work"
    common = ["--dataset", "digits", "--quick", "--n-ref", "40", "--n-gen", "40", "--steps", "3", "--n", "40",
              "--out", str(out), "--work", str(work)]
    assert main(["passive", "epochs", "--ckpts", str(tmp_path / "ckpt_*.pt"), *common]) == 0
    res = json.loads((out / "epochs.json").read_text())
    assert [r["epoch"] for r in res["rows"]] == [1, 2]
    assert {"ot", "fid"} <= set(res["rows"][0]["gap"]) and "near_copy_share_p" in res["rows"][0]["novelty"]
    assert res["eval_feature_net"]["role"] == "eval"
    assert main(["passive", "mixture", "--ckpt", str(tmp_path / "ckpt_2.pt"), "--blur", "0.05,0.35", "--seeds", "0,1",
                 *common]) == 0
    mix = json.loads((out / "mixture.json").read_text())
    assert [r["n_train_part"] for r in mix["rows"]] == [4 * k for k in range(11)]
    assert "novelty" in mix["rows"][0]["gen"] and "ot_b0.35" in mix["rows"][0]["gen"]
    assert mix["seeds"] == [0, 1] and mix["seed_runs"][0]["rows"][0]["gen"]["ot"] != mix["rows"][0]["gen"]["ot"]
    # the checkpoint's split: the trainer's own load_data call (128 training images, not the preset's)
    from diffusion.data import load_data
    d = load_data(cfg.dataset, cfg.data_path, cfg.pad_to_32, cfg.n_train, cfg.n_test, cfg.seed, cfg.n_val)
    split = mix["data_split"]
    assert split["from"] == "checkpoint" and split["n_train"] == 128 == mix["n_train"]
    import hashlib
    assert split["train_idx_sha1"] == hashlib.sha1(d.train_idx.numpy().tobytes()).hexdigest()[:12]
    assert main(["passive", "report", "--dataset", "digits", "--out", str(out)]) == 0
    text = (tmp_path / "rep" / "passive.md").read_text()
    assert "## epochs" in text and "## mixture" in text and "eval" in text
    assert "over 2 seeds" in text and "seed noise" in text and " ± " in text
    assert (out / "epochs.png").exists() and (out / "mixture.png").exists()
