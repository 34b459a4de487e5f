"""Moved to :mod:`mgll.testing.tiny`; this name stays for one release (README: Changes)."""

import sys

from mgll.testing import tiny as _moved

sys.modules[__name__] = _moved
