"""Compare trained flow-matching couplings (and DDIM) at equal network-call budgets.

:func:`compare_couplings` loads flow checkpoints (``python -m diffusion train --preset
digits-flow --flow-coupling exact|sinkhorn|independent``), samples each from the same noises
at every NFE and reports feature-space OT / FID / class balance and path straightness::

    python -m diffusion.flow_compare --ckpt exact=runs/digits-flow-exact/checkpoint.pt \\
        --ckpt independent=runs/digits-flow-indep/checkpoint.pt --ddim runs/digits/checkpoint.pt \\
        --json diffusion/assets/digits_flow_couplings.json --plot flow.png --grid grid.png

An experiment, so it sits above the trainer (it loads checkpoints with :func:`train.load_model`);
the method itself is :mod:`diffusion.flow`.
"""
from __future__ import annotations

import json
import os
import time

import torch

from .data import load_data
from .evaluation import sample_report
from .features import embed
from .flow import FlowMatching, integrate, path_straightness, straightness
from .methods import COUPLINGS, EVALS_PER_STEP, SOLVERS
from .sample import ddim_sample
from .train import feature_net_for, load_model


def coupling_costs(x: torch.Tensor, batch_size: int = 128, batches: int = 10, seed: int = 0, blur: float = 1.0) -> dict:
    """Mean |x0 − x1|² per pair over ``batches`` minibatches of images x (N,C,H,W) and fresh
    noise, for each coupling (what the coupling changes in training)."""
    g = torch.Generator().manual_seed(seed)
    out = {c: [] for c in COUPLINGS}
    for _ in range(batches):
        x1 = x[torch.randperm(len(x), generator=g)[:batch_size]]
        noise = torch.randn(x1.shape, generator=g)
        for c in COUPLINGS:
            x0 = FlowMatching(coupling=c, coupling_blur=blur).pair(x1, noise, generator=g)
            out[c].append((x1 - x0).flatten(1).square().sum(1).mean().item())
    return {c: sum(v) / len(v) for c, v in out.items()}


def _plot(result, path, keys=(("ot_train", "OT(gen, train)"), ("fid_train", "FID(gen, train)"),
                              ("max_class_share", "max class share"), ("mean_confidence", "mean confidence"),
                              ("straightness", "straightness |x1−x0|²/∫|v|²"))):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(keys), figsize=(3.2 * len(keys), 2.8))
    for ax, (k, label) in zip(axes, keys):
        for name, rows in result["methods"].items():
            pts = [(int(nfe), r[k]) for nfe, r in rows["nfe"].items() if r.get(k) is not None]
            if pts:
                ax.plot(*zip(*pts), marker="o", label=name)
        ax.set_xscale("log")
        ax.xaxis.set_minor_locator(matplotlib.ticker.NullLocator())
        ax.set_xticks(result["nfes"], [str(n) for n in result["nfes"]])
        ax.set_xlabel("NFE (network calls)")
        ax.set_title(label, fontsize=9)
        if k in ("ot_train", "fid_train"):
            ax.set_yscale("log")
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


def _grid_figure(panels: dict, path: str) -> None:
    """One PNG: a row per method, a column per NFE, each panel a square grid of its samples;
    ``panels[(method, nfe)]`` = images (n,C,H,W) in [-1, 1]."""
    import math

    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    methods = list(dict.fromkeys(m for m, _ in panels))
    nfes = list(dict.fromkeys(k for _, k in panels))
    fig, axes = plt.subplots(len(methods), len(nfes), figsize=(1.35 * len(nfes) + 0.4, 1.45 * len(methods)),
                             squeeze=False)
    for r, m in enumerate(methods):
        for c, k in enumerate(nfes):
            ax = axes[r][c]
            ax.set_xticks([])
            ax.set_yticks([])
            if (m, k) in panels:
                x = ((panels[(m, k)].detach().float().cpu().clamp(-1, 1) + 1) / 2)[:, 0]
                side = math.ceil(math.sqrt(len(x)))
                H, W = x.shape[-2:]
                img = torch.ones(side * (H + 1) + 1, side * (W + 1) + 1)
                for i in range(len(x)):
                    a, b = divmod(i, side)
                    img[1 + a * (H + 1):1 + a * (H + 1) + H, 1 + b * (W + 1):1 + b * (W + 1) + W] = x[i]
                ax.imshow(img.numpy(), cmap="gray", vmin=0, vmax=1, interpolation="nearest")
            if r == 0:
                ax.set_title(f"NFE {k}", fontsize=8)
            if c == 0:
                ax.set_ylabel(m, fontsize=8)
    fig.tight_layout(pad=0.3)
    fig.savefig(path, dpi=80)
    plt.close(fig)


@torch.no_grad()
def compare_couplings(ckpts: dict, nfes=(2, 5, 10, 20), n: int = 1000, seed: int = 0, solver: str = "euler",
                      ddim_ckpt: str | None = None, straightness_steps: int = 100, out_json: str | None = None,
                      out_png: str | None = None, grid_png: str | None = None, grid_n: int = 16,
                      batch_size: int = 1000, log=print) -> dict:
    """Compare flow-matching checkpoints ``{name: path}`` (e.g. exact vs independent coupling)
    at each NFE in ``nfes`` from the same ``n`` initial noises: feature-space OT / MMD / FID
    vs the train and test images, classes present, max class share and mean confidence from
    the dataset's feature net (as diffusion/experiments.py), and the straightness of the
    paths the solver followed; plus, per checkpoint, :func:`path_straightness` with
    ``straightness_steps`` Euler steps, and the coupling's mean pair cost on training
    minibatches.  ``ddim_ckpt``: also DDIM (η = 0, ``nfe`` steps) of a diffusion checkpoint
    from the same noise.  Writes ``out_json``, ``out_png`` (metric vs NFE, one line per
    method) and ``grid_png`` (the first ``grid_n`` samples of each method at each NFE)."""
    if not ckpts:
        raise ValueError("ckpts must name at least one flow checkpoint")
    t_all = time.perf_counter()
    loaded = {name: load_model(path) for name, path in ckpts.items()}
    for name, (_, proc, _) in loaded.items():
        if not isinstance(proc, FlowMatching):
            raise ValueError(f"checkpoint {ckpts[name]!r} ({name}) is not a flow-matching model (method='flow')")
    cfg = next(iter(loaded.values()))[2]
    data = load_data(cfg.dataset, cfg.data_path, cfg.pad_to_32, cfg.n_train, cfg.n_test, cfg.seed, cfg.n_val)
    net = feature_net_for(cfg, data, role="eval")  # measures: the eval net
    noise = torch.randn((n, *data.shape), generator=torch.Generator().manual_seed(seed))
    real_train, real_test = embed(net, data.x_train[: max(n, 2000)]), embed(net, data.x_test)
    evals = EVALS_PER_STEP[solver]
    bad = [k for k in nfes if k % evals]
    if bad:
        raise ValueError(f"with solver {solver!r} every NFE must be a multiple of {evals}, got {bad}")
    result = {"n": n, "seed": seed, "solver": solver, "nfes": list(nfes), "metric_blur": cfg.metric_blur,
              "dataset": cfg.dataset, "ckpts": dict(ckpts), "methods": {},
              "coupling_cost": coupling_costs(data.x_train, cfg.batch_size, seed=seed, blur=cfg.flow_blur)}
    grids = {}
    for name, (model, flow, c) in loaded.items():
        rows = {"coupling": c.flow_coupling, "sigma_min": c.flow_sigma, "nfe": {}}
        for nfe in nfes:
            t0 = time.perf_counter()
            xs, es = [], []
            for i in range(0, n, batch_size):
                x, e = integrate(model, flow, noise[i:i + batch_size], nfe // evals, solver)
                xs.append(x)
                es.append(straightness(noise[i:i + batch_size], x, e))
            x = torch.cat(xs).clamp(-1, 1)
            dt = time.perf_counter() - t0
            rec = sample_report(net, x, real_train, real_test, cfg.metric_blur)
            rec.update(straightness=torch.cat(es).mean().item(), sample_time=dt)
            rows["nfe"][str(nfe)] = rec
            grids[(name, nfe)] = x[:grid_n]
            log(f"{name} NFE {nfe}: " + _line(rec))
        rows["path_straightness"] = path_straightness(model, flow, noise[:batch_size], straightness_steps)
        log(f"{name}: {straightness_steps}-step straightness {rows['path_straightness']['straightness']:.4f}")
        result["methods"][name] = rows
    if ddim_ckpt and os.path.exists(ddim_ckpt):
        model, diffusion, _ = load_model(ddim_ckpt)
        rows = {"ckpt": ddim_ckpt, "nfe": {}}
        for nfe in nfes:
            t0 = time.perf_counter()
            x = torch.cat([ddim_sample(model, diffusion, steps=nfe, eta=0.0, noise=noise[i:i + batch_size])
                           for i in range(0, n, batch_size)])
            rec = sample_report(net, x, real_train, real_test, cfg.metric_blur)
            rec["sample_time"] = time.perf_counter() - t0
            rows["nfe"][str(nfe)] = rec
            grids[("ddim", nfe)] = x[:grid_n]
            log(f"DDIM NFE {nfe}: " + _line(rec))
        result["methods"]["ddim"] = rows
    elif ddim_ckpt:
        log(f"no DDIM comparison: {ddim_ckpt} not found")
    result["wall_seconds"] = time.perf_counter() - t_all
    if out_json:
        os.makedirs(os.path.dirname(os.path.abspath(out_json)), exist_ok=True)
        with open(out_json, "w") as f:
            json.dump(result, f, indent=1)
    if out_png:
        _plot(result, out_png)
    if grid_png:
        _grid_figure(grids, grid_png)
    return result


def _line(r: dict) -> str:
    s = (f"classes {r['classes_present']}/10, max share {r['max_class_share']:.3f}, "
         f"conf {r['mean_confidence']:.3f}, OT train {r['ot_train']:.3f}, FID train {r['fid_train']:.3f}")
    return s + (f", straightness {r['straightness']:.4f}" if "straightness" in r else "")


def main(argv=None) -> int:
    """``python -m diffusion.flow_compare``: :func:`compare_couplings` from the command line."""
    import argparse

    ap = argparse.ArgumentParser(prog="python -m diffusion.flow_compare", description=compare_couplings.__doc__.split(".")[0])
    ap.add_argument("--ckpt", action="append", required=True, metavar="NAME=PATH", help="a flow checkpoint (repeat)")
    ap.add_argument("--ddim", default=None, help="a diffusion checkpoint to compare with DDIM (optional)")
    ap.add_argument("--nfe", default="2,5,10,20", help="comma-separated network-call budgets")
    ap.add_argument("--n", type=int, default=1000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--solver", choices=SOLVERS, default="euler")
    ap.add_argument("--straightness-steps", type=int, default=100)
    ap.add_argument("--json", default=None)
    ap.add_argument("--plot", default=None)
    ap.add_argument("--grid", default=None)
    args = ap.parse_args(argv)
    ckpts = {}
    for item in args.ckpt:
        if "=" not in item:
            ap.error(f"--ckpt must be NAME=PATH, got {item!r}")
        k, v = item.split("=", 1)
        ckpts[k] = v
    nfes = tuple(int(s) for s in args.nfe.split(",") if s.strip())
    res = compare_couplings(ckpts, nfes, args.n, args.seed, args.solver, args.ddim, args.straightness_steps,
                            args.json, args.plot, args.grid)
    print(f"done in {res['wall_seconds']:.1f} s" + (f"; results -> {args.json}" if args.json else ""))
    return 0


if __name__ == "__main__":  # run the importable module's main: its classes are the ones train.py uses
    from diffusion.flow_compare import main as _main

    raise SystemExit(_main())
