"""Moved to :mod:`ppomax.studies.tasks.reviews`; this old path is an alias that warns once (ppomax/aliases.py)."""

import sys

from ppomax import aliases
from ppomax.studies.tasks import reviews

sys.modules[__name__] = aliases.moved_module(__name__, reviews)
