"""Optional native extension (csrc/ -> otkernels._C).  Installation never fails: without a
compiler, without torch in the build environment (``pip install`` with build isolation), on a
compile error, or with OTKERNELS_NO_EXT=1, otkernels installs as pure Python; the ``native``
backend then compiles the same sources just in time on first use (or reports why it cannot),
and ``backend="auto"`` uses the torch backends meanwhile.

The csrc/ sources are copied into built packages as ``otkernels/_csrc`` for that just-in-time
build; editable installs and the repository read them from ``csrc/`` directly."""
import glob
import os
import shutil
import warnings

from setuptools import setup
from setuptools.command.build_py import build_py

HERE = os.path.dirname(os.path.abspath(__file__))
SOURCES = sorted(glob.glob("csrc/*.cpp"))
HEADERS = sorted(glob.glob("csrc/*.h"))
# keep in sync with otkernels/backends/native.py (FLAGS, LDFLAGS)
CFLAGS = ["-O3", "-fopenmp", "-march=native", "-ffp-contract=fast"]
LDFLAGS = ["-fopenmp"]


class BuildPyWithSources(build_py):
    """Also ship csrc/ inside the package, for the just-in-time fallback build."""

    def run(self):
        super().run()
        if self.dry_run or not SOURCES:
            return
        dst = os.path.join(self.build_lib, "otkernels", "_csrc")
        os.makedirs(dst, exist_ok=True)
        for f in SOURCES + HEADERS:
            shutil.copy(os.path.join(HERE, f), dst)


ext_modules, cmdclass = [], {"build_py": BuildPyWithSources}
if SOURCES and not os.environ.get("OTKERNELS_NO_EXT"):
    try:
        from torch.utils.cpp_extension import BuildExtension, CppExtension

        Base = BuildExtension.with_options(no_python_abi_suffix=True)

        class OptionalBuildExt(Base):
            """A failed compilation is a warning, not a failed install."""

            def run(self):
                try:
                    super().run()
                except Exception as e:  # noqa: BLE001 - any build failure
                    warnings.warn(f"otkernels: native extension not built ({e}); the 'native' "
                                  f"backend will try a just-in-time build on first use")

            def build_extension(self, ext):
                try:
                    super().build_extension(ext)
                except Exception as e:  # noqa: BLE001
                    warnings.warn(f"otkernels: native extension not built ({e}); the 'native' "
                                  f"backend will try a just-in-time build on first use")

        # no -std flag: torch's BuildExtension adds the standard its headers need (C++20 for
        # torch 2.13); the csrc/ sources themselves are C++17.
        ext_modules = [CppExtension("otkernels._C", SOURCES, depends=HEADERS,
                                    extra_compile_args=CFLAGS, extra_link_args=LDFLAGS)]
        cmdclass["build_ext"] = OptionalBuildExt
    except Exception as e:  # no torch at build time: pure-Python install
        warnings.warn(f"otkernels: building without the native extension ({e})")

setup(ext_modules=ext_modules, cmdclass=cmdclass)
