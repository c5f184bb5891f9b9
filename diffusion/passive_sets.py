"""The pieces of the passive experiments (issue 18) that need no model: set builders, controlled
degradations, the metric bundle and the novelty figures.  :mod:`diffusion.passive` runs them.

Set builders return *index tensors* into a pool of images (``y`` its labels), seeded with an
explicit ``torch.Generator``, so tests can check class counts, distinctness and mixture
proportions without images.
"""
from __future__ import annotations

import math
import warnings

import torch
import torch.nn.functional as F

from otkernels import metrics as M
from otkernels.assign import argmin_sqdist

DIVERSITY_CLASSES = {3: 2, 4: 3, 5: 4, 6: 5, 7: 6, 8: 8}  # D_k → number of classes (D3..D8)


# ---------------------------------------------------------------------- set builders
def _split(n: int, parts: int) -> list[int]:
    """n as ``parts`` near-equal integers (the first ones one larger)."""
    q, r = divmod(n, parts)
    return [q + (1 if i < r else 0) for i in range(parts)]


def _perm_of_class(y, c, g):
    where = torch.nonzero(y == c).flatten()
    return where[torch.randperm(len(where), generator=g)]


def class_sets(y: torch.Tensor, classes, n: int, g: torch.Generator, replace: bool = False) -> torch.Tensor:
    """n indices, balanced over ``classes`` (near-equal counts); distinct unless ``replace``
    (then each class's share is drawn with replacement from as many of its images as the share:
    a bootstrap of the distinct set, ~63% distinct)."""
    out = []
    for c, m in zip(classes, _split(n, len(classes))):
        pool = _perm_of_class(y, c, g)
        if not replace and m > len(pool):
            raise ValueError(f"class {int(c)} has {len(pool)} images, {m} distinct ones asked for")
        pick = pool[:m] if not replace else pool[:m][torch.randint(0, min(m, len(pool)), (m,), generator=g)]
        out.append(pick)
    idx = torch.cat(out)
    return idx[torch.randperm(len(idx), generator=g)]


def max_diversity_n(y: torch.Tensor) -> int:
    """The largest set size for which D2 (one class, distinct images) exists: the largest class."""
    return int(torch.bincount(y).max())


def diversity_sets(y: torch.Tensor, n: int, seed: int = 0) -> list[tuple[str, torch.Tensor]]:
    """[(name, indices)] for D1..D10 of n images from the pool with labels ``y``:
    D1 one image repeated n times; D2 n distinct images of one class (a seeded choice among the
    classes with ≥ n images); D3–D8 2, 3, 4, 5, 6, 8 classes, balanced, distinct; D9 10
    classes balanced, each class's share drawn with replacement (a bootstrap of D10's images);
    D10 10 classes balanced, distinct.  The classes of D_k are the first ones of one seeded
    class order (those of D3 ⊂ D4 ⊂ ...), starting with D2's class."""
    g = torch.Generator().manual_seed(seed)
    classes = torch.unique(y)
    counts = torch.stack([(y == c).sum() for c in classes])
    big = classes[counts >= n]
    if len(big) == 0:
        raise ValueError(f"no class has {n} images (largest {int(counts.max())}): D2 cannot be built")
    first = big[torch.randint(0, len(big), (1,), generator=g)].item()
    rest = classes[classes != first]
    order = [first] + rest[torch.randperm(len(rest), generator=g)].tolist()
    sets = [("D1", torch.full((n,), _perm_of_class(y, first, g)[0].item(), dtype=torch.long)),
            ("D2", class_sets(y, order[:1], n, g))]
    for k, nc in DIVERSITY_CLASSES.items():
        sets.append((f"D{k}", class_sets(y, order[:nc], n, g)))
    sets.append(("D9", class_sets(y, order, n, g, replace=True)))
    sets.append(("D10", class_sets(y, order, n, g)))
    return sets


def mixture_sets(n_train: int, n_held: int, n: int, seed: int = 0) -> list[tuple[int, torch.Tensor, torch.Tensor]]:
    """[(k, train_idx, held_idx)] for D0..D10: D_k = round(k·n/10) training and n − that many
    held-out images, taken from the front of one seeded order of each pool (nested sets)."""
    if n > n_train or n > n_held:
        raise ValueError(f"mixtures of {n} need ≥ {n} training and held-out images ({n_train}, {n_held})")
    g = torch.Generator().manual_seed(seed)
    tr, he = torch.randperm(n_train, generator=g), torch.randperm(n_held, generator=g)
    out = []
    for k in range(11):
        m = round(k * n / 10)
        out.append((k, tr[:m], he[: n - m]))
    return out


def missing_class_sets(y: torch.Tensor, k_max: int = 8, seed: int = 0) -> list[tuple[int, list, torch.Tensor]]:
    """[(k, removed classes, indices)] for k = 0..k_max: the pool without the first k classes of
    a seeded class order (removed sets nested)."""
    g = torch.Generator().manual_seed(seed)
    classes = torch.unique(y)
    order = classes[torch.randperm(len(classes), generator=g)].tolist()
    out = []
    for k in range(k_max + 1):
        keep = ~torch.isin(y, torch.tensor(order[:k], dtype=y.dtype))
        out.append((k, order[:k], torch.nonzero(keep).flatten()))
    return out


# ---------------------------------------------------------------------- degradations
def gaussian_blur(x: torch.Tensor, sigma: float) -> torch.Tensor:
    """Images (N,C,H,W) blurred by a Gaussian of σ pixels (separable, radius ⌈3σ⌉, replicate
    padding); σ = 0: x unchanged."""
    if sigma <= 0:
        return x.clone()
    r = max(1, math.ceil(3 * sigma))
    t = torch.arange(-r, r + 1, dtype=x.dtype)
    k = torch.exp(-t ** 2 / (2 * sigma ** 2))
    k = k / k.sum()
    C = x.shape[1]
    y = F.pad(x, (r, r, 0, 0), mode="replicate")
    y = F.conv2d(y, k.view(1, 1, 1, -1).expand(C, 1, 1, -1), groups=C)
    y = F.pad(y, (0, 0, r, r), mode="replicate")
    return F.conv2d(y, k.view(1, 1, -1, 1).expand(C, 1, -1, 1), groups=C)


def add_noise(x: torch.Tensor, sigma: float, seed: int = 0) -> torch.Tensor:
    """x + σ·N(0, 1) (seeded, no clamping)."""
    g = torch.Generator().manual_seed(seed)
    return x + sigma * torch.randn(x.shape, generator=g, dtype=x.dtype)


# ---------------------------------------------------------------------- metrics
def spearman(a, b) -> float:
    """Spearman rank correlation of two sequences (average ranks for ties)."""
    def rank(v):
        v = torch.as_tensor(v, dtype=torch.float64)
        order = v.argsort()
        r = torch.empty_like(v)
        r[order] = torch.arange(len(v), dtype=torch.float64)
        for u in torch.unique(v):  # ties: average rank
            m = v == u
            r[m] = r[m].mean()
        return r
    ra, rb = rank(a), rank(b)
    ra, rb = ra - ra.mean(), rb - rb.mean()
    den = (ra.norm() * rb.norm()).item()
    return float((ra * rb).sum() / den) if den > 0 else float("nan")


class Metrics:
    """The metric bundle of every comparison, with fixed settings: Sinkhorn OT at each blur of
    ``blurs`` (p, scaling, L2-normalised features when ``normalize``; key ``ot`` = the first
    blur, ``ot_b<blur>`` each), MMD² with a Gaussian kernel whose bandwidth is fixed once per
    experiment (the median pairwise distance of the reference features: comparable across
    sets), FID, precision / recall (k = 3) and density / coverage (k = 5).  MMD, FID and PRDC
    use the raw features (``normalize`` only changes OT)."""

    def __init__(self, blurs=(0.05,), p: int = 2, scaling: float = 0.5, normalize: bool = False):
        self.blurs, self.p, self.scaling, self.normalize = tuple(float(b) for b in blurs), int(p), float(scaling), bool(normalize)
        self.bandwidth = None

    def settings(self) -> dict:
        return {"blurs": list(self.blurs), "p": self.p, "scaling": self.scaling, "normalize": self.normalize,
                "mmd_bandwidth": self.bandwidth}

    def fix_bandwidth(self, ref: torch.Tensor) -> None:
        self.bandwidth = float(M.median_bandwidth(ref.float()))

    @torch.no_grad()
    def ot(self, a: torch.Tensor, b: torch.Tensor, blur: float | None = None) -> float:
        return float(M.sinkhorn(a.float(), b.float(), blur=self.blurs[0] if blur is None else blur, p=self.p,
                                scaling=self.scaling, normalize=self.normalize))

    @torch.no_grad()
    def __call__(self, ref: torch.Tensor, f: torch.Tensor, light: bool = False) -> dict:
        """Metrics of features f (M, D) against ref (N, D); ``light``: OT only."""
        ref, f = ref.float(), f.float()
        if self.bandwidth is None:
            self.fix_bandwidth(ref)
        out = {f"ot_b{b:g}": self.ot(ref, f, b) for b in self.blurs}
        out["ot"] = out[f"ot_b{self.blurs[0]:g}"]
        if light:
            return out
        out["mmd2"] = float(M.mmd2(ref, f, "gaussian", self.bandwidth))
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", category=RuntimeWarning)
            out["fid"] = float(M.fid(ref.double(), f.double()))
        out.update({k: float(v) for k, v in M.prdc(ref, f).items()})
        return out


# ---------------------------------------------------------------------- novelty
def nn_dist(x: torch.Tensor, train: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(distance to the nearest row of train, its index) for each row of x (fused argmin pass)."""
    d2, idx = argmin_sqdist(x.flatten(1).float().contiguous(), train.flatten(1).float().contiguous())
    return d2.clamp(min=0).sqrt().flatten(), idx.flatten().long()


class Novelty:
    """How close a set is to the training images, in pixels and in (eval) features, against the
    same figures for held-out real images.  Per space: the median and mean distance to the
    nearest training image, its median over the held-out images' median (``ratio``: < 1 =
    closer to the training set than fresh real images are), the number (and share) of distinct
    nearest training images, and the share of near-copies: nearest training image closer than
    the 5th percentile of the held-out images' nearest-training distances (``threshold``; so
    held-out images score 5% by construction) -- and exact copies (distance < 1e-3)."""

    def __init__(self, train_x, train_f, held_x, held_f):
        self.train = {"pixel": train_x.flatten(1).float(), "feature": train_f.float()}
        self.held = {}
        for space, h in (("pixel", held_x.flatten(1).float()), ("feature", held_f.float())):
            d, idx = nn_dist(h, self.train[space])
            self.held[space] = {"d": d, "idx": idx, "threshold": torch.quantile(d.double(), 0.05).item(),
                                "median": d.median().item()}

    def _space(self, z, space, ref_n=None):
        d, idx = nn_dist(z, self.train[space])
        h = self.held[space]
        n_distinct = len(torch.unique(idx))
        return {"nn_median": d.median().item(), "nn_mean": d.mean().item(),
                "ratio": d.median().item() / h["median"] if h["median"] > 0 else float("nan"),
                "distinct_nn": n_distinct, "distinct_nn_share": n_distinct / len(d),
                "near_copy_share": (d < h["threshold"]).float().mean().item(),
                "exact_copy_share": (d < 1e-3).float().mean().item(), "threshold": h["threshold"]}

    @torch.no_grad()
    def __call__(self, x: torch.Tensor, f: torch.Tensor) -> dict:
        return {"pixel": self._space(x.flatten(1).float(), "pixel"), "feature": self._space(f.float(), "feature")}

    def held_out(self, n: int | None = None, seed: int = 0) -> dict:
        """The held-out images' own figures (the first ``n`` of a seeded order for the distinct
        count, so it compares with a set of n)."""
        out = {}
        for space, h in self.held.items():
            d, idx = h["d"], h["idx"]
            sub = torch.randperm(len(d), generator=torch.Generator().manual_seed(seed))[: n or len(d)]
            k = len(torch.unique(idx[sub]))
            out[space] = {"nn_median": h["median"], "nn_mean": d.mean().item(), "ratio": 1.0, "distinct_nn": k,
                          "distinct_nn_share": k / len(sub), "near_copy_share": (d < h["threshold"]).float().mean().item(),
                          "exact_copy_share": (d < 1e-3).float().mean().item(), "threshold": h["threshold"]}
        return out


def novelty_short(nov: dict) -> dict:
    """The figure carried beside every OT / FID of generated data: near-copy share, median NN
    distance over the held-out images' (ratio) and distinct-NN share, pixels and features."""
    return {f"{k}_{s[0]}": nov[s][k] for s in ("pixel", "feature")
            for k in ("near_copy_share", "ratio", "distinct_nn_share")}


# ---------------------------------------------------------------------- seed noise
class PM(float):
    """A figure measured under several seeds: the float is the mean over the seeds, ``values``
    the per-seed figures (seed order), ``sd`` their sample standard deviation (0 for one seed).
    Arithmetic and formatting treat it as the mean; the verdicts use ``values``."""

    def __new__(cls, values):
        vals = [float(v) for v in values]
        obj = super().__new__(cls, sum(vals) / len(vals))
        obj.values = vals
        same = len(set(vals)) == 1  # exactly 0 (torch's std of equal values can be ~1e-17)
        obj.sd = 0.0 if same else float(torch.tensor(vals, dtype=torch.float64).std().item())
        return obj

    @property
    def lo(self) -> float:
        return min(self.values)

    @property
    def hi(self) -> float:
        return max(self.values)


def combine_seeds(runs: list):
    """One structure from the same experiment under several seeds (dicts, lists, numbers, in
    the same shape): every number becomes a :class:`PM` of the per-seed numbers; other leaves
    (names, lists of numbers such as the removed classes) are taken from the first run; lists of
    dicts (rows) are combined entry by entry.  A key missing from any run keeps the first run's
    value."""
    first = runs[0]
    if isinstance(first, dict):
        return {k: (combine_seeds([r[k] for r in runs]) if all(isinstance(r, dict) and k in r for r in runs) else v)
                for k, v in first.items()}
    if (isinstance(first, list) and first and all(isinstance(x, dict) for x in first)
            and all(isinstance(r, list) and len(r) == len(first) for r in runs)):
        return [combine_seeds([r[i] for r in runs]) for i in range(len(first))]
    if isinstance(first, (int, float)) and not isinstance(first, bool) and all(
            isinstance(r, (int, float)) and not isinstance(r, bool) for r in runs):
        return PM(runs)
    return first


def beyond_noise(diffs) -> int:
    """The sign (+1 / −1) of a paired difference measured once per seed when it is *beyond seed
    noise* -- every seed gives the same sign and the mean exceeds twice the seeds' standard
    deviation -- else 0.  One seed: its sign (no noise estimate)."""
    d = torch.tensor([float(v) for v in diffs], dtype=torch.float64)
    if len(d) == 0 or not torch.isfinite(d).all() or (d == 0).all():
        return 0
    s = int(torch.sign(d[0]).item())
    if len(d) == 1:
        return s
    if not (torch.sign(d) == s).all():
        return 0
    return s if abs(d.mean().item()) > 2 * d.std().item() else 0


def reversals(values_by_step, want: int) -> list[tuple[int, int]]:
    """Steps i → i+1 where a curve expected to move in direction ``want`` (+1 rises, −1 falls)
    moves the other way on average over the seeds: [(i, verdict)], verdict −1 when the reversal
    is beyond seed noise (:func:`beyond_noise`), 0 when within it.  ``values_by_step[i]`` is the
    per-seed list (or a :class:`PM`) at step i."""
    vals = [list(getattr(v, "values", v if isinstance(v, (list, tuple)) else [v])) for v in values_by_step]
    out = []
    for i in range(len(vals) - 1):
        d = [want * (b - a) for a, b in zip(vals[i], vals[i + 1])]
        if sum(d) / len(d) < 0:
            out.append((i, -1 if beyond_noise(d) < 0 else 0))
    return out
