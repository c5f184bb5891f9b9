"""Experiments on a trained checkpoint: sample quality and feature-space metrics, and the
OT-guidance comparison (plain DDIM vs ``ddim_sample_with_ot`` from the same initial noise).

    python -m diffusion evaluate --ckpt runs/digits/checkpoint.pt --ot-guidance --json ot.json
"""
from __future__ import annotations

import time

import torch

from .data import load_data
from .evaluation import feature_metrics, save_grid
from .features import classify, embed
from .sample import ddim_sample, ddim_sample_with_ot
from .train import feature_net_for, load_model


def _report(net, x, real_train, real_test, blur):
    f = embed(net, x)
    probs = torch.cat([net(x[i:i + 1000]).float().softmax(1) for i in range(0, len(x), 1000)])
    out = classify(net, x)
    for split, fr in (("train", real_train), ("test", real_test)):
        out.update({f"{k}_{split}": v for k, v in feature_metrics(fr, f, blur, fake_probs=probs).items()})
    return out


@torch.no_grad()
def evaluate_checkpoint(ckpt: str, n: int = 1000, steps: int = 50, eta: float = 0.0, seed: int = 0,
                        ot_guidance: bool = False, ot_kwargs: dict | None = None, grid: str | None = None,
                        batch_size: int = 1000, log=print) -> dict:
    """Generate ``n`` DDIM-``steps`` samples from the checkpoint's EMA model and measure them
    with the dataset's feature net: class shares, max share, mean top-1 confidence, and OT /
    MMD / FID in feature space vs the train and test images.  With ``ot_guidance``, also
    sample with :func:`ddim_sample_with_ot` (references: the training images) from the same
    noise, and report both and the relative change of OT(gen, train) and OT(gen, test)."""
    model, diffusion, cfg = load_model(ckpt)
    data = load_data(cfg.dataset, cfg.data_path, cfg.pad_to_32, cfg.n_train, cfg.n_test, cfg.seed)
    net = feature_net_for(cfg, data)
    g = torch.Generator().manual_seed(seed)
    noise = torch.randn((n, *data.shape), generator=g)
    real_train, real_test = embed(net, data.x_train[: max(n, 2000)]), embed(net, data.x_test)
    result = {"ckpt": ckpt, "n": n, "steps": steps, "eta": eta, "seed": seed, "metric_blur": cfg.metric_blur}

    t0 = time.perf_counter()
    x = torch.cat([ddim_sample(model, diffusion, steps=steps, eta=eta, noise=noise[i:i + batch_size],
                               generator=torch.Generator().manual_seed(seed + 1))
                   for i in range(0, n, batch_size)])
    result["ddim"] = _report(net, x, real_train, real_test, cfg.metric_blur)
    result["ddim"]["time"] = time.perf_counter() - t0
    if grid:
        save_grid(x[:cfg.grid_n], grid)
    log(f"DDIM-{steps}: " + _line(result["ddim"]))

    if ot_guidance:
        kw = dict(ot_scale=0.1, ot_ref_n=128, ot_inner_iters=1, ot_blur=0.35, ot_p=2)
        kw.update(ot_kwargs or {})
        space = kw.pop("space", "pixel")
        if space == "feature":
            kw["feature_fn"] = net.embed
        t0 = time.perf_counter()
        xo = torch.cat([ddim_sample_with_ot(model, diffusion, data.x_train, steps=steps, eta=eta,
                                            noise=noise[i:i + batch_size],
                                            generator=torch.Generator().manual_seed(seed + 1), **kw)
                        for i in range(0, n, batch_size)])
        result["ddim_ot"] = _report(net, xo, real_train, real_test, cfg.metric_blur)
        result["ddim_ot"]["time"] = time.perf_counter() - t0
        result["ot_guidance"] = {**{k: v for k, v in kw.items() if k != "feature_fn"}, "space": space}
        for split in ("train", "test"):
            a, b = result["ddim"][f"ot_{split}"], result["ddim_ot"][f"ot_{split}"]
            result[f"ot_{split}_reduction"] = (a - b) / a
        if grid:
            save_grid(xo[:cfg.grid_n], grid.replace(".png", "_ot.png"))
        log(f"OT-guided DDIM-{steps}: " + _line(result["ddim_ot"]))
        log(f"OT(gen, train): {result['ddim']['ot_train']:.4f} -> {result['ddim_ot']['ot_train']:.4f} "
            f"({100 * result['ot_train_reduction']:.1f}% lower); OT(gen, test): {result['ddim']['ot_test']:.4f} -> "
            f"{result['ddim_ot']['ot_test']:.4f} ({100 * result['ot_test_reduction']:.1f}% lower)")
    return result


def _line(r: dict) -> str:
    return (f"classes {r['classes_present']}/10, max share {r['max_class_share']:.3f}, "
            f"mean conf {r['mean_confidence']:.3f}, OT train {r['ot_train']:.4f} test {r['ot_test']:.4f}, "
            f"FID train {r['fid_train']:.3f}")
