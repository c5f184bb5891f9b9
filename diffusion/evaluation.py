"""Feature-space metrics between generated and real images, and sample grids.

The metrics come from ``otkernels.metrics`` (Sinkhorn OT, MMD, FID, precision/recall, MMR)
when it is importable; otherwise OT and MMD fall back to ``otkernels.SamplesLoss`` and FID to
a small eigen-decomposition here, and precision/recall/MMR are left out.
"""
from __future__ import annotations

import math
import warnings

import torch

from otkernels import SamplesLoss

try:
    from otkernels import metrics as _metrics
    HAS_METRICS = hasattr(_metrics, "sinkhorn")
except ImportError:  # issue 6's module not installed
    _metrics, HAS_METRICS = None, False


def sinkhorn_ot(real: torch.Tensor, fake: torch.Tensor, blur: float = 0.5, p: int = 2) -> float:
    """Sinkhorn divergence between feature sets real (N, D) and fake (M, D)."""
    real, fake = real.float(), fake.float()
    if HAS_METRICS:
        return float(_metrics.sinkhorn(real, fake, blur=blur, p=p))
    return float(SamplesLoss("sinkhorn", p=p, blur=blur)(real, fake))


def _fid_fallback(x, y):
    x, y = x.double(), y.double()
    mu1, mu2 = x.mean(0), y.mean(0)
    s1, s2 = torch.cov(x.T), torch.cov(y.T)
    w, V = torch.linalg.eigh(s1)
    r1 = (V * w.clamp(min=0).sqrt()) @ V.T  # s1^{1/2}
    tr_sqrt = torch.linalg.eigvalsh(r1 @ s2 @ r1).clamp(min=0).sqrt().sum()
    return float((mu1 - mu2).pow(2).sum() + s1.trace() + s2.trace() - 2 * tr_sqrt)


def feature_metrics(real: torch.Tensor, fake: torch.Tensor, blur: float = 0.5, p: int = 2,
                    fake_probs: torch.Tensor | None = None) -> dict:
    """{"ot", "mmd2", "fid"[, "precision", "recall", "mmr"]} between real (N, D) and fake (M, D)
    features; ``fake_probs`` (M, C): classifier probabilities of the fakes, for the MMR."""
    real, fake = real.float(), fake.float()
    out = {"ot": sinkhorn_ot(real, fake, blur, p)}
    if HAS_METRICS:
        sigma = _metrics.median_bandwidth(real, fake)
        out["mmd2"] = float(_metrics.mmd2(real, fake, "gaussian", sigma))
        with warnings.catch_warnings():  # ReLU features are often rank-deficient: FID is still exact
            warnings.filterwarnings("ignore", message=".*singular.*", category=RuntimeWarning)
            out["fid"] = float(_metrics.fid(real, fake))
        if hasattr(_metrics, "precision_recall"):
            pr = _metrics.precision_recall(real, fake)
            pr = pr if isinstance(pr, dict) else dict(zip(("precision", "recall"), pr))
            out.update({k: float(v) for k, v in pr.items() if k in ("precision", "recall")})
        if fake_probs is not None and hasattr(_metrics, "mode_mixture"):
            out["mmr"] = float(_metrics.mode_mixture(fake_probs.double())["mmr"])
    else:
        sigma = torch.cdist(real[:1000], fake[:1000]).median().item()
        out["mmd2"] = 2 * float(SamplesLoss("gaussian", blur=sigma)(real, fake))  # biased MMD²
        out["fid"] = _fid_fallback(real, fake)
    return out


def sample_report(net, x: torch.Tensor, real_train: torch.Tensor, real_test: torch.Tensor, blur: float) -> dict:
    """The measures of generated images x (n,C,H,W) that the experiments report: the feature
    net's class histogram, max share and confidence (:func:`~diffusion.features.classify`),
    and :func:`feature_metrics` of their embeddings vs the real features of each split
    (keys suffixed ``_train`` / ``_test``)."""
    from .features import classify, embed

    f = embed(net, x)
    probs = torch.cat([net(x[i:i + 1000]).float().softmax(1) for i in range(0, len(x), 1000)])
    out = classify(net, x)
    for split, fr in (("train", real_train), ("test", real_test)):
        out.update({f"{k}_{split}": v for k, v in feature_metrics(fr, f, blur, fake_probs=probs).items()})
    return out


def save_grid(x: torch.Tensor, path: str, nrow: int | None = None, title: str | None = None) -> None:
    """Save images x (N,C,H,W) in [-1, 1] as one PNG grid (matplotlib, no torchvision)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    x = ((x.detach().float().cpu().clamp(-1, 1) + 1) / 2)
    N, C, H, W = x.shape
    nrow = nrow or math.ceil(math.sqrt(N))
    ncol = math.ceil(N / nrow)
    grid = torch.ones(C, ncol * (H + 1) + 1, nrow * (W + 1) + 1)
    for i in range(N):
        r, c = divmod(i, nrow)
        grid[:, 1 + r * (H + 1):1 + r * (H + 1) + H, 1 + c * (W + 1):1 + c * (W + 1) + W] = x[i]
    img = grid.permute(1, 2, 0).numpy()
    scale = max(1, 256 // grid.shape[-1])
    fig = plt.figure(figsize=(grid.shape[-1] * scale / 100, grid.shape[-2] * scale / 100 + (0.2 if title else 0)), dpi=100)
    ax = fig.add_axes([0, 0, 1, 1 if not title else 1 - 0.2 / fig.get_figheight()])
    ax.imshow(img[..., 0] if C == 1 else img, cmap="gray" if C == 1 else None, vmin=0, vmax=1,
              interpolation="nearest")
    ax.axis("off")
    if title:
        fig.suptitle(title, fontsize=7, y=1.0, va="top")
    fig.savefig(path)
    plt.close(fig)


def plot_history(history: list, path: str) -> None:
    """Loss curves and feature-space metrics per epoch, one PNG."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = [("loss", "val_loss", "loss_ot"), ("ot_train", "ot_test"), ("mmd2_train", "mmd2_test"),
            ("fid_train", "fid_test")]
    fig, axes = plt.subplots(1, len(keys), figsize=(4 * len(keys), 3))
    for ax, group in zip(axes, keys):
        for k in group:
            pts = [(h["epoch"], h[k]) for h in history if h.get(k) is not None]
            if pts:
                ax.plot(*zip(*pts), marker="." if len(pts) < 30 else None, label=k)
        ax.set_xlabel("epoch")
        if ax.lines:
            ax.legend(fontsize=7)
        if group[0] == "loss":
            ax.set_yscale("log")
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)
