// Live training view on every Train Subject node: a loss / learning-rate chart, a status
// line ("step 120 / 800 · 3.4 it/s · ETA 3 min") and the latest validation images.
// The server side (nodes/train.py) sends one "dreambooth.train.progress" websocket event
// per training step; this file only listens. It adds no HTTP route: images come from
// ComfyUI's own /view.

// Served at /extensions/<pack folder>/js/: three levels up is the site root, where the
// frontend keeps its shims for extensions (scripts/app.js, scripts/api.js).
import { app } from "../../../scripts/app.js";
import { api } from "../../../scripts/api.js";
import { drawChart } from "./loss_chart.js";
import { TrainingSeries, formatStatus } from "./train_progress.js";

const TRAIN_NODE = "DreamBoothTrainSubject"; // node id in nodes/__init__.py
const PROGRESS_EVENT = "dreambooth.train.progress"; // PROGRESS_EVENT in nodes/train.py
const WIDGET_NAME = "dreambooth_training_chart";
const CHART_MIN_HEIGHT = 170;
const THUMB_HEIGHT = 72;

app.registerExtension({
  name: "dreambooth.subject.train",

  async setup() {
    api.addEventListener(PROGRESS_EVENT, (event) => {
      const node = trainNodeForExecutionId(event.detail?.node);
      node?.dreamboothTraining?.update(event.detail);
    });
  },

  async beforeRegisterNodeDef(nodeType, nodeData) {
    if (nodeData.name !== TRAIN_NODE) return;
    const onNodeCreated = nodeType.prototype.onNodeCreated;
    nodeType.prototype.onNodeCreated = function () {
      const result = onNodeCreated?.apply(this, arguments);
      this.dreamboothTraining = new TrainingView(this);
      return result;
    };
  },
});

/** The Train Subject node the server means by `id`: "5", or "12:5" for node 5 inside subgraph node 12. */
function trainNodeForExecutionId(id) {
  if (id == null) return null;
  let graph = app.graph;
  let node = null;
  for (const part of String(id).split(":")) {
    node = graph?.getNodeById(part) ?? null;
    graph = node?.subgraph;
  }
  // Events for a workflow that is not the open one name nodes that are not there (or are others).
  return node?.comfyClass === TRAIN_NODE ? node : null;
}

/** The DOM widget of one node and the data it shows; the data lives as long as the node. */
class TrainingView {
  constructor(node) {
    this.node = node;
    this.series = new TrainingSeries();
    this.frame = null;

    this.root = element("div", {
      display: "flex", flexDirection: "column", gap: "4px",
      width: "100%", height: "100%", boxSizing: "border-box",
    });
    // The canvas sits absolutely inside a flex child, so its backing-store size never feeds
    // back into the layout that decides its size.
    const plot = element("div", { position: "relative", flex: "1 1 auto", minHeight: `${CHART_MIN_HEIGHT}px` });
    this.canvas = element("canvas", { position: "absolute", inset: "0", width: "100%", height: "100%", borderRadius: "4px" });
    plot.append(this.canvas);
    this.status = element("div", {
      font: "12px sans-serif", color: "var(--input-text, #ddd)",
      whiteSpace: "nowrap", overflow: "hidden", textOverflow: "ellipsis",
    });
    this.imagesCaption = element("div", { font: "11px sans-serif", color: "var(--descrip-text, #999)", display: "none" });
    this.images = element("div", { display: "none", gap: "4px", overflowX: "auto", flex: "0 0 auto" });
    this.root.append(plot, this.status, this.imagesCaption, this.images);

    this.widget = node.addDOMWidget(WIDGET_NAME, "dreambooth-chart", this.root, {
      serialize: false, // not an input: keep it out of the API prompt (graphToPrompt reads options.serialize)
      getMinHeight: () => CHART_MIN_HEIGHT + 24 + (this.series.images.length ? THUMB_HEIGHT + 24 : 0),
    });
    this.widget.serialize = false; // ... and out of the workflow's positional widgets_values

    this.resizeObserver = new ResizeObserver(() => this.scheduleDraw());
    this.resizeObserver.observe(plot);
    const onRemoved = node.onRemoved;
    node.onRemoved = function () {
      this.dreamboothTraining?.resizeObserver.disconnect();
      return onRemoved?.apply(this, arguments);
    };
    this.status.textContent = formatStatus(this.series);
  }

  update(detail) {
    const hadImages = this.series.images;
    this.series.add(detail);
    this.status.textContent = formatStatus(this.series);
    if (this.series.images !== hadImages) this.showImages();
    this.scheduleDraw();
  }

  showImages() {
    const refs = this.series.images;
    this.images.replaceChildren(...refs.map((ref) => {
      const url = api.apiURL(`/view?${new URLSearchParams({ filename: ref.filename, subfolder: ref.subfolder ?? "", type: ref.type ?? "output" })}`);
      const link = element("a", {}, { href: url, target: "_blank", title: ref.filename });
      link.append(element("img", { height: `${THUMB_HEIGHT}px`, borderRadius: "3px", display: "block" }, { src: url, alt: ref.filename }));
      return link;
    }));
    const shown = refs.length > 0;
    this.images.style.display = shown ? "flex" : "none";
    this.imagesCaption.style.display = shown ? "block" : "none";
    this.imagesCaption.textContent = shown ? `validation images, step ${this.series.imagesStep}` : "";
    // The thumbnails need room: grow the node once if it is shorter than its widgets now want.
    const wanted = this.node.computeSize();
    if (wanted[1] > this.node.size[1]) this.node.setSize([this.node.size[0], wanted[1]]);
    this.node.setDirtyCanvas?.(true, true);
  }

  // Events can come faster than frames; draw once per frame at most.
  scheduleDraw() {
    if (this.frame !== null) return;
    this.frame = requestAnimationFrame(() => {
      this.frame = null;
      drawChart(this.canvas, this.series);
    });
  }
}

function element(tag, style = {}, attributes = {}) {
  const el = document.createElement(tag);
  Object.assign(el.style, style);
  Object.assign(el, attributes);
  return el;
}
