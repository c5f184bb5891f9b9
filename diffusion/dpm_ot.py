"""DPM-OT sampling (Li et al., ICCV 2023, "DPM-OT: A New Diffusion Probabilistic Model Based on
Optimal Transport"; code github.com/cognaclee/DPM-OT): an "expressway" from white noise to the
data latents at an intermediate step t' by a semi-discrete OT map, then only the last few
denoising steps from t' to 0.

The procedure implemented here, for a trained ε-model and N training images x0_j:

1. **Data latents** at t' (:func:`dpm_ot_latents`): ``method="q"`` pushes the images forward
   with the forward process, y_j = √ᾱ'·x0_j + √(1−ᾱ')·ε_j with one fixed seeded ε_j per image
   (what DPM-OT's code does: its ``forward_diffusion`` adds σ·noise to the data in its VE
   parametrisation); ``method="ddim"`` inverts the images with deterministic DDIM instead (a
   few network evaluations per image, once): y_j is then the probability-flow ODE's latent of
   x0_j, and DDIM from y_j reconstructs ≈ x0_j.
2. **Semi-discrete OT** (:class:`otkernels.semidiscrete.SemiDiscreteOT`) from the Gaussian
   N(0, I_D), D = C·H·W (the law of x_T's noise), to the uniform measure on the flattened
   y_j, cost ½|z − y|²: every target gets a Laguerre cell of Gaussian mass 1/N, and the map
   T(z) = y_{j(z)} sends each noise to its cell's latent.
3. **Sampling** (:meth:`DPMOTSampler.sample`): z ~ N(0, I) → j = cell(z) → x_{t'} → DDIM from
   t' to 0 in ``steps`` steps (= network evaluations; the map is one fused argmax pass of
   :mod:`otkernels.assign`, not a network evaluation).

Where this differs from the paper's code: the source is N(0, I) (the code draws
``torch.rand``, uniform on [0, 1]^D); the denoiser after the map is DDIM with ``eta``
(the code runs the remaining annealed Langevin steps of NCSNv2, which are stochastic: η > 0 is
the analogue); the topk / angle filter of "singular" samples near cell boundaries is not
implemented; the OT solver is otkernels' (Adam + stall schedule as DPM-OT, plus averaging and a
fresh-sample stopping test, see :mod:`otkernels.semidiscrete`).

**Diversity.**  With a fitted map, T(z) is distributed exactly as the uniform measure on the N
latents: with ``mix=0, eta=0`` every z in a cell gives the same image, at most N distinct
samples, i.e. a deterministic re-decoding of the training latents (for ``method="ddim"``, of
the training images themselves).  Two documented ways out, to be chosen by measurement
(docs/diffusion.md, "DPM-OT"):

* ``eta > 0``: stochastic DDIM from t' (DPM-OT's own choice in spirit: Langevin steps).
* ``mix = λ ∈ (0, 1]``: re-noise the mapped latent around its clean image,
  x_{t'} = √ᾱ'·x0_j + √(1−ᾱ')·(√(1−λ²)·ε_j + λ·ε'),  ε_j = (y_j − √ᾱ'·x0_j)/√(1−ᾱ'),
  with ε' = z itself (``mix_noise="z"``: the sample stays a deterministic function of z) or
  an independent N(0, I) draw (``"fresh"``).  For independent ε' and ε_j ~ N(0, I) (``"q"``
  latents) the combined noise is N(0, I) for every λ, so x_{t'} keeps exactly the law of the
  forward-diffused training set: λ trades the OT target's own noise for new noise.  ε' = z
  is not independent of j (z lies in j's cell, shifted along y_j): an OT-coupled noise.

Measured on digits (``diffusion/assets/dpm_ot_digits.json``, 1000 samples): ``mix=1,
mix_noise="z", eta=0`` was the best variant at every t' and k ≥ 5 (at t'=400, k=5: FID 11.6
vs 22.6 for the paper's ``mix=0`` and 77.8 for DDIM-5), ``eta=1`` was worse than ``eta=0``,
and the paper's map was indistinguishable from drawing the target uniformly at random (its
law once fitted).  The defaults stay the paper's (``mix=0, eta=0``).  Small t' re-decodes the
training images (t'=200: 43–83 % of samples have their own target as nearest training image),
and ``method="ddim"`` latents reproduce them (100 % at k ≥ 5): check memorisation.
"""
from __future__ import annotations

import hashlib
import math
import os
import tempfile
import time
import warnings

import torch

from otkernels._io import atomic_torch_save
from otkernels.semidiscrete import SemiDiscreteOT

from .process import GaussianDiffusion, _extract
from .sample import _as_int, ddim_invert, ddim_sample, ddim_timesteps

__all__ = ["dpm_ot_latents", "DPMOTSampler", "METHODS", "MIX_NOISE"]

METHODS = ("q", "ddim")
MIX_NOISE = ("z", "fresh")
_FORMAT = 1  # DPMOTSampler.save() format version
# The "q" latents' noise is drawn from seed + this offset: with the plain seed, sampling noise
# drawn from the same small seed (0 in every CLI default) would *be* the first latents' noise,
# each z_i would land in latent i's cell, and the samples would re-decode training images
# one to one (measured: 1000 distinct targets of 1000 samples instead of ~730).
LATENT_SEED_OFFSET = 0x9E3779B9


def _check_images(x0, name="x0"):
    if not isinstance(x0, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor of shape (N, C, H, W), got {type(x0).__name__}")
    if not x0.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got {x0.dtype}")
    if x0.dim() != 4 or x0.shape[0] == 0:
        raise ValueError(f"{name} must have shape (N, C, H, W) with N ≥ 1, got {tuple(x0.shape)}")
    if not bool(torch.isfinite(x0).all()):
        raise ValueError(f"{name} contains NaN or Inf values")
    return x0.detach()


def _check_t_start(diffusion, t_start):
    t_start = _as_int(t_start, "t_start")
    if not 0 <= t_start < diffusion.T:
        raise ValueError(f"t_start must be in [0, T-1={diffusion.T - 1}], got {t_start}")
    return t_start


def _device(model, default):
    if model is None:
        return default
    try:
        return next(model.parameters()).device
    except StopIteration:
        return default


@torch.no_grad()
def dpm_ot_latents(model, diffusion: GaussianDiffusion, x0: torch.Tensor, t_start: int, method: str = "ddim",
                   noise: torch.Tensor | None = None, steps: int = 10, generator: torch.Generator | None = None,
                   y=None, clip: bool = False, batch_size: int = 1000) -> torch.Tensor:
    """Latents x_{t_start} (N, C, H, W) of the images x0 (N, C, H, W), on x0's device.

    ``method="q"``: q_sample(x0, t_start, noise), ``noise`` (N, C, H, W) given or drawn from
    ``generator`` on the CPU (``model`` is not used and may be None).  ``method="ddim"``:
    deterministic DDIM inversion with ``steps`` network evaluations per image
    (:func:`diffusion.sample.ddim_invert`, in batches of ``batch_size``; ``clip`` clamps x̂0)."""
    x0 = _check_images(x0)
    t_start = _check_t_start(diffusion, t_start)
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    if method == "q":
        if noise is None:
            noise = torch.randn(x0.shape, generator=generator, dtype=torch.float32).to(x0.device, x0.dtype)
        elif not isinstance(noise, torch.Tensor) or tuple(noise.shape) != tuple(x0.shape):
            got = tuple(noise.shape) if isinstance(noise, torch.Tensor) else type(noise).__name__
            raise ValueError(f"noise must have the shape of x0 {tuple(x0.shape)}, got {got}")
        t = torch.full((x0.shape[0],), t_start, dtype=torch.long, device=x0.device)
        return diffusion.q_sample(x0, t, noise.to(x0.device, x0.dtype))
    if model is None:
        raise ValueError("method='ddim' needs the model (DDIM inversion)")
    ddim_timesteps(diffusion.T, steps, t_start)  # argument errors before any work
    dev = _device(model, x0.device)
    out = []
    for i in range(0, x0.shape[0], batch_size):
        yi = None if y is None else y[i:i + batch_size].to(dev)
        out.append(ddim_invert(model, diffusion, x0[i:i + batch_size].to(dev), t_start, steps, y=yi,
                               clip=clip).to(x0.device, x0.dtype))
    return torch.cat(out)


def _model_fingerprint(model):
    if model is None:
        return None
    h = hashlib.sha256()
    for k, v in sorted(model.state_dict().items()):
        h.update(k.encode())
        h.update(v.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def _schedule(diffusion):
    return {"timesteps": diffusion.T, "beta_schedule": diffusion.beta_schedule, "objective": diffusion.objective}


class DPMOTSampler:
    """DPM-OT: semi-discrete OT from N(0, I_D) to data latents at ``t_start``, then DDIM.

    Args:
        model: the trained ε-network (``model(x, t, y)``); may be None to fit a ``"q"`` map
            without it (set ``.model`` before sampling).
        diffusion: its :class:`GaussianDiffusion`.
        x0: (N, C, H, W) training images; the OT targets are their latents, flattened (N, D).
        t_start: the intermediate timestep t' (an index of the schedule, in [0, T)).
        method: ``"q"`` (forward process, DPM-OT's) or ``"ddim"`` (DDIM inversion): see
            :func:`dpm_ot_latents`.
        latents: precomputed (N, C, H, W) latents (skips ``method``'s computation).
        latent_steps: DDIM inversion steps for ``method="ddim"``.
        seed: seed of the OT source streams and (offset by ``LATENT_SEED_OFFSET``, so that it
            is not the stream of sampling noise drawn from the same seed) of the ``"q"``
            latents' noise.
        qmc, backend: passed to :class:`SemiDiscreteOT` (Sobol source on CPU; assignment
            backend).
        device: where the OT runs (default x0's device); the latents and images live there.

    Attributes: ``latents``, ``x0`` (N, C, H, W), ``ot`` (the :class:`SemiDiscreteOT`),
    ``t_start``, ``method``, ``fit_time`` / ``fit_cpu_time`` (wall / CPU seconds of the last
    :meth:`fit`, None before).
    """

    def __init__(self, model, diffusion: GaussianDiffusion, x0: torch.Tensor, t_start: int, method: str = "q",
                 latents: torch.Tensor | None = None, latent_steps: int = 10, seed: int = 0, qmc="auto",
                 backend: str = "auto", device=None):
        x0 = _check_images(x0)
        self.t_start = _check_t_start(diffusion, t_start)
        if method not in METHODS:
            raise ValueError(f"method must be one of {METHODS}, got {method!r}")
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise TypeError(f"seed must be an int, got {type(seed).__name__}")
        self.model, self.diffusion, self.method, self.seed = model, diffusion, method, seed
        self.latent_steps = _as_int(latent_steps, "latent_steps")
        dev = torch.device(device) if device is not None else x0.device
        self.x0 = x0.to(dev, torch.float32)
        if latents is None:
            latents = dpm_ot_latents(model, diffusion, self.x0, self.t_start, method, steps=self.latent_steps,
                                     generator=torch.Generator().manual_seed(seed + LATENT_SEED_OFFSET))
        else:
            latents = _check_images(latents, "latents")
            if tuple(latents.shape) != tuple(x0.shape):
                raise ValueError(f"latents must have the shape of x0 {tuple(x0.shape)}, got {tuple(latents.shape)}")
        self.latents = latents.to(dev, torch.float32).contiguous()
        self.shape = tuple(x0.shape[1:])
        self.ot = SemiDiscreteOT(self.latents.flatten(1), cost="sqeuclidean", source="gaussian", qmc=qmc, seed=seed,
                                 backend=backend)
        self.fit_time = self.fit_cpu_time = None

    @property
    def N(self):
        return self.ot.N

    @property
    def D(self):
        return self.ot.D

    # ------------------------------------------------------------------ the map
    def fit(self, tol: float = 0.05, max_steps: int = 20000, **kwargs) -> "DPMOTSampler":
        """Fit the OT potential: :meth:`SemiDiscreteOT.fit` (``tol`` = largest relative
        cell-mass error, confirmed on fresh points; ``max_steps``; every other keyword is passed
        through).  Records ``fit_time`` (wall seconds) and ``fit_cpu_time`` (CPU seconds of
        this process, all threads: the figure that does not depend on the machine's load);
        returns ``self``."""
        t0, c0 = time.perf_counter(), time.process_time()
        self.ot.fit(tol=tol, max_steps=max_steps, **kwargs)
        self.fit_time, self.fit_cpu_time = time.perf_counter() - t0, time.process_time() - c0
        return self

    def _noise(self, n, noise, generator):
        if noise is None:
            if n is None:
                raise ValueError("pass n (a number of samples) or noise (n, C, H, W)")
            n = _as_int(n, "n")
            if n < 1:
                raise ValueError(f"n must be ≥ 1, got {n}")
            return torch.randn((n, *self.shape), generator=generator)
        if not isinstance(noise, torch.Tensor) or not noise.is_floating_point():
            raise TypeError(f"noise must be a floating-point tensor (n, {', '.join(map(str, self.shape))}) or "
                            f"(n, {self.D})")
        if noise.dim() == 2 and noise.shape[1] == self.D:
            noise = noise.reshape(noise.shape[0], *self.shape)
        if tuple(noise.shape[1:]) != self.shape:
            raise ValueError(f"noise must have shape (n, {', '.join(map(str, self.shape))}) or (n, {self.D}), "
                             f"got {tuple(noise.shape)}")
        if n is not None and _as_int(n, "n") != noise.shape[0]:
            raise ValueError(f"n={n} but noise has {noise.shape[0]} rows")
        return noise.detach()

    @torch.no_grad()
    def map(self, z: torch.Tensor):
        """The OT map: z (n, C, H, W) or (n, D) -> (latents[idx] (n, C, H, W), idx (n,))."""
        z = self._noise(None, z, None)
        idx = self.ot.assign(z.reshape(z.shape[0], -1).to(self.latents.device, self.ot.dtype))
        return self.latents[idx], idx

    @torch.no_grad()
    def start(self, z: torch.Tensor, mix: float = 0.0, mix_noise: str = "z", generator=None):
        """x_{t'} for the noises z (n, C, H, W): the OT target latent, re-noised by ``mix``
        (module docstring) -> (x_{t'} (n, C, H, W), idx (n,))."""
        mix = float(mix)
        if not 0.0 <= mix <= 1.0:
            raise ValueError(f"mix must be in [0, 1], got {mix}")
        if mix_noise not in MIX_NOISE:
            raise ValueError(f"mix_noise must be one of {MIX_NOISE}, got {mix_noise!r}")
        y, idx = self.map(z)
        if mix == 0.0:
            return y.clone(), idx
        t = torch.full((len(idx),), self.t_start, dtype=torch.long, device=y.device)
        a, b = _extract(self.diffusion.sqrt_abar, t, y), _extract(self.diffusion.sqrt_one_minus_abar, t, y)
        x0 = self.x0[idx]
        eps_j = (y - a * x0) / b
        e2 = z if mix_noise == "z" else torch.randn(z.shape, generator=generator)
        e2 = e2.reshape(y.shape).to(y.device, y.dtype)
        return a * x0 + b * (math.sqrt(1.0 - mix * mix) * eps_j + mix * e2), idx

    @torch.no_grad()
    def sample(self, n: int | None = None, noise: torch.Tensor | None = None, steps: int = 5, eta: float = 0.0,
               mix: float = 0.0, mix_noise: str = "z", generator: torch.Generator | None = None, clip: bool = True,
               y=None, batch_size: int = 1000, return_index: bool = False):
        """DPM-OT samples (n, C, H, W) in [-1, 1]: z (``noise`` (n, C, H, W) or (n, D), or n
        draws from ``generator``) → OT target latent (re-noised by ``mix``) → DDIM from
        ``t_start`` to 0 in ``steps`` network evaluations with ``eta`` (its noise from
        ``generator``).  ``return_index``: also return the targets' indices (n,)."""
        if self.model is None:
            raise ValueError("this sampler has no model: set sampler.model (the ε-network) before sampling")
        ddim_timesteps(self.diffusion.T, steps, self.t_start)  # argument errors before any work
        if float(eta) < 0:
            raise ValueError(f"eta must be ≥ 0, got {eta}")
        z = self._noise(n, noise, generator)
        dev = _device(self.model, self.latents.device)
        out, idxs = [], []
        for i in range(0, z.shape[0], batch_size):
            x, idx = self.start(z[i:i + batch_size], mix, mix_noise, generator)
            yi = None if y is None else y[i:i + batch_size].to(dev)
            out.append(ddim_sample(self.model, self.diffusion, steps=steps, eta=eta, noise=x.to(dev), y=yi,
                                   generator=generator, clip=clip, t_start=self.t_start))
            idxs.append(idx)
        x, idx = torch.cat(out), torch.cat(idxs)
        return (x, idx) if return_index else x

    @torch.no_grad()
    def mass_error(self, n: int = 1 << 22, seed: int | None = None, chunk: int = 1 << 18) -> float:
        """Largest relative cell-mass error max_j |μ_j − ν_j|/ν_j of the fitted map on ``n``
        source points (its own sampling noise is ≈ √(N/n) per cell, ≈ √(2 ln(2N)·N/n) for the
        largest: pass a large n for a sharp estimate).  ``seed=None``: the OT's own check
        stream (:meth:`SemiDiscreteOT.mass_error`, which a freshly loaded map restarts, so its
        points may be those of the fit's own rejected checks); an int: N(0, I) points from an
        independent ``torch.Generator(seed)``, drawn on the CPU in chunks of ``chunk``."""
        if seed is None:
            return self.ot.mass_error(n)
        g, counts, done = torch.Generator().manual_seed(int(seed)), torch.zeros(self.N, dtype=torch.float64), 0
        while done < n:
            m = min(chunk, n - done)
            z = torch.randn(m, self.D, generator=g).to(self.latents.device, self.ot.dtype)
            counts += torch.bincount(self.ot.assign(z), minlength=self.N).cpu().double()
            done += m
        w = self.ot.weights.cpu()
        return ((counts / n - w).abs() / w).max().item()

    # ------------------------------------------------------------------ persistence
    def save(self, path) -> None:
        """One file, written atomically: :meth:`SemiDiscreteOT.save`'s state (the potential,
        its history and targets' fingerprint) plus the sampler's (t_start, method, the images,
        the latents, the schedule and a SHA-256 of the model's weights) under ``"dpm_ot"``."""
        path = os.fspath(path)
        folder = os.path.dirname(os.path.abspath(path))
        os.makedirs(folder, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.ot.", suffix=".tmp", dir=folder)
        os.close(fd)
        try:
            self.ot.save(tmp)
            state = torch.load(tmp, map_location="cpu", weights_only=False)
        finally:
            os.remove(tmp)
        state["dpm_ot"] = {"format": _FORMAT, "t_start": self.t_start, "method": self.method,
                           "latent_steps": self.latent_steps, "seed": self.seed, "x0": self.x0.cpu(),
                           "latents": self.latents.cpu(), "schedule": _schedule(self.diffusion),
                           "model_sha256": _model_fingerprint(self.model), "fit_time": self.fit_time,
                           "fit_cpu_time": self.fit_cpu_time}
        atomic_torch_save(state, path)

    @classmethod
    def load(cls, path, model, diffusion: GaussianDiffusion | None = None, strict: bool = True, backend="auto",
             device=None) -> "DPMOTSampler":
        """A fitted sampler from :meth:`save`.  ``diffusion`` (default: rebuilt from the stored
        schedule) must match the stored schedule.  ``model``: the ε-network to sample with; a
        model whose weights differ from the stored fingerprint raises for ``"ddim"`` latents
        (they were computed with the stored model; ``strict=False``: a warning) and warns for
        ``"q"`` latents (the map does not depend on the model)."""
        state = torch.load(os.fspath(path), map_location="cpu", weights_only=False)
        meta = state.get("dpm_ot") if isinstance(state, dict) else None
        if not isinstance(meta, dict) or meta.get("format") != _FORMAT:
            raise ValueError(f"{path}: not a DPMOTSampler file (format {_FORMAT})")
        if diffusion is None:
            diffusion = GaussianDiffusion(**meta["schedule"])
        elif _schedule(diffusion) != meta["schedule"]:
            raise ValueError(f"{path}: fitted for the schedule {meta['schedule']}, got {_schedule(diffusion)}")
        if model is not None and meta["model_sha256"] is not None and _model_fingerprint(model) != meta["model_sha256"]:
            msg = (f"{path}: the model's weights differ from those the sampler was built with "
                   f"(sha256 {meta['model_sha256'][:12]}…)")
            if meta["method"] == "ddim" and strict:
                raise ValueError(msg + ": its DDIM-inversion latents belong to the other model")
            warnings.warn(msg, stacklevel=2)
        s = cls(model, diffusion, meta["x0"], meta["t_start"], meta["method"], latents=meta["latents"],
                latent_steps=meta["latent_steps"], seed=meta["seed"], backend=backend, device=device)
        s.ot = SemiDiscreteOT.load(path, targets=s.latents.flatten(1), backend=backend)
        s.fit_time, s.fit_cpu_time = meta["fit_time"], meta.get("fit_cpu_time")
        return s

    def __repr__(self):
        return (f"DPMOTSampler(N={self.N}, shape={self.shape}, t_start={self.t_start}, method={self.method!r}, "
                f"converged={self.ot.converged})")
