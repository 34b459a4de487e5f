"""Moved to :mod:`mgll.evaluate.probe_compare_cli`; this name stays for one release (README: Changes)."""

import sys

from mgll.evaluate import probe_compare_cli as _moved

sys.modules[__name__] = _moved
