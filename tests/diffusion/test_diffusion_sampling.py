import pytest
import torch

from diffusion.model import Unet
from diffusion.process import GaussianDiffusion
from diffusion.sample import ddim_sample, ddim_sample_with_ot, ddim_timesteps, ddpm_sample, ot_move
from otkernels import SamplesLoss


@pytest.mark.parametrize("size,mults,attn,channels", [(8, (1, 2), (), 1), (8, (1, 2), (1,), 1),
                                                      (28, (1, 2, 2), (2,), 1), (32, (1, 2, 2), (), 3)])
def test_unet_shapes(size, mults, attn, channels):
    m = Unet(8, mults, channels, resnet_blocks=1, attn_levels=attn, heads=2, dim_head=8)
    x = torch.randn(2, channels, size, size)
    assert m(x, torch.tensor([0, 999])).shape == x.shape


def test_unet_class_conditioning():
    torch.manual_seed(0)
    m = Unet(8, (1, 2), resnet_blocks=1, num_classes=10, cond_drop_prob=0.5).eval()
    x, t = torch.randn(4, 1, 8, 8), torch.full((4,), 10)
    y = torch.tensor([0, 1, 2, 3])
    out_c, out_u = m(x, t, y), m(x, t)
    assert not torch.allclose(out_c, out_u)
    # y=None is the null class; a drop mask of all True is the same thing
    torch.testing.assert_close(m(x, t, y, cond_drop_mask=torch.ones(4, dtype=torch.bool)), out_u)


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    return Unet(8, (1, 2), resnet_blocks=1).eval(), GaussianDiffusion(50)


def test_ddim_eta0_deterministic(tiny):
    model, d = tiny
    noise = torch.randn(6, 1, 8, 8, generator=torch.Generator().manual_seed(1))
    a = ddim_sample(model, d, steps=10, eta=0.0, noise=noise, generator=torch.Generator().manual_seed(2))
    b = ddim_sample(model, d, steps=10, eta=0.0, noise=noise, generator=torch.Generator().manual_seed(3))
    assert torch.equal(a, b)
    c = ddim_sample(model, d, steps=10, eta=1.0, noise=noise, generator=torch.Generator().manual_seed(3))
    assert not torch.equal(a, c)


def test_sampler_shapes_and_ranges(tiny):
    model, d = tiny
    g = torch.Generator().manual_seed(0)
    for x in (ddpm_sample(model, d, (3, 1, 8, 8), generator=g),
              ddim_sample(model, d, (3, 1, 8, 8), steps=7, eta=0.5, generator=g),
              ddim_sample_with_ot(model, d, torch.rand(20, 1, 8, 8) * 2 - 1, (3, 1, 8, 8), steps=5, ot_ref_n=8,
                                  generator=g),
              ddim_sample_with_ot(model, d, torch.rand(20, 1, 8, 8) * 2 - 1, (3, 1, 8, 8), steps=5, ot_ref_n=8,
                                  ot_optimizer="adam", ot_inner_iters=2, ot_first_k=2, generator=g)):
        assert x.shape == (3, 1, 8, 8) and torch.isfinite(x).all()
        assert x.min() >= -1 and x.max() <= 1
    assert ddim_timesteps(1000, 50)[0] == 999 and ddim_timesteps(1000, 50)[-1] == 0
    with pytest.raises(ValueError, match="steps"):
        ddim_timesteps(50, 51)


def test_ot_guidance_changes_only_what_it_should(tiny):
    """ot_scale=0 is plain DDIM; a positive scale moves the samples."""
    model, d = tiny
    noise = torch.randn(5, 1, 8, 8, generator=torch.Generator().manual_seed(1))
    ref = torch.rand(30, 1, 8, 8, generator=torch.Generator().manual_seed(2)) * 2 - 1
    plain = ddim_sample(model, d, steps=5, noise=noise)
    zero = ddim_sample_with_ot(model, d, ref, steps=5, ot_scale=0.0, noise=noise)
    torch.testing.assert_close(zero, plain, atol=1e-5, rtol=0)
    moved = ddim_sample_with_ot(model, d, ref, steps=5, ot_scale=0.5, noise=noise)
    assert (moved - plain).abs().max() > 1e-3


def test_ot_move_reduces_sinkhorn():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(40, 1, 4, 4, generator=g)
    ref = torch.randn(50, 1, 4, 4, generator=g) + 1.5
    loss = SamplesLoss("sinkhorn", p=2, blur=0.35)
    before = loss(x.flatten(1), ref.flatten(1)).item()
    for kw in (dict(scale=0.3), dict(optimizer="adam", lr=0.1, iters=5)):
        after = loss(ot_move(x, ref, loss, **kw).flatten(1), ref.flatten(1)).item()
        assert after < 0.8 * before
