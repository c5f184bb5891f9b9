"""A small CNN feature network (SimpleMNISTFeatureNet-style): 128-d embedding + classifier.

Used for feature-space metrics (OT, MMD, FID, precision/recall) and to classify generated
samples.  One per dataset, trained in seconds (digits) to a minute (MNIST) on a CPU and cached
at a path.  Inputs are images in [-1, 1], (B, C, H, W).
"""
from __future__ import annotations

import os

import torch
import torch.nn.functional as F
from torch import nn

from .checkpoint import load_checkpoint, save_checkpoint


class SimpleMNISTFeatureNet(nn.Module):
    """conv32 → conv64 → pool → conv64 → pool → avg-pool → fc128 (embedding) → fc(num_classes)."""

    def __init__(self, channels: int = 1, image_size: int = 8, num_classes: int = 10, emb_dim: int = 128):
        super().__init__()
        self.config = dict(channels=channels, image_size=image_size, num_classes=num_classes, emb_dim=emb_dim)
        side = 2 if image_size <= 8 else 4
        self.conv = nn.Sequential(
            nn.Conv2d(channels, 32, 3, padding=1), nn.ReLU(),
            nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(64, 64, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.AdaptiveAvgPool2d(side), nn.Flatten())
        self.fc = nn.Linear(64 * side * side, emb_dim)
        self.head = nn.Linear(emb_dim, num_classes)

    def embed(self, x):
        """(B,C,H,W) → (B, emb_dim) features (after ReLU)."""
        return F.relu(self.fc(self.conv(x)))

    def forward(self, x):
        """(B,C,H,W) → (B, num_classes) logits."""
        return self.head(self.embed(x))


def _shift(x, generator):
    """Random translation by up to one pixel (background -1): cheap augmentation."""
    B, _, H, W = x.shape
    p = F.pad(x, (1, 1, 1, 1), value=-1.0)
    dx, dy = torch.randint(0, 3, (2,), generator=generator).tolist()
    return p[:, :, dy:dy + H, dx:dx + W]


def train_feature_net(x, y, epochs: int = 15, batch_size: int = 128, lr: float = 1e-3, seed: int = 0,
                      num_classes: int = 10, device="cpu", progress: bool = False) -> SimpleMNISTFeatureNet:
    """Train a classifier on (x (N,C,H,W) in [-1,1], y (N,)); its own seeded generator, so the
    caller's RNG streams are untouched."""
    g = torch.Generator().manual_seed(seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        net = SimpleMNISTFeatureNet(x.shape[1], x.shape[-1], num_classes).to(device)
    opt = torch.optim.Adam(net.parameters(), lr=lr)
    with torch.enable_grad():  # callable from inside a no_grad evaluation
        _train_epochs(net, opt, x, y, epochs, batch_size, g, device, progress)
    opt.zero_grad(set_to_none=True)
    return net.eval().requires_grad_(False)


def _train_epochs(net, opt, x, y, epochs, batch_size, g, device, progress):
    n = len(x)
    for ep in range(epochs):
        perm = torch.randperm(n, generator=g)
        for i in range(0, n, batch_size):
            idx = perm[i:i + batch_size]
            xb = _shift(x[idx], g).to(device)
            loss = F.cross_entropy(net(xb), y[idx].to(device))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        if progress:
            print(f"feature net epoch {ep + 1}/{epochs}: loss {loss.item():.4f}")


@torch.no_grad()
def accuracy(net, x, y, batch_size: int = 1000) -> float:
    """Top-1 accuracy of ``net`` on (x, y)."""
    dev = next(net.parameters()).device
    pred = torch.cat([net(x[i:i + batch_size].to(dev)).argmax(1).cpu() for i in range(0, len(x), batch_size)])
    return (pred == y).float().mean().item()


@torch.no_grad()
def embed(net, x, batch_size: int = 1000) -> torch.Tensor:
    """(N,C,H,W) → (N, 128) features on CPU, in batches."""
    dev = next(net.parameters()).device
    return torch.cat([net.embed(x[i:i + batch_size].to(dev)).float().cpu() for i in range(0, len(x), batch_size)])


@torch.no_grad()
def classify(net, x, batch_size: int = 1000) -> dict:
    """Class histogram and confidence of ``net`` on generated images x (N,C,H,W): the share of
    each class, how many classes appear, the largest share, the mean top-1 probability."""
    dev = next(net.parameters()).device
    probs = torch.cat([net(x[i:i + batch_size].to(dev)).float().softmax(1).cpu() for i in range(0, len(x), batch_size)])
    conf, pred = probs.max(1)
    share = torch.bincount(pred, minlength=probs.shape[1]).float() / len(x)
    return {"class_share": [round(v, 4) for v in share.tolist()], "classes_present": int((share > 0).sum()),
            "max_class_share": share.max().item(), "mean_confidence": conf.mean().item()}


def load_or_train_feature_net(path: str | None, x_train, y_train, x_test=None, y_test=None, epochs: int = 15,
                              seed: int = 0, device="cpu", dataset: str = "",
                              key_extra: dict | None = None) -> SimpleMNISTFeatureNet:
    """The cached net at ``path`` when it exists and was trained the same way (dataset name,
    image shape, number of training images, epochs, seed, and ``key_extra``: e.g. the net's
    role and which training images it saw); else train one on x_train and save it there.
    ``path=None``: train, cache nothing.  The returned net carries ``net.train_info``: the
    key, ``test_accuracy`` (on x_test, None without it) and ``path``."""
    key = {"dataset": dataset, "shape": list(x_train.shape[1:]), "n_train": len(x_train), "epochs": epochs,
           "seed": seed, **(key_extra or {})}
    if path and os.path.exists(path):
        ck = load_checkpoint(path)
        if ck.get("key") == key:
            net = SimpleMNISTFeatureNet(**ck["config"])
            net.load_state_dict(ck["model"])
            net = net.to(device).eval().requires_grad_(False)
            net.train_info = {**key, "test_accuracy": ck.get("test_accuracy"), "path": path}
            return net
    net = train_feature_net(x_train, y_train, epochs=epochs, seed=seed, device=device)
    acc = accuracy(net, x_test, y_test) if x_test is not None else None
    if path:
        save_checkpoint({"model": net.state_dict(), "config": net.config, "key": key, "test_accuracy": acc}, path)
    net.train_info = {**key, "test_accuracy": acc, "path": path}
    return net
