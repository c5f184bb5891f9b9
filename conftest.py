"""Root conftest: options shared by tests/ and benchmarks/.

``pytest`` runs the tests (benchmarks are skipped); ``pytest --benchmark-only`` runs the
benchmarks; ``--large`` adds the sizes that take minutes."""


def pytest_addoption(parser):
    parser.addoption("--large", action="store_true", default=False,
                     help="also run benchmark sizes that take minutes (e.g. N=M=100k)")


def pytest_collection_modifyitems(config, items):
    import pytest

    if config.getoption("benchmark_only", default=False):
        return
    skip = pytest.mark.skip(reason="benchmark: run with `pytest --benchmark-only`")
    for item in items:
        if "benchmarks" in item.nodeid.split("/")[0]:
            item.add_marker(skip)
