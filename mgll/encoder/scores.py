"""Moved to :mod:`mgll.evaluate.scores`; this name stays for one release (README: Changes)."""

import sys

from mgll.evaluate import scores as _moved

sys.modules[__name__] = _moved
