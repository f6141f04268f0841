"""Moved to :mod:`ppomax.models.tiny`; this old path is an alias that warns once (ppomax/aliases.py)."""

import sys

from ppomax import aliases
from ppomax.models import tiny

sys.modules[__name__] = aliases.moved_module(__name__, tiny)
