"""Image datasets as in-memory tensors in [-1, 1] with their class labels.

- ``digits``: scikit-learn's 8×8 digits (1797 images, ships with scikit-learn: no download).
- ``mnist``: 28×28 from an ``mnist.npz`` file (keys x_train, y_train, x_test, y_test) or a
  torchvision root holding ``MNIST/raw`` (torchvision imported only then; never downloads).
- ``cifar10``: 32×32×3 through torchvision, when it is installed.

Every loader returns a :class:`ImageData` with ``x_*`` (N, C, H, W) float32 and ``y_*`` (N,)
long.  :func:`load_data` also holds a validation split out of the training images
(:func:`validation_split`: min(5000, 10%) of them, stratified, seeded), so the validation loss
never sees the test set, which is kept for final figures.  The batch order comes from
:func:`batches` with an explicit ``torch.Generator``, so a checkpoint can store it and a
resumed run sees the same batches.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

DATASETS = ("digits", "mnist", "cifar10")


@dataclass
class ImageData:
    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor
    name: str
    num_classes: int = 10
    x_val: torch.Tensor | None = None  # held out of the training images by load_data
    y_val: torch.Tensor | None = None
    train_idx: torch.Tensor | None = None  # indices of x_train / x_val in the loader's training images
    val_idx: torch.Tensor | None = None

    @property
    def shape(self):
        """(C, H, W) of one image."""
        return tuple(self.x_train.shape[1:])


def balanced_subset(x, y, n: int, seed: int = 0):
    """n images with (as near as possible) n/num_classes per class, in a seeded random order."""
    idx = balanced_indices(y, n, seed)
    return x[idx], y[idx]


def balanced_indices(y, n: int | None, seed: int = 0) -> torch.Tensor:
    """The indices :func:`balanced_subset` takes (all of them, in order, when n is None or ≥ len(y))."""
    if n is None or n >= len(y):
        return torch.arange(len(y))
    g = torch.Generator().manual_seed(seed)
    classes = torch.unique(y)
    per, extra = divmod(n, len(classes))
    idx = []
    for i, c in enumerate(classes):
        where = torch.nonzero(y == c).flatten()
        idx.append(where[torch.randperm(len(where), generator=g)[: per + (1 if i < extra else 0)]])
    idx = torch.cat(idx)
    return idx[torch.randperm(len(idx), generator=g)]


VAL_MAX, VAL_FRACTION = 5000, 0.1


def validation_size(n_train: int) -> int:
    """The default validation split: min(5000, 10%) of the training images (MNIST 60000 → 5000,
    CIFAR-10 50000 → 5000, digits 1500 → 150)."""
    return min(VAL_MAX, round(VAL_FRACTION * n_train))


def validation_split(y: torch.Tensor, n_val: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """(train_idx, val_idx): a seeded, stratified split of ``len(y)`` training images into
    len(y) − n_val and n_val, both sorted.  Each class gives ⌊n_val·n_c/N⌋ images, and the
    remaining ones go to the classes with the largest fractional parts, so the total is exact."""
    N = len(y)
    if not 0 <= n_val < N:
        raise ValueError(f"n_val must be in [0, {N}) (the training images), got {n_val}")
    g = torch.Generator().manual_seed(seed)
    classes = torch.unique(y)
    counts = torch.stack([(y == c).sum() for c in classes])
    quota = counts * n_val // N
    frac = counts * n_val - quota * N  # numerator of the fractional part
    order = sorted(range(len(classes)), key=lambda i: (-int(frac[i]), i))
    for i in order[: n_val - int(quota.sum())]:
        quota[i] += 1
    val = [torch.nonzero(y == c).flatten()[torch.randperm(int(n), generator=g)[: int(q)]]
           for c, n, q in zip(classes, counts, quota)]
    mask = torch.zeros(N, dtype=torch.bool)
    mask[torch.cat(val)] = True
    return torch.nonzero(~mask).flatten(), torch.nonzero(mask).flatten()


def _to_unit(x: np.ndarray, vmax: float) -> torch.Tensor:
    return torch.from_numpy(np.asarray(x, dtype=np.float32)) / (vmax / 2) - 1


def load_digits(n_test: int = 297, seed: int = 0) -> ImageData:
    """sklearn digits (values 0..16 → [-1, 1]), (N,1,8,8); a stratified split of n_test images."""
    from sklearn.datasets import load_digits as _load

    d = _load()
    x, y = _to_unit(d.images, 16.0)[:, None], torch.from_numpy(d.target).long()
    g = torch.Generator().manual_seed(seed)
    test = []
    for c in range(10):  # stratified: the test split has the class proportions of the whole set
        where = torch.nonzero(y == c).flatten()
        k = round(n_test * len(where) / len(y))
        test.append(where[torch.randperm(len(where), generator=g)[:k]])
    mask = torch.zeros(len(y), dtype=torch.bool)
    mask[torch.cat(test)] = True
    return ImageData(x[~mask], y[~mask], x[mask], y[mask], "digits")


def load_mnist(path: str, pad_to_32: bool = False) -> ImageData:
    """MNIST from an ``.npz`` file or a torchvision root folder; (N,1,28,28) or padded (N,1,32,32)
    with the background value -1."""
    if str(path).endswith(".npz"):
        if not os.path.exists(path):
            raise FileNotFoundError(f"MNIST npz not found: {path}")
        with np.load(path) as f:
            arrays = [f[k] for k in ("x_train", "y_train", "x_test", "y_test")]
    else:
        try:
            from torchvision.datasets import MNIST
        except ImportError as e:
            raise ImportError(f"data_path={path!r} is not an .npz file, and reading a torchvision root "
                              f"needs torchvision: {e}") from e
        tr, te = MNIST(path, train=True, download=False), MNIST(path, train=False, download=False)
        arrays = [tr.data.numpy(), tr.targets.numpy(), te.data.numpy(), te.targets.numpy()]
    xtr, ytr, xte, yte = arrays
    xtr, xte = _to_unit(xtr, 255.0)[:, None], _to_unit(xte, 255.0)[:, None]
    if pad_to_32:
        xtr, xte = F.pad(xtr, (2, 2, 2, 2), value=-1.0), F.pad(xte, (2, 2, 2, 2), value=-1.0)
    return ImageData(xtr, torch.from_numpy(ytr).long(), xte, torch.from_numpy(yte).long(), "mnist")


def load_cifar10(root: str) -> ImageData:
    """CIFAR-10 through torchvision (no download: the files must be under ``root``), (N,3,32,32)."""
    try:
        from torchvision.datasets import CIFAR10
    except ImportError as e:
        raise ImportError(f"CIFAR-10 needs torchvision (pip install torchvision): {e}") from e
    tr, te = CIFAR10(root, train=True, download=False), CIFAR10(root, train=False, download=False)
    conv = lambda a: _to_unit(a, 255.0).permute(0, 3, 1, 2).contiguous()  # noqa: E731
    return ImageData(conv(tr.data), torch.tensor(tr.targets), conv(te.data), torch.tensor(te.targets), "cifar10")


def load_data(dataset: str, data_path: str | None = None, pad_to_32: bool = False,
              n_train: int | None = None, n_test: int | None = None, seed: int = 0,
              n_val: int | None = None) -> ImageData:
    """One entry point for the config: the dataset; a validation split of ``n_val`` training
    images (None: :func:`validation_size`) held out with :func:`validation_split` (seed + 2)
    before anything else, so it does not depend on n_train; then balanced subsets of n_train
    (of the remaining training images) and n_test."""
    if dataset == "digits":
        d = load_digits(seed=seed)
    elif dataset == "mnist":
        if not data_path:
            raise ValueError("dataset 'mnist' needs data_path (an mnist.npz file or a torchvision root)")
        d = load_mnist(data_path, pad_to_32)
    elif dataset == "cifar10":
        if not data_path:
            raise ValueError("dataset 'cifar10' needs data_path (a torchvision CIFAR-10 root)")
        d = load_cifar10(data_path)
    else:
        raise ValueError(f"dataset must be one of {DATASETS}, got {dataset!r}")
    tr, va = validation_split(d.y_train, validation_size(len(d.y_train)) if n_val is None else n_val, seed + 2)
    d.x_val, d.y_val, d.val_idx = d.x_train[va], d.y_train[va], va
    sub = balanced_indices(d.y_train[tr], n_train, seed)
    d.train_idx = tr[sub]
    d.x_train, d.y_train = d.x_train[d.train_idx], d.y_train[d.train_idx]
    d.x_test, d.y_test = balanced_subset(d.x_test, d.y_test, n_test, seed + 1)
    return d


def batches(n: int, batch_size: int, generator: torch.Generator, drop_last: bool = True):
    """Index tensors of one epoch in the generator's random order."""
    perm = torch.randperm(n, generator=generator)
    stop = n - n % batch_size if drop_last and n >= batch_size else n
    for i in range(0, stop, batch_size):
        yield perm[i:i + batch_size]
