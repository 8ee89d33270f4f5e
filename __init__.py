"""ComfyUI entry point: the pack's nodes, its web extension and its workflow templates.

ComfyUI imports this file as `custom_nodes/<folder>/__init__.py`; everything else is in
`nodes/` (thin adapters) and `training/` (the engine, usable without ComfyUI).
"""
from pathlib import Path

from .nodes import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS
from .nodes.host import register_model_folders
from .nodes.lora import install_bundled_embedding_note
from .nodes.templates import mirror_example_workflows

WEB_DIRECTORY = "./web"

register_model_folders()  # models/dino for Subject Fidelity's dino_folder
install_bundled_embedding_note()  # the core LoraLoader's line for a bundled embedding, made plain
mirror_example_workflows(Path(__file__).resolve().parent)

__all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS", "WEB_DIRECTORY"]
