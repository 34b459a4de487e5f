"""Moved to :mod:`mgll.evaluate.paired`; this name stays for one release (README: Changes)."""

import sys

from mgll.evaluate import paired as _moved

sys.modules[__name__] = _moved
