"""Optional native extension (csrc/).  Installation never fails: without a compiler, without
torch in the build environment, or with OTKERNELS_NO_EXT=1, otkernels installs as pure
Python and ``backend="auto"`` uses the torch backends."""
import os
import warnings

from setuptools import setup

ext_modules, cmdclass = [], {}
sources = sorted(os.path.join("csrc", f) for f in os.listdir("csrc") if f.endswith(".cpp")) if os.path.isdir("csrc") else []
if sources and not os.environ.get("OTKERNELS_NO_EXT"):
    try:
        from torch.utils.cpp_extension import BuildExtension, CppExtension

        ext_modules = [CppExtension("otkernels._C", sources,
                                    extra_compile_args=["-O3", "-std=c++17", "-fopenmp", "-march=native"],
                                    extra_link_args=["-fopenmp"])]
        cmdclass = {"build_ext": BuildExtension.with_options(no_python_abi_suffix=True)}
    except Exception as e:  # no torch at build time, no compiler: pure-Python install
        warnings.warn(f"otkernels: building without the native extension ({e})")

setup(ext_modules=ext_modules, cmdclass=cmdclass)
