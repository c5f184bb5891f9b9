"""Training: the Trainer (Adam, EMA, gradient clipping, bf16/fp16 autocast, per-epoch logs, sample
grids, atomic checkpoints, exact resume) and the OT-enhanced loss

    L = L_eps + λ(epoch) · Sinkhorn_p,blur( squash(x̂0), squash(reference batch) )

where x̂0 = predict_start_from_noise(x_t, t, ε̂) and the reference batch is drawn from a pool
of training images disjoint from the current batch (``ot_pool_size=0``: all of them, fresh
draws every step), compared in pixel space or in the guide feature net's embedding; the
metrics use the other, eval feature net (:func:`feature_net_for`).
"""
from __future__ import annotations

import contextlib
import copy
import csv
import hashlib
import json
import os
import random
import time

import numpy as np
import torch

from otkernels import SamplesLoss
from otkernels import distributed as otd

from . import ddp
from .checkpoint import load_checkpoint, rng_state, save_checkpoint, set_rng_state
from .config import DiffusionConfig
from .data import ImageData, batches, load_data
from .evaluation import feature_metrics, plot_history, save_grid
from .features import classify, embed, load_or_train_feature_net
from .flow import FlowMatching, flow_sample
from .model import Unet
from .process import GaussianDiffusion
from .sample import ddim_sample


def build_model(cfg: DiffusionConfig, channels: int) -> Unet:
    return Unet(cfg.dim, cfg.dim_mults, channels, cfg.resnet_blocks, cfg.attn_levels, dropout=cfg.dropout,
                num_classes=10 if cfg.class_cond else None, cond_drop_prob=cfg.cond_drop_prob)


def build_process(cfg: DiffusionConfig):
    """GaussianDiffusion (``method="diffusion"``) or FlowMatching (``method="flow"``)."""
    if cfg.method == "flow":
        return FlowMatching(cfg.flow_sigma, cfg.flow_coupling, cfg.flow_blur, cfg.timesteps)
    return GaussianDiffusion(cfg.timesteps, cfg.beta_schedule, cfg.objective)


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


FEATURE_ROLES = ("guide", "eval")
EVAL_FEATURE_SEED_OFFSET = 1000003   # the eval net's seed: cfg.seed + this (the guide net's: cfg.seed)
FEATURE_SPLIT_SEED_OFFSET = 7919     # the guide/eval split of the training images: seed cfg.seed + this


def feature_split(n_train: int, seed: int) -> dict:
    """Disjoint halves of ``range(n_train)`` for the two feature nets: a permutation seeded by
    ``seed + FEATURE_SPLIT_SEED_OFFSET``; ``"guide"`` its first ``n_train // 2`` indices,
    ``"eval"`` the rest (each sorted)."""
    perm = torch.randperm(n_train, generator=torch.Generator().manual_seed(seed + FEATURE_SPLIT_SEED_OFFSET))
    h = n_train // 2
    return {"guide": perm[:h].sort().values, "eval": perm[h:].sort().values}


def feature_net_path(cfg: DiffusionConfig, size: int, role: str = "guide") -> str:
    """Cache path of the ``role`` feature net: ``cfg.feature_path`` for the guide net and the same
    path with ``-eval`` before the extension for the eval net; by default
    ``<out_dir>/../features/<dataset>-<size>-<role>.pt``."""
    if role not in FEATURE_ROLES:
        raise ValueError(f"role must be one of {FEATURE_ROLES}, got {role!r}")
    if cfg.feature_path:
        if role == "guide":
            return cfg.feature_path
        root, ext = os.path.splitext(cfg.feature_path)
        return f"{root}-eval{ext or '.pt'}"
    return os.path.join(os.path.dirname(os.path.abspath(cfg.out_dir)), "features", f"{cfg.dataset}-{size}-{role}.pt")


def feature_net_for(cfg: DiffusionConfig, data: ImageData, device="cpu", role: str = "guide"):
    """One of the dataset's two feature nets (issue 17: what guides must not be what measures).

    ``role="guide"``: the net that guidance sees (the OT loss in feature space during training,
    ``--ot-space feature`` OT guidance when sampling); ``role="eval"``: the net that measures
    (feature-space metrics, class shares, confidence).  They are trained on disjoint halves of
    the training images (:func:`feature_split`) with different seeds (guide ``cfg.seed``, eval
    ``cfg.seed + EVAL_FEATURE_SEED_OFFSET``), cached at :func:`feature_net_path`, trained on
    first use inside ``fork_rng``: the caller's RNG streams are untouched.  The net's
    ``train_info`` says how it was made (role, images, seed, test accuracy, path)."""
    if role not in FEATURE_ROLES:
        raise ValueError(f"role must be one of {FEATURE_ROLES}, got {role!r}")
    path = feature_net_path(cfg, data.shape[-1], role)
    n = len(data.x_train)
    idx = feature_split(n, cfg.seed)[role]
    seed = cfg.seed if role == "guide" else cfg.seed + EVAL_FEATURE_SEED_OFFSET
    extra = {"role": role, "of_n_train": n, "split_seed": cfg.seed + FEATURE_SPLIT_SEED_OFFSET,
             "indices_sha1": hashlib.sha1(idx.numpy().tobytes()).hexdigest()[:16]}
    with torch.random.fork_rng(devices=[]):
        return load_or_train_feature_net(path, data.x_train[idx], data.y_train[idx], data.x_test, data.y_test,
                                         epochs=cfg.feature_epochs, seed=seed, device=device,
                                         dataset=cfg.dataset, key_extra=extra)


def feature_net_info(net) -> dict:
    """What a feature net returned by :func:`feature_net_for` was trained on, for result files:
    role, n_train (images it saw), of_n_train, seed, epochs, test_accuracy, path."""
    info = getattr(net, "train_info", {}) or {}
    return {k: info.get(k) for k in ("role", "n_train", "of_n_train", "seed", "epochs", "test_accuracy", "path")}


class EMA:
    """Exponential moving average of a model's parameters; decay warms up as
    min(decay, (1+n)/(10+n)) so early averages are not dominated by the initialisation."""

    def __init__(self, model: torch.nn.Module, decay: float = 0.995):
        self.model = copy.deepcopy(model).eval().requires_grad_(False)
        self.decay, self.updates = decay, 0

    @torch.no_grad()
    def update(self, model: torch.nn.Module) -> None:
        self.updates += 1
        d = min(self.decay, (1 + self.updates) / (10 + self.updates))
        for e, p in zip(self.model.parameters(), model.parameters()):
            e.lerp_(p.detach(), 1 - d)
        for e, b in zip(self.model.buffers(), model.buffers()):
            e.copy_(b)

    def state_dict(self):
        return {"model": self.model.state_dict(), "updates": self.updates}

    def load_state_dict(self, s):
        self.model.load_state_dict(s["model"])
        self.updates = s["updates"]


class OTLoss:
    """Sinkhorn loss between x̂0 (B,C,H,W) and reference images (M,C,H,W), both passed through
    the same squash to [-1, 1] (``"clamp"``: identity on images already in [-1, 1]; ``"tanh"``:
    tanh of both, so a reference compared with itself costs 0 and the gradient does not push
    saturated pixels past the references' ±tanh(1)), then flattened (``space="pixel"``) or
    embedded by a frozen feature net (``"feature"``)."""

    def __init__(self, p: int = 2, blur: float = 0.35, space: str = "pixel", feature_net=None,
                 squash: str = "clamp", sharded: bool = False):
        if space == "feature" and feature_net is None:
            raise ValueError("ot_space='feature' needs a feature net")
        # sharded: each rank passes its rows of x̂0 and of the references; the value is the OT loss
        # of the global batch (otkernels.distributed), its gradient this rank's share
        self.loss = (otd.SamplesLoss if sharded else SamplesLoss)("sinkhorn", p=p, blur=blur)
        self.space, self.net, self.squash = space, feature_net, squash

    def _squash(self, x: torch.Tensor) -> torch.Tensor:
        return x.clamp(-1, 1) if self.squash == "clamp" else torch.tanh(x)

    @torch.no_grad()
    def reference_features(self, ref: torch.Tensor, batch_size: int = 1000) -> torch.Tensor:
        """(M, C, H, W) reference images → what :meth:`__call__` compares x̂0 with: (M, D)
        squashed and flattened, or embedded by the frozen net.  The Trainer computes this once
        for all training images, so a step's references cost an index, not a forward pass."""
        with torch.autocast(ref.device.type, enabled=False):
            out = [self._squash(ref[i:i + batch_size].float()) for i in range(0, len(ref), batch_size)]
            if self.space == "feature":
                out = [self.net.embed(r) for r in out]
            return torch.cat([r.flatten(1) for r in out])

    def __call__(self, x0_hat: torch.Tensor, ref: torch.Tensor | None = None,
                 ref_features: torch.Tensor | None = None) -> torch.Tensor:
        """S(x̂0, ref): ``ref`` images (M,C,H,W), or their :meth:`reference_features` (M, D)."""
        if (ref is None) == (ref_features is None):
            raise ValueError("OTLoss takes ref or ref_features, exactly one")
        with torch.autocast(x0_hat.device.type, enabled=False):  # Sinkhorn in float32, even under AMP
            x = self._squash(x0_hat.float())
            if self.space == "feature":
                x = self.net.embed(x)
            y = self.reference_features(ref) if ref_features is None else ref_features.float()
            return self.loss(x.flatten(1), y.detach())


class ReferencePool:
    """A fixed random subset of the training images (``size``; 0, or ``size >= n_train``: all of
    them); :meth:`draw` returns a batch of them that excludes the current training batch's
    indices.  With ``size=0`` and ``ot_ref_batch=2000`` every step's references are 2000 fresh
    draws from all the training images outside the batch."""

    def __init__(self, n_train: int, size: int, seed: int):
        if size < 0:
            raise ValueError(f"size must be >= 0 (0: all training images), got {size}")
        g = torch.Generator().manual_seed(seed)
        size = n_train if size == 0 else min(size, n_train)
        self.idx = torch.randperm(n_train, generator=g)[:size]

    def draw(self, n: int, exclude: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        cand = self.idx[~torch.isin(self.idx, exclude)]
        if len(cand) == 0:
            raise ValueError("the OT reference pool is contained in the training batch: raise ot_pool_size")
        return cand[torch.randperm(len(cand), generator=generator)[:n]]


def ot_weight(cfg: DiffusionConfig, epoch: float) -> float:
    """λ at (fractional) ``epoch``: 0 before ot_start_epoch, a linear ramp over ot_warmup_epochs,
    then ot_lambda."""
    if cfg.ot_lambda == 0 or epoch < cfg.ot_start_epoch:
        return 0.0
    if cfg.ot_warmup_epochs == 0:
        return cfg.ot_lambda
    return cfg.ot_lambda * min(1.0, (epoch - cfg.ot_start_epoch) / cfg.ot_warmup_epochs)


class Trainer:
    """Trains a Unet on ``cfg``'s dataset; writes to ``cfg.out_dir``:
    ``checkpoint.pt`` (every ``ckpt_every`` epochs, atomic; with ``save_every``, also a series
    ``checkpoint_<epoch>.pt``), ``log.json``, ``log.csv``,
    ``curves.png``, ``samples_<epoch>.png``.  ``resume=True`` continues from the checkpoint
    exactly (model, EMA, optimizer, step/epoch, torch/numpy/python/data-order RNG states).

    Data parallel (torchrun; the default process group initialised, e.g. by
    :func:`diffusion.ddp.init_from_env`): ``cfg.batch_size`` is per rank, the global batch is
    ``batch_size × world``; every rank draws the global batch's order, timesteps, noise and OT
    references from the same streams and trains on its slice, the model is wrapped in
    DistributedDataParallel, the flow-matching coupling and the OT loss are those of the
    global batch (:mod:`otkernels.distributed`); rank 0 alone writes checkpoints, logs and
    grids and runs the evaluations (see :mod:`diffusion.ddp`)."""

    def __init__(self, cfg: DiffusionConfig, data: ImageData | None = None, resume: bool = False, log=print):
        self.rank, self.world = otd.world()
        self.cfg, self.log = cfg, (log if self.rank == 0 else (lambda *a, **k: None))
        if cfg.threads:
            torch.set_num_threads(cfg.threads)
        self.device = resolve_device(cfg.device)
        ts = cfg.seed if cfg.train_seed is None else cfg.train_seed  # init, batch order, noise, references
        self.train_seed = ts
        torch.manual_seed(ts)
        np.random.seed(ts)
        random.seed(ts)
        self.data = data if data is not None else load_data(cfg.dataset, cfg.data_path, cfg.pad_to_32, cfg.n_train,
                                                            cfg.n_test, cfg.seed, cfg.n_val)
        self.diffusion = build_process(cfg)  # GaussianDiffusion or FlowMatching
        self.model = build_model(cfg, self.data.shape[0]).to(self.device)
        self.opt = torch.optim.Adam(self.model.parameters(), lr=cfg.lr)
        self.ema = EMA(self.model, cfg.ema_decay)
        # autocast on the model's device (bf16 / fp16 on CUDA; on CPU too, where torch supports
        # both, so the path is testable without a GPU); fp16 scales the loss, bf16 needs no scaler
        self.amp_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(cfg.amp)
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=cfg.amp == "fp16")
        self.order_gen = torch.Generator().manual_seed(ts)      # batch order
        self.ref_gen = torch.Generator().manual_seed(ts + 1)    # OT reference batches
        self.pool = ReferencePool(len(self.data.x_train), cfg.ot_pool_size, ts + 2)
        self.epoch, self.step, self.history = 0, 0, []
        self._features, self._eval_features, self._ot_loss, self._ref_features = None, None, None, None
        self.ckpt_path = os.path.join(cfg.out_dir, "checkpoint.pt")
        if resume and os.path.exists(self.ckpt_path):
            self.load(self.ckpt_path)
            self.log(f"resumed from {self.ckpt_path} at epoch {self.epoch} (step {self.step})")
        elif cfg.init_from:
            ck = load_checkpoint(cfg.init_from, map_location=self.device)
            self.model.load_state_dict(ck["model"])
            self.ema.load_state_dict(ck["ema"])
            self.log(f"fine-tuning from {cfg.init_from} (epoch {ck['epoch']})")
        self.net = self.model  # what the training steps call: DDP's wrapper when data parallel
        if self.world > 1:
            from torch.nn.parallel import DistributedDataParallel

            cuda = self.device.type == "cuda"
            index = self.device.index if self.device.index is not None else (torch.cuda.current_device() if cuda else None)
            self.net = DistributedDataParallel(self.model, device_ids=[index] if cuda else None)

    # ------------------------------------------------------------------ parts built on demand
    @property
    def features(self):
        """The guide feature net (``feature_net_for(role="guide")``): the OT loss's space with
        ``ot_space="feature"``.  Trained on first use with its own seed: the training RNG
        streams are untouched."""
        if self._features is None:  # data parallel: rank 0 trains and caches it, the others load it
            if self.rank > 0:
                ddp.barrier(self.world)
            self._features = feature_net_for(self.cfg, self.data, self.device, role="guide")
            if self.rank == 0:
                ddp.barrier(self.world)
        return self._features

    @property
    def eval_features(self):
        """The eval feature net (``feature_net_for(role="eval")``, trained on the other half of
        the training images): :meth:`evaluate`'s metrics and class shares."""
        if self._eval_features is None:
            self._eval_features = feature_net_for(self.cfg, self.data, self.device, role="eval")
        return self._eval_features

    @property
    def ot_loss(self) -> OTLoss:
        if self._ot_loss is None:
            c = self.cfg
            self._ot_loss = OTLoss(c.ot_p, c.ot_blur, c.ot_space, self.features if c.ot_space == "feature" else None,
                                   c.ot_squash, sharded=self.world > 1)
        return self._ot_loss

    @property
    def ref_features(self) -> torch.Tensor:
        """(N_train, D): every training image as the feature-space OT term sees it (the guide
        net's features of the squashed image), computed once on first use; steps index into
        it (before: 2,000 references per step cost 2,000 forward passes, 470 s per MNIST epoch)."""
        if self._ref_features is None:
            self._ref_features = self.ot_loss.reference_features(self.data.x_train.to(self.device))
        return self._ref_features

    def _autocast(self):
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.amp_dtype)

    # ------------------------------------------------------------------ training
    def train_step(self, idx: torch.Tensor) -> dict:
        """One optimizer step on the training images ``idx`` (the global batch: data parallel,
        this rank trains on its slice); returns the loss terms (of the global batch)."""
        cfg, d, dev = self.cfg, self.data, self.device
        rows = ddp.shard(len(idx), self.rank, self.world)  # everything: this rank's rows of the global draws
        x0 = d.x_train[idx[rows]].to(dev)
        y = d.y_train[idx[rows]].to(dev) if cfg.class_cond else None
        t = self.diffusion.sample_timesteps(len(idx), cfg.timestep_sampler, device=dev)[rows]
        noise = torch.randn((len(idx), *x0.shape[1:]), dtype=x0.dtype, device=dev)[rows]
        w = ot_weight(cfg, self.epoch + (self.step % self.steps_per_epoch) / self.steps_per_epoch)
        model = self.net
        if self.world > 1:  # the forward's own draws (dropout): a per-rank seed
            model = ddp.RankRNG(self.net, self.train_seed + 7919 * (self.step * self.world + self.rank + 1), dev)
        sharded = self.world > 1 and hasattr(self.diffusion, "global_batch")  # flow: global-batch coupling
        with self._autocast():
            if sharded:
                self.diffusion.global_batch = True
            try:
                loss_eps, x0_hat = self.diffusion.training_loss(model, x0, t, noise, y)
            finally:
                if sharded:
                    self.diffusion.global_batch = False
            loss, loss_ot = loss_eps, None
            if w > 0:
                keep = t < (cfg.ot_max_t or cfg.timesteps)
                if ddp.total(keep.sum(), self.world) >= 2:
                    pick = self.pool.draw(cfg.ot_ref_batch or self.global_batch_size, idx, self.ref_gen)
                    pick = pick[ddp.shard(len(pick), self.rank, self.world)]
                    if cfg.ot_space == "feature":  # the frozen net's features of every training image, once
                        loss_ot = self.ot_loss(x0_hat[keep], ref_features=self.ref_features[pick.to(dev)])
                    else:
                        loss_ot = self.ot_loss(x0_hat[keep], d.x_train[pick].to(dev))
                    # the global OT loss; DDP averages the ranks' gradients, whose OT parts add up
                    # to the global gradient: scale by the world size
                    loss = loss_eps + w * self.world * loss_ot
        report = loss
        if self.world > 1:  # the logs: the global batch's terms
            loss_eps = ddp.mean(loss_eps, self.world)
            report = loss_eps + (w * loss_ot.detach().float() if loss_ot is not None else 0.0)
        self.opt.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        if cfg.grad_clip > 0:
            self.scaler.unscale_(self.opt)
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), cfg.grad_clip)
        self.scaler.step(self.opt)
        self.scaler.update()
        self.ema.update(self.model)
        self.step += 1
        return {"loss": report.item(), "loss_eps": loss_eps.item(),
                "loss_ot": None if loss_ot is None else loss_ot.item(), "ot_weight": w}

    @property
    def global_batch_size(self) -> int:
        """Images per optimizer step: ``batch_size`` × the number of ranks."""
        return self.cfg.batch_size * self.world

    @property
    def steps_per_epoch(self) -> int:
        return max(1, len(self.data.x_train) // self.global_batch_size)

    def train(self) -> list:
        """Run the remaining epochs; returns the per-epoch history."""
        from tqdm.auto import tqdm

        cfg = self.cfg
        os.makedirs(cfg.out_dir, exist_ok=True)
        bar = tqdm(total=cfg.epochs * self.steps_per_epoch, initial=self.step, disable=not cfg.progress or self.rank > 0,
                   desc="train", dynamic_ncols=True)
        while self.epoch < cfg.epochs:
            self.model.train()
            t0, terms = time.perf_counter(), []
            for idx in batches(len(self.data.x_train), self.global_batch_size, self.order_gen):
                terms.append(self.train_step(idx))
                bar.update(1)
                bar.set_postfix(epoch=self.epoch + 1, loss=f"{terms[-1]['loss']:.4f}")
            self.epoch += 1
            mean = lambda k: (float(np.mean(v)) if (v := [s[k] for s in terms if s[k] is not None]) else None)  # noqa: E731
            rec = {"epoch": self.epoch, "step": self.step, "loss": mean("loss"), "loss_eps": mean("loss_eps"),
                   "loss_ot": mean("loss_ot"), "ot_weight": mean("ot_weight"), "epoch_time": time.perf_counter() - t0}
            rec["val_loss"] = self.validation_loss()
            last = self.epoch == cfg.epochs
            if self.rank == 0 and ((last and cfg.eval_final) or (cfg.eval_every and self.epoch % cfg.eval_every == 0)):
                rec.update(self.evaluate(cfg.eval_n, grid_path=os.path.join(cfg.out_dir, f"samples_{self.epoch:04d}.png")))
            self.history.append(rec)
            if self.rank == 0:  # data parallel: rank 0 writes (every rank holds the same state)
                self.write_logs(plot=last or "ot_train" in rec)
                if last or self.epoch % cfg.ckpt_every == 0:
                    self.save(self.ckpt_path)
                if cfg.save_every and self.epoch % cfg.save_every == 0:  # the series (passive `epochs`)
                    self.save(os.path.join(cfg.out_dir, f"checkpoint_{self.epoch:04d}.pt"))
            ddp.barrier(self.world)
            if rec.get("ot_train") is not None:
                bar.write(f"epoch {self.epoch}: loss {rec['loss']:.4f} val {rec['val_loss']:.4f} "
                          f"OT(gen,train) {rec['ot_train']:.3f} OT(gen,test) {rec['ot_test']:.3f}")
        bar.close()
        return self.history

    # ------------------------------------------------------------------ evaluation
    @torch.no_grad()
    def validation_loss(self) -> float:
        """The ε-loss of the EMA model on (up to val_n) images of the validation split (held out of
        the training data by :func:`~diffusion.data.load_data`; never the test set), fixed noise
        and timesteps."""
        cfg, d = self.cfg, self.data
        if d.x_val is None or len(d.x_val) == 0:
            raise ValueError("the validation loss needs a validation split (data.x_val): load the data with load_data")
        x = d.x_val[: cfg.val_n]
        g = torch.Generator().manual_seed(cfg.seed + 12345)
        t = torch.randint(0, cfg.timesteps, (len(x),), generator=g)
        noise = torch.randn(x.shape, generator=g)
        total = 0.0
        for i in range(0, len(x), 500):
            sl = slice(i, i + 500)
            y = d.y_val[: cfg.val_n][sl].to(self.device) if cfg.class_cond else None
            with self._autocast():
                loss, _ = self.diffusion.training_loss(self.ema.model, x[sl].to(self.device), t[sl].to(self.device),
                                                       noise[sl].to(self.device), y)
            total += loss.item() * len(x[sl])
        return total / len(x)

    @torch.no_grad()
    def generate(self, n: int, seed: int, steps: int | None = None, batch_size: int = 1000) -> torch.Tensor:
        """n DDIM (or, for ``method="flow"``, ODE-solver) samples (n,C,H,W) from the EMA model
        with a seeded generator (class labels drawn uniformly for a conditional model)."""
        cfg = self.cfg
        g = torch.Generator().manual_seed(seed)
        out = []
        with torch.random.fork_rng(devices=[]), self._autocast():
            for i in range(0, n, batch_size):
                b = min(batch_size, n - i)
                y = torch.randint(0, 10, (b,), generator=g).to(self.device) if cfg.class_cond else None
                shape = (b, *self.data.shape)
                if cfg.method == "flow":
                    x = flow_sample(self.ema.model, self.diffusion, shape, steps or cfg.sample_steps, cfg.flow_solver,
                                    y=y, generator=g)
                else:
                    x = ddim_sample(self.ema.model, self.diffusion, shape, steps or cfg.sample_steps, cfg.sample_eta,
                                    y=y, generator=g)
                out.append(x.float().cpu())
        return torch.cat(out)

    @torch.no_grad()
    def evaluate(self, n: int, grid_path: str | None = None) -> dict:
        """Feature-space OT / MMD / FID of n generated samples vs train and vs test, and the
        eval feature net's class histogram of the samples (the eval net, never the one the OT
        loss trains against); a sample grid at ``grid_path``."""
        cfg, d = self.cfg, self.data
        t0 = time.perf_counter()
        x = self.generate(n, seed=cfg.seed + 1000 * self.epoch)
        net = self.eval_features
        with torch.random.fork_rng(devices=[]):
            f_gen = embed(net, x)
            probs = torch.cat([net(x[i:i + 1000].to(self.device)).float().softmax(1).cpu() for i in range(0, n, 1000)])
            rec = {}
            for split, xr in (("train", d.x_train), ("test", d.x_test)):
                m = feature_metrics(embed(net, xr[: max(n, 2000)]), f_gen, cfg.metric_blur, fake_probs=probs)
                rec.update({f"{k}_{split}": v for k, v in m.items()})
            q = classify(net, x)
            rec.update(classes_present=q["classes_present"], max_class_share=q["max_class_share"],
                       mean_confidence=q["mean_confidence"])
        if grid_path:
            save_grid(x[: cfg.grid_n], grid_path)
        rec["eval_time"] = time.perf_counter() - t0
        return rec

    # ------------------------------------------------------------------ logs and checkpoints
    def write_logs(self, plot: bool = True) -> None:
        """log.json (config + history) and log.csv every epoch; curves.png when ``plot``."""
        out = self.cfg.out_dir
        with open(os.path.join(out, "log.json"), "w") as f:
            json.dump({"config": self.cfg.to_dict(), "history": self.history}, f, indent=1)
        keys = list(dict.fromkeys(k for h in self.history for k in h))
        with open(os.path.join(out, "log.csv"), "w", newline="") as f:
            w = csv.DictWriter(f, keys)
            w.writeheader()
            w.writerows(self.history)
        if plot:
            try:
                plot_history(self.history, os.path.join(out, "curves.png"))
            except ImportError:  # matplotlib missing: logs only
                pass

    def state_dict(self) -> dict:
        return {"model": self.model.state_dict(), "ema": self.ema.state_dict(), "opt": self.opt.state_dict(),
                "scaler": self.scaler.state_dict(), "epoch": self.epoch, "step": self.step,
                "history": self.history, "config": self.cfg.to_dict(),
                "rng": rng_state(self.order_gen, self.ref_gen)}

    def save(self, path: str) -> None:
        save_checkpoint(self.state_dict(), path)

    def load(self, path: str) -> None:
        ck = load_checkpoint(path, map_location=self.device)
        self.model.load_state_dict(ck["model"])
        self.ema.load_state_dict(ck["ema"])
        self.opt.load_state_dict(ck["opt"])
        if ck.get("scaler"):
            self.scaler.load_state_dict(ck["scaler"])
        self.epoch, self.step, self.history = ck["epoch"], ck["step"], ck["history"]
        set_rng_state(ck["rng"], self.order_gen, self.ref_gen)


def load_model(path: str, device="cpu"):
    """(EMA model, GaussianDiffusion or FlowMatching (cfg.method), config) from a training
    checkpoint, ready to sample."""
    ck = load_checkpoint(path, map_location=device)
    cfg = DiffusionConfig(**ck["config"])
    channels = ck["ema"]["model"]["init_conv.weight"].shape[1]
    model = build_model(cfg, channels).to(device)
    model.load_state_dict(ck["ema"]["model"])
    return model.eval().requires_grad_(False), build_process(cfg), cfg


