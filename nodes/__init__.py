"""The pack's ComfyUI nodes: thin adapters over `training/`. One module per concern."""
NODE_CLASS_MAPPINGS: dict = {}
NODE_DISPLAY_NAME_MAPPINGS: dict = {}
