"""Experiments on a trained checkpoint: sample quality and feature-space metrics, the
OT-guidance comparison (plain DDIM vs ``ddim_sample_with_ot`` from the same initial noise), and
the DPM-OT comparison (DDIM-k vs DPM-OT-k at the same number of network evaluations).

    python -m diffusion evaluate --ckpt runs/digits/checkpoint.pt --ot-guidance --json ot.json
    python -m diffusion evaluate --ckpt runs/digits/checkpoint.pt --dpm-ot --dpm-ot-steps 2,5,10 \
        --dpm-ot-t-start 200,400 --json dpm_ot.json
"""
from __future__ import annotations

import math
import os
import time

import torch

from otkernels.assign import argmin_sqdist
from otkernels.metrics import knn

from .data import load_data
from .dpm_ot import DPMOTSampler
from .evaluation import sample_report, save_grid
from .features import embed
from .sample import OT_UNITS, ddim_sample, ddim_sample_with_ot
from .train import feature_net_for, feature_net_info, load_model


@torch.no_grad()
def evaluate_checkpoint(ckpt: str, n: int = 1000, steps: int = 50, eta: float = 0.0, seed: int = 0,
                        ot_guidance: bool = False, ot_kwargs: dict | None = None, grid: str | None = None,
                        batch_size: int = 1000, log=print, dpm_ot: dict | None = None) -> dict:
    """Generate ``n`` DDIM-``steps`` samples from the checkpoint's EMA model and measure them
    with the dataset's eval feature net (``feature_net_for(role="eval")``): class shares, max
    share, mean top-1 confidence, and OT / MMD / FID in feature space vs the train and test
    images, and their memorisation (:func:`memorisation`: distance to the nearest training
    image, in pixels).  With ``ot_guidance``, also sample with :func:`ddim_sample_with_ot`
    (references: the training images; ``space="feature"``: guided in the guide feature net's
    space, never the eval net's) from the same noise, and report both and the relative change
    of OT(gen, train) and OT(gen, test).  ``ot_kwargs["ot_unit"]``: ``"minibatch"`` (default:
    chunks of a multiple of ``ot_ref_n`` samples, group offsets passed on, so the result does
    not depend on ``batch_size``) or ``"all"`` (all ``n`` samples in one call, one reference
    set of ``n`` per step).  ``dpm_ot``: keyword arguments of :func:`dpm_ot_comparison`
    (DDIM-k vs DPM-OT-k from the same noise, DDIM-``steps`` as the reference, measured by the
    eval net), its results under ``"dpm_ot"``.  ``result["feature_nets"]``: how the nets used
    were trained (``"guide"``: None unless feature-space guidance ran)."""
    model, diffusion, cfg = load_model(ckpt)
    data = load_data(cfg.dataset, cfg.data_path, cfg.pad_to_32, cfg.n_train, cfg.n_test, cfg.seed, cfg.n_val)
    net = feature_net_for(cfg, data, role="eval")
    g = torch.Generator().manual_seed(seed)
    noise = torch.randn((n, *data.shape), generator=g)
    real_train, real_test = embed(net, data.x_train[: max(n, 2000)]), embed(net, data.x_test)
    train_nn = knn(data.x_train.flatten(1).float(), None, k=1)[0][:, 0]
    result = {"ckpt": ckpt, "n": n, "steps": steps, "eta": eta, "seed": seed, "metric_blur": cfg.metric_blur,
              "feature_nets": {"eval": feature_net_info(net), "guide": None}}

    t0 = time.perf_counter()
    x = torch.cat([ddim_sample(model, diffusion, steps=steps, eta=eta, noise=noise[i:i + batch_size],
                               generator=torch.Generator().manual_seed(seed + 1))
                   for i in range(0, n, batch_size)])
    result["ddim"] = sample_report(net, x, real_train, real_test, cfg.metric_blur)
    result["ddim"]["time"] = time.perf_counter() - t0
    result["ddim"]["memorisation"] = memorisation(x, data.x_train, train_nn)
    if grid:
        save_grid(x[:cfg.grid_n], grid)
    log(f"DDIM-{steps}: " + _line(result["ddim"]))

    if dpm_ot is not None:
        result["dpm_ot"] = dpm_ot_comparison(model, diffusion, data, net, noise, real_train, real_test,
                                             cfg.metric_blur, reference=(steps, x), seed=seed,
                                             batch_size=batch_size, log=log, train_nn=train_nn, **dpm_ot)

    if ot_guidance:
        kw = dict(ot_scale=0.1, ot_ref_n=128, ot_inner_iters=1, ot_blur=0.35, ot_p=2, ot_unit="minibatch")
        kw.update(ot_kwargs or {})
        space = kw.pop("space", "pixel")
        if kw["ot_unit"] not in OT_UNITS:
            raise ValueError(f"ot_unit must be one of {OT_UNITS}, got {kw['ot_unit']!r}")
        if kw["ot_unit"] == "minibatch" and kw["ot_ref_n"] < 1:
            raise ValueError(f"ot_ref_n must be >= 1, got {kw['ot_ref_n']}")
        if space == "feature":
            guide = feature_net_for(cfg, data, role="guide")
            kw["feature_fn"] = guide.embed
            result["feature_nets"]["guide"] = feature_net_info(guide)
        t0 = time.perf_counter()
        if kw["ot_unit"] == "all":  # the unit is all n samples: one call
            chunk = n
        else:  # whole groups of ot_ref_n per call, offsets passed on: independent of batch_size
            chunk = max(1, batch_size // kw["ot_ref_n"]) * kw["ot_ref_n"]
        xo = torch.cat([ddim_sample_with_ot(model, diffusion, data.x_train, steps=steps, eta=eta,
                                            noise=noise[i:i + chunk],
                                            generator=torch.Generator().manual_seed(seed + 1),
                                            ot_group_offset=0 if kw["ot_unit"] == "all" else i // kw["ot_ref_n"],
                                            **kw)
                        for i in range(0, n, chunk)])
        result["ddim_ot"] = sample_report(net, xo, real_train, real_test, cfg.metric_blur)
        result["ddim_ot"]["time"] = time.perf_counter() - t0
        result["ddim_ot"]["memorisation"] = memorisation(xo, data.x_train, train_nn)
        result["ot_guidance"] = {**{k: v for k, v in kw.items() if k != "feature_fn"}, "space": space,
                                 "samples_per_call": chunk}
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


# ---------------------------------------------------------------------- DPM-OT
def memorisation(x: torch.Tensor, train: torch.Tensor, train_nn: torch.Tensor | None = None,
                 target: torch.Tensor | None = None) -> dict:
    """How close samples x (n, C, H, W) are to the training images (M, C, H, W), in pixels:
    the distance to the nearest training image (one fused argmin pass, no n×M matrix), its
    mean and median, the fraction below the 5th percentile of the train-to-train
    nearest-neighbour distances (``train_nn``, (M,), computed when None), and the fraction of
    samples with a (near-)identical other sample (distance < 1e-3, computed in float64).
    ``target`` (n,): the index of the training image each sample was made from (DPM-OT's OT
    target): adds the mean distance to it and the fraction of samples whose nearest training
    image is their own target."""
    xf, tf = x.flatten(1).float(), train.flatten(1).float()
    if train_nn is None:
        train_nn = knn(tf, None, k=1)[0][:, 0]
    p5 = torch.quantile(train_nn.double(), 0.05).item()
    d2, nn = argmin_sqdist(xf, tf)
    d = d2.clamp(min=0).sqrt()
    # float64: in float32 |x|² + |y|² − 2⟨x, y⟩ leaves up to ~7e-3 between identical images
    dup = knn(xf, None, k=1, dtype=torch.float64)[0][:, 0] if len(xf) > 1 else torch.full((1,), math.inf)
    out = {"nn_train_mean": d.mean().item(), "nn_train_median": d.median().item(),
           "below_train_p5": (d < p5).float().mean().item(), "duplicate_frac": (dup < 1e-3).float().mean().item()}
    if target is not None:
        target = target.to(nn.device)
        out["target_dist_mean"] = (xf - tf[target]).norm(dim=1).mean().item()
        out["nn_is_target"] = (nn == target).float().mean().item()
    return out


MASS_CHECK_SEED = 20230701  # the re-measure's own pseudo-random stream, independent of the fit's


def _sampler_path(cache_dir, method, t_start, tol, seed, latent_steps):
    tag = f"-ls{latent_steps}" if method == "ddim" else ""
    return os.path.join(cache_dir, f"dpm_ot_{method}{tag}_t{t_start}_tol{tol:g}_seed{seed}.pt")


def _variants(mix, eta, mix_noise):
    noises = [mix_noise] if isinstance(mix_noise, str) else list(mix_noise)
    return [{"name": f"mix{m:g}_eta{e:g}" + (f"_{nz}" if m > 0 else ""), "mix": float(m), "eta": float(e),
             "mix_noise": nz} for m in mix for e in eta for nz in (noises if m > 0 else noises[:1])]


@torch.no_grad()
def dpm_ot_comparison(model, diffusion, data, net, noise, real_train, real_test, blur, steps=(2, 5, 10),
                      t_start=(400,), method: str = "q", tol: float = 0.05, max_steps: int = 20000,
                      mix=(0.0,), eta=(0.0,), mix_noise="z", control: bool = False, latent_steps: int = 10,
                      check_samples: int = 1 << 24, cache_dir: str | None = None, reference=None, seed: int = 0,
                      ot_seed: int = 0, grid: str | None = None, grid_steps: int | None = None,
                      grid_variants=("mix0_eta0", "mix1_eta0_z", "mix1_eta0_fresh"), batch_size: int = 1000,
                      progress: bool = False, log=print, train_nn: torch.Tensor | None = None) -> dict:
    """DDIM-k vs DPM-OT-k (``k`` in ``steps``: network evaluations of the sampling; the OT map is
    not one), from the same ``noise`` (n, C, H, W), every set measured by :func:`~diffusion.evaluation.sample_report` and
    :func:`memorisation`.

    For each t' in ``t_start``: a :class:`DPMOTSampler` on the training images (``method``
    latents, seed ``ot_seed``) fitted to ``tol`` (``max_steps``; its wall / CPU time is
    ``fit_time`` / ``fit_cpu_time``), re-measured on ``check_samples`` points of an
    independent pseudo-random stream (``MASS_CHECK_SEED``: ``mass_error``; its own noise per
    cell √(N/n) is ``mass_error_noise``), then sampled with every (``mix``, ``eta``,
    ``mix_noise``) combination (``mix_noise``: ``"z"``, ``"fresh"`` or a list of them; only
    for mix > 0).  ``control``: also the same latents with the target drawn uniformly at
    random instead of by the map (the law the map's output has when fitted).  Each DPM-OT
    report adds ``distinct_targets``, ``target_class_agreement`` (the feature net's label of
    the sample = its target's label) and, in ``memorisation``, ``nn_is_target`` /
    ``target_dist_mean``.  DDIM-k is η = 0 from T-1.  ``cache_dir``: save fitted samplers there and reuse them (``fit_time`` is then
    the stored one).  ``reference``: (steps, samples) of an already generated DDIM reference.
    ``train_nn``: the train-to-train nearest-neighbour distances, when the caller has them.
    ``seed``: the η > 0 / fresh-noise / control streams (the noise z is the caller's).
    ``grid``: PNG of the first 16 samples per row (DDIM reference, DDIM-k, and per t' the
    DPM-OT-k ``grid_variants`` and the training image of each sample's OT target) at
    ``grid_steps`` (default the middle of ``steps``).
    """
    n, dev = len(noise), next(model.parameters()).device
    x_train = data.x_train
    if train_nn is None:
        train_nn = knn(x_train.flatten(1).float(), None, k=1)[0][:, 0]
    test_mem = memorisation(data.x_test, x_train, train_nn)
    out = {"n": n, "method": method, "tol": tol, "ot_seed": ot_seed, "max_steps": max_steps,
           "latent_steps": latent_steps,
           "check_samples": check_samples, "n_train": len(x_train), "dim": x_train[0].numel(),
           "train_nn": {"mean": train_nn.mean().item(), "p5": torch.quantile(train_nn.double(), 0.05).item()},
           "test_memorisation": test_mem, "ddim": {}, "dpm_ot": {}}

    def measure(x, t0, extra=None, target=None):
        r = sample_report(net, x, real_train, real_test, blur)
        r["memorisation"] = memorisation(x, x_train, train_nn, target)
        if target is not None:  # does the sample keep its OT target's class (feature net's label)?
            pred = torch.cat([net(x[i:i + 1000].to(next(net.parameters()).device)).argmax(1).cpu()
                              for i in range(0, len(x), 1000)])
            r["target_class_agreement"] = (pred == data.y_train[target.cpu()]).float().mean().item()
        r["time"] = time.perf_counter() - t0
        r.update(extra or {})
        return r

    gen = lambda: torch.Generator().manual_seed(seed + 1)  # noqa: E731  (η > 0 and fresh-noise streams)
    rows = []
    grid_k = grid_steps or sorted(steps)[len(steps) // 2]
    if reference is not None:
        k_ref, x_ref = reference
        out["ddim"][str(k_ref)] = measure(x_ref, time.perf_counter())
        out["ddim"][str(k_ref)]["time"] = None  # generated by the caller
        rows.append((f"DDIM-{k_ref}", x_ref[:16]))
        log(f"DDIM-{k_ref} memorisation: {_mem_line(out['ddim'][str(k_ref)]['memorisation'])}")
    log(f"test images memorisation: {_mem_line(test_mem)}")
    for k in steps:
        t0 = time.perf_counter()
        x = torch.cat([ddim_sample(model, diffusion, steps=k, noise=noise[i:i + batch_size].to(dev), generator=gen())
                       .cpu() for i in range(0, n, batch_size)])
        out["ddim"][str(k)] = measure(x, t0)
        log(f"DDIM-{k}: " + _line(out["ddim"][str(k)]))
        if k == grid_k:
            rows.append((f"DDIM-{k}", x[:16]))

    for ts in t_start:
        path = _sampler_path(cache_dir, method, ts, tol, ot_seed, latent_steps) if cache_dir else None
        if path and os.path.exists(path):
            s = DPMOTSampler.load(path, model, diffusion)
            log(f"t'={ts}: loaded {path}")
        else:
            s = DPMOTSampler(model, diffusion, x_train, ts, method, latent_steps=latent_steps, seed=ot_seed)
            s.fit(tol=tol, max_steps=max_steps, progress=progress)
            if path:
                s.save(path)
        t0 = time.perf_counter()
        err = s.mass_error(check_samples, seed=MASS_CHECK_SEED)
        hist = s.ot.history
        rec = {"fit_time": s.fit_time, "fit_cpu_time": s.fit_cpu_time, "converged": s.ot.converged, "tol": tol,
               "fit_steps": hist["step"][-1] if hist["step"] else None,
               "fit_samples": hist["samples"][-1] if hist["samples"] else None,
               "checks": [list(c) for c in hist.get("checks", [])],
               "mass_error": err, "mass_error_noise": math.sqrt(s.N / check_samples),
               "mass_error_time": time.perf_counter() - t0, "abar": s.diffusion.alphas_cumprod[ts].item(),
               "variants": {}}
        log(f"t'={ts}: fit {s.fit_time:.1f} s (converged {s.ot.converged}), max relative cell-mass error "
            f"{err:.4f} on {check_samples} fresh points (own noise {rec['mass_error_noise']:.4f} per cell)")
        variants = _variants(mix, eta, mix_noise)
        if control:
            variants.append({"name": "random_target", "mix": 0.0, "eta": 0.0, "mix_noise": "z"})
        for v in variants:
            rec["variants"][v["name"]] = {}
            for k in steps:
                t0 = time.perf_counter()
                if v["name"] == "random_target":
                    idx = torch.randint(0, s.N, (n,), generator=torch.Generator().manual_seed(seed + 2))
                    x = torch.cat([ddim_sample(model, diffusion, steps=k, t_start=ts,
                                               noise=s.latents[idx[i:i + batch_size]].to(dev)).cpu()
                                   for i in range(0, n, batch_size)])
                else:
                    x, idx = s.sample(noise=noise, steps=k, eta=v["eta"], mix=v["mix"], mix_noise=v["mix_noise"],
                                      generator=gen(), batch_size=batch_size, return_index=True)
                    x = x.cpu()
                r = measure(x, t0, {"distinct_targets": int(torch.unique(idx).numel())}, target=idx)
                rec["variants"][v["name"]][str(k)] = r
                log(f"DPM-OT t'={ts} {v['name']} k={k}: " + _line(r) + f", {_mem_line(r['memorisation'])}, "
                    f"{r['distinct_targets']} distinct targets, nearest train image = target "
                    f"{r['memorisation']['nn_is_target']:.3f}, target's class {r['target_class_agreement']:.3f}")
                if k == grid_k and v["name"] in grid_variants:
                    rows.append((f"t'={ts} {v['name']}", x[:16]))
                    if v["mix"] == 0 and v["eta"] == 0:
                        rows.append((f"t'={ts} OT target's x0", s.x0[idx[:16]].cpu()))
        out["dpm_ot"][str(ts)] = rec
    if grid:
        comparison_grid(rows, grid)
    return out


def comparison_grid(rows, path, scale: int = 3) -> None:
    """One PNG: a labelled strip of images per row, rows = [(label, x (m, C, H, W) in [-1, 1])]."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    m = max(len(x) for _, x in rows)
    C, H, W = rows[0][1].shape[1:]
    label_in = 0.3 + 0.055 * max(len(label) for label, _ in rows)  # inches for the labels (7 pt)
    fig, axes = plt.subplots(len(rows), 1, figsize=(m * (W + 1) * scale / 100 + label_in, len(rows) * (H + 2) * scale / 100),
                             dpi=100, squeeze=False)
    for ax, (label, x) in zip(axes[:, 0], rows):
        x = ((x.detach().float().cpu().clamp(-1, 1) + 1) / 2)
        strip = torch.ones(C, H, m * (W + 1) - 1)
        for i in range(len(x)):
            strip[:, :, i * (W + 1):i * (W + 1) + W] = x[i]
        img = strip.permute(1, 2, 0).numpy()
        ax.imshow(img[..., 0] if C == 1 else img, cmap="gray" if C == 1 else None, vmin=0, vmax=1,
                  interpolation="nearest")
        ax.set_xticks([])
        ax.set_yticks([])
        ax.set_ylabel(label, rotation=0, ha="right", va="center", fontsize=7)
    width = fig.get_figwidth()
    fig.subplots_adjust(left=min(0.75, (label_in - 0.1) / width), right=0.99, top=0.99, bottom=0.01, hspace=0.15)
    fig.savefig(path)
    plt.close(fig)


def _mem_line(m: dict) -> str:
    return (f"NN-train dist mean {m['nn_train_mean']:.3f}, below train p5 {m['below_train_p5']:.3f}, "
            f"duplicates {m['duplicate_frac']:.3f}")
