"""The web extension without a browser: every web/js file parses, and the chart's data
(web/js/train_progress.js, no DOM) behaves, run by Node. Skipped when `node` is missing;
tests/comfyui/test_browser.py checks the drawing in the real frontend."""

import json
import shutil
import subprocess
from pathlib import Path

import pytest

WEB_JS = Path(__file__).resolve().parents[1] / "web" / "js"
NODE = shutil.which("node")

pytestmark = pytest.mark.skipif(NODE is None, reason="node not found: the web/js checks need Node.js")


@pytest.fixture(scope="module")
def modules(tmp_path_factory) -> Path:
    """web/js copied next to a package.json that makes Node read .js files as ES modules, as browsers do."""
    folder = tmp_path_factory.mktemp("web_js")
    for path in WEB_JS.glob("*.js"):
        shutil.copy(path, folder / path.name)
    (folder / "package.json").write_text('{"type": "module"}')
    return folder


def run_node(folder: Path, script: str):
    """Runs an ES-module script in `folder` and returns the JSON it prints."""
    result = subprocess.run([NODE, "--input-type=module", "-e", script], cwd=folder,
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def test_web_js_files_exist():
    assert (WEB_JS / "dreambooth_train.js").is_file()


@pytest.mark.parametrize("name", sorted(path.name for path in WEB_JS.glob("*.js")))
def test_file_parses(modules, name):
    result = subprocess.run([NODE, "--check", str(modules / name)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr


def test_extension_imports_the_frontend_from_the_site_root():
    # The file is served at /extensions/<pack>/js/, so the site root is three levels up.
    source = (WEB_JS / "dreambooth_train.js").read_text()
    assert 'from "../../../scripts/app.js"' in source and 'from "../../../scripts/api.js"' in source


SERIES_SCRIPT = """
import { TrainingSeries, AVERAGE_WINDOW, formatStatus } from "./train_progress.js";
const s = new TrainingSeries();
const event = (step, extra = {}) => ({node: "5", step, total: 800, loss: step % 2 ? 0.2 : 0.1, lr: 1e-4,
                                      it_per_s: 3.4, eta_s: 180, images: [], ...extra});
const out = {};
for (let step = 1; step <= 40; step++) s.add(event(step, step === 30 ? {images: [{filename: "a.png"}]} : {}));
out.steps = s.steps.length;
out.lastAverage = s.average[s.average.length - 1];
out.window = AVERAGE_WINDOW;
out.imagesStep = s.imagesStep;
out.status = formatStatus(s);
s.add(event(41, {loss: null}));
out.nullLoss = [Number.isNaN(s.loss[s.loss.length - 1]), s.average[s.average.length - 1]];
out.restartedOnResume = s.add(event(25));
out.afterResume = [s.steps, s.images.length];
out.restartedOnNewTotal = s.add(event(26, {total: 100}));
s.add(event(100, {total: 100, it_per_s: 0.4, eta_s: 0}));
out.done = formatStatus(s);
out.empty = formatStatus(new TrainingSeries());
console.log(JSON.stringify(out));
"""


def test_series_keeps_one_run_and_its_trailing_mean(modules):
    out = run_node(modules, SERIES_SCRIPT)
    assert out["steps"] == 40
    assert out["window"] == 20
    assert out["lastAverage"] == pytest.approx(0.15)  # 10 steps of 0.2 and 10 of 0.1
    assert out["imagesStep"] == 30  # kept while later steps bring no images
    assert out["status"] == "step 40 / 800 · 3.4 it/s · ETA 3 min · loss 0.1000"
    assert out["nullLoss"] == [True, pytest.approx(0.15)]  # a missing loss is a gap, not a zero
    assert out["restartedOnResume"] is True
    assert out["afterResume"] == [[25], 0]  # a resumed run shows from the step it resumed at
    assert out["restartedOnNewTotal"] is True
    assert out["done"] == "step 100 / 100 · 2.5 s/it · done · loss 0.1000"
    assert out["empty"].startswith("Queue the prompt")


def test_durations_read_as_a_person_would_say_them(modules):
    out = run_node(modules, """
        import { formatDuration } from "./train_progress.js";
        console.log(JSON.stringify([0, 42.4, 59.6, 180, 3599, 3600, 3 * 3600 + 5 * 60].map(formatDuration)));
    """)
    assert out == ["0 s", "42 s", "1 min", "3 min", "1 h 00 min", "1 h 00 min", "3 h 05 min"]


def test_chart_module_loads_outside_a_browser(modules):
    out = run_node(modules, """
        import { plotArea, COLORS } from "./loss_chart.js";
        console.log(JSON.stringify({area: plotArea(400, 200), colors: Object.keys(COLORS)}));
    """)
    area = out["area"]
    assert 0 < area["width"] < 400 and 0 < area["height"] < 200
    assert out["colors"] == ["loss", "average", "lr"]


IDENTITY_SCRIPT = """
import { TrainingSeries, formatStatus } from "./train_progress.js";
import { drawChart, IDENTITY_COLOR } from "./loss_chart.js";
// A canvas stand-in that records the color of every filled arc (the identity dots).
globalThis.window = { devicePixelRatio: 1 };
globalThis.getComputedStyle = () => ({ getPropertyValue: () => "" });
function fakeCanvas() {
  const dots = [];
  const ctx = new Proxy({ fillStyle: "", strokeStyle: "" }, {
    get(target, name) {
      if (name in target) return target[name];
      if (name === "measureText") return () => ({ width: 10 });
      if (name === "arc") return (x, y) => target._arcs.push([x, y]);
      if (name === "fill") return () => { for (const a of target._arcs) dots.push([target.fillStyle, ...a]); target._arcs = []; };
      if (name === "beginPath") return () => { target._arcs = []; };
      return () => {};
    },
    set(target, name, value) { target[name] = value; return true; },
  });
  return { canvas: { clientWidth: 400, clientHeight: 200, width: 0, height: 0, getContext: () => ctx }, dots };
}
const out = {};
for (const withIdentity of [false, true]) {
  const s = new TrainingSeries();
  for (let step = 1; step <= 30; step++) {
    const scores = withIdentity && step % 10 === 0 ? { identity: 0.9 - step / 100 } : {};
    s.add({ step, total: 30, loss: 0.1, lr: 1e-4, ...scores });
  }
  const { canvas, dots } = fakeCanvas();
  drawChart(canvas, s);
  const identityDots = dots.filter((d) => d[0] === IDENTITY_COLOR);
  out[withIdentity] = { dots: identityDots.length, ys: identityDots.map((d) => d[2]), status: formatStatus(s),
                        finite: s.identity.filter(Number.isFinite) };
}
console.log(JSON.stringify(out));
"""


def test_identity_line_is_drawn_only_when_events_carry_it(modules):
    out = run_node(modules, IDENTITY_SCRIPT)
    assert out["false"]["dots"] == 0 and "identity" not in out["false"]["status"]
    with_identity = out["true"]
    assert with_identity["finite"] == pytest.approx([0.8, 0.7, 0.6])  # steps 10, 20, 30; NaN elsewhere
    assert with_identity["dots"] == 3
    ys = with_identity["ys"]
    assert ys[0] < ys[1] < ys[2]  # a smaller distance is drawn lower (canvas y grows downwards)
    assert with_identity["status"].endswith("identity 0.600 (step 30)")


IDENTITY_LOSS_SCRIPT = """
import { TrainingSeries } from "./train_progress.js";
import { drawChart, IDENTITY_LOSS_COLOR } from "./loss_chart.js";
// A canvas stand-in that records each stroked path's color and point count, and the texts drawn.
globalThis.window = { devicePixelRatio: 1 };
globalThis.getComputedStyle = () => ({ getPropertyValue: () => "" });
const strokes = [], texts = [];
const ctx = new Proxy({ fillStyle: "", strokeStyle: "", _points: 0 }, {
  get(target, name) {
    if (name in target) return target[name];
    if (name === "measureText") return () => ({ width: 10 });
    if (name === "beginPath") return () => { target._points = 0; };
    if (name === "moveTo" || name === "lineTo") return () => { target._points += 1; };
    if (name === "stroke") return () => strokes.push([target.strokeStyle, target._points]);
    if (name === "fillText") return (text) => texts.push(String(text));
    return () => {};
  },
  set(target, name, value) { target[name] = value; return true; },
});
const out = {};
for (const withTerm of [false, true]) {
  const s = new TrainingSeries();
  for (let step = 1; step <= 12; step++) {  // identity_every 4: the term on steps 1, 5, 9
    s.add({ step, total: 12, loss: 0.1, lr: 1e-4, ...(withTerm && step % 4 === 1 ? { identity_loss: 0.02 } : {}) });
  }
  strokes.length = 0; texts.length = 0;
  drawChart({ clientWidth: 400, clientHeight: 200, width: 0, height: 0, getContext: () => ctx }, s);
  out[withTerm] = { finite: s.identityLoss.filter(Number.isFinite),
                    points: strokes.filter((x) => x[0] === IDENTITY_LOSS_COLOR).map((x) => x[1]),
                    legend: texts.includes("identity term") };
}
console.log(JSON.stringify(out));
"""


def test_identity_loss_term_is_drawn_joined_across_the_steps_that_skip_it(modules):
    out = run_node(modules, IDENTITY_LOSS_SCRIPT)
    assert out["false"] == {"finite": [], "points": [], "legend": False}
    assert out["true"]["finite"] == pytest.approx([0.02, 0.02, 0.02])
    assert out["true"]["points"] == [3] and out["true"]["legend"]  # one line through steps 1, 5 and 9
