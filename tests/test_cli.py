"""``python -m otkernels``: the demo (warm-up, median, geomloss column), ``info``, ``build``,
and the native kernels' just-in-time build: messages on stderr only when it compiles."""
import os

import pytest
import torch

from otkernels import __main__ as cli
from otkernels.backends import native


def test_demo_rows_and_reference(capsys):
    pytest.importorskip("sklearn")
    rows = cli.main(["--n", "40", "--repeat", "2", "--blur", "1.0"])
    out = capsys.readouterr().out
    names = [r[0] for r in rows]
    assert "otkernels auto" in names and "otkernels tensorized" in names
    assert "median of 2 calls after a warm-up call" in out
    values = [r[1] for r in rows]
    assert max(values) - min(values) <= 1e-4 * abs(values[-1])
    assert all(r[2] > 0 and r[3] > 0 for r in rows)
    try:
        import geomloss  # noqa: F401
        assert names[-1] == "geomloss tensorized" and "x geomloss tensorized" in out
    except ImportError:
        assert "geomloss is not installed" in out


def test_demo_json(tmp_path, capsys):
    pytest.importorskip("sklearn")
    path = tmp_path / "demo.json"
    cli.main(["demo", "--n", "30", "--repeat", "1", "--json", str(path)])
    import json
    data = json.loads(path.read_text())
    assert {"name", "value", "median_seconds", "warmup_seconds", "repeat"} <= set(data[0])


def test_info_and_build(capsys):
    assert cli.main(["info"]) == 0
    out = capsys.readouterr().out
    assert "tensorized" in out and "cost cache budget" in out
    ok, _ = native.available()
    rc = cli.main(["build"])
    out = capsys.readouterr().out
    assert (rc == 0 and "native kernels ready" in out) if ok else rc == 1


@pytest.fixture
def fake_jit(tmp_path, monkeypatch):
    """_jit with torch's compiler and the .so import replaced by stand-ins (no compilation)."""
    from torch.utils import cpp_extension

    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    monkeypatch.delenv("OTKERNELS_NO_JIT", raising=False)
    calls = {"load": 0, "import": 0}

    def load(name, sources, build_directory, **kw):
        calls["load"] += 1
        with open(os.path.join(build_directory, "otkernels_C.so"), "w") as fh:
            fh.write("built")
        return "module"

    def imported(path):
        calls["import"] += 1
        return "module"

    monkeypatch.setattr(cpp_extension, "load", load)
    monkeypatch.setattr(native, "_import_built", imported)
    return calls


def test_jit_messages_only_when_compiling(fake_jit, capsys):
    assert native._jit() == "module"
    err = capsys.readouterr().err
    assert fake_jit == {"load": 1, "import": 0}
    assert "compiling the native CPU kernels" in err and "python -m otkernels build" in err
    assert "compiled in" in err
    # a later process: the build for these sources exists, nothing is compiled or printed
    assert native._jit() == "module"
    assert fake_jit == {"load": 1, "import": 1}
    assert capsys.readouterr().err == ""
    # force: rebuilds
    native._jit(force=True)
    assert fake_jit["load"] == 2 and "compiling" in capsys.readouterr().err


def test_jit_build_dir_follows_the_sources(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    srcs = native._sources()
    d = native.jit_build_dir(srcs)
    assert d == native.jit_build_dir(srcs) and d.startswith(str(tmp_path))
    copy = tmp_path / "src"
    copy.mkdir()
    for f in srcs + native._headers(srcs):
        (copy / os.path.basename(f)).write_bytes(open(f, "rb").read())
    moved = sorted(str(p) for p in copy.glob("*.cpp"))
    assert native.jit_build_dir(moved) == d  # contents, not paths
    (copy / "otk.h").write_bytes((copy / "otk.h").read_bytes() + b"\n// changed\n")
    assert native.jit_build_dir(moved) != d  # a changed header: a new build
    assert torch.__version__ not in d
