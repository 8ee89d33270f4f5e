"""ComfyUI entry point: the pack's nodes and its web extension.

ComfyUI imports this file as `custom_nodes/<folder>/__init__.py`; everything else is in
`nodes/` (thin adapters) and `training/` (the engine, usable without ComfyUI).
"""
from .nodes import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS

WEB_DIRECTORY = "./web"

__all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS", "WEB_DIRECTORY"]
