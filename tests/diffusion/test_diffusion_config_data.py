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
