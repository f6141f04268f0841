"""The package's structure (issue #25): the library and its studies apart, no import circle, files of
a few hundred lines, and the moved import paths kept as aliases that warn once.

The layers, from the module's dotted name:

- the application layer: ``ppomax.cli`` and ``ppomax.__main__`` (the ``ppomax`` command launches the
  library's stages and the studies, and may import anything);
- the studies: ``ppomax.studies.*`` (demo, ablate, the SmolLM2 study, their reports and tasks);
- the tools: ``ppomax.tools.*`` (killtest, gpu_check, the SmolLM2 fetcher);
- the aliases: the old paths of moved modules (``ppomax.aliases.MOVED_MODULES``, and ``ppomax.tasks``);
- the library: every other module of ``src/ppomax``.

Rules (every ``import`` counts, at module level and inside functions alike):

1. the library imports only the library (never a study, a tool, the CLI or an old path);
2. a tool imports the library and tools; a study the library, tools and studies; neither the CLI;
3. no module imports an old (alias) path: only users' code still does;
4. no ``_private`` name crosses files: neither ``from ppomax.x import _name`` nor ``module._name`` on
   an imported ppomax module, from any module of src/ppomax;
5. the import graph (an import of ``a.b.c`` also runs the packages ``a.b`` and ``a``) has no cycle;
6. the library imports nothing by a computed name (``importlib.import_module``, ``__import__``)
   except ``ppomax.aliases``, whose table is the only link from an old path to a study.
"""

from __future__ import annotations

import ast
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

import ppomax
from ppomax import aliases

SRC = Path(ppomax.__file__).parent
APP = {"ppomax.cli", "ppomax.__main__"}
MAX_LINES = 500
# The PPO loop reads in one sitting (issue #25): the trainer stays well under the general limit.
MAX_LINES_OF = {"ppo/trainer.py": 450}


def module_name(path: Path, root: Path = SRC, package: str = "ppomax") -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join([package, *parts])


def source_modules(root: Path = SRC, package: str = "ppomax") -> dict[str, Path]:
    return {module_name(p, root, package): p for p in sorted(root.rglob("*.py"))}


def layer(mod: str) -> str:
    if mod in APP:
        return "app"
    for pkg in ("studies", "tools"):
        if mod == f"ppomax.{pkg}" or mod.startswith(f"ppomax.{pkg}."):
            return {"studies": "study", "tools": "tool"}[pkg]
    if mod in aliases.MOVED_MODULES or mod == "ppomax.tasks":
        return "alias"
    return "library"


ALLOWED = {"library": {"library"}, "tool": {"library", "tool"}, "study": {"library", "tool", "study"}}


def _under_type_checking(tree: ast.AST) -> set[int]:
    """ids of the import nodes under ``if TYPE_CHECKING:`` (never executed)."""
    skip = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and ast.unparse(node.test) in ("TYPE_CHECKING", "typing.TYPE_CHECKING"):
            skip |= {id(n) for stmt in node.body for n in ast.walk(stmt)}
    return skip


class Imports:
    """Every import of one module (module level and inside functions): the ppomax modules it imports,
    the names it takes from them, and which local names are bound to ppomax modules."""

    def __init__(self, mod: str, source: str, modules: set[str], is_package: bool) -> None:
        self.mod, self.modules = mod, modules
        self.edges: list[tuple[str, int]] = []  # (imported module, line)
        self.names: list[tuple[str, str, int]] = []  # (module, name, line) of `from module import name`
        self.module_aliases: dict[str, str] = {}  # local name -> ppomax module
        self.dynamic: list[int] = []  # lines of importlib.import_module / __import__ calls
        tree = ast.parse(source)
        skip = _under_type_checking(tree)
        package = mod if is_package else mod.rpartition(".")[0]
        for node in ast.walk(tree):
            if id(node) in skip:
                continue
            if isinstance(node, ast.Import):
                for a in node.names:
                    if a.name.split(".")[0] == "ppomax":
                        self.edges.append((a.name, node.lineno))
                        self.module_aliases[a.asname or a.name.split(".")[0]] = a.name if a.asname else "ppomax"
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1] + ([base] if base else []))
                if base.split(".")[0] != "ppomax":
                    continue
                for a in node.names:
                    sub = f"{base}.{a.name}"
                    if sub in modules:  # `from ppomax import data`: the submodule itself
                        self.edges.append((sub, node.lineno))
                        self.module_aliases[a.asname or a.name] = sub
                    else:
                        self.edges.append((base, node.lineno))
                        self.names.append((base, a.name, node.lineno))
            elif isinstance(node, ast.Call) and ast.unparse(node.func) in ("importlib.import_module", "__import__"):
                self.dynamic.append(node.lineno)
        self.attributes = [(self.module_aliases[n.value.id], n.attr, n.lineno) for n in ast.walk(tree)
                           if isinstance(n, ast.Attribute) and isinstance(n.value, ast.Name)
                           and n.value.id in self.module_aliases]


def scan(root: Path = SRC, package: str = "ppomax") -> dict[str, Imports]:
    found = source_modules(root, package)
    return {m: Imports(m, p.read_text(encoding="utf-8"), set(found), p.name == "__init__.py") for m, p in found.items()}


def ancestors(mod: str) -> list[str]:
    parts = mod.split(".")
    return [".".join(parts[:i]) for i in range(1, len(parts))]


def import_graph(scanned: dict[str, Imports]) -> dict[str, set[str]]:
    """module -> the modules importing it runs: each imported module and its packages, except the
    importer's own packages (already running when it imports), unless it imports one by name."""
    graph: dict[str, set[str]] = {m: set() for m in scanned}
    for m, imp in scanned.items():
        own = set(ancestors(m))
        for target, _ in imp.edges:
            implicit = [t for t in ancestors(target) if t not in own]  # run on the way, unless already running
            for t in [*implicit, target]:  # an explicit import of an own package counts: it reads its names
                if t != m and t in scanned:
                    graph[m].add(t)
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle of ``graph`` as [a, b, ..., a], or None."""
    state: dict[str, int] = {}  # 1: on the DFS stack, 2: done
    stack: list[str] = []

    def visit(n: str) -> list[str] | None:
        state[n] = 1
        stack.append(n)
        for t in sorted(graph[n]):
            if state.get(t) == 1:
                return [*stack[stack.index(t):], t]
            if t not in state and (c := visit(t)):
                return c
        stack.pop()
        state[n] = 2
        return None

    for n in sorted(graph):
        if n not in state and (c := visit(n)):
            return c
    return None


def layer_violations(scanned: dict[str, Imports]) -> list[str]:
    bad = []
    for m, imp in scanned.items():
        src = layer(m)
        for target, line in imp.edges:
            dst = layer(target)
            if src == "alias" or src == "app" and dst != "alias":
                continue
            if dst == "alias":
                bad.append(f"{m}:{line} imports the old path {target} (now {aliases.MOVED_MODULES.get(target)})")
            elif dst not in ALLOWED[src]:
                bad.append(f"{m}:{line} ({src}) imports {target} ({dst})")
    return bad


def private_crossings(scanned: dict[str, Imports]) -> list[str]:
    bad = []
    for m, imp in scanned.items():
        for target, name, line in [*imp.names, *imp.attributes]:
            if name.startswith("_") and not name.startswith("__") and target != m:
                bad.append(f"{m}:{line} uses {target}.{name}")
    return bad


def dynamic_imports(scanned: dict[str, Imports]) -> list[str]:
    return [f"{m}:{line}" for m, imp in scanned.items() for line in imp.dynamic
            if layer(m) == "library" and m != "ppomax.aliases"]


@pytest.fixture(scope="module")
def scanned() -> dict[str, Imports]:
    return scan()


def test_the_layers_are_what_the_tree_says(scanned):
    """The rules below see every module: the studies and tools the issue names, the CLI, the aliases."""
    layers = {m: layer(m) for m in scanned}
    assert {m for m, v in layers.items() if v == "study"} >= {
        "ppomax.studies.demo", "ppomax.studies.ablate", "ppomax.studies.report", "ppomax.studies.smollm2_study",
        "ppomax.studies.smollm2_task", "ppomax.studies.smollm2_results", "ppomax.studies.smollm2_targets",
        "ppomax.studies.tasks.reviews"}
    assert {m for m, v in layers.items() if v == "tool"} == {
        "ppomax.tools", "ppomax.tools.killtest", "ppomax.tools.gpu_check", "ppomax.tools.smollm2"}
    assert {m for m, v in layers.items() if v == "alias"} == {*aliases.MOVED_MODULES, "ppomax.tasks"}
    for old, new in aliases.MOVED_MODULES.items():
        assert new in scanned and old in scanned, (old, new)
    assert {"ppomax.functional", "ppomax.ppo.trainer", "ppomax.evaluate", "ppomax.config"} <= {
        m for m, v in layers.items() if v == "library"}


def test_the_library_never_imports_a_study_and_studies_use_the_layers_below(scanned):
    bad = layer_violations(scanned)
    assert not bad, "imports across the layers (tests/test_layers.py docstring):\n" + "\n".join(bad)


def test_no_private_name_crosses_files(scanned):
    bad = private_crossings(scanned)
    assert not bad, "a _private name used from another module (make it public, or keep it in its file):\n" + \
        "\n".join(bad)


def test_benchmarks_and_examples_use_only_public_names():
    """Scripts beside the package are users of it: no ``_private`` ppomax name either."""
    found = set(source_modules())
    root = SRC.parent.parent
    scripts = {f"{p.parent.name}.{p.stem}": p for d in ("benchmarks", "examples") for p in sorted((root / d).rglob("*.py"))}
    assert len(scripts) >= 5, scripts  # the check sees the scripts
    imports = {m: Imports(m, p.read_text(encoding="utf-8"), found, False) for m, p in scripts.items()}
    bad = private_crossings(imports)
    assert not bad, "\n".join(bad)


def test_the_library_imports_nothing_by_a_computed_name(scanned):
    assert not dynamic_imports(scanned)


def test_no_import_cycle(scanned):
    cycle = find_cycle(import_graph(scanned))
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_no_source_file_over_500_lines():
    sizes = {str(p.relative_to(SRC)): len(p.read_text(encoding="utf-8").splitlines()) for p in SRC.rglob("*.py")}
    over = {f: n for f, n in sizes.items() if n > MAX_LINES_OF.get(f, MAX_LINES)}
    assert not over, f"files over {MAX_LINES} lines ({MAX_LINES_OF} for these; split them along what they do): {over}"


def test_the_checks_fail_on_a_package_that_breaks_the_rules(tmp_path, monkeypatch):
    """The rules above can fail: a made-up package with a function-level library -> study import, a
    private import across files, a private attribute of an imported module, a computed import and a
    cycle through a package's __init__ is caught on each count."""
    pkg = tmp_path / "ppomax"
    files = {
        "__init__.py": "",
        "lib.py": "def f():\n    from ppomax.studies import demo\n    from ppomax.util import _helper\n",
        "util.py": "import importlib\n\ndef _helper():\n    return importlib.import_module('x')\n",
        "other.py": "from ppomax import util as U\n\nx = U._helper\n",
        "models/__init__.py": "from ppomax.models.tiny import build\n",
        "models/tiny.py": "def build():\n    from ppomax.tiny_user import x\n",
        "tiny_user.py": "from ppomax.models.loading import y\n",
        "models/loading.py": "y = 1\n",
        "studies/__init__.py": "",
        "studies/demo.py": "from ppomax.cli import main\n",
        "cli.py": "",
    }
    for name, text in files.items():
        (pkg / name).parent.mkdir(parents=True, exist_ok=True)
        (pkg / name).write_text(textwrap.dedent(text))
    fake = scan(pkg)
    assert layer_violations(fake) == ["ppomax.lib:2 (library) imports ppomax.studies.demo (study)",
                                      "ppomax.studies.demo:1 (study) imports ppomax.cli (app)"]
    assert private_crossings(fake) == ["ppomax.lib:3 uses ppomax.util._helper", "ppomax.other:3 uses ppomax.util._helper"]
    assert dynamic_imports(fake) == ["ppomax.util:4"]
    # tiny_user imports models.loading, which runs the package models, whose __init__ imports models.tiny
    assert find_cycle(import_graph(fake)) == ["ppomax.models", "ppomax.models.tiny", "ppomax.tiny_user", "ppomax.models"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None
    # a submodule reading its package's names while the package imports the submodule (even in a function)
    eng = tmp_path / "two" / "ppomax"
    for name, text in {"__init__.py": "", "eng/__init__.py": "def make():\n    from ppomax.eng.vllm import V\n",
                       "eng/vllm.py": "from ppomax.eng import Sampling\n"}.items():
        (eng / name).parent.mkdir(parents=True, exist_ok=True)
        (eng / name).write_text(text)
    assert find_cycle(import_graph(scan(eng))) == ["ppomax.eng", "ppomax.eng.vllm", "ppomax.eng"]


# ---------------------------------------------------------------------------------------------
# The old paths
# ---------------------------------------------------------------------------------------------


def _run(code: str, tmp_path: Path, *args: str) -> subprocess.CompletedProcess:
    script = tmp_path / "user_script.py"
    script.write_text(textwrap.dedent(code))
    env = {**os.environ, "PYTHONWARNINGS": "always"}  # a second warning would show, not be deduplicated
    return subprocess.run([sys.executable, *args, str(script)], capture_output=True, text=True, env=env, timeout=300)


def test_every_old_module_path_is_the_new_module_and_warns_once_at_the_users_import(tmp_path):
    """``import ppomax.demo`` (and every other moved path) gives the moved module itself, warns once per
    process with a FutureWarning naming the new path, and points the warning at the user's import line."""
    lines = [f"import {old}" for old in aliases.MOVED_MODULES]
    checks = [f"assert sys.modules[{old!r}] is importlib.import_module({new!r}), {old!r}"
              for old, new in aliases.MOVED_MODULES.items()]
    code = "\n".join(["import importlib", "import sys", *lines, *lines, *checks, "print('ok')"])
    res = _run(code, tmp_path)
    assert res.returncode == 0 and res.stdout.strip() == "ok", res.stderr
    script = str(tmp_path / "user_script.py")
    for i, (old, new) in enumerate(aliases.MOVED_MODULES.items()):
        expected = f"{script}:{3 + i}: FutureWarning: {old} has moved to {new}; import it from there"
        hits = [line for line in res.stderr.splitlines() if f"FutureWarning: {old} has moved" in line]
        assert len(hits) == 1 and hits[0].startswith(expected), (old, hits)


def test_moved_names_of_modules_that_stay_warn_once(tmp_path):
    """``ppomax.config.DemoConfig`` (now ppomax.studies.config) and ``ppomax.training.reduce_and_clip``
    (now ppomax.gradients): the same objects, one FutureWarning each."""
    code = """\
        from ppomax.config import DemoConfig
        from ppomax.config import DemoConfig as again
        from ppomax.training import reduce_and_clip
        import ppomax.gradients, ppomax.studies.config
        assert DemoConfig is again is ppomax.studies.config.DemoConfig
        assert reduce_and_clip is ppomax.gradients.reduce_and_clip
        print("ok")
    """
    res = _run(code, tmp_path)
    assert res.returncode == 0 and res.stdout.strip() == "ok", res.stderr
    warned = [line for line in res.stderr.splitlines() if "FutureWarning" in line and "has moved" in line]
    assert len(warned) == 2 and "ppomax.config.DemoConfig has moved to ppomax.studies.config.DemoConfig" in warned[0]
    assert "ppomax.training.reduce_and_clip has moved to ppomax.gradients.reduce_and_clip" in warned[1]


@pytest.mark.parametrize("tool", ["killtest", "gpu_check"])
def test_python_m_commands_still_run_without_a_warning(tool):
    """``python -m ppomax.killtest`` / ``python -m ppomax.gpu_check`` are documented commands, not imports."""
    res = subprocess.run([sys.executable, "-m", f"ppomax.{tool}", "--help"], capture_output=True, text=True,
                         env={**os.environ, "PYTHONWARNINGS": "always"}, timeout=300)
    assert res.returncode == 0 and f"python -m ppomax.{tool}" in res.stdout, res.stderr
    assert "has moved" not in res.stderr
