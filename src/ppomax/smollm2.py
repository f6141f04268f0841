"""Moved to :mod:`ppomax.tools.smollm2`; this old path is an alias that warns once (ppomax/aliases.py)."""

import sys

from ppomax import aliases
from ppomax.tools import smollm2

sys.modules[__name__] = aliases.moved_module(__name__, smollm2)
