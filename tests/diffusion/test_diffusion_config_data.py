import os

import pytest
import torch

from diffusion.cli import main
from diffusion.config import PRESETS, DiffusionConfig, apply_overrides, preset
from diffusion.data import balanced_subset, batches, load_data, load_mnist, validation_size, validation_split


@pytest.mark.parametrize("changes,match", [
    (dict(lr=-1e-3), "lr must be > 0"),
    (dict(beta_schedule="quadratic"), "beta_schedule must be one of"),
    (dict(objective="score"), "objective must be one of"),
    (dict(sample_steps=2000), r"sample_steps must be <= timesteps \(1000\)"),
    (dict(dataset="imagenet"), "dataset must be one of"),
    (dict(dataset="mnist", data_path=None), "data_path is required"),
    (dict(ema_decay=1.0), r"ema_decay must be in \[0, 1\)"),
    (dict(dim_mults=()), "dim_mults must be"),
    (dict(attn_levels=(3,)), "attn_levels must be"),
    (dict(amp="fp8"), "amp must be one of"),
    (dict(ot_space="latent"), "ot_space must be one of"),
    (dict(ot_p=3), "ot_p must be one of"),
    (dict(batch_size=0), "batch_size must be > 0"),
    (dict(ot_max_t=5000), "ot_max_t must be in"),
])
def test_bad_config_values_name_the_field(changes, match):
    with pytest.raises(ValueError, match=match):
        DiffusionConfig(**changes)


def test_presets_and_overrides():
    for name in PRESETS:
        preset(name)
    ref = preset("mnist")
    assert (ref.dim, ref.dim_mults, ref.epochs, ref.lr, ref.batch_size) == (64, (1, 2, 4), 35, 2e-4, 128)
    with pytest.raises(ValueError, match="unknown preset 'cifar'"):
        preset("cifar")
    with pytest.raises(ValueError, match="unknown config field"):
        preset("digits", learning_rate=1)
    c = apply_overrides(preset("digits"), ["dim_mults=1,2,4", "ot_lambda=0.1", "class_cond=true", "ot_max_t=none"])
    assert c.dim_mults == (1, 2, 4) and c.ot_lambda == 0.1 and c.class_cond and c.ot_max_t is None
    with pytest.raises(ValueError, match="lr: cannot parse"):
        apply_overrides(c, ["lr=fast"])
    with pytest.raises(TypeError, match="epochs must be a number"):
        DiffusionConfig(epochs="10")


def test_cli_reports_config_errors(capsys):
    assert main(["train", "--preset", "digits", "--lr", "-1"]) == 2
    assert "lr must be > 0" in capsys.readouterr().err
    assert main(["train", "--preset", "nope"]) == 2
    assert main(["train", "--set", "sample_steps=5000"]) == 2
    assert "sample_steps" in capsys.readouterr().err


def test_digits_split_and_subsets():
    d = load_data("digits")  # 1500 training images: 150 held out for validation
    assert d.x_train.shape == (1350, 1, 8, 8) and d.x_val.shape == (150, 1, 8, 8) and d.x_test.shape == (297, 1, 8, 8)
    assert d.x_train.min() == -1 and d.x_train.max() == 1
    assert len(torch.unique(d.y_test)) == 10
    x, y = balanced_subset(d.x_train, d.y_train, 100)
    assert torch.bincount(y).tolist() == [10] * 10
    g = torch.Generator().manual_seed(0)
    idx = torch.cat(list(batches(100, 32, g)))
    assert len(idx) == 96 and len(set(idx.tolist())) == 96


def _unique_mnist_npz(path, n_train=60000, n_test=300):
    """An mnist.npz whose images are all different (the index in two pixels, the split in a
    third), so the splits' disjointness can be checked on the images themselves."""
    import numpy as np

    def images(n, split):
        x = np.zeros((n, 28, 28), dtype=np.uint8)
        i = np.arange(n)
        x[:, 0, 0], x[:, 0, 1], x[:, 0, 2] = i // 256, i % 256, split
        return x

    np.savez(path, x_train=images(n_train, 1), y_train=np.arange(n_train) % 10,
             x_test=images(n_test, 2), y_test=np.arange(n_test) % 10)


def _keys(x):
    return {tuple(v) for v in ((x[:, 0, 0, :3] + 1) * 127.5).round().long().tolist()}


def test_validation_split_is_held_out_of_training(tmp_path):
    """Issue 17: load_data holds a validation split out of the training images (MNIST: 5000;
    digits: 10%, 150 of 1500), stratified, deterministic, independent of n_train; train,
    validation and test are disjoint (checked on indices and on the images); the validation
    loss uses it, never the test set."""
    path = str(tmp_path / "mnist.npz")
    _unique_mnist_npz(path)
    d = load_data("mnist", path)
    assert (len(d.x_train), len(d.x_val), len(d.x_test)) == (55000, 5000, 300)
    assert torch.bincount(d.y_val).tolist() == [500] * 10
    tr, va, te = _keys(d.x_train), _keys(d.x_val), _keys(d.x_test)
    assert (len(tr), len(va), len(te)) == (55000, 5000, 300)
    assert not tr & va and not tr & te and not va & te
    assert not set(d.train_idx.tolist()) & set(d.val_idx.tolist())
    sub = load_data("mnist", path, n_train=600, n_test=100)
    assert torch.equal(sub.val_idx, d.val_idx) and set(sub.train_idx.tolist()) <= set(d.train_idx.tolist())
    assert len(sub.x_train) == 600 and not _keys(sub.x_train) & va
    assert torch.equal(load_data("mnist", path, n_train=600, n_test=100).train_idx, sub.train_idx)  # deterministic
    assert not torch.equal(load_data("mnist", path, seed=1).val_idx, d.val_idx)
    assert len(load_data("mnist", path, n_val=1000).x_val) == 1000
    with pytest.raises(ValueError, match="n_val"):
        load_data("mnist", path, n_val=60000)

    dig = load_data("digits")
    assert (len(dig.x_train), len(dig.x_val), len(dig.x_test)) == (1350, 150, 297)
    assert len(set(dig.train_idx.tolist()) | set(dig.val_idx.tolist())) == 1500
    assert torch.equal(load_data("digits").val_idx, dig.val_idx)
    assert validation_size(60000) == 5000 and validation_size(50000) == 5000 and validation_size(1500) == 150
    tr_i, va_i = validation_split(torch.arange(23) % 3, 7, seed=0)
    assert len(va_i) == 7 and sorted(tr_i.tolist() + va_i.tolist()) == list(range(23))


def test_validation_loss_uses_the_validation_split(tiny_cfg):
    from diffusion.train import Trainer

    tr = Trainer(tiny_cfg)
    before = tr.validation_loss()
    tr.data.x_test = tr.data.x_test * 0 + 5  # the test set plays no part
    assert tr.validation_loss() == before
    tr.data.x_val = tr.data.x_val.flip(0)
    assert tr.validation_loss() != before


MNIST_NPZ = os.path.join(os.path.dirname(__file__), "..", "..", "..", "shared", "data", "mnist.npz")


@pytest.mark.skipif(not os.path.exists(MNIST_NPZ), reason="../shared/data/mnist.npz not present")
def test_mnist_npz_tiny_subset():
    d = load_data("mnist", MNIST_NPZ, pad_to_32=True, n_train=50, n_test=20)
    assert d.x_train.shape == (50, 1, 32, 32) and d.x_test.shape == (20, 1, 32, 32)
    assert d.x_train.min() == -1 and d.x_train.max() == 1 and d.x_train[..., :2, :].eq(-1).all()
    assert torch.bincount(d.y_train).tolist() == [5] * 10
    with pytest.raises(FileNotFoundError):
        load_mnist("/nonexistent/mnist.npz")


def _fake_torchvision(monkeypatch, n_train=20, n_test=10):
    """A stand-in ``torchvision.datasets`` (torchvision does not install beside the CPU torch
    here): CIFAR10 / MNIST classes with torchvision's attributes (data, targets), random
    uint8 images, and a record of the arguments they were built with."""
    import sys
    import types

    import numpy as np

    calls = []

    class CIFAR10:
        def __init__(self, root, train=True, download=False):
            calls.append(("cifar10", root, train, download))
            n, rng = (n_train if train else n_test), np.random.default_rng(int(train))   # same data each time
            self.data = rng.integers(0, 256, (n, 32, 32, 3), dtype=np.uint8)   # (N, H, W, C) as torchvision
            self.targets = [i % 10 for i in range(n)]                         # a list, as torchvision

    class MNIST:
        def __init__(self, root, train=True, download=False):
            calls.append(("mnist", root, train, download))
            n, rng = (n_train if train else n_test), np.random.default_rng(int(train))
            self.data = torch.from_numpy(rng.integers(0, 256, (n, 28, 28), dtype=np.uint8))
            self.targets = torch.arange(n) % 10

    tv = types.ModuleType("torchvision")
    ds = types.ModuleType("torchvision.datasets")
    ds.CIFAR10, ds.MNIST, tv.datasets = CIFAR10, MNIST, ds
    monkeypatch.setitem(sys.modules, "torchvision", tv)
    monkeypatch.setitem(sys.modules, "torchvision.datasets", ds)
    return calls


def test_cifar10_through_torchvision_layout(monkeypatch):
    calls = _fake_torchvision(monkeypatch)
    d = load_data("cifar10", "/data/cifar", n_train=10, n_test=10)
    assert d.x_train.shape == (10, 3, 32, 32) and d.x_test.shape == (10, 3, 32, 32) and d.shape == (3, 32, 32)
    assert d.x_train.dtype == torch.float32 and d.x_train.is_contiguous()
    assert -1 <= d.x_train.min() and d.x_train.max() <= 1
    assert torch.bincount(d.y_train, minlength=10).tolist() == [1] * 10
    # never downloads: both splits read from the given root
    assert {c[1:] for c in calls} == {("/data/cifar", True, False), ("/data/cifar", False, False)}
    # channel order and scale: pixel (n, h, w, c) of torchvision's array lands at [n, c, h, w] as v/127.5 − 1
    import sys
    from diffusion.data import load_cifar10
    full = load_cifar10("/data/cifar")
    raw = sys.modules["torchvision.datasets"].CIFAR10("/data/cifar", train=True).data
    assert full.x_train[3, 2, 5, 7].item() == pytest.approx(raw[3, 5, 7, 2] / 127.5 - 1, abs=1e-6)
    assert full.x_train[0, 0].flatten().tolist() == pytest.approx((raw[0, :, :, 0].flatten() / 127.5 - 1).tolist(), abs=1e-6)
    assert full.y_train.dtype == torch.long and full.y_train.tolist() == [i % 10 for i in range(20)]
    with pytest.raises(ValueError, match="needs data_path"):
        load_data("cifar10")


def test_mnist_torchvision_root(monkeypatch):
    calls = _fake_torchvision(monkeypatch)
    d = load_data("mnist", "/data/mnist-root", pad_to_32=True)  # 20 training images: 2 held out for validation
    assert d.x_train.shape == (18, 1, 32, 32) and d.x_val.shape == (2, 1, 32, 32) and d.x_test.shape == (10, 1, 32, 32)
    assert d.x_train[..., :2, :].eq(-1).all()
    assert all(not c[3] for c in calls)  # download=False


def test_cifar10_without_torchvision_says_so(monkeypatch):
    import sys
    monkeypatch.setitem(sys.modules, "torchvision", None)
    monkeypatch.setitem(sys.modules, "torchvision.datasets", None)
    with pytest.raises(ImportError, match="CIFAR-10 needs torchvision"):
        load_data("cifar10", "/data/cifar")
