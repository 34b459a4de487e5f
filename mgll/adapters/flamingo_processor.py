"""Moved to :mod:`mgll.adapters.hosts.medflamingo.processor`; this name stays for one release (README: Changes)."""

import sys

from mgll.adapters.hosts.medflamingo import processor as _moved

sys.modules[__name__] = _moved
