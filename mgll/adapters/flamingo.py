"""Moved to :mod:`mgll.adapters.hosts.medflamingo.model`; this name stays for one release (README: Changes)."""

import sys

from mgll.adapters.hosts.medflamingo import model as _moved

sys.modules[__name__] = _moved
