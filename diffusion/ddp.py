"""Data-parallel training under ``torchrun``: the process group, the rank's share of a global
batch, and the per-rank model RNG (the Trainer's side of issue 22).

    torchrun --standalone --nproc_per_node=2 -m diffusion train --preset digits-flow

Scheme (so that W processes with ``batch_size`` b train exactly like one process with batch
W·b).  Every rank draws the *global* random quantities of a step from the same streams —
the batch order (one permutation per epoch: DistributedSampler's "same seed, disjoint
slices"), timesteps, noise, OT references — and keeps its contiguous slice (rank r: rows
[r·b, (r+1)·b)).  The minibatch OT coupling and the OT loss are computed over the whole
global batch (:mod:`otkernels.distributed`), the model's gradients are averaged by
DistributedDataParallel.  Randomness *inside* the model's forward (dropout, classifier-free
condition dropping) comes from a per-rank seed (:class:`RankRNG`), so ranks do not share
dropout masks; with such randomness the run is a valid data-parallel run but no longer equal
to the one-process run, whose forward draws from the global stream.
"""
from __future__ import annotations

import os

import torch
import torch.distributed as dist

from otkernels.distributed import world


def init_from_env(device: str = "auto") -> tuple:
    """Start the default process group when launched by torchrun (``WORLD_SIZE`` > 1 in the
    environment, not yet initialised): NCCL with one GPU per local rank on CUDA, gloo on CPU.
    Returns ``(rank, world size, device name)``; ``device`` is the config's device, changed
    to ``cuda:<LOCAL_RANK>`` for NCCL."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not dist.is_initialized():
        cuda = torch.cuda.is_available() and device in ("auto", "cuda")
        if cuda:
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group("nccl" if cuda else "gloo")
        if cuda:
            device = f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}"
    rank, size = world()
    return rank, size, device


def shard(n: int, rank: int, size: int) -> slice:
    """Rows of a global batch of n that rank ``rank`` of ``size`` trains on: contiguous slices,
    the first ``n % size`` ranks one row longer (equal when ``size`` divides n)."""
    q, r = divmod(n, size)
    start = rank * q + min(rank, r)
    return slice(start, start + q + (1 if rank < r else 0))


def mean(value: torch.Tensor, size: int) -> torch.Tensor:
    """The mean over ranks of a scalar (detached; the value itself with one process)."""
    if size == 1:
        return value.detach()
    v = value.detach().clone().float()
    dist.all_reduce(v)
    return v / size


def total(value: torch.Tensor, size: int) -> torch.Tensor:
    """The sum over ranks of a tensor (detached)."""
    v = value.detach().clone()
    if size > 1:
        dist.all_reduce(v)
    return v


def barrier(size: int) -> None:
    if size > 1:
        dist.barrier()


class RankRNG:
    """Calls ``net`` with torch's RNG forked and seeded per (rank, step): the forward's own
    draws (dropout, condition dropping) differ between ranks, and the global stream, which
    every rank must advance identically, is left as it was."""

    def __init__(self, net, seed: int, device: torch.device):
        self.net, self.seed, self.device = net, int(seed), device

    def __call__(self, *args, **kwargs):
        devices = [self.device] if self.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices):
            torch.manual_seed(self.seed)
            return self.net(*args, **kwargs)
