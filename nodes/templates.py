"""The example graphs in ComfyUI's template browser (Workflow -> Browse Templates).

ComfyUI lists a pack's templates from a folder named `example_workflows` (app/custom_node_manager.py),
and serves it from a route it adds after the packs are loaded. Our graphs live in `examples_workflows/`
(the documented place, with the API twins in `api/`); at load we mirror its UI files into a git-ignored
`example_workflows/`, so there is one copy to edit and no symlink (which Windows checkouts lack).
"""
from __future__ import annotations

import logging
import os
from pathlib import Path

SOURCE_FOLDER = "examples_workflows"
TEMPLATE_FOLDER = "example_workflows"  # the name ComfyUI looks for


def mirror_example_workflows(pack_dir: Path) -> list[str]:
    """Copy `examples_workflows/*.json` to `example_workflows/` where missing or changed and drop files
    no longer in the source; returns the template names. A read-only pack folder only loses the listing."""
    source, target = Path(pack_dir) / SOURCE_FOLDER, Path(pack_dir) / TEMPLATE_FOLDER
    files = {path.name: path.read_bytes() for path in sorted(source.glob("*.json"))}
    try:
        target.mkdir(exist_ok=True)
        for stale in target.glob("*.json"):
            if stale.name not in files:
                stale.unlink()
        for name, data in files.items():
            path = target / name
            if not path.is_file() or path.read_bytes() != data:
                partial = path.with_name(f".{name}.tmp")
                partial.write_bytes(data)
                os.replace(partial, path)
    except OSError as exc:
        logging.warning("[dreambooth] the example workflows are not in the template browser: cannot write %s (%s)",
                        target, exc.strerror or exc)
        return []
    return [Path(name).stem for name in files]
