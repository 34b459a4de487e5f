"""Moved to :mod:`mgll.evaluate.metrics`; this name stays for one release (README: Changes)."""

import sys

from mgll.evaluate import metrics as _moved

sys.modules[__name__] = _moved
