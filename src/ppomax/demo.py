"""Moved to :mod:`ppomax.studies.demo`; this old path is an alias that warns once (ppomax/aliases.py)."""

import sys

from ppomax import aliases
from ppomax.studies import demo

sys.modules[__name__] = aliases.moved_module(__name__, demo)
