"""``python -m diffusion passive <experiment>``: does OT *measure* what users care about?  The
passive experiments of issue 18 -- controlled degradations of real image sets, training
progress over a checkpoint series, and memorisation -- each writing JSON + PNG under
``reports/<dataset>/passive/``, collected by ``passive report`` into
``reports/<dataset>/passive.md``.

    python -m diffusion passive diversity --dataset digits --quick
    python -m diffusion passive blur --dataset digits --quick --ckpt runs/digits/checkpoint.pt
    python -m diffusion passive epochs --dataset digits --ckpts 'runs/digits/ckpt_*.pt' --quick
    python -m diffusion passive memorization --dataset mnist --data-path ../shared/data/mnist.npz --quick
    python -m diffusion passive report --dataset digits

Experiments: ``diversity`` (D1..D10), ``blur``, ``noise`` (pixel and feature space),
``mixture`` (training / held-out mixtures), ``missing-classes``, ``epochs`` (``--ckpts``),
``memorization``; ``all`` runs the first five and ``memorization`` in turn.  Every set is
embedded by the dataset's *evaluation* feature net (``feature_net_for(role="eval")``: trained
on one half of the training images, with its own seed; the "guide" net that OT losses and
guidance use is trained on the other half and is never used here).  Sinkhorn settings:
``--blur`` (one or more, comma-separated; default 0.05), ``--p``, ``--scaling``,
``--normalize`` (L2-normalised features).  See docs/passive.md.
"""
from __future__ import annotations

import glob
import hashlib
import json
import math
import os
import shlex
import sys
import time

import torch

from .passive_sets import (PM, Metrics, Novelty, add_noise, beyond_noise, combine_seeds, diversity_sets,
                           gaussian_blur, max_diversity_n, missing_class_sets, mixture_sets, novelty_short, reversals,
                           spearman)

EXPERIMENTS = ("diversity", "blur", "noise", "mixture", "missing-classes", "epochs", "memorization")
BLUR_SIGMAS = {"digits": (0.0, 0.3, 0.6, 1.0, 1.5, 2.0), "mnist": (0.0, 0.5, 1.0, 1.5, 2.0, 3.0)}
NOISE_SIGMAS = (0.0, 0.05, 0.1, 0.2, 0.4, 0.8)
NEAR_COPY_NOISE = 0.05
METRIC_KEYS = ("ot", "mmd2", "fid", "precision", "recall", "density", "coverage")


# ---------------------------------------------------------------------- context
class Context:
    """Data, the eval feature net, the reference / pool split and the metric settings of one
    invocation.  The reference is a balanced subset of ``n_ref`` training images; the sets
    built from training images come from the *other* training images (the pool), so no set
    shares an image with the reference."""

    def __init__(self, dataset="digits", data_path=None, ckpt=None, quick=False, seed=0, n=None, n_ref=None,
                 n_gen=None, steps=None, blurs=(0.05,), p=2, scaling=0.5, normalize=False, work=None,
                 feature_epochs=None, log=print):
        from .config import DiffusionConfig, preset
        from .data import load_data
        from .features import embed
        from .train import feature_net_for, feature_net_info

        self.dataset, self.quick, self.seed, self.log, self.ckpt = dataset, quick, seed, log, ckpt
        self.work = work or os.path.join("runs", f"passive-{dataset}")
        if ckpt:  # the checkpoint's data: its training images are what "training images" means
            from .checkpoint import load_checkpoint
            cfg = DiffusionConfig(**load_checkpoint(ckpt)["config"])
            if cfg.dataset != dataset:
                raise ValueError(f"--ckpt {ckpt} is a {cfg.dataset} model, --dataset is {dataset}")
        elif dataset == "digits":
            cfg = preset("digits")
        elif dataset == "mnist":
            cfg = preset("mnist-quick", data_path=data_path or "../shared/data/mnist.npz")
        else:
            raise ValueError(f"--dataset must be digits or mnist, got {dataset!r}")
        if data_path:
            cfg = cfg.replace(data_path=data_path)
        cfg = cfg.replace(out_dir=os.path.join(self.work, "run"), feature_path=None, progress=False,
                          **({"feature_epochs": feature_epochs} if feature_epochs else {}))
        self.cfg = cfg
        t0, c0 = time.perf_counter(), time.process_time()
        self.data = d = load_data(cfg.dataset, cfg.data_path, cfg.pad_to_32, cfg.n_train, cfg.n_test, cfg.seed,
                                  cfg.n_val)
        self.net = feature_net_for(cfg, d, role="eval")
        self.net_info = feature_net_info(self.net)
        self.embed = lambda x: embed(self.net, x)
        big = dataset != "digits"
        self.n_ref = min(n_ref or (1000 if big else 400), len(d.x_train) // 2)  # the rest is the pool
        self.n = n or (500 if big and quick else 1000)
        self.n_gen = n_gen or (500 if quick else 1000)
        self.steps = steps or (20 if quick else 50)
        self.held_x, self.held_y = torch.cat([d.x_val, d.x_test]), torch.cat([d.y_val, d.y_test])
        self.train_f, self.held_f = self._features()
        self.metrics = Metrics(blurs, p, scaling, normalize)
        self._split(seed)
        self._shared = {}  # the novelty reference, shared with the reseeded copies
        self.setup_s, self.setup_cpu_s = time.perf_counter() - t0, time.process_time() - c0

    def _split(self, seed: int) -> None:
        """The seeded reference / pool split of the training images (and the MMD bandwidth,
        fixed on the reference).  The data split itself (training / validation / test) is the
        checkpoint's (``cfg.seed``) and does not change with ``seed``."""
        from .data import balanced_indices

        d = self.data
        ref = balanced_indices(d.y_train, self.n_ref, seed)
        mask = torch.ones(len(d.y_train), dtype=torch.bool)
        mask[ref] = False
        self.ref_idx, self.pool_idx = ref, torch.nonzero(mask).flatten()
        self.ref_x, self.ref_y = d.x_train[ref], d.y_train[ref]
        self.pool_x, self.pool_y = d.x_train[mask], d.y_train[mask]
        self.ref_f, self.pool_f = self.train_f[ref], self.train_f[mask]
        self.metrics = Metrics(self.metrics.blurs, self.metrics.p, self.metrics.scaling, self.metrics.normalize)
        self.metrics.fix_bandwidth(self.ref_f)

    def reseeded(self, seed: int) -> "Context":
        """This context under another seed: a new reference / pool split, and the sets, noise
        and generated samples drawn from it; the data split, eval net, features and novelty
        reference are shared (nothing is recomputed)."""
        import copy

        c = copy.copy(self)
        c.seed = seed
        c._split(seed)
        c.setup_s = c.setup_cpu_s = 0.0
        return c

    def _features(self):
        """Eval-net features of all training and held-out images, cached under ``<work>/``
        (keyed by the net's weights and the images)."""
        h = hashlib.sha1()
        for t in list(self.net.state_dict().values()) + [self.data.x_train, self.held_x]:
            h.update(t.detach().float().contiguous().numpy().tobytes())
        path = os.path.join(self.work, "features", f"embeddings-{h.hexdigest()[:16]}.pt")
        if os.path.exists(path):
            c = torch.load(path, weights_only=True)
            return c["train"], c["held"]
        tr, he = self.embed(self.data.x_train), self.embed(self.held_x)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        torch.save({"train": tr, "held": he}, path)
        return tr, he

    @property
    def novelty(self) -> Novelty:
        if "novelty" not in self._shared:
            self._shared["novelty"] = Novelty(self.data.x_train, self.train_f, self.held_x, self.held_f)
        return self._shared["novelty"]

    def split_info(self) -> dict:
        """Which training images: the config fields :func:`~diffusion.data.load_data` was called
        with (the checkpoint's when there is one -- the trainer's own call) and a digest of the
        training indices, so runs on different splits can be told apart."""
        c, d = self.cfg, self.data
        idx = getattr(d, "train_idx", None)
        digest = hashlib.sha1(idx.numpy().tobytes()).hexdigest()[:12] if idx is not None else None
        return {"from": "checkpoint" if self.ckpt else "preset", "n_train": c.n_train, "n_val": c.n_val,
                "n_test": c.n_test, "seed": c.seed, "train_idx_sha1": digest}

    def info(self) -> dict:
        d = self.data
        return {"dataset": self.dataset, "quick": self.quick, "seed": self.seed, "n_set": self.n, "n_ref": self.n_ref,
                "n_gen": self.n_gen, "ddim_steps": self.steps, "n_train": len(d.x_train), "n_pool": len(self.pool_x),
                "n_held_out": len(self.held_x), "image_shape": list(d.shape),
                "eval_feature_net": self.net_info, "sinkhorn": self.metrics.settings(), "data_split": self.split_info(),
                "threads": torch.get_num_threads()}

    @torch.no_grad()
    def generate(self, ckpt: str, n: int | None = None) -> torch.Tensor:
        """n (default n_gen) DDIM-``steps`` samples (η = 0) of the checkpoint's EMA model from
        seeded noise, cached under ``<work>/gen/``."""
        from .sample import ddim_sample
        from .train import load_model

        n = n or self.n_gen
        st = os.stat(ckpt)
        key = hashlib.sha1(f"{os.path.abspath(ckpt)}|{st.st_mtime_ns}|{st.st_size}|{n}|{self.steps}|{self.seed}"
                           .encode()).hexdigest()[:16]
        path = os.path.join(self.work, "gen", f"{key}.pt")
        if os.path.exists(path):
            return torch.load(path, weights_only=True)
        model, process, cfg = load_model(ckpt)
        g = torch.Generator().manual_seed(self.seed + 1)
        shape = (n, *self.data.shape)
        if cfg.method == "flow":
            from .flow import flow_sample
            x = flow_sample(model, process, shape, self.steps, cfg.flow_solver, generator=g)
        else:
            x = torch.cat([ddim_sample(model, process, (min(500, n - i), *self.data.shape), self.steps, 0.0,
                                       generator=g) for i in range(0, n, 500)])
        os.makedirs(os.path.dirname(path), exist_ok=True)
        torch.save(x, path)
        return x

    def gen_set(self, ckpt):
        """(x, features, novelty, short novelty) of the checkpoint's generated set, or None."""
        if not ckpt:
            return None
        x = self.generate(ckpt)
        f = self.embed(x)
        nov = self.novelty(x, f)
        return {"x": x, "f": f, "novelty": nov, "short": novelty_short(nov)}


def _orders(rows, param, keys=METRIC_KEYS, prefix=""):
    """Spearman ρ of each metric against the parameter over the rows."""
    xs = [r[param] for r in rows]
    out = {}
    first = (rows[0].get(prefix) or {}) if prefix else rows[0]
    for k in list(keys) + sorted((k for k in first if k.startswith("ot_b")), key=lambda k: float(k[4:])):
        vals = [r.get(prefix + k) if not prefix else (r.get(prefix) or {}).get(k) for r in rows]
        if all(isinstance(v, (int, float)) and math.isfinite(v) for v in vals):
            out[k] = spearman(xs, vals)
    return out


def _gen_row(ctx, gen, real_f):
    m = ctx.metrics(real_f, gen["f"])
    return {**m, "novelty": gen["short"]}


# ---------------------------------------------------------------------- experiments
@torch.no_grad()
def exp_diversity(ctx: Context, ckpt=None, out_dir=None) -> dict:
    """D1..D10 (:func:`~diffusion.passive_sets.diversity_sets`) of n pool images against the
    training reference; with a checkpoint, the generated set against each D_k too."""
    n = min(ctx.n, max_diversity_n(ctx.pool_y))
    sets = diversity_sets(ctx.pool_y, n, ctx.seed)
    gen = ctx.gen_set(ckpt)
    rows = []
    for i, (name, idx) in enumerate(sets):
        f = ctx.pool_f[idx]
        row = {"set": name, "k": i + 1, "distinct": len(torch.unique(idx)),
               "classes": len(torch.unique(ctx.pool_y[idx])), **ctx.metrics(ctx.ref_f, f)}
        if gen:
            row["gen"] = _gen_row(ctx, gen, f)
        rows.append(row)
    if out_dir:
        from .evaluation import save_grid
        save_grid(torch.cat([ctx.pool_x[idx[:10]] for _, idx in sets]), os.path.join(out_dir, "diversity_sets.png"),
                  nrow=10)
    res = {"n_set": n, "rows": rows, "param": "k", "expect": {"ot": "falls from D1 to D10 (Spearman ≤ −0.9)"},
           "orders": _orders(rows, "k"), "gen_orders": _orders(rows, "k", prefix="gen") if gen else None}
    if gen:
        res["gen_novelty"] = gen["novelty"]
    return res


def _pool_set(ctx, n=None):
    """(images, features) of a balanced set of min(n, pool) distinct pool images."""
    from .data import balanced_indices
    idx = balanced_indices(ctx.pool_y, n or min(ctx.n, len(ctx.pool_y)), ctx.seed + 5)
    return ctx.pool_x[idx], ctx.pool_f[idx]


@torch.no_grad()
def exp_blur(ctx: Context, ckpt=None, out_dir=None) -> dict:
    """A balanced set of pool images, Gaussian-blurred at increasing σ (pixels), against the
    training reference; with a checkpoint, the generated set against each blurred set."""
    x, _ = _pool_set(ctx)
    gen = ctx.gen_set(ckpt)
    rows, shown = [], []
    for s in BLUR_SIGMAS[ctx.dataset if ctx.dataset in BLUR_SIGMAS else "mnist"]:
        xb = gaussian_blur(x, s)
        shown.append(xb[:10])
        f = ctx.embed(xb)
        row = {"sigma": s, **ctx.metrics(ctx.ref_f, f)}
        if gen:
            row["gen"] = _gen_row(ctx, gen, f)
        rows.append(row)
    if out_dir:
        from .evaluation import save_grid
        save_grid(torch.cat(shown), os.path.join(out_dir, "blur_sets.png"), nrow=10)
    res = {"n_set": len(x), "rows": rows, "param": "sigma", "expect": {"ot": "rises with blur σ"},
           "orders": _orders(rows, "sigma"), "gen_orders": _orders(rows, "sigma", prefix="gen") if gen else None}
    if gen:
        res["gen_novelty"] = gen["novelty"]
    return res


@torch.no_grad()
def exp_noise(ctx: Context, ckpt=None, out_dir=None) -> dict:
    """Additive Gaussian noise of σ on a balanced set of pool images, in pixel space (images in
    [-1, 1], not clamped) and in feature space (σ times the reference features' overall
    standard deviation, added to the embeddings), against the training reference."""
    x, f0 = _pool_set(ctx)
    fstd = ctx.ref_f.std().item()
    rows = []
    for space in ("pixel", "feature"):
        for s in NOISE_SIGMAS:
            f = ctx.embed(add_noise(x, s, ctx.seed + 11)) if space == "pixel" else add_noise(f0, s * fstd, ctx.seed + 12)
            rows.append({"space": space, "sigma": s, **ctx.metrics(ctx.ref_f, f)})
    orders = {sp: _orders([r for r in rows if r["space"] == sp], "sigma") for sp in ("pixel", "feature")}
    return {"n_set": len(x), "feature_std": fstd, "rows": rows, "param": "sigma",
            "expect": {"ot": "rises with noise σ (both spaces)"}, "orders": orders}


@torch.no_grad()
def exp_mixture(ctx: Context, ckpt=None, out_dir=None) -> dict:
    """D0..D10: D_k mixes k/10 training (pool) and (10−k)/10 held-out (validation + test)
    images.  Each D_k against the training reference; against a *copier* (a set of pool images
    with pixel noise σ = 0.05: what a model that memorised its training images would emit);
    and, with a checkpoint, against the generated set.  Does OT tell memorised from fresh?"""
    n = min(ctx.n, len(ctx.held_x), len(ctx.pool_x)) // 10 * 10
    sets = mixture_sets(len(ctx.pool_x), len(ctx.held_x), n, ctx.seed + 7)
    pool_f, held_f = ctx.pool_f, ctx.held_f
    g = torch.Generator().manual_seed(ctx.seed + 8)
    cidx = torch.randperm(len(ctx.pool_x), generator=g)[: min(ctx.n_gen, len(ctx.pool_x))]
    copier_x = add_noise(ctx.pool_x[cidx], NEAR_COPY_NOISE, ctx.seed + 9)
    copier = {"f": ctx.embed(copier_x)}
    copier["short"] = novelty_short(ctx.novelty(copier_x, copier["f"]))
    gen = ctx.gen_set(ckpt)
    rows = []
    for k, ti, hi in sets:
        f = torch.cat([pool_f[ti], held_f[hi]])
        row = {"k": k, "n_train_part": len(ti), "n_held_part": len(hi), **ctx.metrics(ctx.ref_f, f),
               "copier": _gen_row(ctx, copier, f)}
        if gen:
            row["gen"] = _gen_row(ctx, gen, f)
        rows.append(row)
    res = {"n_set": n, "rows": rows, "param": "k",
           "expect": {"ot": "flat vs the training reference (held-out and training images are one distribution)",
                      "copier": "falls with k only if OT can tell memorised from fresh data"},
           "orders": _orders(rows, "k"), "copier_orders": _orders(rows, "k", prefix="copier"),
           "gen_orders": _orders(rows, "k", prefix="gen") if gen else None}
    if gen:
        res["gen_novelty"] = gen["novelty"]
    return res


@torch.no_grad()
def exp_missing(ctx: Context, ckpt=None, out_dir=None) -> dict:
    """A balanced set of pool images (all classes) against references with 0..8 classes
    removed (the training reference minus those classes' images); with a checkpoint, the
    generated set against each reduced reference."""
    _, f = _pool_set(ctx)
    gen = ctx.gen_set(ckpt)
    rows = []
    for k, removed, idx in missing_class_sets(ctx.ref_y, 8, ctx.seed + 3):
        rf = ctx.ref_f[idx]
        row = {"k": k, "removed": removed, "n_ref": len(idx), **ctx.metrics(rf, f)}
        if gen:
            row["gen"] = _gen_row(ctx, gen, rf)
        rows.append(row)
    res = {"n_set": len(f), "rows": rows, "param": "k", "expect": {"ot": "rises with the number of missing classes"},
           "orders": _orders(rows, "k"), "gen_orders": _orders(rows, "k", prefix="gen") if gen else None}
    if gen:
        res["gen_novelty"] = gen["novelty"]
    return res


def expand_ckpts(spec) -> list[str]:
    """Paths from a list of comma-separated paths / globs, each glob sorted."""
    items = spec if isinstance(spec, (list, tuple)) else [spec]
    out = []
    for item in items:
        for part in str(item).split(","):
            part = part.strip()
            if part:
                hits = sorted(glob.glob(part))
                out += hits if hits else ([part] if os.path.exists(part) else [])
    return list(dict.fromkeys(out))


@torch.no_grad()
def exp_epochs(ctx: Context, ckpts=None, out_dir=None) -> dict:
    """For every checkpoint of a series (ordered by its stored epoch): the generated set against
    m training images and against m held-out images (m = min(n_ref, held-out images), both
    balanced), the train-vs-held-out baseline, the gap OT(gen, held-out) − OT(gen, train), and
    the novelty figures."""
    from .checkpoint import load_checkpoint
    from .data import balanced_indices

    paths = expand_ckpts(ckpts or [])
    if not paths:
        raise ValueError("epochs needs a checkpoint series: --ckpts 'runs/x/ckpt_*.pt' (or a comma-separated list)")
    m = min(ctx.n_ref, len(ctx.held_x))
    tr_f = ctx.train_f[balanced_indices(ctx.data.y_train, m, ctx.seed + 21)]
    he_f = ctx.held_f[balanced_indices(ctx.held_y, m, ctx.seed + 22)]
    base = ctx.metrics(tr_f, he_f)
    series = []
    for p in paths:
        ck = load_checkpoint(p)
        series.append((ck.get("epoch", 0), ck.get("step", 0), p))
    rows = []
    for epoch, step, p in sorted(series):
        gen = ctx.gen_set(p)
        a, b = ctx.metrics(tr_f, gen["f"]), ctx.metrics(he_f, gen["f"])
        rows.append({"epoch": epoch, "step": step, "ckpt": p, "train": a, "held_out": b,
                     "gap": {k: b[k] - a[k] for k in ("ot", "mmd2", "fid")}, "novelty": gen["short"]})
    return {"n_compare": m, "baseline": base, "rows": rows, "param": "epoch",
            "expect": {"ot": "falls over training; the gap stays near the baseline's noise unless the model copies"},
            "orders": {"train": _orders(rows, "epoch", prefix="train"),
                       "held_out": _orders(rows, "epoch", prefix="held_out")}}


@torch.no_grad()
def exp_memorization(ctx: Context, ckpt=None, out_dir=None) -> dict:
    """Novelty (:class:`~diffusion.passive_sets.Novelty`, pixels and features) of held-out real
    images (the baseline), exact training copies, near copies (training images + N(0, 0.05²)
    pixel noise), half near copies / half held-out, blurred training copies (σ = 1 pixel),
    and, with a checkpoint, the generated set."""
    n = min(ctx.n, len(ctx.held_x))
    g = torch.Generator().manual_seed(ctx.seed + 31)
    ti = torch.randperm(len(ctx.data.x_train), generator=g)[:n]
    tr, tr_f = ctx.data.x_train[ti], ctx.train_f[ti]
    he = ctx.held_x[torch.randperm(len(ctx.held_x), generator=g)[:n]]
    near = add_noise(tr, NEAR_COPY_NOISE, ctx.seed + 32)
    sets = {"copies": tr, "near_copies": near, "half_near_copies": torch.cat([near[: n // 2], he[n // 2:]]),
            "blurred_copies": gaussian_blur(tr, 1.0)}
    rows = [{"set": "held_out", "n": len(ctx.held_x), **ctx.novelty.held_out(n, ctx.seed)}]
    for name, x in sets.items():
        rows.append({"set": name, "n": len(x), **ctx.novelty(x, tr_f if name == "copies" else ctx.embed(x))})
    if ckpt:
        gen = ctx.gen_set(ckpt)
        rows.append({"set": "generated", "n": len(gen["x"]), "ckpt": ckpt, **gen["novelty"],
                     "ot_train": ctx.metrics(ctx.ref_f, gen["f"])})
    return {"n_set": n, "rows": rows, "param": "set",
            "expect": {"near_copy_share": "≈1 for copies and near copies, ≈0.5 for half, 0.05 for held-out (by construction)"}}


RUNNERS = {"diversity": exp_diversity, "blur": exp_blur, "noise": exp_noise, "mixture": exp_mixture,
           "missing-classes": exp_missing, "epochs": exp_epochs, "memorization": exp_memorization}


# ---------------------------------------------------------------------- figures
def plot_experiment(name: str, res: dict, path: str) -> None:
    """One small PNG per experiment: OT (each blur), MMD² and FID (each scaled to its maximum),
    and precision / recall / density / coverage against the experiment's parameter."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    res = seed_view(res)  # means over the seeds; OT / FID lines carry their std as error bars
    rows = res["rows"]
    sd = lambda vals: [getattr(v, "sd", 0.0) for v in vals]  # noqa: E731
    fig, axes = plt.subplots(1, 3, figsize=(9, 2.4))
    if name == "memorization":
        labels = [r["set"] for r in rows]
        for ax, sp in zip(axes[:2], ("pixel", "feature")):
            ax.bar(range(len(rows)), [r[sp]["near_copy_share"] for r in rows])
            ax.set_xticks(range(len(rows)), labels, rotation=30, fontsize=6, ha="right")
            ax.set_title(f"near-copy share ({sp})", fontsize=8)
        axes[2].bar(range(len(rows)), [r["pixel"]["ratio"] for r in rows])
        axes[2].set_xticks(range(len(rows)), labels, rotation=30, fontsize=6, ha="right")
        axes[2].set_title("NN distance / held-out's (pixels)", fontsize=8)
    else:
        groups = [("space", sp) for sp in ("pixel", "feature")] if name == "noise" else [(None, None)]
        for gk, gv in groups:
            sub = [r for r in rows if gk is None or r[gk] == gv]
            tag = f" {gv}" if gv else ""
            if name == "epochs":
                xs = [r["epoch"] for r in sub]
                for part in ("train", "held_out"):
                    v = [r[part]["ot"] for r in sub]
                    axes[0].errorbar(xs, v, yerr=sd(v), marker=".", capsize=2, label=f"OT gen-{part}")
                    v = [r[part]["fid"] for r in sub]
                    axes[1].errorbar(xs, v, yerr=sd(v), marker=".", capsize=2, label=f"FID gen-{part}")
                axes[0].axhline(res["baseline"]["ot"], ls=":", c="k", label="train-held")
                axes[1].axhline(res["baseline"]["fid"], ls=":", c="k")
                axes[2].plot(xs, [r["novelty"]["near_copy_share_p"] for r in sub], marker=".", label="near-copy px")
                axes[2].plot(xs, [r["novelty"]["ratio_p"] for r in sub], marker=".", label="NN ratio px")
                continue
            xs = [r[res["param"]] for r in sub]
            for k in [k for k in sub[0] if k.startswith("ot_b")]:
                v = [r[k] for r in sub]
                axes[0].errorbar(xs, v, yerr=sd(v), marker=".", capsize=2, label=k.replace("ot_b", "OT blur ") + tag)
            for k in ("mmd2", "fid"):
                v = [r[k] for r in sub]
                mx = max(abs(t) for t in v) or 1
                axes[1].plot(xs, [t / mx for t in v], marker=".", label=f"{k}/max" + tag)
            for k in ("precision", "recall", "coverage"):
                axes[2].plot(xs, [r[k] for r in sub], marker=".", label=k + tag)
            if name == "mixture":
                v = [r["copier"]["ot"] for r in sub]
                axes[0].errorbar(xs, v, yerr=sd(v), marker="x", capsize=2, label="OT copier")
            if any("gen" in r for r in sub):
                v = [r["gen"]["ot"] for r in sub]
                axes[0].errorbar(xs, v, yerr=sd(v), marker="x", capsize=2, label="OT generated")
        for ax in axes:
            ax.set_xlabel("epoch" if name == "epochs" else res["param"], fontsize=7)
        axes[0].set_yscale("log" if name != "epochs" else "linear")
    for ax in axes:
        ax.tick_params(labelsize=6)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=5)
    fig.suptitle(name, fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=60)
    plt.close(fig)


# ---------------------------------------------------------------------- CLI
def add_parser(sub) -> None:
    p = sub.add_parser("passive", help="passive experiments: does OT measure diversity, blur, noise, missing "
                                       "classes, training progress, copying? (issue 18)")
    p.add_argument("experiment", choices=EXPERIMENTS + ("all", "report"))
    p.add_argument("--dataset", default="digits", choices=("digits", "mnist"))
    p.add_argument("--data-path", default=None, help="mnist: the .npz (default ../shared/data/mnist.npz)")
    p.add_argument("--ckpt", default=None, help="a checkpoint: its generated samples are measured too")
    p.add_argument("--ckpts", action="append", default=[], help="epochs: checkpoint paths / globs (comma-separated)")
    p.add_argument("--quick", action="store_true", help="CPU sizes (MNIST: sets of 500; 500 generated, DDIM-20)")
    p.add_argument("--n", type=int, default=None, help="images per set (default 1000; quick MNIST 500; capped by the data)")
    p.add_argument("--n-ref", type=int, default=None, help="reference images (default digits 400, MNIST 1000)")
    p.add_argument("--n-gen", type=int, default=None, help="generated images (default 1000, quick 500)")
    p.add_argument("--steps", type=int, default=None, help="DDIM steps (default 50, quick 20)")
    p.add_argument("--blur", default="0.05", help="Sinkhorn blur(s), comma-separated: 0.05, 0.2, 0.35, 0.75, 10")
    p.add_argument("--p", type=int, default=2, choices=(1, 2))
    p.add_argument("--scaling", type=float, default=0.5, help="ε-scaling factor (0.5 or 0.9)")
    p.add_argument("--normalize", action="store_true", help="OT on L2-normalised features")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--seeds", default=None, help="several seeds, comma-separated (0,1,2): each experiment runs once "
                                                 "per seed (reference, sets, noise, samples); the report shows the "
                                                 "mean ± std and judges differences against that spread")
    p.add_argument("--threads", type=int, default=1, help="torch threads (default 1: multi-threaded eigh is "
                                                          "pathologically slow on a busy CPU; 0: torch's default)")
    p.add_argument("--out", default=None, help="folder of the JSON / PNGs (default reports/<dataset>/passive)")
    p.add_argument("--work", default=None, help="caches (eval feature net, samples; default runs/passive-<dataset>)")
    p.add_argument("--report", default=None, help="report: the markdown file (default reports/<dataset>/passive.md)")


def _command(args) -> str:
    argv = getattr(args, "argv", None)
    return "python -m diffusion " + shlex.join(argv) if argv else "python -m diffusion passive " + args.experiment


SEED_KEYS = ("rows", "orders", "gen_orders", "copier_orders", "baseline")  # what each extra seed keeps


def parse_seeds(args) -> list[int]:
    """``--seeds 0,1,2`` (else ``[--seed]``)."""
    if getattr(args, "seeds", None):
        seeds = [int(s) for s in str(args.seeds).split(",") if s.strip()]
        if len(set(seeds)) != len(seeds) or not seeds:
            raise ValueError(f"--seeds must be distinct integers, got {args.seeds!r}")
        return seeds
    return [args.seed]


def run_seeds(name: str, ctx: Context, target, out_dir: str | None, seeds) -> dict:
    """The experiment once per seed (``ctx`` is the first seed's; the others are
    :meth:`Context.reseeded` copies): the first seed's result, with ``seeds`` and the other
    seeds' :data:`SEED_KEYS` under ``seed_runs`` when there are several."""
    seeds = list(seeds)
    if seeds[0] != ctx.seed:
        raise ValueError(f"the context's seed is {ctx.seed}, the first of --seeds {seeds[0]}")
    res = RUNNERS[name](ctx, target, out_dir)
    if len(seeds) > 1:
        extra = []
        for s in seeds[1:]:
            r = RUNNERS[name](ctx.reseeded(s), target, None)
            extra.append({"seed": s, **{k: r[k] for k in SEED_KEYS if k in r}})
        res["seeds"], res["seed_runs"] = seeds, extra
    return res


def seed_view(res: dict) -> dict:
    """``res`` with the :data:`SEED_KEYS` of all its seeds combined (:func:`combine_seeds`):
    every figure a :class:`PM` (the mean, with per-seed ``values`` and ``sd``), also for a
    one-seed result (sd 0)."""
    if res.get("combined"):
        return res
    runs = [{k: res[k] for k in SEED_KEYS if k in res}] + [{k: r[k] for k in SEED_KEYS if k in r}
                                                          for r in res.get("seed_runs", [])]
    return {**res, **combine_seeds(runs), "seeds": res.get("seeds", [res.get("seed", 0)]), "combined": True}


def run_experiment(name: str, ctx: Context, args, out_dir: str, seeds=None) -> dict:
    os.makedirs(out_dir, exist_ok=True)
    t0, c0 = time.perf_counter(), time.process_time()
    target = args.ckpts if name == "epochs" else args.ckpt
    res = run_seeds(name, ctx, target, out_dir, seeds or [ctx.seed])
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    res = {"experiment": name, "command": _command(args), "wall_s": round(wall + ctx.setup_s, 1),
           "cpu_s": round(cpu + ctx.setup_cpu_s, 1),
           "setup_s": round(ctx.setup_s, 1), "ckpt": target or None, **ctx.info(), **res}
    ctx.setup_s = ctx.setup_cpu_s = 0.0  # counted once per invocation
    os.makedirs(out_dir, exist_ok=True)
    stem = name.replace("-", "_")
    with open(os.path.join(out_dir, f"{stem}.json"), "w") as f:
        json.dump(res, f, indent=1, default=float)
    try:
        plot_experiment(name, res, os.path.join(out_dir, f"{stem}.png"))
    except ImportError:
        pass
    return res


def cmd_passive(args) -> int:
    out_dir = args.out or os.path.join("reports", args.dataset, "passive")
    if args.experiment == "report":
        path = write_report(args.dataset, out_dir, args.report)
        print(f"wrote {path}")
        return 0
    if args.threads:
        torch.set_num_threads(args.threads)
    ck = args.ckpt or (expand_ckpts(args.ckpts)[:1] or [None])[0] if args.experiment == "epochs" else args.ckpt
    seeds = parse_seeds(args)
    ctx = Context(args.dataset, args.data_path, ck, args.quick, seeds[0], args.n, args.n_ref, args.n_gen, args.steps,
                  [float(b) for b in str(args.blur).split(",") if b.strip()], args.p, args.scaling, args.normalize,
                  args.work)
    names = [e for e in EXPERIMENTS if e != "epochs"] if args.experiment == "all" else [args.experiment]
    for name in names:
        res = run_experiment(name, ctx, args, out_dir, seeds)
        print(f"{name}: {res['wall_s']} s; " + "; ".join(_check_lines(res)))
    return 0


# ---------------------------------------------------------------------- report
def _n_seeds(v) -> int:
    return len(getattr(v, "values", [v]))


def _seed_note(v) -> str:
    """' (−1.00..−0.98 over 3 seeds)' for a figure of several seeds, else ''."""
    vals = getattr(v, "values", [v])
    return f" ({min(vals):+.2f}..{max(vals):+.2f} over {len(vals)} seeds)" if len(vals) > 1 else ""


def _order_verdict(rho, want: int) -> str:
    """Each seed's ρ against the expected order (|ρ| ≥ 0.9 in direction ``want``)."""
    vals = [v for v in getattr(rho, "values", [rho]) if math.isfinite(v)]
    good = sum((v <= -0.9) if want < 0 else (v >= 0.9) for v in vals)
    if vals and good == len(vals):
        return "as expected" + (f" in all {len(vals)} seeds" if len(vals) > 1 else "")
    return "NOT as expected" if good == 0 else f"as expected in {good} of {len(vals)} seeds only"


def _rho_line(label: str, rho, want: int | None = None) -> str:
    line = f"{label} ρ = {float(rho):+.2f}{_seed_note(rho)}"
    return line + (f" ({_order_verdict(rho, want)})" if want else "")


def _noise_word(v: int, n: int) -> str:
    return "one seed: no noise estimate" if n < 2 else ("beyond seed noise" if v else "within seed noise")


def _reversal_line(rows, get, want: int, label, what: str) -> str | None:
    """Where the mean curve of ``get(row)`` moves against the expected direction, each step
    judged against the seeds (:func:`~diffusion.passive_sets.reversals`)."""
    vals = [get(r) for r in rows]
    if any(v is None for v in vals):
        return None
    revs = reversals(vals, want)
    if not revs:
        return None
    n = _n_seeds(vals[0])
    return (f"{what} moves against the expected order at " +
            ", ".join(f"{label(rows[i])} → {label(rows[i + 1])} ({_noise_word(v < 0, n)})" for i, v in revs))


def _trend_line(label: str, first, last) -> str:
    """The end-to-end change of a curve expected flat (mixtures), judged against the seeds."""
    a, b = getattr(first, "values", [first]), getattr(last, "values", [last])
    d = [y - x for x, y in zip(a, b)]
    mean = sum(d) / len(d)
    sd = float(torch.tensor(d, dtype=torch.float64).std()) if len(d) > 1 else 0.0
    v = beyond_noise(d)
    rel = 100 * mean / float(first) if float(first) else float("nan")
    if len(d) < 2:
        verdict = ("falls" if mean < 0 else "rises") + " (one seed: no noise estimate)"
    else:
        verdict = {-1: "falls beyond seed noise", 1: "rises beyond seed noise", 0: "flat within seed noise"}[v]
    return f"{label}: D10 − D0 = {mean:+.3g}" + (f" ± {sd:.2g}" if len(d) > 1 else "") + f" ({rel:+.1f} %), {verdict}"


def _closest_line(rows, label, what="generated set closest (OT) to") -> str:
    n = _n_seeds(rows[0]["gen"]["ot"])
    picks = [label(min(rows, key=lambda r: getattr(r["gen"]["ot"], "values", [r["gen"]["ot"]])[s])) for s in range(n)]
    return f"{what} {', '.join(picks)}" + (" (per seed)" if n > 1 else "")


_LABELS = {"diversity": lambda r: r["set"], "blur": lambda r: f"σ {float(r['sigma']):g}",
           "missing-classes": lambda r: f"k {int(r['k'])}", "noise": lambda r: f"σ {float(r['sigma']):g}"}


def _check_lines(res: dict) -> list[str]:
    """Plain verdicts: each expected order against the measured Spearman ρ (per seed), the
    steps that go against it and whether they exceed the seeds' spread; mixtures' and the
    epochs gap's end-to-end changes against the seeds' spread."""
    res = seed_view(res)
    name, out = res["experiment"], []
    want = {"diversity": -1, "blur": 1, "missing-classes": 1}.get(name)
    label = _LABELS.get(name)
    if want:
        for k, rho in res["orders"].items():
            if not math.isfinite(rho) or k == "ot":  # "ot" is the first blur's ot_b<blur>
                continue
            good = _order_verdict(rho, want).startswith("as expected")
            if k.startswith("ot") or k in ("mmd2", "fid") or not good:
                out.append(_rho_line(f"{k}:", rho, want if (k.startswith("ot") or k in ("mmd2", "fid")) else None))
        for key, what in (("ot", "OT"), ("fid", "FID")):
            line = _reversal_line(res["rows"], lambda r, key=key: r.get(key), want, label, what)
            if line:
                out.append(line)
        if res.get("gen_orders"):
            out.append(_rho_line("OT(generated, each set)", res["gen_orders"].get("ot", float("nan"))))
            if name in ("diversity", "blur"):
                out.append(_closest_line(res["rows"], label))
    elif name == "noise":
        for sp, o in res["orders"].items():
            for k, rho in o.items():
                if k.startswith("ot_b"):
                    out.append(_rho_line(f"{k} {sp} noise", rho, 1))
            line = _reversal_line([r for r in res["rows"] if r["space"] == sp], lambda r: r.get("ot"), 1, label,
                                  f"OT ({sp})")
            if line:
                out.append(line)
    elif name == "mixture":
        rows = res["rows"]
        out.append(_rho_line("OT(train ref, D_k)", res["orders"].get("ot")))
        out.append(_trend_line("OT(train ref, D_k)", rows[0]["ot"], rows[-1]["ot"]))
        out.append(_rho_line("OT(copier, D_k)", res["copier_orders"].get("ot")))
        out.append(_trend_line("OT(copier, D_k)", rows[0]["copier"]["ot"], rows[-1]["copier"]["ot"]))
        if res.get("gen_orders"):
            out.append(_rho_line("OT(generated, D_k)", res["gen_orders"].get("ot", float("nan"))))
            out.append(_trend_line("OT(generated, D_k)", rows[0]["gen"]["ot"], rows[-1]["gen"]["ot"]))
    elif name == "memorization":
        for r in res["rows"]:
            px, ft = r["pixel"]["near_copy_share"], r["feature"]["near_copy_share"]
            pm = lambda v: f"{float(v):.2f}" + (f" ± {v.sd:.2f}" if getattr(v, "sd", 0) else "")  # noqa: E731
            out.append(f"{r['set']}: near copies {pm(px)} px / {pm(ft)} feat")
    elif name == "epochs":
        rows = res["rows"]
        out.append(_rho_line("OT(gen, train) vs epoch", res["orders"]["train"].get("ot", float("nan")), -1))
        for key, what in (("ot", "OT(gen, train)"), ("fid", "FID(gen, train)")):
            line = _reversal_line(rows, lambda r, key=key: r["train"][key], -1, lambda r: f"epoch {int(r['epoch'])}", what)
            if line:
                out.append(line)
        b = res["baseline"]
        out.append(f"baseline OT(train, held-out) {_fmt(b['ot'])}, FID {_fmt(b['fid'])}")
        n = _n_seeds(rows[0]["gap"]["ot"]) if rows else 1
        for key, what in (("ot", "OT"), ("fid", "FID")):
            signs = [beyond_noise(getattr(r["gap"][key], "values", [r["gap"][key]])) for r in rows]
            groups = {s: [str(int(r["epoch"])) for r, v in zip(rows, signs) if v == s] for s in (-1, 1, 0)}
            if n < 2:
                out.append(f"{what} gap (held-out − train) < 0 at epochs {', '.join(groups[-1]) or 'none'}, > 0 at "
                           f"{', '.join(groups[1]) or 'none'} (one seed: no noise estimate)")
            else:
                out.append(f"{what} gap (held-out − train) < 0 beyond seed noise at epochs {', '.join(groups[-1]) or 'none'}; "
                           f"> 0 beyond noise at {', '.join(groups[1]) or 'none'}; within noise at "
                           f"{', '.join(groups[0]) or 'none'}")
    return out


def _fmt(v):
    if isinstance(v, PM) and v.sd > 0:
        return f"{_fmt(float(v))} ± {v.sd:.2g}"
    if isinstance(v, bool) or v is None:
        return str(v)
    if isinstance(v, float):
        return f"{v:.3g}" if abs(v) >= 1e-3 or v == 0 else f"{v:.2e}"
    return str(v)


def _table(rows, cols) -> list[str]:
    head = [c[0] for c in cols]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        lines.append("| " + " | ".join(_fmt(c[1](r)) for c in cols) + " |")
    return lines


def _metric_cols(blurs, prefix=None, short=False):
    get = (lambda r, k: r[k]) if prefix is None else (lambda r, k: (r.get(prefix) or {}).get(k))
    shown = (list(blurs[:1]) + list(blurs[-1:] if len(blurs) > 1 else [])) if short else blurs
    cols = [(f"OT b{b:g}", lambda r, b=b: get(r, f"ot_b{b:g}")) for b in shown]
    keys = ("fid",) if short else ("mmd2", "fid", "precision", "recall", "density", "coverage")
    plain = lambda v: float(v) if isinstance(v, PM) else v  # noqa: E731  (± only on OT, MMD², FID)
    return cols + [(k, (lambda r, k=k: get(r, k)) if k in ("mmd2", "fid") else (lambda r, k=k: plain(get(r, k))))
                   for k in keys]


def _nov_cols(prefix):
    plain = lambda v: float(v) if isinstance(v, PM) else v  # noqa: E731
    return [("near-copy px", lambda r: plain(r[prefix]["novelty"]["near_copy_share_p"])),
            ("NN ratio px", lambda r: plain(r[prefix]["novelty"]["ratio_p"])),
            ("near-copy feat", lambda r: plain(r[prefix]["novelty"]["near_copy_share_f"])),
            ("distinct NN feat", lambda r: plain(r[prefix]["novelty"]["distinct_nn_share_f"]))]


def write_report(dataset: str, out_dir: str, path: str | None = None) -> str:
    """``reports/<dataset>/passive.md`` from the experiments' JSON files in ``out_dir``."""
    path = path or os.path.join(os.path.dirname(out_dir.rstrip("/")) or ".", "passive.md")
    rel = os.path.relpath(out_dir, os.path.dirname(path) or ".")
    found = {}
    for e in EXPERIMENTS:
        f = os.path.join(out_dir, e.replace("-", "_") + ".json")
        if os.path.exists(f):
            with open(f) as fh:
                found[e] = seed_view(json.load(fh))
    L = [f"# Passive experiments on {dataset}: does OT measure what we care about?", "",
         "Generated by `python -m diffusion passive report`; the commands, what each experiment measures "
         "and the caveats are in [docs/passive.md](../../docs/passive.md).  Every set is embedded by the "
         "**evaluation** feature net (`feature_net_for(role=\"eval\")`, trained on one half of the training "
         "images with its own seed), never by the guide net that OT training / guidance use.", ""]
    if not found:
        L.append("No experiment has been run yet.")
    any_res = next(iter(found.values()), None)
    if any_res:
        net = any_res["eval_feature_net"]
        L += [f"Eval feature net: {net.get('n_train')} of {net.get('of_n_train')} training images, seed "
              f"{net.get('seed')}, {net.get('epochs')} epochs, test accuracy {_fmt(net.get('test_accuracy'))}.  "
              f"Training images {any_res['n_train']} (reference {any_res['n_ref']} balanced, the other "
              f"{any_res['n_pool']} the pool the sets are drawn from), held-out (val + test) {any_res['n_held_out']}.", ""]
        sp = any_res.get("data_split")
        if sp:
            L += [f"Data split: `load_data` with the {sp['from']}'s config (n_train {sp['n_train']}, n_val "
                  f"{'default' if sp['n_val'] is None else sp['n_val']}, n_test {sp['n_test']}, seed {sp['seed']}), "
                  f"training indices sha1 {sp['train_idx_sha1']}"
                  + ("; with a checkpoint this is the trainer's own call, so *training* and *held-out* mean what "
                     "they meant for the model." if sp["from"] == "checkpoint" else ".")]
            other = {e: r["data_split"]["train_idx_sha1"] for e, r in found.items()
                     if r.get("data_split") and r["data_split"]["train_idx_sha1"] != sp["train_idx_sha1"]}
            if other:
                L[-1] += "  **Other splits:** " + ", ".join(f"{e} {h}" for e, h in other.items()) + "."
            L.append("")
        L += ["Wall time: in the process, data + eval net (cached) + the experiment, sampling included; "
              "add ~3 s of Python / torch start-up for the command's.  CPU time: this process's user + system time "
              "(the wall time is longer when the machine is shared).", "",
              "| experiment | command | wall time (s) | CPU time (s) | torch threads |", "|---|---|---|---|---|"]
        for e, r in found.items():
            L.append(f"| {e} | `{r['command']}` | {r['wall_s']} | {r.get('cpu_s', '')} | {r.get('threads')} |")
        L.append("")
    against = [f"- **{e}**: {line}" for e, r in found.items() for line in _check_lines(r)
               if "NOT as expected" in line or "seeds only" in line or "against the expected order" in line]
    if found:
        L += ["## Against expectations", "",
              "Every verdict below that does not simply confirm the expectation (orders missed in some or all seeds, "
              "steps against the expected order; mixtures and the epochs gap are in their sections):", ""]
        L += (against or ["- none"]) + [""]
    for e, r in found.items():
        blurs = r["sinkhorn"]["blurs"]
        s = r["sinkhorn"]
        L += [f"## {e}", "", f"Sinkhorn p = {s['p']}, blur {', '.join(f'{b:g}' for b in blurs)}, scaling "
              f"{s['scaling']:g}, {'L2-normalised' if s['normalize'] else 'raw'} features; MMD² Gaussian, bandwidth "
              f"{_fmt(s['mmd_bandwidth'])} (fixed: the reference's median distance).  Sets of {r.get('n_compare', r.get('n_set'))}; "
              f"expected: {'; '.join(f'{k} {v}' for k, v in r['expect'].items())}.", ""]
        seeds = r.get("seeds", [r.get("seed", 0)])
        if len(seeds) > 1:
            L += [f"Seeds {', '.join(map(str, seeds))} (each draws its own reference, sets, noise and generated "
                  "samples; the data split and the eval net are fixed): every figure is the **mean over the seeds**, "
                  "OT / MMD² / FID with ± their standard deviation; ρ ranges are min..max over the seeds.  A "
                  "difference is *beyond seed noise* when every seed gives it the same sign and its mean exceeds "
                  "twice its standard deviation over the seeds.", ""]
        else:
            L += [f"One seed ({seeds[0]}): no seed-noise estimate (`--seeds 0,1,2` gives one).", ""]
        L += ["**Measured:** " + "; ".join(_check_lines(r)) + ".", ""]
        rows = r["rows"]
        if e == "diversity":
            cols = [("set", lambda x: x["set"]), ("distinct", lambda x: x["distinct"]), ("classes", lambda x: x["classes"])]
            L += _table(rows, cols + _metric_cols(blurs))
            if any("gen" in x for x in rows):
                L += ["", "Generated set against each D_k:", ""] + _table(
                    rows, [("set", lambda x: x["set"])] + _metric_cols(blurs, "gen") + _nov_cols("gen"))
            L += ["", f"![{e}]({rel}/diversity.png)", f"![sets]({rel}/diversity_sets.png)"]
        elif e in ("blur", "missing-classes"):
            key = "sigma" if e == "blur" else "k"
            cols = [(key, lambda x: x[key])] + ([("removed", lambda x: x["removed"])] if e != "blur" else [])
            L += _table(rows, cols + _metric_cols(blurs))
            if any("gen" in x for x in rows):
                L += ["", "Generated set against each:", ""] + _table(
                    rows, [(key, lambda x: x[key])] + _metric_cols(blurs, "gen") + _nov_cols("gen"))
            L += ["", f"![{e}]({rel}/{e.replace('-', '_')}.png)"]
            if e == "blur":
                L.append(f"![sets]({rel}/blur_sets.png)")
        elif e == "noise":
            L += _table(rows, [("space", lambda x: x["space"]), ("σ", lambda x: x["sigma"])] + _metric_cols(blurs))
            L += ["", f"Feature-space σ is in units of the reference features' std ({_fmt(r['feature_std'])}).", "",
                  f"![{e}]({rel}/noise.png)"]
        elif e == "mixture":
            L += _table(rows, [("k", lambda x: x["k"]), ("train", lambda x: x["n_train_part"]),
                               ("held-out", lambda x: x["n_held_part"])] + _metric_cols(blurs, short=True)
                        + [(f"copier {c[0]}", c[1]) for c in _metric_cols(blurs, "copier", short=True)]
                        + [(f"gen {c[0]}", c[1]) for c in (_metric_cols(blurs, "gen", short=True)
                                                           if any("gen" in x for x in rows) else [])])
            L += [""] + [f"{who.capitalize()} novelty: near-copy share {_fmt(rows[0][who]['novelty']['near_copy_share_p'])} "
                         f"px / {_fmt(rows[0][who]['novelty']['near_copy_share_f'])} feat, NN distance over the held-out "
                         f"images' {_fmt(rows[0][who]['novelty']['ratio_p'])} px / {_fmt(rows[0][who]['novelty']['ratio_f'])} "
                         f"feat, distinct nearest training images {_fmt(rows[0][who]['novelty']['distinct_nn_share_f'])} "
                         f"(feat)." for who in ("copier", "gen") if who in rows[0]]
            L += ["", f"![{e}]({rel}/mixture.png)"]
        elif e == "epochs":
            L += [f"Baseline train vs held-out: OT {_fmt(r['baseline']['ot'])}, MMD² {_fmt(r['baseline']['mmd2'])}, "
                  f"FID {_fmt(r['baseline']['fid'])}.", ""]
            L += _table(rows, [("epoch", lambda x: x["epoch"]), ("OT gen-train", lambda x: x["train"]["ot"]),
                               ("OT gen-held", lambda x: x["held_out"]["ot"]), ("OT gap", lambda x: x["gap"]["ot"]),
                               ("FID gen-train", lambda x: x["train"]["fid"]), ("FID gen-held", lambda x: x["held_out"]["fid"]),
                               ("FID gap", lambda x: x["gap"]["fid"]),
                               ("near-copy px", lambda x: x["novelty"]["near_copy_share_p"]),
                               ("NN ratio px", lambda x: x["novelty"]["ratio_p"]),
                               ("distinct NN feat", lambda x: x["novelty"]["distinct_nn_share_f"])])
            L += ["", f"![{e}]({rel}/epochs.png)"]
        elif e == "memorization":
            cols = [("set", lambda x: x["set"])]
            for sp in ("pixel", "feature"):
                t = "px" if sp == "pixel" else "feat"
                cols += [(f"NN median {t}", lambda x, sp=sp: x[sp]["nn_median"]),
                         (f"ratio {t}", lambda x, sp=sp: x[sp]["ratio"]),
                         (f"distinct NN {t}", lambda x, sp=sp: x[sp]["distinct_nn_share"]),
                         (f"near copies {t}", lambda x, sp=sp: x[sp]["near_copy_share"])]
            L += _table(rows, cols)
            L += ["", f"Near-copy threshold: the held-out images' 5th percentile of the distance to the nearest training "
                      f"image (pixels {_fmt(rows[0]['pixel']['threshold'])}, features {_fmt(rows[0]['feature']['threshold'])}).",
                  "", f"![{e}]({rel}/memorization.png)"]
        L.append("")
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    with open(path, "w") as f:
        f.write("\n".join(L) + "\n")
    return path


if __name__ == "__main__":  # pragma: no cover  (``python -m diffusion.passive``; not through cli: no cycle)
    import argparse

    _ap = argparse.ArgumentParser(prog="python -m diffusion")
    add_parser(_ap.add_subparsers(dest="cmd", required=True))
    sys.exit(cmd_passive(_ap.parse_args(["passive", *sys.argv[1:]])))
