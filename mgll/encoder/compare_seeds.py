"""Moved to :mod:`mgll.evaluate.compare_seeds`; this name stays for one release (README: Changes)."""

import sys

from mgll.evaluate import compare_seeds as _moved

sys.modules[__name__] = _moved
