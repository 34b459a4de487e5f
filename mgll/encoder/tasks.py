"""Moved to :mod:`mgll.evaluate.tasks`; this name stays for one release (README: Changes)."""

import sys

from mgll.evaluate import tasks as _moved

sys.modules[__name__] = _moved
