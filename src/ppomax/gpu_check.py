"""`python -m ppomax.gpu_check`: runs :mod:`ppomax.tools.gpu_check` (the command stays as documented). Importing
``ppomax.gpu_check`` is an alias of the moved module that warns once (ppomax/aliases.py)."""

import sys

if __name__ == "__main__":
    from ppomax.tools.gpu_check import main

    sys.exit(main())
else:
    from ppomax import aliases
    from ppomax.tools import gpu_check

    sys.modules[__name__] = aliases.moved_module(__name__, gpu_check)
