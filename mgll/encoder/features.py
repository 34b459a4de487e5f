"""Moved to :mod:`mgll.evaluate.features`; this name stays for one release (README: Changes)."""

import sys

from mgll.evaluate import features as _moved

sys.modules[__name__] = _moved
