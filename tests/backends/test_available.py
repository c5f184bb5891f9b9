"""Every backend that this machine can run is available: a broken native build, a triton
whose interpreter path fails, or a pykeops that cannot compile must fail the suite, not turn
the backend's tests into skips (``setup.py`` only warns when the extension does not build)."""
import pytest

from otkernels import backends
from otk_testing import expected_backend


@pytest.mark.parametrize("name", ["tensorized", "blocked", "native", "triton", "keops"])
def test_expected_backend_is_available(name):
    expected, because = expected_backend(name)
    ok, why = backends.available()[name]
    if not expected:
        pytest.skip(f"{name} is not expected here: {because}")
    assert ok, f"backend {name} should be available ({because}) but is not: {why}"
