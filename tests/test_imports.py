"""Import structure: no circles between modules (function-local imports included), and no side effect from
importing the package: the BLAS is placed only by the explicit `use_optimized_blas()` (or the command line),
which warns when mlx.core came first. Checked in fresh interpreters."""

from __future__ import annotations

import ast
import os
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# Source folder -> the package it installs as (pyproject's package-dir).
PACKAGES = {ROOT / "openelm_mlx": "openelm_mlx", ROOT / "convert": "openelm_mlx.convert",
            ROOT / "bench": "openelm_mlx.bench"}

linux_only = pytest.mark.skipif(sys.platform != "linux", reason="the BLAS is placed on Linux only")


def _modules() -> dict:
    """Dotted module name -> source file, for every module the wheel installs."""
    modules = {}
    for folder, package in PACKAGES.items():
        for path in folder.rglob("*.py"):
            parts = [p for p in path.relative_to(folder).with_suffix("").parts if p != "__init__"]
            modules[".".join([package, *parts])] = path
    return modules


def _imported(module: str, path: Path, node: ast.AST) -> list:
    """The dotted names an import statement may refer to (`from . import x` may name module x)."""
    if isinstance(node, ast.Import):
        return [alias.name for alias in node.names]
    base = module.split(".")
    if node.level:
        base = base[: len(base) - node.level + (path.name == "__init__.py")]
    target = ".".join(base + ([node.module] if node.module else []))
    return [target] + [f"{target}.{alias.name}" for alias in node.names]


def import_graph() -> dict:
    """Module -> the modules it imports anywhere (function bodies too). Imports of a package's
    __init__ are left out: every submodule implies its package, and __init__ is lazy."""
    modules = _modules()
    graph = {}
    for module, path in modules.items():
        targets = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                targets |= {t for t in _imported(module, path, node)
                            if t in modules and t != module and modules[t].name != "__init__.py"}
        graph[module] = targets
    return graph


def find_cycle(graph: dict) -> list:
    """One import circle as a list of modules, or [] (depth-first search)."""
    state, stack = {}, []

    def visit(module):
        state[module] = "open"
        stack.append(module)
        for target in sorted(graph[module]):
            if state.get(target) == "open":
                return stack[stack.index(target):] + [target]
            if target not in state and (cycle := visit(target)):
                return cycle
        state[module] = "done"
        stack.pop()
        return []

    for module in sorted(graph):
        if module not in state and (cycle := visit(module)):
            return cycle
    return []


def test_the_cycle_finder_finds_cycles():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) == []


def test_no_import_cycles():
    graph = import_graph()
    assert {"openelm_mlx.cli", "openelm_mlx.chat", "openelm_mlx.server", "openelm_mlx.convert.cli"} <= set(graph)
    assert "openelm_mlx.cli_args" in graph["openelm_mlx.chat"]  # function bodies are read too
    assert find_cycle(graph) == []


# ---------------------------------------------------------------------------- the BLAS


@pytest.fixture(scope="module")
def library(tmp_path_factory) -> str:
    """A loadable BLAS no process maps by itself: a copy of the reference BLAS mlx[cpu] ships."""
    bundled = sorted(Path(sysconfig.get_paths()["purelib"]).glob("mlx_cpu.libs/libblas*.so*"))
    if sys.platform != "linux" or not bundled:
        pytest.skip("needs mlx[cpu] on Linux")
    copy = tmp_path_factory.mktemp("blas") / "libopenelm_test_blas.so"
    copy.write_bytes(bundled[0].read_bytes())
    return str(copy)


def _run(code: str, library: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "OPENELM_MLX_BLAS": library}
    prelude = "import sys\ndef mapped(path): return path in open('/proc/self/maps').read()\n"
    proc = subprocess.run([sys.executable, "-c", prelude + code], capture_output=True, text=True, env=env,
                          timeout=120, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr
    return proc


@linux_only
def test_importing_the_package_loads_neither_mlx_nor_a_blas(library):
    proc = _run("import openelm_mlx, openelm_mlx.blas, openelm_mlx.errors, openelm_mlx.convert\n"
                f"print('mlx.core' in sys.modules, mapped({library!r}), openelm_mlx.__version__)\n", library)
    assert proc.stdout.split()[:2] == ["False", "False"]


@linux_only
def test_use_optimized_blas_before_mlx_loads_the_library(library):
    proc = _run("import openelm_mlx\n"
                "loaded = openelm_mlx.use_optimized_blas()\n"
                "import mlx.core as mx\n"
                "from openelm_mlx.blas import describe_blas\n"
                f"print(loaded == {library!r}, mapped({library!r}), {library!r} in describe_blas())\n", library)
    assert proc.stdout.split() == ["True", "True", "True"] and proc.stderr == ""


@linux_only
def test_use_optimized_blas_after_mlx_warns_and_changes_nothing(library):
    proc = _run("import mlx.core, warnings, openelm_mlx\n"
                "with warnings.catch_warnings(record=True) as caught:\n"
                "    warnings.simplefilter('always')\n"
                "    loaded = openelm_mlx.use_optimized_blas()\n"
                "(w,) = caught\n"
                f"print(loaded, mapped({library!r}), w.category.__name__)\n"
                "print(w.message)\n", library)
    first, message = proc.stdout.splitlines()
    assert first.split() == ["None", "False", "BLASWarning"]
    assert "after mlx.core was imported" in message and "before importing mlx" in message


@linux_only
def test_the_command_line_places_the_blas_before_mlx(library):
    """Both entry points: the console script's main and `python -m openelm_mlx.convert`."""
    for entry in ("from openelm_mlx.cli import main\nmain(['--version'])\n",
                  "import runpy\nsys.argv = ['convert', '--help']\n"
                  "runpy.run_module('openelm_mlx.convert', run_name='__main__')\n"):
        proc = _run("import atexit\n"
                    f"atexit.register(lambda: print('mapped', mapped({library!r}), 'mlx.core' in sys.modules))\n"
                    + entry, library)
        assert proc.stdout.splitlines()[-1] == "mapped True True", proc.stdout
        assert "warning" not in proc.stderr
