"""The pack in the real ComfyUI frontend, in headless Chromium: the example workflows load, convert
to their API twins and lay out cleanly once the frontend has sized their nodes, and the Train
Subject chart draws progress events.

Needs a `chromium` binary (Debian: apt-get install chromium) and websocket-client; without
them every test here is skipped with one printed line. Set SCREENSHOTS_DIR to keep the layout
screenshots (one per example, at scale 1) in a folder of your choice. Chromium is driven over the
DevTools protocol by tests/comfyui/cdp.py; one browser serves the whole module.
"""

import json
import os
import struct
import urllib.request
import zlib
from pathlib import Path

import pytest
from fixture_paths import load_pack

try:
    from cdp import Chromium, find_browser
except ImportError as error:  # websocket-client missing
    Chromium, find_browser, IMPORT_ERROR = None, None, f"{error.name} not installed (pip install -r requirements-dev.txt)"
else:
    IMPORT_ERROR = None

REPO_ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = sorted(path.stem for path in (REPO_ROOT / "examples_workflows").glob("*.json"))
EXTENSION = "dreambooth.subject.train"
TRAIN_NODE = "DreamBoothTrainSubject"
WIDGET = "dreambooth_training_chart"  # WIDGET_NAME in web/js/dreambooth_train.js
PROGRESS_EVENT = "dreambooth.train.progress"
FRONTEND_TIMEOUT_S = 60
BASE_MODEL = "v1-5-pruned-emaonly.safetensors"  # what the examples' checkpoint widgets name


def missing_browser_reason() -> str | None:
    if IMPORT_ERROR:
        return IMPORT_ERROR
    if not find_browser():
        return "no chromium binary found (apt-get install chromium)"
    return None


@pytest.fixture(scope="module")  # closed after this module: an open ComfyUI tab uses ~0.13 s of CPU every second
def page(request):
    reason = missing_browser_reason()
    if reason:  # checked before the server starts: no browser, no wait
        say_once(request.config, f"tests/comfyui/test_browser.py skipped: {reason}")
        pytest.skip(reason)
    comfy_server = request.getfixturevalue("comfy_server")
    give_the_examples_their_base_model(comfy_server.base_dir)
    # A fresh user would get the template browser over the canvas; mark the tutorial as seen.
    post_json(comfy_server.url + "/settings/Comfy.TutorialCompleted", True)
    with Chromium(find_browser(), width=1400, height=1200) as browser:  # room for the whole node
        tab = browser.page()
        tab.navigate(comfy_server.url)
        tab.wait_for(f"""window.comfyAPI?.app?.app?.graph
                     && comfyAPI.app.app.extensions.some(e => e.name === "{EXTENSION}")
                     && !!LiteGraph.registered_node_types["{TRAIN_NODE}"]""", timeout=FRONTEND_TIMEOUT_S)
        # The frontend restores its default graph once it is up; a graph loaded before that is replaced.
        tab.wait_for("comfyAPI.app.app.graph.nodes.length > 0", timeout=FRONTEND_TIMEOUT_S)
        # The frontend's own missing-node detection reports through this extension hook.
        tab.evaluate("""(() => {
            const app = comfyAPI.app.app;
            window.app = app;
            window.api = comfyAPI.api.api;
            app.registerExtension({name: "pytest.probe", afterConfigureGraph(missing) {
                window.pytestMissingNodeTypes = missing.map(m => typeof m === "string" ? m : m.type);
            }});
        })()""")
        yield tab
        tab.close()


def give_the_examples_their_base_model(base_dir: Path) -> None:
    """The checkpoint the examples name, as a real user has it: newer frontends mark a node red when
    the model file its widget names is not installed. An empty (valid) safetensors file is enough:
    the browser tests list it, nothing here loads it."""
    path = base_dir / "models" / "checkpoints" / BASE_MODEL
    if not path.exists():
        header = b'{"__metadata__":{"note":"test stand-in"}}'
        header += b" " * (-len(header) % 8)
        path.write_bytes(struct.pack("<Q", len(header)) + header)


def say_once(config, line: str) -> None:
    """A line on the terminal from inside a fixture, where pytest captures output."""
    reporter = config.pluginmanager.get_plugin("terminalreporter")
    capture = config.pluginmanager.get_plugin("capturemanager")
    if reporter is None or capture is None:
        print(line)
        return
    with capture.global_and_fixture_disabled():
        reporter.write_line(line)


def post_json(url: str, value) -> None:
    request = urllib.request.Request(url, data=json.dumps(value).encode(),
                                     headers={"Content-Type": "application/json"})
    urllib.request.urlopen(request, timeout=10).close()


def load_in_frontend(page, workflow: dict) -> dict:
    """Loads a UI workflow with app.loadGraphData; returns what the frontend made of it."""
    return page.evaluate(f"""(async () => {{
        window.pytestMissingNodeTypes = null;
        await app.loadGraphData({json.dumps(workflow)});
        const graph = app.graph;
        const links = graph.links instanceof Map ? [...graph.links.values()] : Object.values(graph.links ?? {{}});
        const dangling = links.filter(l => {{
            const origin = graph.getNodeById(l.origin_id), target = graph.getNodeById(l.target_id);
            return !origin || !target || target.inputs?.[l.target_slot]?.link !== l.id
                || !(origin.outputs?.[l.origin_slot]?.links ?? []).includes(l.id);
        }}).map(l => l.id);
        return {{
            nodes: graph.nodes.length,
            links: links.length,
            unregistered: graph.nodes.filter(n => !(n.type in LiteGraph.registered_node_types)).map(n => n.type),
            with_errors: graph.nodes.filter(n => n.has_errors).map(n => n.type),
            missing: window.pytestMissingNodeTypes,
            dangling,
            prompt: (await app.graphToPrompt()).output,
        }};
    }})()""")


def read_example(name: str, api: bool = False) -> dict:
    folder = REPO_ROOT / "examples_workflows" / ("api" if api else "")
    return json.loads((folder / f"{name}.json").read_text())


def test_extension_loads_without_errors(page, comfy_server):
    listed = comfy_server.get("/extensions")
    assert "/extensions/comfyui-dreambooth-subject/js/dreambooth_train.js" in listed
    assert page.evaluate(f'app.extensions.some(e => e.name === "{EXTENSION}")')
    errors = [e for e in page.errors if "dreambooth" in e.lower()]
    assert errors == []


@pytest.mark.parametrize("name", EXAMPLES)
def test_example_loads_and_queues_its_api_twin(page, name):
    workflow = read_example(name)
    loaded = load_in_frontend(page, workflow)
    assert loaded["missing"] == [], "the frontend reports missing node types"
    assert loaded["unregistered"] == [] and loaded["with_errors"] == []
    assert loaded["dangling"] == []
    assert (loaded["nodes"], loaded["links"]) == (len(workflow["nodes"]), len(workflow["links"]))
    twin = read_example(name, api=True)
    prompt = loaded["prompt"]
    assert sorted(prompt, key=int) == sorted(twin, key=int), "node ids in the frontend's prompt vs the twin"
    differences = {node_id: {"frontend": prompt[node_id], "twin": twin[node_id]}
                   for node_id in prompt if prompt[node_id] != twin[node_id]}
    assert differences == {}, json.dumps(differences, indent=1)[:4000]


# ------------------------------------------------------------------ layout

def sized_layout(page, workflow: dict, output_dir: Path) -> dict:
    """The graph as the frontend laid it out: loaded, every Train Subject showing a run with validation
    images (its tallest state), and drawn until widgets and DOM widgets have sized their nodes.
    Boxes are [x, y, width, height] in graph units; a node's box includes its title bar and the badges
    drawn above it (e.g. the pack's name)."""
    folder = output_dir / "dreambooth" / "runs" / "pytest_layout" / "validation"
    folder.mkdir(parents=True, exist_ok=True)
    images = []
    for scene, rgb in SCENES.items():
        write_png(folder / f"step1_{scene}.png", rgb)
        images.append({"filename": f"step1_{scene}.png", "subfolder": "dreambooth/runs/pytest_layout/validation",
                       "type": "output"})
    return page.evaluate(f"""(async () => {{
        await app.loadGraphData({json.dumps(workflow)});
        const frame = () => new Promise(r => requestAnimationFrame(() => requestAnimationFrame(r)));
        for (const node of app.graph.nodes) {{
            node.dreamboothTraining?.update({{node: String(node.id), step: 1, total: 2, loss: 0.1, lr: 1e-4,
                                              images: {json.dumps(images)}}});
        }}
        for (let i = 0; i < 3; i++) {{ app.canvas.draw(true, true); await frame(); }}
        const title = LiteGraph.NODE_TITLE_HEIGHT;
        const ctx = app.canvas.ctx ?? app.canvasEl.getContext("2d");
        return {{
            nodes: app.graph.nodes.map(n => {{
                const badges = (n.badges ?? []).map(b => typeof b === "function" ? b() : b)
                    .filter(b => b.text?.trim() || b.icon);  // an empty badge is not drawn
                const above = title + (badges.length ? Math.max(...badges.map(b => b.height ?? 0)) + 2 : 0);
                return {{id: n.id, title: n.title, box: [n.pos[0], n.pos[1] - above, n.size[0], n.size[1] + above]}};
            }}),
            groups: app.graph.groups.map(g => {{
                const [x, y, width, height] = g._bounding ?? [...g.pos, ...g.size];
                const fontSize = g.font_size ?? LiteGraph.DEFAULT_GROUP_FONT_SIZE ?? 24;
                ctx.save();
                ctx.font = `${{fontSize}}px ${{LiteGraph.GROUP_FONT ?? "Arial"}}`;
                const textWidth = ctx.measureText(g.title).width;
                ctx.restore();
                const titleHeight = g.titleHeight ?? title;
                return {{title: g.title, box: [x, y, width, height], titleHeight,
                         titleText: [x + 4, y, textWidth + 8, titleHeight]}};
            }}),
        }};
    }})()""")


def overlap(a, b) -> bool:
    return a[0] < b[0] + b[2] and b[0] < a[0] + a[2] and a[1] < b[1] + b[3] and b[1] < a[1] + a[3]


def inside(inner, outer) -> bool:
    return (outer[0] <= inner[0] and inner[0] + inner[2] <= outer[0] + outer[2]
            and outer[1] <= inner[1] and inner[1] + inner[3] <= outer[1] + outer[3])


def layout_problems(workflow: dict, layout: dict) -> list[str]:
    """Overlapping nodes, nodes outside their group (the group the saved file places them in),
    group titles running into another group."""
    def group_of(node):
        x, y = node["pos"]
        return next((g["title"] for g in workflow["groups"] if inside([x, y, 0, 0], g["bounding"])), None)

    groups = {g["title"]: g for g in layout["groups"]}
    saved = {str(node["id"]): node for node in workflow["nodes"]}
    problems = []
    nodes = layout["nodes"]
    for i, a in enumerate(nodes):
        for b in nodes[i + 1:]:
            if overlap(a["box"], b["box"]):
                problems.append(f"'{a['title']}' {fmt(a['box'])} overlaps '{b['title']}' {fmt(b['box'])}")
        home = group_of(saved[str(a["id"])])
        if home is None:
            clashes = [g["title"] for g in layout["groups"] if overlap(a["box"], g["box"])]
            if clashes:
                problems.append(f"'{a['title']}' {fmt(a['box'])} is in no group but overlaps {clashes}")
            continue
        x, y, width, height = groups[home]["box"]
        body = [x, y + groups[home]["titleHeight"], width, height - groups[home]["titleHeight"]]
        if not inside(a["box"], body):
            problems.append(f"'{a['title']}' {fmt(a['box'])} leaves its group '{home}' {fmt(body)}")
    for g in layout["groups"]:
        for other in layout["groups"]:
            if other is not g and overlap(g["titleText"], other["box"]):
                problems.append(f"the title of '{g['title']}' {fmt(g['titleText'])} runs into '{other['title']}'")
    return problems


def fmt(box) -> str:
    return "[" + ", ".join(f"{v:.0f}" for v in box) + "]"


def screenshot_graph(page, path: Path, layout: dict) -> None:
    """The whole graph at scale 1 (full detail: widgets and labels drawn), in a viewport made to fit it."""
    boxes = [n["box"] for n in layout["nodes"]] + [g["box"] for g in layout["groups"]]
    left, top = min(b[0] for b in boxes) - 20, min(b[1] for b in boxes) - 20
    width = int(max(b[0] + b[2] for b in boxes) - left + 20)
    height = int(max(b[1] + b[3] for b in boxes) - top + 20)
    page.send("Emulation.setDeviceMetricsOverride", width=width + 200, height=height + 200,
              deviceScaleFactor=1, mobile=False)
    try:
        origin = page.evaluate(f"""(async () => {{
            await new Promise(r => setTimeout(r, 300));  // the canvas follows the window's resize
            const rect = app.canvasEl.getBoundingClientRect();
            app.canvas.ds.scale = 1;
            app.canvas.ds.offset = [{-left} + 100, {-top} + 100 - rect.top];
            app.canvas.setDirty(true, true);
            app.canvas.draw(true, true);
            await new Promise(r => requestAnimationFrame(() => requestAnimationFrame(r)));
            return [rect.left + 100, 100];
        }})()""")
        page.screenshot(path, clip={"x": origin[0], "y": origin[1], "width": width, "height": height})
    finally:
        page.send("Emulation.clearDeviceMetricsOverride")


@pytest.mark.parametrize("name", EXAMPLES)
def test_example_lays_out_without_overlaps(page, name, comfy_server, tmp_path_factory):
    """After the frontend has sized every node (widgets, the training chart with validation images),
    no two nodes overlap, every node stays inside its group and no group title runs into another group."""
    workflow = read_example(name)
    layout = sized_layout(page, workflow, comfy_server.base_dir / "output")
    folder = Path(os.environ["SCREENSHOTS_DIR"]) if os.environ.get("SCREENSHOTS_DIR") else tmp_path_factory.mktemp("layout")
    folder.mkdir(parents=True, exist_ok=True)
    shot = folder / f"{name}.png"
    screenshot_graph(page, shot, layout)
    problems = layout_problems(workflow, layout)
    assert problems == [], f"{len(problems)} layout problems (see {shot}):\n" + "\n".join(problems)


# ------------------------------------------------------------------ live chart

TOTAL = 200
LAST_STEP = 120
VALIDATION_STEP = 100
SCENES = {"forest": (40, 110, 50), "desert": (215, 180, 110), "mountains": (90, 110, 160)}


def progress(node_id: str, step: int, images=()) -> dict:
    """A plausible event: noisy loss drifting down, lr with warmup then cosine decay."""
    import math

    warmup = 20
    lr = 1e-4 * (step / warmup if step <= warmup else 0.5 * (1 + math.cos(math.pi * (step - warmup) / (TOTAL - warmup))))
    noise = (math.sin(step * 12.9898) * 43758.5453) % 1.0  # a fixed pseudo-random sequence in [0, 1)
    loss = 0.08 + 0.1 * math.exp(-step / 60) + 0.05 * noise
    return {"node": node_id, "step": step, "total": TOTAL, "loss": loss, "lr": lr, "it_per_s": 3.4,
            "eta_s": (TOTAL - step) / 3.4, "images": list(images)}


def write_png(path: Path, rgb, size=(64, 64)) -> None:
    """A flat-color PNG, without an imaging library."""
    width, height = size
    raw = b"".join(b"\x00" + bytes(rgb) * width for _ in range(height))

    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(raw))
                     + chunk(b"IEND", b""))


def dispatch(page, events: list[dict]) -> None:
    """Delivers events as if the server had sent them: a message on the frontend's own websocket,
    {"type", "data"} as PromptServer.send_sync writes it, then waits for the chart's next frame."""
    page.evaluate(f"""(async () => {{
        for (const data of {json.dumps(events)}) {{
            const message = JSON.stringify({{type: "{PROGRESS_EVENT}", data}});
            api.socket.dispatchEvent(new MessageEvent("message", {{data: message}}));
        }}
        await new Promise(r => requestAnimationFrame(() => requestAnimationFrame(r)));
    }})()""")


@pytest.fixture(scope="module")
def train_node(page, comfy_server):
    """A fresh graph with one Train Subject node at scale 1, fed LAST_STEP progress events."""
    folder = comfy_server.base_dir / "output" / "dreambooth" / "runs" / "pytest" / "validation"
    folder.mkdir(parents=True, exist_ok=True)
    images = []
    for scene, rgb in SCENES.items():
        write_png(folder / f"step{VALIDATION_STEP}_{scene}.png", rgb)
        images.append({"filename": f"step{VALIDATION_STEP}_{scene}.png",
                       "subfolder": "dreambooth/runs/pytest/validation", "type": "output"})
    node_id = page.evaluate(f"""(async () => {{
        await app.loadGraphData({{last_node_id: 0, last_link_id: 0, nodes: [], links: [], groups: [],
                                  config: {{}}, extra: {{ds: {{offset: [0, 0], scale: 1}}}}, version: 0.4}});
        const node = LiteGraph.createNode("{TRAIN_NODE}");
        node.pos = [100, 140];  // clear of the tab bar and the side bar
        app.graph.add(node);
        node.setSize([460, node.computeSize()[1]]);
        app.canvas.setDirty(true, true);
        return String(node.id);
    }})()""")
    events = [progress(node_id, step, images if step == VALIDATION_STEP else ())
              for step in range(1, LAST_STEP + 1)]
    dispatch(page, events)
    page.wait_for(f"""(() => {{
        const imgs = [...app.graph.getNodeById({node_id}).widgets.find(w => w.name === "{WIDGET}")
                      .element.querySelectorAll("img")];
        return imgs.length > 0 && imgs.every(i => i.complete);
    }})()""", timeout=20)
    page.evaluate("new Promise(r => requestAnimationFrame(() => requestAnimationFrame(r)))")
    return node_id


def chart_state(page, node_id: str) -> dict:
    return page.evaluate(f"""(async () => {{
        const chart = await import(new URL("/extensions/comfyui-dreambooth-subject/js/loss_chart.js", location.href));
        const node = app.graph.getNodeById({node_id});
        const widget = node.widgets.find(w => w.name === "{WIDGET}");
        const canvas = widget.element.querySelector("canvas");
        const dpr = window.devicePixelRatio || 1;
        const area = canvas.plotArea ?? chart.plotArea(canvas.clientWidth, canvas.clientHeight);  // as last drawn
        const ctx = canvas.getContext("2d");
        const pixels = ctx.getImageData(Math.round(area.x * dpr) + 2, Math.round(area.y * dpr) + 2,
                                        Math.round(area.width * dpr) - 4, Math.round(area.height * dpr) - 4).data;
        const background = ctx.getImageData(1, 1, 1, 1).data;  // the chart's corner: background only
        const hex = c => [1, 3, 5].map(i => parseInt(c.slice(i, i + 2), 16));
        const near = (i, rgb) => Math.abs(pixels[i] - rgb[0]) + Math.abs(pixels[i + 1] - rgb[1])
                                 + Math.abs(pixels[i + 2] - rgb[2]) < 60;
        const counts = {{drawn: 0, average: 0, lr: 0, identity: 0, identityLoss: 0}};
        for (let i = 0; i < pixels.length; i += 4) {{
            if (!near(i, background)) counts.drawn++;
            if (near(i, hex(chart.COLORS.average))) counts.average++;
            if (near(i, hex(chart.COLORS.lr))) counts.lr++;
            if (near(i, hex(chart.IDENTITY_COLOR))) counts.identity++;
            if (near(i, hex(chart.IDENTITY_LOSS_COLOR))) counts.identityLoss++;
        }}
        const rect = widget.element.getBoundingClientRect();
        const title = LiteGraph.NODE_TITLE_HEIGHT, s = app.canvas.ds.scale, o = app.canvas.ds.offset;
        const canvasRect = app.canvasEl.getBoundingClientRect();
        const {{prompt, workflowNode}} = await app.graphToPrompt().then(p => ({{
            prompt: p.output[{node_id}], workflowNode: p.workflow.nodes.find(n => String(n.id) === "{node_id}")}}));
        return {{
            counts,
            legend: widget.pytestDrawnTexts ?? null,
            plotPixels: pixels.length / 4,
            text: widget.element.textContent,
            images: [...widget.element.querySelectorAll("img")].map(i => ({{src: i.getAttribute("src"), width: i.naturalWidth}})),
            visible: document.body.contains(widget.element) && rect.width > 100 && rect.height > 100,
            promptInputs: Object.keys(prompt.inputs),
            widgetsValues: workflowNode.widgets_values.length,
            nodeClip: {{x: Math.max(0, canvasRect.left + (node.pos[0] + o[0]) * s - 10),
                        y: Math.max(0, canvasRect.top + (node.pos[1] - title + o[1]) * s - 10),
                        width: node.size[0] * s + 20, height: (node.size[1] + title) * s + 20}},
        }};
    }})()""")


def test_chart_draws_progress_events(page, train_node, tmp_path_factory):
    state = chart_state(page, train_node)
    shots = tmp_path_factory.mktemp("browser")
    page.screenshot(shots / "train_node.png", clip=state["nodeClip"])
    page.screenshot(shots / "page.png")
    assert state["visible"], "the chart widget is not on screen"
    counts, area = state["counts"], state["plotPixels"]
    assert counts["drawn"] > 0.01 * area, f"plot area nearly empty: {counts} of {area} px (see {shots})"
    assert counts["average"] > 100 and counts["lr"] > 100, f"a line is missing: {counts} (see {shots})"
    assert f"step {LAST_STEP} / {TOTAL}" in state["text"]
    assert "3.4 it/s" in state["text"] and "ETA" in state["text"]
    assert f"validation images, step {VALIDATION_STEP}" in state["text"]
    assert len(state["images"]) == len(SCENES)
    assert all(image["width"] == 64 for image in state["images"]), state["images"]  # served by /view


def test_chart_widget_stays_out_of_prompt_and_workflow(page, train_node, comfy_server):
    state = chart_state(page, train_node)
    assert WIDGET not in state["promptInputs"]
    info = comfy_server.get("/object_info")[TRAIN_NODE]["input"]
    declared = {**info["required"], **info.get("optional", {})}
    links = {"SUBJECT_DATASET", "CLASS_IMAGES"}  # this node's socket-only inputs
    widget_inputs = [name for name, spec in declared.items() if not (isinstance(spec[0], str) and spec[0] in links)]
    assert state["widgetsValues"] == len(widget_inputs)


def test_chart_restarts_when_a_run_resumes(page, train_node):
    dispatch(page, [progress(train_node, 50), progress(train_node, 51)])
    state = chart_state(page, train_node)
    assert f"step 51 / {TOTAL}" in state["text"]
    assert state["images"] == [], "images of the previous run are still shown"
    series = page.evaluate(f"app.graph.getNodeById({train_node}).dreamboothTraining.series.steps")
    assert series == [50, 51]


def test_events_for_other_nodes_are_ignored(page, train_node):
    before = page.evaluate(f"app.graph.getNodeById({train_node}).dreamboothTraining.series.steps.length")
    dispatch(page, [progress("999", 1), progress("77:5", 2), {"step": 3}])
    after = page.evaluate(f"app.graph.getNodeById({train_node}).dreamboothTraining.series.steps.length")
    assert after == before
    assert [e for e in page.errors if "dreambooth" in e.lower()] == []


# ------------------------------------------------------------------ the identity line, from the node's own events

VALIDATE_EVERY = 20  # validation_every of the run the identity events stand for
IDENTITY_EVERY = 4  # identity_every: the identity loss term on every 4th step


def node_events(node_id: str, steps: int, with_identity: bool) -> list[dict]:
    """The websocket payloads nodes/train.py's TrainingWatch sends for the trainer's Progress events: the node's
    own code builds them (its send_event is recorded here, where no PromptServer runs; the progress bar is
    ComfyUI's and is left out), so a renamed key fails this test. Validated steps carry StepScores.row() and
    the loss steps the identity term, as training/train.py adds them to the event's info."""
    load_pack()
    from pack_offline.nodes import train as node
    from pack_offline.training.identity import StepScores
    from pack_offline.training.progress import Progress

    sent = []
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(node, "send_event", lambda name, data: sent.append((name, data)))
        patch.setattr(node, "HostProgress", lambda node_id: lambda event: None)
        watch = node.TrainingWatch(node_id)
        for step in range(1, steps + 1):
            plain = progress(node_id, step)
            info = {k: plain[k] for k in ("loss", "lr", "it_per_s", "eta_s")}
            if with_identity and step % IDENTITY_EVERY == 1:
                info["identity_loss"] = 0.02 + 0.01 * (step % 3)
            if with_identity and step % VALIDATE_EVERY == 0:
                info |= StepScores(step, identity=0.9 - 0.4 * step / steps, presence=1.0).row()
            watch(Progress("train", step, TOTAL, info))
    assert node.PROGRESS_EVENT == PROGRESS_EVENT and {name for name, _ in sent} == {PROGRESS_EVENT}
    return [data for _, data in sent]


@pytest.fixture(scope="module")
def second_node(page, train_node):
    """A second Train Subject beside train_node (which keeps its series); its chart records the texts it draws."""
    node_id = page.evaluate(f"""(() => {{
        const node = LiteGraph.createNode("{TRAIN_NODE}");
        node.pos = [620, 140];
        app.graph.add(node);
        node.setSize([420, node.computeSize()[1]]);  // the example workflows' width
        app.canvas.setDirty(true, true);
        return String(node.id);
    }})()""")
    page.wait_for(f"""(() => {{
        const widget = app.graph.getNodeById({node_id}).widgets.find(w => w.name === "{WIDGET}");
        const canvas = widget.element.querySelector("canvas");
        if (!canvas || !canvas.clientWidth) return false;
        const ctx = canvas.getContext("2d"), fillText = ctx.fillText.bind(ctx);
        widget.pytestDrawnTexts = [];
        ctx.fillText = (text, x, ...rest) => {{  // where it lands too: a legend entry past the edge is not seen
            widget.pytestDrawnTexts.push({{text: String(text), x, width: ctx.measureText(text).width,
                                          align: ctx.textAlign, canvasWidth: canvas.clientWidth}});
            return fillText(text, x, ...rest);
        }};
        return true;
    }})()""", timeout=20)
    return node_id


def run_on_chart(page, node_id: str, events: list[dict]) -> dict:
    """A new run's events (the series restarts at step 1), then the chart and its texts as drawn once more
    from the final series."""
    dispatch(page, events)
    page.evaluate(f"""(async () => {{
        const node = app.graph.getNodeById({node_id});
        node.widgets.find(w => w.name === "{WIDGET}").pytestDrawnTexts = [];
        node.dreamboothTraining.scheduleDraw();
        await new Promise(r => requestAnimationFrame(() => requestAnimationFrame(r)));
    }})()""")
    return chart_state(page, node_id)


@pytest.mark.parametrize("with_identity", [True, False], ids=["with identity", "without"])
def test_chart_draws_the_identity_line_only_from_events_that_carry_it(page, train_node, second_node, with_identity,
                                                                      tmp_path_factory):
    first_series = f"app.graph.getNodeById({train_node}).dreamboothTraining.series.steps"
    before = page.evaluate(first_series)
    events = node_events(second_node, LAST_STEP, with_identity)
    assert any(e["identity"] is not None for e in events) == with_identity
    state = run_on_chart(page, second_node, events)
    shot = tmp_path_factory.mktemp("identity") / "second_node.png"
    page.screenshot(shot, clip=state["nodeClip"])
    counts, legend = state["counts"], [drawn["text"] for drawn in state["legend"]]
    print(f"{'with' if with_identity else 'without'} identity: {counts} of {state['plotPixels']} px; legend {legend}")
    assert state["visible"] and f"step {LAST_STEP} / {TOTAL}" in state["text"]
    assert counts["average"] > 100, f"the chart was not drawn: {counts} (see {shot})"
    if with_identity:
        assert counts["identity"] > 100, f"no identity line: {counts} (see {shot})"
        assert counts["identityLoss"] > 50, f"no identity term: {counts} (see {shot})"
        assert "identity distance (0-1)" in legend and "identity term" in legend, legend
        cut = [d for d in state["legend"] if d["align"] == "left" and (d["x"] < 0 or d["x"] + d["width"] > d["canvasWidth"])]
        assert not cut, f"legend entries past the chart's edge: {cut} (see {shot})"
        assert f"identity 0.500 (step {LAST_STEP})" in state["text"]
    else:
        assert counts["identity"] == 0 and counts["identityLoss"] == 0, f"{counts} (see {shot})"
        assert "loss" in legend and not [text for text in legend if "identity" in text], legend
        assert "identity" not in state["text"]
    assert page.evaluate(first_series) == before, "the events for the second node reached the first"
