"""Atomic file writes: a crash or an exception during a save leaves the previous file intact."""
from __future__ import annotations

import os
import tempfile

import torch


def atomic_torch_save(obj, path) -> None:
    """``torch.save(obj)`` to a temporary file in ``path``'s directory, fsync, ``os.replace``
    over ``path``, then fsync the directory (where the platform allows) so the rename lasts."""
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", suffix=".tmp", dir=folder)
    try:
        with os.fdopen(fd, "wb") as fh:
            torch.save(obj, fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.remove(tmp)
        except OSError:
            pass
        raise
    try:
        dfd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)
    except OSError:  # some platforms / filesystems cannot fsync a directory
        pass
