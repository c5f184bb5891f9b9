"""Boolean switches read from the environment (``OTKERNELS_KEOPS_CPU``, ``OTKERNELS_TRITON_CPU``,
``TRITON_INTERPRET``, ...), read at call time so that tests and users can change them."""
import os

_TRUE = ("1", "true", "on", "yes")


def flag(name: str) -> bool:
    """Whether the environment variable ``name`` is set to 1/true/on/yes (any case)."""
    return os.environ.get(name, "0").strip().lower() in _TRUE
