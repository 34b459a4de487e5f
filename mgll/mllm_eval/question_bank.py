"""Moved to :mod:`mgll.data.question_bank`; this name stays for one release (README: Changes)."""

import sys

from mgll.data import question_bank as _moved

sys.modules[__name__] = _moved
