import json
import os

import pytest
import torch

import diffusion.checkpoint as ckpt_mod
from diffusion.checkpoint import load_checkpoint, save_checkpoint
from diffusion.train import OTLoss, Trainer, load_model, ot_weight


def _params(module):
    return torch.cat([p.detach().flatten() for p in module.parameters()])


def test_ot_loss_sends_gradient_to_the_model(tiny_cfg):
    tr = Trainer(tiny_cfg.replace(ot_lambda=0.1, ot_blur=0.35, ot_p=2))
    d = tr.data
    idx = torch.arange(16)
    t = torch.randint(0, 50, (16,))
    _, x0_hat = tr.diffusion.training_loss(tr.model, d.x_train[idx], t, torch.randn(16, 1, 8, 8))
    ref = d.x_train[tr.pool.draw(16, idx, tr.ref_gen)]
    loss = tr.ot_loss(x0_hat, ref)
    loss.backward()
    grads = [p.grad for p in tr.model.parameters()]
    assert all(g is not None for g in grads)
    assert sum(g.abs().sum() for g in grads) > 0
    assert torch.isfinite(loss)


def test_ot_loss_feature_space_gradient(tiny_cfg):
    tr = Trainer(tiny_cfg.replace(ot_lambda=0.1, ot_space="feature", ot_squash="tanh"))
    x = torch.randn(8, 1, 8, 8, requires_grad=True)
    loss = tr.ot_loss(x, tr.data.x_train[:8])
    loss.backward()
    assert x.grad.abs().sum() > 0
    assert all(p.grad is None for p in tr.features.parameters())  # the feature net stays frozen


@pytest.mark.parametrize("squash", ["clamp", "tanh"])
def test_ot_loss_squashes_references_too(squash):
    """Issue 17: the squash applies to x̂0 and to the references alike, so a reference batch
    compared with itself costs 0 and has no gradient (tanh on x̂0 alone gave 1.19 and pushed
    the background pixels at −1 toward −∞)."""
    g = torch.Generator().manual_seed(0)
    ref = torch.rand(32, 1, 8, 8, generator=g) * 2 - 1
    ref[ref < -0.5] = -1  # a quarter of the pixels are background
    x = ref.clone().requires_grad_(True)
    loss = OTLoss(2, 0.35, squash=squash)(x, ref)
    assert abs(loss.item()) < 1e-6
    (grad,) = torch.autograd.grad(loss, x)
    assert grad.abs().max() < 1e-4


def test_ot_loss_reference_features_are_the_references(tiny_cfg):
    """Precomputed reference features (the Trainer's cache) give the same loss and gradient as
    the images; exactly one of the two is taken."""
    from diffusion.train import OTLoss, Trainer

    tr = Trainer(tiny_cfg.replace(ot_lambda=0.1, ot_space="feature", ot_squash="tanh"))
    loss = tr.ot_loss
    g = torch.Generator().manual_seed(0)
    x = torch.randn(6, 1, 8, 8, generator=g, requires_grad=True)
    idx = torch.tensor([3, 7, 11, 20, 40])
    a = loss(x, tr.data.x_train[idx])
    (ga,) = torch.autograd.grad(a, x)
    b = loss(x, ref_features=tr.ref_features[idx])
    (gb,) = torch.autograd.grad(b, x)
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(ga, gb, rtol=1e-4, atol=1e-7)
    assert tr.ref_features.shape == (len(tr.data.x_train), 128)
    with pytest.raises(ValueError, match="exactly one"):
        loss(x)
    px = OTLoss(2, 0.35)
    torch.testing.assert_close(px.reference_features(tr.data.x_train[idx]), tr.data.x_train[idx].flatten(1))


def test_reference_pool_disjoint_from_batch(tiny_cfg):
    tr = Trainer(tiny_cfg)
    idx = tr.pool.idx[:40]
    ref = tr.pool.draw(100, idx, tr.ref_gen)
    assert len(set(ref.tolist()) & set(idx.tolist())) == 0
    assert set(ref.tolist()) <= set(tr.pool.idx.tolist())


def test_ot_weight_schedule(tiny_cfg):
    c = tiny_cfg.replace(ot_lambda=0.2, ot_start_epoch=2, ot_warmup_epochs=4)
    assert [ot_weight(c, e) for e in (0, 1.9, 2, 4, 6, 10)] == pytest.approx([0, 0, 0, 0.1, 0.2, 0.2])
    assert ot_weight(tiny_cfg, 5) == 0.0


def test_resume_reproduces_uninterrupted_run(tiny_cfg, check_resume):
    check_resume(tiny_cfg.replace(ot_lambda=0.1, ot_ref_batch=16, dropout=0.1))  # every RNG stream in use


def test_interrupted_checkpoint_write_keeps_previous(tmp_path, monkeypatch):
    path = tmp_path / "ck.pt"
    save_checkpoint({"w": torch.arange(5), "epoch": 1}, path)
    real_save = torch.save

    def crash(obj, f, *a, **k):
        f.write(b"partial checkpoint bytes")  # part of the temp file is written ...
        raise KeyboardInterrupt("simulated crash during the write")  # ... then the process dies

    monkeypatch.setattr(ckpt_mod.torch, "save", crash)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint({"w": torch.zeros(5), "epoch": 2}, path)
    monkeypatch.setattr(ckpt_mod.torch, "save", real_save)
    ck = load_checkpoint(path)
    assert ck["epoch"] == 1 and torch.equal(ck["w"], torch.arange(5))
    assert os.listdir(tmp_path) == ["ck.pt"]  # no temp file left behind
    with pytest.raises(FileNotFoundError):
        load_checkpoint(tmp_path / "missing.pt")


def test_trainer_logs_metrics_grids_and_checkpoint(tiny_cfg):
    cfg = tiny_cfg.replace(epochs=1, eval_final=True, ot_lambda=0.1)
    tr = Trainer(cfg)
    hist = tr.train()
    rec = hist[-1]
    for k in ("loss", "loss_ot", "val_loss", "ot_train", "ot_test", "mmd2_train", "fid_test", "classes_present"):
        assert rec[k] is not None, k
    out = cfg.out_dir
    for name in ("checkpoint.pt", "log.json", "log.csv", "curves.png", "samples_0001.png"):
        assert os.path.exists(os.path.join(out, name)), name
    assert json.load(open(os.path.join(out, "log.json")))["history"][0]["epoch"] == 1
    from diffusion.train import feature_net_path
    assert os.path.exists(feature_net_path(cfg, 8, "eval"))  # the eval feature net (the metrics') is cached
    model, diffusion, c2 = load_model(os.path.join(out, "checkpoint.pt"))
    assert c2 == cfg and diffusion.T == cfg.timesteps
    x = tr.generate(4, seed=0)
    assert x.shape == (4, 1, 8, 8)


def test_finetune_from_checkpoint(tiny_cfg, tmp_path):
    base = Trainer(tiny_cfg.replace(epochs=1))
    base.train()
    ft = Trainer(tiny_cfg.replace(out_dir=str(tmp_path / "ft"), init_from=base.ckpt_path, ot_lambda=0.1))
    assert torch.equal(_params(ft.model), _params(base.model))
    assert ft.epoch == 0


@pytest.mark.parametrize("amp", ["bf16", "fp16"])
def test_autocast_train_step(tiny_cfg, amp):
    """bf16 / fp16 autocast (here on CPU: the same code path as CUDA): the UNet runs in the low
    precision, the ε-loss and the Sinkhorn term in float32, the step updates the weights, and
    fp16 goes through the loss scaler."""
    tr = Trainer(tiny_cfg.replace(amp=amp, ot_lambda=0.1, ot_blur=0.35))
    low = {"bf16": torch.bfloat16, "fp16": torch.float16}[amp]
    assert tr.amp_dtype is low and tr.scaler.is_enabled() == (amp == "fp16")
    seen = []
    hook = tr.model.register_forward_hook(lambda m, i, o: seen.append(o.dtype))
    before = _params(tr.model)
    terms = tr.train_step(torch.arange(32))
    hook.remove()
    assert seen == [low]
    assert all(torch.isfinite(torch.tensor(terms[k])) for k in ("loss", "loss_eps", "loss_ot"))
    assert terms["loss"] == pytest.approx(terms["loss_eps"] + 0.1 * terms["loss_ot"], rel=1e-5)
    if amp == "fp16":  # the scaler skips the steps whose scaled gradients overflow, then lowers its scale
        scale0 = 2.0 ** 30  # far too large (whether the default 2^16 overflows at once depends on the data)
        tr.scaler.update(scale0)
        start = _params(tr.model)
        tr.train_step(torch.arange(32))
        assert torch.equal(_params(tr.model), start) and tr.scaler.get_scale() == scale0 / 2  # skipped, halved
        for _ in range(40):
            if (_params(tr.model) - start).abs().max() > 0:
                break
            tr.train_step(torch.arange(32))
        assert tr.scaler.get_scale() < scale0 / 2
    assert (_params(tr.model) - before).abs().max() > 0
    assert all(p.dtype == torch.float32 for p in tr.model.parameters())  # master weights stay float32
    with tr._autocast():  # the OT term is computed in float32 even inside autocast
        idx = torch.arange(16)
        _, x0_hat = tr.diffusion.training_loss(tr.model, tr.data.x_train[idx], torch.randint(0, 50, (16,)),
                                               torch.randn(16, 1, 8, 8))
        loss_ot = tr.ot_loss(x0_hat, tr.data.x_train[tr.pool.draw(16, idx, tr.ref_gen)])
    assert loss_ot.dtype == torch.float32 and torch.isfinite(loss_ot)


def test_resume_with_fp16_scaler(tiny_cfg, check_resume):
    check_resume(tiny_cfg.replace(amp="fp16"))  # the loss scale is part of the exact state


def _opt_state_equal(a, b):
    """Two Adam state dicts hold exactly equal tensors (step counts, moments) and param groups."""
    sa, sb = a.state_dict(), b.state_dict()
    assert sa["param_groups"] == sb["param_groups"]
    assert sa["state"].keys() == sb["state"].keys()
    for k in sa["state"]:
        for name, va in sa["state"][k].items():
            vb = sb["state"][k][name]
            assert torch.equal(va, vb) if torch.is_tensor(va) else va == vb, (k, name)
    return True


def _history(trainer):
    """Per-epoch records without the wall-clock fields (the only values allowed to differ)."""
    return [{k: v for k, v in h.items() if not k.endswith("_time")} for h in trainer.history]


def test_resume_mid_run_with_evaluation_and_feature_ot(tiny_cfg, tmp_path, monkeypatch):
    """README's 'exact resume' with everything on: feature-space OT (the cached feature net),
    evaluation every epoch (DDIM sampling, feature metrics, grids) and a resume after epoch 1
    and after epoch 2 of 3.  The resumed runs end with the uninterrupted run's weights, EMA
    weights, Adam state and full per-epoch history (losses, validation loss, every metric),
    exactly equal.  (The PNG curves and grids are not part of the state: drawn as no-ops here,
    which takes this test from ~20 s to ~5 s.)"""
    import diffusion.train as train_mod

    monkeypatch.setattr(train_mod, "plot_history", lambda *a, **k: None)
    monkeypatch.setattr(train_mod, "save_grid", lambda *a, **k: None)
    cfg = tiny_cfg.replace(epochs=3, eval_every=1, eval_n=16, grid_n=4, val_n=32, ot_lambda=0.1,
                           ot_space="feature", ot_squash="tanh", ot_ref_batch=16, dropout=0.1)
    data = Trainer(cfg).data  # loaded once, shared (read only) by the five trainers
    runs = {}
    for stop in (1, 2, None):  # None: uninterrupted; the first run trains and caches the feature net
        out = str(tmp_path / f"stop{stop}")
        if stop is not None:
            Trainer(cfg.replace(out_dir=out, epochs=stop), data, log=lambda *a: None).train()
        tr = Trainer(cfg.replace(out_dir=out), data, resume=stop is not None, log=lambda *a: None)
        assert tr.epoch == (stop or 0)
        tr.train()
        runs[stop] = tr
    straight = runs[None]
    hist = _history(straight)
    assert [h["epoch"] for h in hist] == [1, 2, 3] and all(h["ot_train"] is not None for h in hist)
    assert all(h["loss_ot"] is not None for h in hist)
    for stop in (1, 2):
        r = runs[stop]
        assert r.step == straight.step == 3 * straight.steps_per_epoch
        assert torch.equal(_params(r.model), _params(straight.model)), f"weights after a resume at epoch {stop}"
        assert torch.equal(_params(r.ema.model), _params(straight.ema.model)), f"EMA after a resume at epoch {stop}"
        assert _opt_state_equal(r.opt, straight.opt)
        assert _history(r) == hist, f"history after a resume at epoch {stop}"
