"""`python -m ppomax` (used by `accelerate launch -m ppomax ...`)."""

import sys

from ppomax.cli import main

sys.exit(main())
