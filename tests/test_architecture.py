"""ARCHITECTURE.md is the map of the code: it must list every module, and the engine's rules must hold."""
import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
MAP = ROOT / "ARCHITECTURE.md"
MAX_LINES = 500
HOST_MODULES = ("comfy", "folder_paths", "server", "nodes", "comfy_api", "comfy_execution")


def _modules() -> set[str]:
    found = set()
    for folder in ("training", "nodes"):
        for path in (ROOT / folder).rglob("*.py"):
            if "__pycache__" not in path.parts:
                found.add(path.relative_to(ROOT).as_posix())
    return found


def _listed() -> set[str]:
    return set(re.findall(r"`((?:training|nodes)/[\w/]+\.py)`", MAP.read_text()))


def test_every_module_is_on_the_map():
    missing = sorted(_modules() - _listed())
    assert not missing, f"ARCHITECTURE.md does not list: {missing}"


def test_the_map_names_no_module_that_is_gone():
    gone = sorted(_listed() - _modules())
    assert not gone, f"ARCHITECTURE.md lists modules that do not exist: {gone}"


def test_no_engine_module_over_the_limit():
    long = {p: n for p in _modules() if p.startswith("training/")
            if (n := len((ROOT / p).read_text().splitlines())) > MAX_LINES}
    assert not long, f"modules over {MAX_LINES} lines: {long}"


def test_the_engine_never_imports_the_host_or_the_nodes():
    offenders = []
    for rel in sorted(p for p in _modules() if p.startswith("training/")):
        tree = ast.parse((ROOT / rel).read_text())
        for node in ast.walk(tree):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            elif isinstance(node, ast.ImportFrom) and node.level >= 2:
                names = ["(relative import out of training/)"] if rel.count("/") < node.level else []
            offenders += [f"{rel}: {n}" for n in names if n.split(".")[0] in HOST_MODULES or n.startswith("(")]
    assert not offenders, offenders
