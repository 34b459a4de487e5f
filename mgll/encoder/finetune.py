"""Moved to :mod:`mgll.evaluate.finetune`; this name stays for one release (README: Changes)."""

import sys

from mgll.evaluate import finetune as _moved

sys.modules[__name__] = _moved
