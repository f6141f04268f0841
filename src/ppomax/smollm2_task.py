"""Moved to :mod:`ppomax.studies.smollm2_task`; this old path is an alias that warns once (ppomax/aliases.py)."""

import sys

from ppomax import aliases
from ppomax.studies import smollm2_task

sys.modules[__name__] = aliases.moved_module(__name__, smollm2_task)
