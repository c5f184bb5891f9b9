"""Tiny configurations shared by the diffusion tests (one thread: see tests/conftest.py)."""
import pytest

from diffusion.config import DiffusionConfig


@pytest.fixture
def tiny_cfg(tmp_path):
    """A few-second digits run: 128 training images, a one-level UNet of width 8, T=50."""
    return DiffusionConfig(dataset="digits", n_train=128, n_test=64, timesteps=50, dim=8, dim_mults=(1, 2),
                           resnet_blocks=1, epochs=2, batch_size=32, lr=1e-3, sample_steps=5, eval_every=0,
                           eval_final=False, eval_n=32, val_n=64, grid_n=16, feature_epochs=1,
                           out_dir=str(tmp_path / "run"), feature_path=str(tmp_path / "features.pt"),
                           progress=False, ot_pool_size=64)
