"""Moved to :mod:`mgll.evaluate.zeroshot_finetune_cli`; this name stays for one release (README: Changes)."""

import sys

from mgll.evaluate import zeroshot_finetune_cli as _moved

sys.modules[__name__] = _moved
