"""Issue 17: separate guide / eval feature nets, fresh references from the whole training set
(``ot_pool_size=0``), and the unit of OT guidance (``ot_unit``)."""
import json
import os

import pytest
import torch

import diffusion.experiments as exp_mod
import diffusion.sample as sample_mod
import diffusion.train as train_mod
from diffusion.config import DiffusionConfig
from diffusion.data import load_data
from diffusion.sample import ddim_sample_with_ot
from diffusion.train import ReferencePool, Trainer, feature_net_for, feature_net_path, feature_split


def _params(module):
    return torch.cat([p.detach().flatten() for p in module.parameters()])


def _data(cfg):
    return load_data(cfg.dataset, cfg.data_path, cfg.pad_to_32, cfg.n_train, cfg.n_test, cfg.seed, cfg.n_val)


# ---------------------------------------------------------------------- two feature nets
def test_guide_and_eval_feature_nets_are_separate(tiny_cfg, monkeypatch):
    """The guide and eval nets are trained on disjoint halves of the training images (together
    all of them) with different seeds, cached at different paths, and differ."""
    data = _data(tiny_cfg)
    n = len(data.x_train)
    split = feature_split(n, tiny_cfg.seed)
    g_idx, e_idx = set(split["guide"].tolist()), set(split["eval"].tolist())
    assert not g_idx & e_idx and g_idx | e_idx == set(range(n)) and abs(len(g_idx) - len(e_idx)) <= 1
    assert torch.equal(feature_split(n, tiny_cfg.seed)["eval"], split["eval"])  # fixed by cfg.seed
    assert not torch.equal(feature_split(n, tiny_cfg.seed + 1)["eval"], split["eval"])

    seen = {}
    real = train_mod.load_or_train_feature_net

    def spy(path, x, y, *a, **k):
        seen[k["key_extra"]["role"]] = (x.clone(), k["seed"], path)
        return real(path, x, y, *a, **k)

    monkeypatch.setattr(train_mod, "load_or_train_feature_net", spy)
    guide = feature_net_for(tiny_cfg, data, role="guide")
    ev = feature_net_for(tiny_cfg, data, role="eval")
    assert torch.equal(seen["guide"][0], data.x_train[split["guide"]])
    assert torch.equal(seen["eval"][0], data.x_train[split["eval"]])
    assert seen["guide"][1] != seen["eval"][1]
    assert seen["guide"][2] == tiny_cfg.feature_path != seen["eval"][2] == feature_net_path(tiny_cfg, 8, "eval")
    assert seen["eval"][2].endswith("features-eval.pt")
    assert os.path.exists(seen["guide"][2]) and os.path.exists(seen["eval"][2])
    assert not torch.equal(_params(guide), _params(ev))
    assert guide.train_info["role"] == "guide" and ev.train_info["role"] == "eval"
    assert guide.train_info["n_train"] + ev.train_info["n_train"] == n
    # the caches are reused for their own role only
    assert torch.equal(_params(feature_net_for(tiny_cfg, data, role="eval")), _params(ev))
    assert torch.equal(_params(feature_net_for(tiny_cfg, data, role="guide")), _params(guide))
    # default paths: <out_dir>/../features/<dataset>-<size>-<role>.pt
    c = tiny_cfg.replace(feature_path=None)
    assert feature_net_path(c, 8, "guide").endswith(os.path.join("features", "digits-8-guide.pt"))
    assert feature_net_path(c, 8, "eval").endswith(os.path.join("features", "digits-8-eval.pt"))
    with pytest.raises(ValueError, match="role"):
        feature_net_for(tiny_cfg, data, role="both")


def test_old_feature_cache_is_not_reused(tiny_cfg):
    """A cache file written under the old key (all training images, no role) is retrained."""
    from diffusion.checkpoint import load_checkpoint, save_checkpoint
    from diffusion.features import train_feature_net

    data = _data(tiny_cfg)
    old = train_feature_net(data.x_train, data.y_train, epochs=1, seed=tiny_cfg.seed)
    key = {"dataset": "digits", "shape": list(data.x_train.shape[1:]), "n_train": len(data.x_train), "epochs": 1,
           "seed": tiny_cfg.seed}
    save_checkpoint({"model": old.state_dict(), "config": old.config, "key": key, "test_accuracy": None},
                    tiny_cfg.feature_path)
    net = feature_net_for(tiny_cfg, data, role="guide")
    assert not torch.equal(_params(net), _params(old))
    assert load_checkpoint(tiny_cfg.feature_path)["key"]["role"] == "guide"


def test_trainer_guides_with_one_net_and_evaluates_with_the_other(tiny_cfg, monkeypatch):
    tr = Trainer(tiny_cfg.replace(ot_lambda=0.1, ot_space="feature"))
    assert tr.ot_loss.net is tr.features
    assert tr.eval_features is not tr.features
    assert tr.eval_features.train_info["role"] == "eval" and tr.features.train_info["role"] == "guide"
    used = []
    real_embed, real_classify = train_mod.embed, train_mod.classify
    monkeypatch.setattr(train_mod, "embed", lambda net, x, *a, **k: used.append(net) or real_embed(net, x, *a, **k))
    monkeypatch.setattr(train_mod, "classify",
                        lambda net, x, *a, **k: used.append(net) or real_classify(net, x, *a, **k))
    rec = tr.evaluate(16)
    assert rec["ot_train"] is not None and used and all(net is tr.eval_features for net in used)
    # pixel-space OT: evaluating never trains the guide net
    tr2 = Trainer(tiny_cfg.replace(ot_lambda=0.1, out_dir=tiny_cfg.out_dir + "2"))
    tr2.evaluate(16)
    assert tr2._features is None and tr2._eval_features is not None


def test_evaluate_checkpoint_nets_memorisation_and_unit(tiny_cfg, tmp_path, monkeypatch):
    """evaluate_checkpoint: metrics with the eval net, feature guidance with the guide net, both
    recorded; memorisation in both reports; ot_unit="all" samples all n in one call; with
    "minibatch" the result does not depend on the evaluation batch size."""
    Trainer(tiny_cfg.replace(epochs=1)).train()
    ckpt = str(tmp_path / "run" / "checkpoint.pt")
    nets, calls = [], []
    real_report, real_ot = exp_mod.sample_report, exp_mod.ddim_sample_with_ot

    def report(net, *a, **k):
        nets.append(net)
        return real_report(net, *a, **k)

    def guided(*a, **k):
        calls.append((len(k["noise"]), k["ot_unit"], k["ot_group_offset"], k.get("feature_fn")))
        return real_ot(*a, **k)

    monkeypatch.setattr(exp_mod, "sample_report", report)
    monkeypatch.setattr(exp_mod, "ddim_sample_with_ot", guided)
    kw = dict(space="feature", ot_ref_n=8, ot_scale=0.5, ot_unit="all")
    r = exp_mod.evaluate_checkpoint(ckpt, n=24, steps=3, ot_guidance=True, ot_kwargs=kw, batch_size=8,
                                    log=lambda *a: None)
    assert [c[:3] for c in calls] == [(24, "all", 0)]  # one call over all samples
    assert calls[0][3].__self__.train_info["role"] == "guide"
    assert len(nets) == 2 and all(net.train_info["role"] == "eval" for net in nets)
    assert r["feature_nets"]["eval"]["role"] == "eval" and r["feature_nets"]["guide"]["role"] == "guide"
    assert r["feature_nets"]["eval"]["seed"] != r["feature_nets"]["guide"]["seed"]
    assert r["ot_guidance"]["ot_unit"] == "all" and r["ot_guidance"]["space"] == "feature"
    for name in ("ddim", "ddim_ot"):
        for k in ("ot_train", "ot_test", "fid_train", "mmd2_train", "classes_present", "max_class_share",
                  "mean_confidence", "class_share"):
            assert k in r[name], (name, k)
        assert {"nn_train_mean", "below_train_p5", "duplicate_frac"} <= set(r[name]["memorisation"])
    json.dumps(r)  # the result is JSON-serialisable

    out = {}
    for bs in (8, 16, 20):  # 20 -> calls of 16 (whole groups of 8)
        calls.clear()
        kw = dict(space="pixel", ot_ref_n=8, ot_scale=0.5, ot_unit="minibatch")
        out[bs] = exp_mod.evaluate_checkpoint(ckpt, n=24, steps=3, ot_guidance=True, ot_kwargs=kw, batch_size=bs,
                                              log=lambda *a: None)
        assert out[bs]["feature_nets"]["guide"] is None
        assert [c[2] for c in calls] == {8: [0, 1, 2], 16: [0, 2], 20: [0, 2]}[bs]
    for bs in (16, 20):
        for k in ("ot_train", "ot_test", "fid_train"):
            assert out[bs]["ddim_ot"][k] == pytest.approx(out[8]["ddim_ot"][k], rel=1e-4, abs=1e-6)
    with pytest.raises(ValueError, match="ot_unit"):
        exp_mod.evaluate_checkpoint(ckpt, n=8, steps=2, ot_guidance=True, ot_kwargs=dict(ot_unit="batch"),
                                    log=lambda *a: None)

    from diffusion.cli import main
    monkeypatch.setattr(exp_mod, "ddim_sample_with_ot", real_ot)
    path = tmp_path / "r.json"
    assert main(["evaluate", "--ckpt", ckpt, "--n", "16", "--steps", "2", "--ot-guidance", "--ot-unit", "all",
                 "--json", str(path)]) == 0
    assert json.loads(path.read_text())["ot_guidance"]["ot_unit"] == "all"


# ---------------------------------------------------------------------- fresh references
def test_pool_size_zero_draws_from_all_training_images(tiny_cfg):
    with pytest.raises(ValueError, match="ot_pool_size must be >= 0"):
        DiffusionConfig(ot_pool_size=-1)
    cfg = tiny_cfg.replace(ot_pool_size=0, ot_lambda=0.1)
    tr = Trainer(cfg)
    n = len(tr.data.x_train)
    assert sorted(tr.pool.idx.tolist()) == list(range(n))
    assert sorted(ReferencePool(n, n + 5, 0).idx.tolist()) == list(range(n))
    batch = torch.randperm(n, generator=torch.Generator().manual_seed(0))[:32]
    rest = set(range(n)) - set(batch.tolist())
    seen = set()
    for _ in range(20):
        ref = tr.pool.draw(40, batch, tr.ref_gen)
        assert len(ref) == 40 and len(set(ref.tolist())) == 40  # the requested size, distinct
        assert not set(ref.tolist()) & set(batch.tolist())      # outside the batch
        seen |= set(ref.tolist())
    assert seen == rest and len(seen) > tiny_cfg.ot_pool_size  # more than the fixed pool of 64 could give
    terms = tr.train_step(batch)
    assert terms["loss_ot"] is not None


def test_pool_size_zero_resume_is_exact(tiny_cfg, check_resume):
    check_resume(tiny_cfg.replace(ot_lambda=0.1, ot_pool_size=0, ot_ref_batch=2000))


# ---------------------------------------------------------------------- unit of OT guidance
def test_minibatch_unit_does_not_depend_on_the_split(tiny_unet):
    model, d = tiny_unet
    noise = torch.randn(16, 1, 8, 8, generator=torch.Generator().manual_seed(1))
    ref = torch.rand(40, 1, 8, 8, generator=torch.Generator().manual_seed(2)) * 2 - 1
    kw = dict(steps=4, ot_scale=0.5, ot_ref_n=4, ot_unit="minibatch")

    def run(nz, off):
        return ddim_sample_with_ot(model, d, ref, noise=nz, generator=torch.Generator().manual_seed(3),
                                   ot_group_offset=off, **kw)

    whole = run(noise, 0)
    halves = torch.cat([run(noise[:8], 0), run(noise[8:], 2)])
    quarters = torch.cat([run(noise[i:i + 4], i // 4) for i in range(0, 16, 4)])
    torch.testing.assert_close(halves, whole, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(quarters, whole, rtol=1e-5, atol=1e-5)
    plain = ddim_sample_with_ot(model, d, ref, noise=noise, **{**kw, "ot_scale": 0.0})
    assert (whole - plain).abs().max() > 1e-3  # the guidance did something


def test_unit_sizes_of_the_reference_draws(tiny_unet, monkeypatch):
    model, d = tiny_unet
    sizes = []
    real = sample_mod.ot_move

    def spy(x0, ref, *a, **k):
        sizes.append((len(x0), len(ref)))
        return real(x0, ref, *a, **k)

    monkeypatch.setattr(sample_mod, "ot_move", spy)
    ref = torch.rand(40, 1, 8, 8, generator=torch.Generator().manual_seed(2)) * 2 - 1
    noise = torch.randn(10, 1, 8, 8, generator=torch.Generator().manual_seed(1))
    ddim_sample_with_ot(model, d, ref, steps=3, ot_ref_n=4, noise=noise, ot_unit="minibatch")
    assert sizes == [(4, 4), (4, 4), (2, 2)] * 3  # groups of ot_ref_n, the last smaller, as many references
    sizes.clear()
    ddim_sample_with_ot(model, d, ref, steps=3, ot_ref_n=4, noise=noise, ot_unit="all")
    assert sizes == [(10, 10)] * 3  # all samples against len(x) references, ot_ref_n ignored
    with pytest.raises(ValueError, match="ot_unit"):
        ddim_sample_with_ot(model, d, ref, steps=3, noise=noise, ot_unit="batch")
