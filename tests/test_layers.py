"""Imports point down the layers: util/ (lowest) < models/ < datasets/ < the scripts.

util/ imports neither datasets/ nor models/; models/ does not import datasets/; neither imports
the scripts (main.py, engine.py, ...). Checked twice: in the source of every file (imports inside
functions included), and by importing every module of both folders in a fresh interpreter.
"""
import ast
import json
import os
import subprocess
import sys

import pytest

from tests.conftest import ROOT

SCRIPTS = {"main", "engine", "predict", "hubconf", "run_with_submitit", "benchmarks", "tools"}
FORBIDDEN = {"util": {"datasets", "models"} | SCRIPTS, "models": {"datasets"} | SCRIPTS}


def python_files(folder, root=ROOT):
    for directory, _, names in os.walk(os.path.join(root, folder)):
        yield from (os.path.join(directory, n) for n in sorted(names) if n.endswith(".py"))


def imported_modules(path, root=ROOT):
    """The absolute name of every module a file imports, relative imports resolved."""
    package = os.path.relpath(os.path.dirname(path), root).split(os.sep)
    with open(path) as f:
        tree = ast.parse(f.read(), path)
    for node in ast.walk(tree):  # every node: imports inside functions too
        if isinstance(node, ast.Import):
            yield from (alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = package[:len(package) - node.level + 1] if node.level else []
            if node.module:
                yield ".".join(base + [node.module])
            else:  # from . import name: the name may be a module
                yield from (".".join(base + [alias.name]) for alias in node.names)


def forbidden_in(path, folder, root=ROOT):
    return sorted({n for n in imported_modules(path, root) if n.split(".")[0] in FORBIDDEN[folder]})


@pytest.mark.parametrize("folder", sorted(FORBIDDEN))
def test_no_file_imports_a_higher_layer(folder):
    found = {os.path.relpath(path, ROOT): forbidden_in(path, folder) for path in python_files(folder)}
    assert {path: names for path, names in found.items() if names} == {}
    assert len(found) > 5


def test_the_check_finds_lazy_and_relative_imports(tmp_path):
    inner = tmp_path / "util" / "sub"
    inner.mkdir(parents=True)
    (inner / "x.py").write_text("import torch\nfrom . import y\n\n\ndef f():\n"
                                "    from datasets import coco\n    from ..misc import z\n")
    (tmp_path / "util" / "w.py").write_text("import util.misc\nimport models.detr as m\n")
    found = {os.path.relpath(p, tmp_path): forbidden_in(p, "util", root=tmp_path)
             for p in python_files("util", root=tmp_path)}
    assert found == {os.path.join("util", "sub", "x.py"): ["datasets"],
                     os.path.join("util", "w.py"): ["models.detr"]}
    assert sorted(imported_modules(str(inner / "x.py"), root=tmp_path)) == [
        "datasets", "torch", "util.misc", "util.sub.y"]


def test_importing_util_and_models_loads_no_higher_layer():
    modules = [os.path.relpath(p, ROOT)[:-3].replace(os.sep, ".").removesuffix(".__init__")
               for folder in FORBIDDEN for p in python_files(folder)]
    code = (f"import importlib, json, sys\nfor m in {modules!r}:\n    importlib.import_module(m)\n"
            f"print(json.dumps(sorted(sys.modules)))")
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr
    loaded = json.loads(result.stdout.splitlines()[-1])
    assert "models.detr" in loaded and "util.misc" in loaded
    assert [m for m in loaded if m.split(".")[0] in {"datasets"} | SCRIPTS] == []
