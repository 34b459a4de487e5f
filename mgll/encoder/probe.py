"""Moved to :mod:`mgll.evaluate.probe`; this name stays for one release (README: Changes)."""

import sys

from mgll.evaluate import probe as _moved

sys.modules[__name__] = _moved
