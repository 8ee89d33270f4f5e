"""Paths and loaders the tests share. (Not in conftest.py: tests/comfyui/ has a conftest module of its own,
so `from conftest import ...` would pick whichever one was imported first.)"""
import importlib.util
import sys
from pathlib import Path
from types import ModuleType

ROOT = Path(__file__).resolve().parent.parent
SUBJECT_PHOTOS = ROOT / "training" / "sample_data" / "subject"
OTHER_PEOPLE = ROOT / "tests" / "fixtures" / "other_people"
PACK = "pack_offline"  # the package name the pack is imported under: `from pack_offline.nodes import host`


def load_pack() -> ModuleType:
    """The pack's __init__.py imported as the package `pack_offline`, as ComfyUI imports a custom node
    folder but without ComfyUI; imported once per process."""
    if PACK not in sys.modules:
        spec = importlib.util.spec_from_file_location(PACK, ROOT / "__init__.py", submodule_search_locations=[str(ROOT)])
        module = importlib.util.module_from_spec(spec)
        sys.modules[PACK] = module
        try:
            spec.loader.exec_module(module)
        except BaseException:
            del sys.modules[PACK]
            raise
    return sys.modules[PACK]
