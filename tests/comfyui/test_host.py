"""The pack loads in the real ComfyUI and every node it declares is listed by the host."""

import json
import subprocess

# Imports the pack the way ComfyUI does (a package by file location, after cli_args
# has parsed --cpu) and prints the node ids it declares.
DECLARED_IDS_SCRIPT = """
import importlib.util, json, sys
pack_dir = sys.argv[1]
import comfy.options
comfy.options.enable_args_parsing()
sys.argv = ["main.py", "--cpu"]
spec = importlib.util.spec_from_file_location(
    "pack_under_test", pack_dir + "/__init__.py", submodule_search_locations=[pack_dir])
module = importlib.util.module_from_spec(spec)
sys.modules[spec.name] = module
spec.loader.exec_module(module)
print(json.dumps(sorted(getattr(module, "NODE_CLASS_MAPPINGS", None) or {})))
"""


def import_time_lines(log: str, pack_dir) -> list[str]:
    """The lines of the "Import times for custom nodes" block that name the pack."""
    block = log.split("Import times for custom nodes:", 1)[-1].split("\n\n", 1)[0]
    return [line for line in block.splitlines() if line.rstrip().endswith(str(pack_dir))]


def declared_node_ids(server) -> list[str]:
    result = subprocess.run(
        [server.python, "-c", DECLARED_IDS_SCRIPT, str(server.pack_dir)],
        cwd=server.host, capture_output=True, text=True, timeout=120,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


def test_pack_imports_without_failure(comfy_server):
    log = comfy_server.log_text()
    assert "Import times for custom nodes:" in log, comfy_server.log_tail()
    lines = import_time_lines(log, comfy_server.pack_dir)
    assert len(lines) == 1, f"pack not in the import times block:\n{comfy_server.log_tail()}"
    assert "IMPORT FAILED" not in lines[0], f"pack failed to import:\n{comfy_server.log_tail()}"


def test_every_declared_node_is_listed(comfy_server):
    declared = set(declared_node_ids(comfy_server))
    object_info = comfy_server.get("/object_info")
    listed = {node_id for node_id, info in object_info.items()
              if info.get("python_module") == f"custom_nodes.{comfy_server.pack_dir.name}"}
    # A declared id missing here was ignored by the host, e.g. it clashes with a built-in.
    assert declared - listed == set(), "declared but not listed by the host"
    assert listed == declared


def test_examples_are_in_the_template_browser(comfy_server):
    """Workflow -> Browse Templates lists the three graphs under the pack's folder name and serves each
    byte for byte as examples_workflows/ holds it (mirrored at load by nodes/templates.py)."""
    import urllib.request

    from host_helpers import EXAMPLES, WORKFLOWS

    pack = comfy_server.pack_dir.name
    listed = comfy_server.get("/workflow_templates")
    assert sorted(listed.get(pack, [])) == sorted(EXAMPLES), listed
    for name in EXAMPLES:
        with urllib.request.urlopen(f"{comfy_server.url}/api/workflow_templates/{pack}/{name}.json",
                                    timeout=30) as response:
            assert response.read() == (WORKFLOWS / f"{name}.json").read_bytes(), name
