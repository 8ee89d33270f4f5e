// The numbers behind the Train Subject node's live chart: one TrainingSeries per node,
// fed by the "dreambooth.train.progress" events that nodes/train.py sends every step.
// No DOM and no ComfyUI imports here, so `node` can run it in tests/test_web_offline.py.
// (ComfyUI imports every .js file under web/ as an extension; this one only exports.)

// Steps in the trailing mean drawn over the raw loss: single-step diffusion losses are
// mostly noise (they depend on the random timestep), the mean shows the trend.
export const AVERAGE_WINDOW = 20;

export class TrainingSeries {
  constructor() {
    this.clear();
  }

  clear() {
    this.steps = [];
    this.loss = []; // NaN where a step reported no loss
    this.average = []; // trailing mean of the last AVERAGE_WINDOW finite losses
    this.lr = [];
    this.identity = []; // identity distance on validated steps (nodes/train.py forwards it), NaN elsewhere
    this.lastIdentity = null; // {step, value} of the latest validated step that had one
    this.identityLoss = []; // the identity loss term (identity_weight) on the steps that computed it, NaN elsewhere
    this.total = 0;
    this.latest = null; // the last event's detail, for the status line
    this.images = []; // the latest validation images: [{filename, subfolder, type}]
    this.imagesStep = null;
    this._window = [];
  }

  get hasIdentity() {
    return this.lastIdentity !== null;
  }

  get hasIdentityLoss() {
    return this.identityLoss.some(Number.isFinite);
  }

  get isEmpty() {
    return this.steps.length === 0;
  }

  /** Adds one progress event; returns true when it began a new run and the old points were dropped. */
  add(detail) {
    const step = Number(detail.step);
    if (!Number.isFinite(step)) return false;
    const total = Number(detail.total) || 0;
    // A step that does not move forward is a new run, or a resumed one that starts from its
    // checkpoint: the chart then shows that run only, from the step it (re)started at.
    const restarted = !this.isEmpty && (step <= this.steps[this.steps.length - 1] || total !== this.total);
    if (restarted) this.clear();

    const loss = finiteOrNaN(detail.loss);
    this.steps.push(step);
    this.loss.push(loss);
    this.lr.push(finiteOrNaN(detail.lr));
    const identity = finiteOrNaN(detail.identity);
    this.identity.push(identity);
    if (Number.isFinite(identity)) this.lastIdentity = { step, value: identity };
    this.identityLoss.push(finiteOrNaN(detail.identity_loss));
    if (Number.isFinite(loss)) {
      this._window.push(loss);
      if (this._window.length > AVERAGE_WINDOW) this._window.shift();
    }
    this.average.push(this._window.length ? mean(this._window) : NaN);
    this.total = total;
    this.latest = detail;
    // Validation images come only on the steps that render them; keep showing the last ones.
    if (Array.isArray(detail.images) && detail.images.length) {
      this.images = detail.images;
      this.imagesStep = step;
    }
    return restarted;
  }
}

/** "step 120 / 800 · 3.4 it/s · ETA 3 min · loss 0.1234" for the latest event (or a hint when none). */
export function formatStatus(series) {
  const d = series.latest;
  if (!d) return "Queue the prompt to train: loss and learning rate are drawn here, step by step.";
  const parts = [`step ${d.step} / ${d.total}`];
  if (Number.isFinite(d.it_per_s) && d.it_per_s > 0) parts.push(formatRate(d.it_per_s));
  if (d.step >= d.total) parts.push("done");
  else if (Number.isFinite(d.eta_s)) parts.push(`ETA ${formatDuration(d.eta_s)}`);
  if (Number.isFinite(d.loss)) parts.push(`loss ${d.loss.toFixed(4)}`);
  const id = series.lastIdentity;
  if (id) parts.push(`identity ${id.value.toFixed(3)} (step ${id.step})`);
  return parts.join(" · ");
}

/** "3.4 it/s", or "2.5 s/it" below one step a second (as tqdm does: small rates read badly). */
export function formatRate(itPerS) {
  return itPerS >= 1 ? `${itPerS.toFixed(1)} it/s` : `${(1 / itPerS).toFixed(1)} s/it`;
}

/** "42 s", "3 min", "1 h 05 min". */
export function formatDuration(seconds) {
  const s = Math.max(0, Math.round(seconds));
  if (s < 60) return `${s} s`;
  const minutes = Math.round(s / 60);
  if (minutes < 60) return `${minutes} min`;
  return `${Math.floor(minutes / 60)} h ${String(minutes % 60).padStart(2, "0")} min`;
}

function finiteOrNaN(value) {
  return typeof value === "number" && Number.isFinite(value) ? value : NaN;
}

function mean(values) {
  return values.reduce((a, b) => a + b, 0) / values.length;
}
