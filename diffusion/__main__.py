"""``python -m diffusion``: see :mod:`diffusion.cli`."""
import sys

from .cli import main

sys.exit(main())
