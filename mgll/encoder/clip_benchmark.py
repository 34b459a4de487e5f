"""Moved to :mod:`mgll.evaluate.clip_benchmark`; this name stays for one release (README: Changes)."""

import sys

from mgll.evaluate import clip_benchmark as _moved

sys.modules[__name__] = _moved
