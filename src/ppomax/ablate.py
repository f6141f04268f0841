"""Moved to :mod:`ppomax.studies.ablate`; this old path is an alias that warns once (ppomax/aliases.py)."""

import sys

from ppomax import aliases
from ppomax.studies import ablate

sys.modules[__name__] = aliases.moved_module(__name__, ablate)
