"""UI-format workflow (what the ComfyUI page saves) -> API-format prompt, by the rule of the
frontend's `graphToPrompt` (comfyui_frontend_package 1.27: the loop over widgets whose options.serialize is not false).

Pure Python; `object_info` is the server's /object_info. What is implemented:
- widget values are positional in `widgets_values`, in INPUT_TYPES order (required, then
  optional) of the inputs that are widgets (INT, FLOAT, STRING, BOOLEAN, combos; not
  `forceInput`); an INT with `control_after_generate` (or named seed / noise_seed without
  `control_after_generate: false`) is followed by its control value, which is not sent;
- a linked input becomes `[str(origin node id), origin slot]`, also over a widget's value;
- muted (mode 2) and bypassed (mode 4) nodes and frontend-only nodes (notes, reroutes) are
  left out, and so are links from nodes that are left out;
- `_meta.title` is the node's title, else the node type's display name.
Not implemented (our examples do not use them): group nodes, subgraphs, primitive nodes.
"""
from __future__ import annotations

WIDGET_TYPES = {"INT", "FLOAT", "STRING", "BOOLEAN", "COMBO"}
VIRTUAL_TYPES = {"Note", "MarkdownNote", "Reroute", "PrimitiveNode"}
SKIPPED_MODES = {2, 4}  # NEVER (muted), BYPASS


def ordered_inputs(info: dict) -> list[tuple[str, list]]:
    """(name, spec) of a node type's inputs in the frontend's order: required, then optional."""
    order = info.get("input_order") or {k: list(v) for k, v in info["input"].items()}
    out = []
    for section in ("required", "optional"):
        specs = info["input"].get(section, {})
        out += [(name, specs[name]) for name in order.get(section, []) if name in specs]
    return out


def is_widget(spec: list) -> bool:
    kind = spec[0]
    options = spec[1] if len(spec) > 1 and isinstance(spec[1], dict) else {}
    return (isinstance(kind, list) or kind in WIDGET_TYPES) and not options.get("forceInput")


def has_control_widget(name: str, spec: list) -> bool:
    options = spec[1] if len(spec) > 1 and isinstance(spec[1], dict) else {}
    if spec[0] != "INT":
        return bool(options.get("control_after_generate"))
    control = options.get("control_after_generate")
    return bool(control) if control is not None else name in ("seed", "noise_seed")


def widget_names(info: dict) -> list[tuple[str, bool]]:
    """(widget name, followed by a control value) in `widgets_values` order."""
    return [(name, has_control_widget(name, spec)) for name, spec in ordered_inputs(info) if is_widget(spec)]


def convert(workflow: dict, object_info: dict) -> dict:
    """The API prompt the frontend would queue for this UI workflow."""
    links = {link[0]: link for link in workflow.get("links", [])}
    output = {}
    for node in workflow["nodes"]:
        if node["type"] in VIRTUAL_TYPES or node.get("mode", 0) in SKIPPED_MODES:
            continue
        info = object_info[node["type"]]
        inputs = {}
        values = list(node.get("widgets_values") or [])
        position = 0
        for name, control in widget_names(info):
            if position >= len(values):
                raise ValueError(f"node {node['id']} ({node['type']}): widgets_values has no value for {name}")
            value = values[position]
            inputs[name] = {"__value__": value} if isinstance(value, list) else value
            position += 2 if control else 1
        if position != len(values):
            raise ValueError(f"node {node['id']} ({node['type']}): {len(values)} widgets_values for "
                             f"{position} widget slots")
        for slot in node.get("inputs") or []:
            if slot.get("link") is None:
                continue
            link = links[slot["link"]]
            inputs[slot["name"]] = [str(link[1]), int(link[2])]
        output[str(node["id"])] = {"inputs": inputs, "class_type": node["type"],
                                   "_meta": {"title": node.get("title") or info["display_name"]}}
    for entry in output.values():  # links from nodes that are not in the prompt are dropped
        for name, value in list(entry["inputs"].items()):
            if isinstance(value, list) and len(value) == 2 and value[0] not in output:
                del entry["inputs"][name]
    return output
