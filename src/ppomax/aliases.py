"""Old import paths kept as aliases (issue #25: the library and its studies apart).

When ppomax split into the library (``ppomax``), what it runs to show itself (``ppomax.studies``)
and its tools (``ppomax.tools``), these modules and names moved. Each old module path is a small
module at the old place that replaces itself in ``sys.modules`` with the new module, so both
paths give the same module object; an old name is found through its old module's
``__getattr__``. Either warns once per process, naming the new path, with a FutureWarning: shown by
default wherever the old path is used (a DeprecationWarning is hidden unless the importing code is
``__main__``), as transformers does for what it will remove. ``python -m ppomax.killtest`` and
``python -m ppomax.gpu_check`` are commands, not imports: they run the tool without a warning.

This module is the only link from an old library path to a study; the library itself never
imports one (tests/test_layers.py).
"""

from __future__ import annotations

import importlib
import warnings
from types import ModuleType
from typing import Any

# old module -> new module
MOVED_MODULES = {
    "ppomax.demo": "ppomax.studies.demo",
    "ppomax.ablate": "ppomax.studies.ablate",
    "ppomax.report": "ppomax.studies.report",
    "ppomax.smollm2_study": "ppomax.studies.smollm2_study",
    "ppomax.smollm2_task": "ppomax.studies.smollm2_task",
    "ppomax.smollm2_results": "ppomax.studies.smollm2_results",
    "ppomax.smollm2_targets": "ppomax.studies.smollm2_targets",
    "ppomax.tasks.reviews": "ppomax.studies.tasks.reviews",
    "ppomax.killtest": "ppomax.tools.killtest",
    "ppomax.gpu_check": "ppomax.tools.gpu_check",
    "ppomax.smollm2": "ppomax.tools.smollm2",
    "ppomax.tiny": "ppomax.models.tiny",
}

# old module -> {name: new module}, for names that left a module that stays
MOVED_NAMES = {
    "ppomax.config": {"DemoConfig": "ppomax.studies.config", "AblateConfig": "ppomax.studies.config",
                      "DEMO_METHODS": "ppomax.studies.config"},
    "ppomax.training": {"reduce_and_clip": "ppomax.gradients", "grad_norm": "ppomax.gradients"},
}


def _warn(old: str, new: str) -> None:
    # stacklevel 4: _warn, its caller here, the alias module (or __getattr__), then the code that used the
    # old path (the warnings module skips importlib's own frames)
    warnings.warn(f"{old} has moved to {new}; import it from there (the old path will be removed)",
                  FutureWarning, stacklevel=4)


def moved_module(old: str, new: ModuleType) -> ModuleType:
    """Called by the module at the old path ``old``: warn, and return the new module to put in its place."""
    _warn(old, new.__name__)
    return new


_warned: set[str] = set()


def moved_name(module: str, name: str) -> Any:
    """The old module's ``__getattr__``: ``module.name`` from where it lives now (warns once per name)."""
    target = MOVED_NAMES.get(module, {}).get(name)
    if target is None:
        raise AttributeError(f"module {module!r} has no attribute {name!r}")
    if f"{module}.{name}" not in _warned:
        _warned.add(f"{module}.{name}")
        _warn(f"{module}.{name}", f"{target}.{name}")
    return getattr(importlib.import_module(target), name)
