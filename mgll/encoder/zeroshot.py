"""Moved to :mod:`mgll.evaluate.zeroshot`; this name stays for one release (README: Changes)."""

import sys

from mgll.evaluate import zeroshot as _moved

sys.modules[__name__] = _moved
