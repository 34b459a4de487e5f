"""Moved to :mod:`mgll.evaluate.compare`; this name stays for one release (README: Changes)."""

import sys

from mgll.evaluate import compare as _moved

sys.modules[__name__] = _moved
