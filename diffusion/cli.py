"""``python -m diffusion train|sample|evaluate``.

    python -m diffusion train --preset digits                      # CPU, minutes
    python -m diffusion train --preset digits --resume             # continue runs/digits exactly
    torchrun --standalone --nproc_per_node=2 -m diffusion train --preset digits-flow   # data parallel
    python -m diffusion train --preset digits --ot-lambda 0.1 --set ot_blur=0.35 --out-dir runs/digits-ot
    python -m diffusion sample --ckpt runs/digits/checkpoint.pt --sampler ddim --n 64 --out grid.png
    python -m diffusion evaluate --ckpt runs/digits/checkpoint.pt --ot-guidance --json ot.json
    python -m diffusion sample --ckpt runs/digits/checkpoint.pt --sampler dpm-ot --steps 5 --t-start 400
    python -m diffusion evaluate --ckpt runs/digits/checkpoint.pt --dpm-ot --dpm-ot-steps 2,5,10 \
        --dpm-ot-t-start 200,400 --dpm-ot-mix 0,1 --json dpm_ot.json
    python -m diffusion sweep --preset digits --quick --jobs 2       # OT training × guidance grid

Every config field has a flag (``--dim-mults 1,2,4``, ``--ot-lambda 0.1``) and can also be set
with ``--set field=value``; see ``diffusion/config.py`` for the fields and presets.
"""
from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
import time

import torch

from .config import PRESETS, DiffusionConfig, apply_overrides, field_names, preset


def _train_parser(sub):
    p = sub.add_parser("train", help="train a model (writes checkpoint, logs, plots, sample grids)")
    p.add_argument("--preset", default="digits", help=f"one of {sorted(PRESETS)} (default digits)")
    p.add_argument("--resume", action="store_true", help="continue from <out_dir>/checkpoint.pt exactly")
    p.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE", help="override a config field")
    for name in field_names():
        p.add_argument("--" + name.replace("_", "-"), dest="f_" + name, default=None, metavar="V",
                       help=argparse.SUPPRESS)
    return p


def _config(args) -> DiffusionConfig:
    items = [f"{n}={getattr(args, 'f_' + n)}" for n in field_names() if getattr(args, "f_" + n) is not None]
    items += args.set
    cfg = preset(args.preset)
    cfg = apply_overrides(cfg, items)
    ckpt = os.path.join(cfg.out_dir, "checkpoint.pt")
    if args.resume and os.path.exists(ckpt):  # the run's own config, with this call's overrides
        from .checkpoint import load_checkpoint
        cfg = apply_overrides(DiffusionConfig(**load_checkpoint(ckpt)["config"]), items)
    return cfg


def cmd_train(args) -> int:
    from .ddp import init_from_env
    from .train import Trainer

    cfg = _config(args)
    rank, _, device = init_from_env(cfg.device)  # under torchrun: the process group (NCCL / gloo)
    if device != cfg.device:
        cfg = cfg.replace(device=device)
    t0 = time.perf_counter()
    trainer = Trainer(cfg, resume=args.resume)
    hist = trainer.train()
    last = hist[-1] if hist else {}
    wall = time.perf_counter() - t0
    if rank > 0:
        return 0
    print(json.dumps({"out_dir": cfg.out_dir, "epochs": trainer.epoch, "steps": trainer.step,
                      "wall_seconds": round(wall, 1), **{k: v for k, v in last.items() if k != "epoch"}}, indent=1))
    return 0


def cmd_sample(args) -> int:
    from .evaluation import save_grid
    from .sample import ddim_sample, ddim_sample_with_ot, ddpm_sample
    from .train import load_model

    model, diffusion, cfg = load_model(args.ckpt)
    g = torch.Generator().manual_seed(args.seed)
    shape = (args.n, model.channels, *_image_hw(cfg))
    y = torch.full((args.n,), args.label, dtype=torch.long) if args.label is not None else None
    if cfg.method == "flow":  # a flow-matching checkpoint: its ODE solver, --steps steps (--sampler ignored)
        from .flow import flow_sample
        x = flow_sample(model, diffusion, shape, args.steps, cfg.flow_solver, y=y, guidance_scale=args.guidance,
                        generator=g)
        args.sampler = f"flow-{cfg.flow_solver}"
    elif args.sampler == "ddpm":
        x = ddpm_sample(model, diffusion, shape, y=y, guidance_scale=args.guidance, generator=g)
    elif args.sampler == "ddim":
        x = ddim_sample(model, diffusion, shape, args.steps, args.eta, y=y, guidance_scale=args.guidance, generator=g)
    elif args.sampler == "dpm-ot":
        x = _sample_dpm_ot(args, model, diffusion, cfg, g)
    else:
        from .data import load_data
        from .train import feature_net_for
        data = load_data(cfg.dataset, cfg.data_path, cfg.pad_to_32, cfg.n_train, cfg.n_test, cfg.seed, cfg.n_val)
        feature_fn = feature_net_for(cfg, data, role="guide").embed if args.ot_space == "feature" else None
        x = ddim_sample_with_ot(model, diffusion, data.x_train, shape, args.steps, **_ot_guidance_kwargs(args),
                                eta=args.eta, feature_fn=feature_fn, y=y, guidance_scale=args.guidance, generator=g)
    save_grid(x, args.out)
    if args.save_tensor:
        torch.save(x, args.save_tensor)
    print(f"{args.n} samples ({args.sampler}) -> {args.out}")
    return 0


def _sample_dpm_ot(args, model, diffusion, cfg, g):
    """DPM-OT samples: the sampler fitted on the training images is loaded from / saved to
    ``--dpm-ot-cache`` (default: the checkpoint's folder; "" to refit every time)."""
    from .data import load_data
    from .dpm_ot import DPMOTSampler
    from .experiments import _sampler_path

    cache = _dpm_ot_cache(args)
    path = _sampler_path(cache, args.dpm_ot_method, args.t_start, args.dpm_ot_tol, args.dpm_ot_seed,
                         args.dpm_ot_latent_steps) if cache else None
    if path and os.path.exists(path):
        s = DPMOTSampler.load(path, model, diffusion)
    else:
        data = load_data(cfg.dataset, cfg.data_path, cfg.pad_to_32, cfg.n_train, cfg.n_test, cfg.seed, cfg.n_val)
        s = DPMOTSampler(model, diffusion, data.x_train, args.t_start, args.dpm_ot_method,
                         latent_steps=args.dpm_ot_latent_steps, seed=args.dpm_ot_seed)
        s.fit(tol=args.dpm_ot_tol, max_steps=args.dpm_ot_max_steps)
        print(f"DPM-OT map fitted in {s.fit_time:.1f} s (converged {s.ot.converged})")
        if path:
            s.save(path)
            print(f"DPM-OT sampler -> {path}")
    return s.sample(args.n, steps=args.steps, eta=args.eta, mix=args.mix, mix_noise=args.mix_noise, generator=g)


def _dpm_ot_cache(args):
    if args.dpm_ot_cache is None:
        return os.path.dirname(os.path.abspath(args.ckpt))
    return args.dpm_ot_cache or None


def _ints(text):
    return [int(v) for v in str(text).split(",") if v.strip()]


def _loadavg():
    try:
        with open("/proc/loadavg") as f:
            return [float(v) for v in f.read().split()[:3]]
    except OSError:  # not Linux
        return None


def _choices(text, allowed, flag):
    vals = [v.strip() for v in str(text).split(",") if v.strip()]
    bad = [v for v in vals if v not in allowed]
    if bad or not vals:
        raise ValueError(f"{flag} takes a comma-separated list of {allowed}, got {text!r}")
    return vals


def _floats(text):
    return [float(v) for v in str(text).split(",") if v.strip()]


def _image_hw(cfg):
    return {"digits": (8, 8), "cifar10": (32, 32)}.get(cfg.dataset, (32, 32) if cfg.pad_to_32 else (28, 28))


def _ot_guidance_kwargs(args) -> dict:
    """The OT-guidance flags shared by ``sample --sampler ddim-ot`` and ``evaluate --ot-guidance``."""
    return dict(ot_scale=args.ot_scale, ot_ref_n=args.ot_ref_n, ot_inner_iters=args.ot_inner_iters,
                ot_blur=args.ot_blur, ot_p=args.ot_p, ot_optimizer=args.ot_optimizer, ot_lr=args.ot_lr,
                ot_first_k=args.ot_first_k, ot_unit=args.ot_unit)


def cmd_evaluate(args) -> int:
    from .experiments import evaluate_checkpoint

    kw = dict(_ot_guidance_kwargs(args), space=args.ot_space)
    dpm_ot = None
    if args.dpm_ot:
        dpm_ot = dict(steps=_ints(args.dpm_ot_steps or args.steps), t_start=_ints(args.dpm_ot_t_start),
                      method=args.dpm_ot_method, tol=args.dpm_ot_tol, max_steps=args.dpm_ot_max_steps,
                      latent_steps=args.dpm_ot_latent_steps, mix=_floats(args.dpm_ot_mix), eta=_floats(args.dpm_ot_eta),
                      mix_noise=_choices(args.dpm_ot_mix_noise, ("z", "fresh"), "--dpm-ot-mix-noise"),
                      control=args.dpm_ot_control,
                      check_samples=args.dpm_ot_check_samples, cache_dir=_dpm_ot_cache(args), grid=args.dpm_ot_grid,
                      ot_seed=args.dpm_ot_seed)
    t0, load0 = time.perf_counter(), _loadavg()
    res = evaluate_checkpoint(args.ckpt, n=args.n, steps=args.steps, eta=args.eta, seed=args.seed,
                              ot_guidance=args.ot_guidance, ot_kwargs=kw, grid=args.grid, dpm_ot=dpm_ot)
    argv = getattr(args, "argv", None)
    res["run"] = {"command": None if argv is None else " ".join(["python -m diffusion", *map(shlex.quote, argv)]),
                  "wall_seconds": round(time.perf_counter() - t0, 1), "loadavg_start": load0, "loadavg_end": _loadavg(),
                  "torch_threads": torch.get_num_threads()}
    if args.json:
        with open(args.json, "w") as f:
            json.dump(res, f, indent=1)
        print(f"results -> {args.json}")
    return 0


def _sampling_args(p, with_ot=True):
    p.add_argument("--ckpt", required=True, help="training checkpoint (its EMA weights are used)")
    p.add_argument("--steps", type=int, default=50, help="DDIM steps")
    p.add_argument("--eta", type=float, default=0.0)
    p.add_argument("--seed", type=int, default=0)
    if with_ot:
        p.add_argument("--ot-scale", type=float, default=0.1, help="OT guidance step (fraction of the way)")
        p.add_argument("--ot-ref-n", type=int, default=128, help="reference minibatch per step")
        p.add_argument("--ot-inner-iters", type=int, default=1)
        p.add_argument("--ot-blur", type=float, default=0.35)
        p.add_argument("--ot-p", type=int, choices=(1, 2), default=2, help="exponent of the guidance cost |x - y|^p")
        p.add_argument("--ot-optimizer", choices=("sgd", "adam"), default="sgd")
        p.add_argument("--ot-lr", type=float, default=0.05,
                       help="Adam lr (--ot-optimizer adam); each Adam step is ot_scale * ot_lr")
        p.add_argument("--ot-first-k", type=int, default=None, help="guide only the first k DDIM steps")
        p.add_argument("--ot-space", choices=("pixel", "feature"), default="pixel",
                       help="guide in pixels or in the guide feature net's space (metrics use the eval net)")
        p.add_argument("--ot-unit", choices=("minibatch", "all"), default="minibatch",
                       help="unit of guidance: groups of --ot-ref-n samples, each against as many fresh "
                            "references (minibatch), or all samples against one reference set of their size (all)")


def _dpm_ot_args(p, evaluate):
    """DPM-OT options: ``sample --sampler dpm-ot`` (one t', one mix) and ``evaluate --dpm-ot``
    (comma-separated lists: every t' × mix × eta, each at every k)."""
    g = p.add_argument_group("DPM-OT (diffusion/dpm_ot.py)")
    if evaluate:
        g.add_argument("--dpm-ot", action="store_true", help="compare DDIM-k and DPM-OT-k from the same noise")
        g.add_argument("--dpm-ot-steps", default=None, metavar="K,...",
                       help="network evaluations k of both samplers (default: --steps)")
        g.add_argument("--dpm-ot-t-start", default="400", metavar="T,...", help="intermediate timesteps t'")
        g.add_argument("--dpm-ot-mix", default="0", metavar="L,...", help="re-noising weights λ in [0, 1]")
        g.add_argument("--dpm-ot-eta", default="0", metavar="E,...", help="DDIM η of the DPM-OT steps")
        g.add_argument("--dpm-ot-mix-noise", default="z", metavar="z|fresh,...",
                       help="noise ε' of the re-noising (mix > 0): z itself or fresh draws")
        g.add_argument("--dpm-ot-control", action="store_true",
                       help="also a control: the same latents, targets drawn at random instead of by the map")
        g.add_argument("--dpm-ot-check-samples", type=int, default=1 << 24,
                       help="fresh points for the re-measured cell-mass error")
        g.add_argument("--dpm-ot-grid", default=None, help="comparison grid PNG")
    else:
        g.add_argument("--t-start", type=int, default=400, help="DPM-OT intermediate timestep t'")
        g.add_argument("--mix", type=float, default=0.0, help="DPM-OT re-noising weight λ in [0, 1]")
        g.add_argument("--mix-noise", choices=("z", "fresh"), default="z")
    g.add_argument("--dpm-ot-method", choices=("q", "ddim"), default="q",
                   help="data latents: forward process (q, DPM-OT's) or DDIM inversion")
    g.add_argument("--dpm-ot-tol", type=float, default=0.05, help="largest relative cell-mass error of the fit")
    g.add_argument("--dpm-ot-max-steps", type=int, default=20000)
    g.add_argument("--dpm-ot-latent-steps", type=int, default=10, help="DDIM inversion steps (--dpm-ot-method ddim)")
    g.add_argument("--dpm-ot-seed", type=int, default=0, help="seed of the q latents and of the OT fit")
    g.add_argument("--dpm-ot-cache", default=None,
                   help="folder of fitted DPM-OT samplers (default: the checkpoint's; '' to refit)")


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m diffusion", description=__doc__.split("\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    sub = ap.add_subparsers(dest="cmd", required=True)
    _train_parser(sub)
    s = sub.add_parser("sample", help="sample a grid from a checkpoint")
    _sampling_args(s)
    s.add_argument("--sampler", choices=("ddpm", "ddim", "ddim-ot", "dpm-ot"), default="ddim")
    s.add_argument("--n", type=int, default=64)
    s.add_argument("--label", type=int, default=None, help="class label (class-conditional models)")
    s.add_argument("--guidance", type=float, default=1.0, help="classifier-free guidance scale")
    s.add_argument("--out", default="samples.png")
    s.add_argument("--save-tensor", default=None, help="also save the samples as a .pt tensor")
    _dpm_ot_args(s, evaluate=False)
    e = sub.add_parser("evaluate", help="sample quality and feature-space metrics; --ot-guidance compares "
                                        "plain and OT-guided DDIM from the same noise")
    _sampling_args(e)
    e.add_argument("--n", type=int, default=1000, help="generated samples")
    e.add_argument("--ot-guidance", action="store_true")
    e.add_argument("--grid", default=None, help="save sample grids here (PNG; _ot.png for the guided ones)")
    e.add_argument("--json", default=None, help="write the results to this JSON file")
    _dpm_ot_args(e, evaluate=True)
    from .sweep import add_parser as add_sweep_parser
    add_sweep_parser(sub)
    from .passive import add_parser as add_passive_parser
    add_passive_parser(sub)
    return ap


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)  # recorded in evaluate's JSON
    try:
        from .sweep import cmd_sweep
        from .passive import cmd_passive
        return {"train": cmd_train, "sample": cmd_sample, "evaluate": cmd_evaluate, "sweep": cmd_sweep,
                "passive": cmd_passive}[args.cmd](args)
    except (ValueError, TypeError, FileNotFoundError) as e:
        if os.environ.get("DIFFUSION_DEBUG"):
            raise
        print(f"error: {e}", file=sys.stderr)
        return 2
