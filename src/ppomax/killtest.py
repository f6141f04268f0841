"""`python -m ppomax.killtest`: runs :mod:`ppomax.tools.killtest` (the command stays as documented). Importing
``ppomax.killtest`` is an alias of the moved module that warns once (ppomax/aliases.py)."""

import sys

if __name__ == "__main__":
    from ppomax.tools.killtest import main

    sys.exit(main())
else:
    from ppomax import aliases
    from ppomax.tools import killtest

    sys.modules[__name__] = aliases.moved_module(__name__, killtest)
