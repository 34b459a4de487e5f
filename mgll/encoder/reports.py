"""Moved to :mod:`mgll.evaluate.reports`; this name stays for one release (README: Changes)."""

import sys

from mgll.evaluate import reports as _moved

sys.modules[__name__] = _moved
