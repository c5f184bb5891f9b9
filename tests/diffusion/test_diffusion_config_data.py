import os

import pytest
import torch

from diffusion.cli import main
from diffusion.config import PRESETS, DiffusionConfig, apply_overrides, preset
from diffusion.data import balanced_subset, batches, load_data, load_mnist


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
    d = load_data("digits")
    assert d.x_train.shape == (1500, 1, 8, 8) and d.x_test.shape == (297, 1, 8, 8)
    assert d.x_train.min() == -1 and d.x_train.max() == 1
    assert len(torch.unique(d.y_test)) == 10
    x, y = balanced_subset(d.x_train, d.y_train, 100)
    assert torch.bincount(y).tolist() == [10] * 10
    g = torch.Generator().manual_seed(0)
    idx = torch.cat(list(batches(100, 32, g)))
    assert len(idx) == 96 and len(set(idx.tolist())) == 96


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
    d = load_data("mnist", "/data/mnist-root", pad_to_32=True)
    assert d.x_train.shape == (20, 1, 32, 32) and d.x_test.shape == (10, 1, 32, 32)
    assert d.x_train[..., :2, :].eq(-1).all()
    assert all(not c[3] for c in calls)  # download=False


def test_cifar10_without_torchvision_says_so(monkeypatch):
    import sys
    monkeypatch.setitem(sys.modules, "torchvision", None)
    monkeypatch.setitem(sys.modules, "torchvision.datasets", None)
    with pytest.raises(ImportError, match="CIFAR-10 needs torchvision"):
        load_data("cifar10", "/data/cifar")
