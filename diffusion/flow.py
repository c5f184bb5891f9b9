"""Flow matching with minibatch OT couplings: OT-CFM (Tong et al. 2023, "Improving and
generalizing flow-based generative models with minibatch optimal transport") and multisample
flow matching (Pooladian et al. 2023).

A network v(x, t) is trained to regress the velocity u = x1 − x0 of the straight path
x_s = (1 − s)·x0 + s·x1 + σ_min·z from noise x0 (s = 0) to data x1 (s = 1).  With the
independent coupling (x0, x1 drawn independently: I-CFM, rectified flow's first round) the
learned paths cross and curve; pairing each minibatch's noise with its images by an OT plan
(``coupling="exact"``: the optimal permutation for |x0 − x1|²; ``"sinkhorn"``: a draw from
each row of the entropic plan) makes them straighter, so few ODE steps suffice.  The
coupling comes from :mod:`otkernels.coupling`, on flattened images, without gradients.

Time.  :class:`FlowMatching` keeps GaussianDiffusion's integer timesteps t ∈ [0, T) with
t = 0 the data end: the flow time is s = 1 − t/(T − 1), so t = T − 1 is pure noise (s = 0)
and t = 0 the data (s = 1), and the network is given t itself (a float between grid points
when sampling), i.e. the range its sinusoidal embedding sees for diffusion.  Hence the
Trainer's timestep options keep their meaning: ``timestep_sampler="quadratic"`` puts more
weight near the data and ``ot_max_t`` keeps the OT loss term on the samples nearest the
data.  The sampler integrates ds from 0 to 1 on a uniform grid of ``steps`` steps.

    flow = FlowMatching(coupling="exact")
    loss, x1_hat = flow.training_loss(model, images, flow.sample_timesteps(B), torch.randn_like(images))
    x = flow_sample(model, flow, (64, 1, 8, 8), steps=10)           # Euler, 10 network calls

The comparison of trained couplings (``python -m diffusion.flow_compare``) lives in
:mod:`diffusion.flow_compare`, above the trainer; the method names in :mod:`diffusion.methods`.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from otkernels import distributed as otd
from otkernels.coupling import sample_pairs

from .methods import COUPLINGS, EVALS_PER_STEP, SOLVERS  # noqa: F401  (re-exported names)
from .process import sample_timesteps



def _bcast(v: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """(B,) → (B, 1, 1, 1) in x's dtype and device, to broadcast against x."""
    return v.to(device=x.device, dtype=x.dtype).reshape(-1, *([1] * (x.dim() - 1)))


class FlowMatching:
    """Conditional flow matching on straight paths, noise x0 → data x1, with a minibatch coupling.

    sigma_min: std of the Gaussian tube around each path (x_s = (1−s)x0 + s x1 + σ_min z;
    0: deterministic paths).  coupling: ``"exact"``, ``"sinkhorn"`` (entropic plan at
    ``coupling_blur``, geomloss's convention ε = blur², cost ½|x0 − x1|²) or
    ``"independent"``.  T: the number of integer timesteps (the model's time input range).

    It offers the part of :class:`~diffusion.process.GaussianDiffusion`'s interface the
    Trainer uses: ``T``, :meth:`training_loss`, :meth:`sample_timesteps`.
    """

    def __init__(self, sigma_min: float = 0.0, coupling: str = "exact", coupling_blur: float = 1.0,
                 T: int = 1000):
        if coupling not in COUPLINGS:
            raise ValueError(f"coupling must be one of {COUPLINGS}, got {coupling!r}")
        if isinstance(sigma_min, bool) or not isinstance(sigma_min, (int, float)) or not sigma_min >= 0:
            raise ValueError(f"sigma_min must be a number >= 0, got {sigma_min!r}")
        if isinstance(coupling_blur, bool) or not isinstance(coupling_blur, (int, float)) or not coupling_blur > 0:
            raise ValueError(f"coupling_blur must be a number > 0, got {coupling_blur!r}")
        if isinstance(T, bool) or int(T) != T or T < 2:
            raise ValueError(f"T must be an int >= 2, got {T!r}")
        self.sigma_min, self.coupling, self.T = float(sigma_min), coupling, int(T)
        self.coupling_blur = float(coupling_blur)
        # data-parallel training (set by the Trainer under torchrun): each rank passes its rows of
        # the global batch; the coupling and the σ_min draws are those of the whole global batch
        self.global_batch, self.process_group = False, None

    def _sharded(self) -> bool:
        return self.global_batch and otd.is_sharded(self.process_group)

    def _rows(self, n: int, device) -> tuple:
        """(this rank's first row in the global batch, the global batch size)."""
        sizes = otd.gather(torch.tensor([n], device=device), 0, self.process_group).tolist()
        return sum(sizes[:otd.world(self.process_group)[0]]), sum(sizes)

    def __repr__(self):
        return (f"FlowMatching(sigma_min={self.sigma_min}, coupling={self.coupling!r}, "
                f"coupling_blur={self.coupling_blur}, T={self.T})")

    # ------------------------------------------------------------------ time
    def flow_time(self, t: torch.Tensor) -> torch.Tensor:
        """Integer (or float) timesteps t (B,) → flow time s = 1 − t/(T−1) (B,) float64."""
        return 1.0 - t.double() / (self.T - 1)

    def model_time(self, s) -> torch.Tensor:
        """Flow time s (float or (B,)) → the network's time input t = (1 − s)(T − 1), float."""
        return (1.0 - torch.as_tensor(s, dtype=torch.float64)) * (self.T - 1)

    # ------------------------------------------------------------------ paths and coupling
    @torch.no_grad()
    def pair(self, x1: torch.Tensor, noise: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """The noise (B,C,H,W) re-ordered so that noise[k] goes with the image x1[k] under the
        coupling (computed on the flattened images, in float32, no gradient).  Independent
        coupling: the noise as it is (already independent of the images).  ``generator``:
        the sinkhorn draws (None: torch's global RNG)."""
        if self.coupling == "independent":
            return noise
        kw = {"blur": self.coupling_blur} if self.coupling == "sinkhorn" else {}
        sharded, n = self._sharded(), len(x1)
        if sharded:  # the coupling of the global batch: every rank computes it, keeps its rows
            start, _ = self._rows(n, x1.device)
            x1 = otd.gather(x1, 0, self.process_group)
            noise = otd.gather(noise, 0, self.process_group)
        with torch.autocast(x1.device.type, enabled=False):
            _, j = sample_pairs(x1.detach().flatten(1).float(), noise.detach().flatten(1).float(), self.coupling,
                                generator=generator, **kw)
        if sharded:
            j = j[start:start + n]
        return noise[j]

    def interpolate(self, x0: torch.Tensor, x1: torch.Tensor, s: torch.Tensor, z: torch.Tensor | None = None):
        """x_s = (1 − s)·x0 + s·x1 (+ σ_min·z): s (B,) broadcast over the image dimensions."""
        s = _bcast(s, x1)
        xs = (1 - s) * x0 + s * x1
        if self.sigma_min > 0 and z is not None:
            xs = xs + self.sigma_min * z
        return xs

    def training_loss(self, model, x1, t, noise, y=None, generator: torch.Generator | None = None):
        """MSE between v̂ = model(x_t, t, y) and u = x1 − x0, where x0 is ``noise`` re-ordered
        by the coupling (:meth:`pair`) and x_t = (1 − s)x0 + s x1 + σ_min z, s = 1 − t/(T−1);
        z (σ_min > 0 only) and the sinkhorn draws come from ``generator`` (None: global RNG).
        Returns (loss scalar, x̂1 = x_t + (1 − s)·v̂ (B,C,H,W), the one-step estimate of the
        data, carrying gradients to the model)."""
        x0 = self.pair(x1, noise, generator)
        z = None
        if self.sigma_min > 0:
            start, n = self._rows(len(x1), x1.device) if self._sharded() else (0, len(x1))  # the global batch's draws
            z = torch.randn((n, *x1.shape[1:]), generator=generator, device="cpu" if generator is not None else x1.device)
            z = z[start:start + len(x1)].to(device=x1.device, dtype=x1.dtype)
        s = self.flow_time(t)
        xt = self.interpolate(x0, x1, s, z)
        v = model(xt, t, y)
        loss = F.mse_loss(v.float(), (x1 - x0).float())
        return loss, xt + _bcast(1 - s, xt) * v

    def velocity(self, model, x, s, y=None, guidance_scale: float = 1.0) -> torch.Tensor:
        """v̂(x, s) (B,C,H,W) at flow time s (float); classifier-free guidance as in
        GaussianDiffusion.model_predictions when ``guidance_scale != 1`` (needs y)."""
        t = self.model_time(s).to(x.device, torch.float32).expand(x.shape[0])
        if y is not None and guidance_scale != 1.0:
            both = model(torch.cat([x, x]), torch.cat([t, t]), torch.cat([y, y]),
                         cond_drop_mask=torch.cat([torch.zeros_like(y, dtype=torch.bool),
                                                   torch.ones_like(y, dtype=torch.bool)]))
            cond, uncond = both.chunk(2)
            return uncond + guidance_scale * (cond - uncond)
        return model(x, t, y)

    # ------------------------------------------------------------------ timesteps
    def sample_timesteps(self, n: int, sampler: str = "uniform", device=None, generator=None) -> torch.Tensor:
        """(n,) long timesteps, as GaussianDiffusion's (:func:`~diffusion.process.sample_timesteps`):
        ``"quadratic"`` puts more weight on small t, near the data (s close to 1)."""
        return sample_timesteps(self.T, n, sampler, device, generator)


# ---------------------------------------------------------------------- ODE sampler
def _check_solver(steps, method):
    if method not in SOLVERS:
        raise ValueError(f"method must be one of {SOLVERS}, got {method!r}")
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps must be an int >= 1, got {steps!r}")


@torch.no_grad()
def integrate(model, flow: FlowMatching, x0: torch.Tensor, steps: int = 50, method: str = "euler", y=None,
              guidance_scale: float = 1.0):
    """Solve dx/ds = v̂(x, s) from s = 0 (x0 (B,C,H,W)) to s = 1 on a uniform grid of ``steps``
    steps: ``"euler"`` (one network call per step), ``"midpoint"`` or ``"heun"`` (two).
    Returns (x(1) (B,C,H,W), unclamped; the path's kinetic energy Σ_k |Δx_k|²/h (B,), the
    discrete ∫|v|² ds of the polygon the solver followed)."""
    _check_solver(steps, method)
    x = x0.clone()
    h = 1.0 / steps
    energy = torch.zeros(x.shape[0], dtype=torch.float64, device=x.device)
    for k in range(steps):
        s = k * h
        v = flow.velocity(model, x, s, y, guidance_scale)
        if method == "midpoint":
            v = flow.velocity(model, x + 0.5 * h * v, s + 0.5 * h, y, guidance_scale)
        elif method == "heun":
            v = 0.5 * (v + flow.velocity(model, x + h * v, s + h, y, guidance_scale))
        dx = h * v
        energy += dx.flatten(1).double().square().sum(1) / h
        x = x + dx
    return x, energy


@torch.no_grad()
def flow_sample(model, flow: FlowMatching, shape=None, steps: int = 50, method: str = "euler", noise=None, y=None,
                guidance_scale: float = 1.0, generator: torch.Generator | None = None) -> torch.Tensor:
    """Images (B,C,H,W) in [-1, 1] (clamped at the end): the ODE of :func:`integrate` from
    ``noise`` (or N(0, I) noise of ``shape`` drawn on the CPU from ``generator``, as the DDIM
    sampler does, so the same generator gives the same start).  Network calls: ``steps``
    (euler) or 2·``steps`` (midpoint, heun)."""
    from .sample import _device, _start

    _check_solver(steps, method)
    x = _start(shape, noise, generator, _device(model))
    return integrate(model, flow, x, steps, method, y, guidance_scale)[0].clamp(-1, 1)


def straightness(x0: torch.Tensor, x1: torch.Tensor, energy: torch.Tensor) -> torch.Tensor:
    """|x1 − x0|² / ∫|v|² ds per sample (B,): 1 for a straight path at constant speed, < 1
    otherwise (Cauchy–Schwarz); x0, x1 (B,C,H,W) the path's ends, energy from :func:`integrate`."""
    d = (x1 - x0).flatten(1).double().square().sum(1).to(energy.device)
    return torch.where(energy > 0, d / energy.clamp_min(1e-300), torch.ones_like(d))


@torch.no_grad()
def path_straightness(model, flow: FlowMatching, noise: torch.Tensor, steps: int = 100, method: str = "euler",
                      y=None) -> dict:
    """Straightness diagnostics of the learned flow from ``noise`` (B,C,H,W), solved with
    ``steps`` steps: mean ratio |x(1) − x(0)|²/∫|v|² ds (1 = straight), mean kinetic energy
    ∫|v|² ds, mean squared displacement |x(1) − x(0)|², all per sample (not per pixel)."""
    x1, energy = integrate(model, flow, noise, steps, method, y)
    r = straightness(noise, x1, energy)
    d = (x1 - noise).flatten(1).double().square().sum(1)
    return {"straightness": r.mean().item(), "kinetic_energy": energy.mean().item(), "displacement": d.mean().item(),
            "steps": steps, "method": method}
