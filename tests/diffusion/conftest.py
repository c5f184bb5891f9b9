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


@pytest.fixture(scope="module")
def tiny_unet():
    """(a seeded width-8 two-level Unet, GaussianDiffusion(T=50)): for the sampler tests."""
    import torch

    from diffusion.model import Unet
    from diffusion.process import GaussianDiffusion

    torch.manual_seed(0)
    return Unet(8, (1, 2), resnet_blocks=1).eval(), GaussianDiffusion(50)


def _params(module):
    import torch
    return torch.cat([p.detach().flatten() for p in module.parameters()])


@pytest.fixture
def check_resume(tmp_path):
    """``check_resume(cfg) -> (straight, resumed)``: trains ``cfg`` uninterrupted (out_dir a/)
    and as one epoch + a resumed run (b/), and asserts the two end bitwise equal (step,
    weights, EMA weights, per-epoch losses)."""
    import torch

    from diffusion.train import Trainer

    def run(cfg):
        straight = Trainer(cfg.replace(out_dir=str(tmp_path / "a")))
        straight.train()
        first = Trainer(cfg.replace(out_dir=str(tmp_path / "b"), epochs=1))
        first.train()
        del first
        resumed = Trainer(cfg.replace(out_dir=str(tmp_path / "b")), resume=True)
        assert resumed.epoch == 1
        resumed.train()
        assert resumed.step == straight.step
        assert torch.equal(_params(resumed.model), _params(straight.model))
        assert torch.equal(_params(resumed.ema.model), _params(straight.ema.model))
        assert [h["loss"] for h in resumed.history] == [h["loss"] for h in straight.history]
        return straight, resumed

    return run
