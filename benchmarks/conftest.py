"""Fixtures for the otkernels benchmarks (pytest-benchmark); plain helpers live in
``common.py`` (data generation, thread count, KeOps check, CPU timing).

Run them with ``pytest --benchmark-only`` (the root conftest skips them otherwise);
``--large`` adds the configurations that take many minutes.  Every benchmark runs with
``torch.set_num_threads(THREADS)`` on float32 data from ``common.make_data`` (fixed seed).
"""
from __future__ import annotations

import os
import platform

import pytest
import torch

from common import THREADS, keops_status, set_threads


@pytest.fixture
def large(request) -> bool:
    """True when ``--large`` was given (configurations that take many minutes)."""
    return bool(request.config.getoption("--large"))


@pytest.fixture(autouse=True)
def _threads():
    set_threads()
    yield


def pytest_benchmark_update_machine_info(config, machine_info):
    import geomloss

    import otkernels

    machine_info["torch"] = torch.__version__
    machine_info["torch_threads"] = THREADS
    machine_info["geomloss"] = geomloss.__version__
    machine_info["otkernels"] = getattr(otkernels, "__version__", "?")
    machine_info["keops"] = keops_status()[1]
    machine_info["cpu_count"] = os.cpu_count()
    machine_info["OMP_WAIT_POLICY"] = os.environ.get("OMP_WAIT_POLICY", "(unset)")
    machine_info["loadavg_at_save"] = os.getloadavg()
    machine_info["platform"] = platform.platform()
