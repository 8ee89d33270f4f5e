// Draws a TrainingSeries (train_progress.js) on a <canvas>: raw loss, its trailing mean
// (left axis) and the learning rate (right axis) against step; with validation scores, the
// identity distance of each validated step (0 at the bottom to 1 at the top: lower = closer). Plain canvas 2D, no chart
// library: the pack has no build step and the frontend ships none we may rely on.

import { AVERAGE_WINDOW } from "./train_progress.js";

export const COLORS = {
  loss: "#4f8fd6",
  average: "#ff9f40",
  lr: "#5fd068",
};
export const IDENTITY_COLOR = "#d65fd0";
// The identity loss term (part of the loss, on its axis), where the trainer computed it.
export const IDENTITY_LOSS_COLOR = "#e05a5a";
// dlib's same-person threshold (FACE_MATCH_THRESHOLD in training/eval/scorers.py), drawn as a faint line.
const IDENTITY_MATCH = 0.6;

// Room around the plot for the axis labels (CSS pixels).
const MARGIN = { left: 46, right: 52, top: 22, bottom: 20 };
const FONT = "11px sans-serif";

// Height of one legend row; the legend wraps onto more rows when the chart is narrow.
const LEGEND_ROW = 14;

/** The plot rectangle inside a chart of width x height CSS pixels, below `legendRows` rows of legend. */
export function plotArea(width, height, legendRows = 1) {
  const top = MARGIN.top + (Math.max(1, legendRows) - 1) * LEGEND_ROW;
  return {
    x: MARGIN.left,
    y: top,
    width: Math.max(1, width - MARGIN.left - MARGIN.right),
    height: Math.max(1, height - top - MARGIN.bottom),
  };
}

/** Redraws the whole chart; the canvas backing store follows its CSS size and the device pixel ratio. */
export function drawChart(canvas, series) {
  const width = canvas.clientWidth;
  const height = canvas.clientHeight;
  if (!width || !height) return; // not laid out (node collapsed or off screen)
  const dpr = window.devicePixelRatio || 1;
  if (canvas.width !== Math.round(width * dpr) || canvas.height !== Math.round(height * dpr)) {
    canvas.width = Math.round(width * dpr);
    canvas.height = Math.round(height * dpr);
  }
  const ctx = canvas.getContext("2d");
  ctx.setTransform(dpr, 0, 0, dpr, 0, 0);
  const theme = readTheme(canvas);
  ctx.fillStyle = theme.background;
  ctx.fillRect(0, 0, width, height);
  ctx.font = FONT;

  if (series.isEmpty) {
    ctx.fillStyle = theme.muted;
    ctx.textAlign = "center";
    ctx.textBaseline = "middle";
    ctx.fillText("No training steps yet", width / 2, height / 2);
    return;
  }

  const legend = layoutLegend(ctx, width, legendItems(series.hasIdentity, series.hasIdentityLoss));
  const area = plotArea(width, height, legend.rows);
  canvas.plotArea = area; // where the last frame drew the plot (read by the browser test)
  const first = series.steps[0];
  const last = series.steps[series.steps.length - 1];
  // The x axis spans the whole run, so the drawn width shows how far training has come.
  const xRange = { min: first, max: Math.max(series.total, last, first + 1) };
  const lossRange = paddedRange(series.loss.concat(series.average, series.identityLoss));
  const lrRange = { min: 0, max: (finiteMax(series.lr) || 1) * 1.1 }; // from 0: warmup and decay read as such
  const x = (step) => area.x + ((step - xRange.min) / (xRange.max - xRange.min)) * area.width;
  const yLoss = (v) => area.y + area.height - ((v - lossRange.min) / (lossRange.max - lossRange.min)) * area.height;
  const yLr = (v) => area.y + area.height - ((v - lrRange.min) / (lrRange.max - lrRange.min)) * area.height;

  drawGridAndAxes(ctx, area, theme, xRange, lossRange, lrRange, x, yLoss, yLr);

  ctx.save();
  ctx.beginPath();
  ctx.rect(area.x, area.y, area.width, area.height);
  ctx.clip();
  drawLine(ctx, series.steps, series.lr, x, yLr, { color: COLORS.lr, width: 1.5, dash: [5, 3] });
  drawLine(ctx, series.steps, series.loss, x, yLoss, { color: COLORS.loss, width: 1, alpha: 0.55 });
  drawLine(ctx, series.steps, series.average, x, yLoss, { color: COLORS.average, width: 2 });
  if (series.hasIdentityLoss) drawIdentityLoss(ctx, series, x, yLoss);
  if (series.hasIdentity) drawIdentity(ctx, area, series, x);
  ctx.restore();

  drawLegend(ctx, theme, legend);
}

function drawGridAndAxes(ctx, area, theme, xRange, lossRange, lrRange, x, yLoss, yLr) {
  ctx.lineWidth = 1;
  ctx.strokeStyle = theme.grid;
  ctx.fillStyle = theme.muted;

  // Loss ticks on the left, at round values; grid lines follow them.
  ctx.textAlign = "right";
  ctx.textBaseline = "middle";
  for (const v of niceTicks(lossRange.min, lossRange.max, 4)) {
    const y = Math.round(yLoss(v)) + 0.5;
    line(ctx, area.x, y, area.x + area.width, y);
    ctx.fillText(formatTick(v), area.x - 4, y);
  }
  // Learning-rate ticks on the right, in the rate's own color so the two axes are not confused.
  ctx.textAlign = "left";
  ctx.fillStyle = COLORS.lr;
  for (const v of niceTicks(lrRange.min, lrRange.max, 4)) {
    ctx.fillText(v === 0 ? "0" : v.toExponential(0), area.x + area.width + 4, yLr(v));
  }
  // Step ticks along the bottom.
  ctx.fillStyle = theme.muted;
  ctx.textAlign = "center";
  ctx.textBaseline = "top";
  for (const v of niceTicks(xRange.min, xRange.max, 5).filter(Number.isInteger)) {
    ctx.fillText(String(v), x(v), area.y + area.height + 4);
  }
  ctx.textAlign = "left"; // the axis name at the bottom left corner, clear of the lowest loss tick and the first step
  ctx.textBaseline = "bottom";
  ctx.fillText("step", 4, area.y + area.height + MARGIN.bottom - 1);

  ctx.strokeStyle = theme.axis;
  ctx.strokeRect(area.x + 0.5, area.y + 0.5, area.width - 1, area.height - 1);
}

/** Identity distance per validated step: dots joined across the steps between validations. */
function drawIdentity(ctx, area, series, x) {
  const range = { min: 0, max: Math.max(1, finiteMax(series.identity) * 1.05) };
  const y = (v) => area.y + area.height - ((v - range.min) / (range.max - range.min)) * area.height;
  ctx.save();
  ctx.strokeStyle = IDENTITY_COLOR;
  ctx.globalAlpha = 0.35;
  ctx.setLineDash([2, 3]);
  line(ctx, area.x, y(IDENTITY_MATCH), area.x + area.width, y(IDENTITY_MATCH));
  ctx.restore();
  const steps = [];
  const values = [];
  series.identity.forEach((v, i) => {
    if (Number.isFinite(v)) {
      steps.push(series.steps[i]);
      values.push(v);
    }
  });
  drawLine(ctx, steps, values, x, y, { color: IDENTITY_COLOR, width: 2 });
  ctx.fillStyle = IDENTITY_COLOR;
  for (let i = 0; i < steps.length; i++) {
    ctx.beginPath();
    ctx.arc(x(steps[i]), y(values[i]), 2.5, 0, 2 * Math.PI);
    ctx.fill();
  }
}

/** The identity loss term on the steps that computed it (every identity_every-th, low timesteps), joined. */
function drawIdentityLoss(ctx, series, x, yLoss) {
  const steps = series.steps.filter((_, i) => Number.isFinite(series.identityLoss[i]));
  const values = series.identityLoss.filter(Number.isFinite);
  drawLine(ctx, steps, values, x, yLoss, { color: IDENTITY_LOSS_COLOR, width: 1.5 });
}

function legendItems(withIdentity = false, withIdentityLoss = false) {
  const items = [
    [COLORS.loss, "loss"],
    [COLORS.average, `mean of ${AVERAGE_WINDOW}`],
    [COLORS.lr, "learning rate (right)"],
  ];
  if (withIdentityLoss) items.push([IDENTITY_LOSS_COLOR, "identity term"]);
  if (withIdentity) items.push([IDENTITY_COLOR, "identity distance (0-1)"]);
  return items;
}

/** Places each legend item (swatch, then label) left to right, starting a new row where one would not fit. */
export function layoutLegend(ctx, width, items) {
  ctx.font = FONT;
  const start = 8;
  const placed = [];
  let left = start;
  let row = 0;
  for (const [color, label] of items) {
    const itemWidth = 16 + ctx.measureText(label).width;
    if (left > start && left + itemWidth > width - 4) {
      row += 1;
      left = start;
    }
    placed.push({ color, label, x: left, y: MARGIN.top / 2 + row * LEGEND_ROW });
    left += itemWidth + 12;
  }
  return { items: placed, rows: row + 1 };
}

function drawLegend(ctx, theme, legend) {
  ctx.textAlign = "left";
  ctx.textBaseline = "middle";
  for (const { color, label, x, y } of legend.items) {
    ctx.fillStyle = color;
    ctx.fillRect(x, y - 1.5, 12, 3);
    ctx.fillStyle = theme.text;
    ctx.fillText(label, x + 16, y);
  }
}

/** A polyline through the finite points; a gap where a value is missing. */
function drawLine(ctx, steps, values, x, y, { color, width, alpha = 1, dash = [] }) {
  ctx.save();
  ctx.strokeStyle = color;
  ctx.lineWidth = width;
  ctx.globalAlpha = alpha;
  ctx.setLineDash(dash);
  ctx.beginPath();
  let drawing = false;
  for (let i = 0; i < steps.length; i++) {
    if (!Number.isFinite(values[i])) {
      drawing = false;
      continue;
    }
    const px = x(steps[i]);
    const py = y(values[i]);
    if (drawing) ctx.lineTo(px, py);
    else ctx.moveTo(px, py);
    drawing = true;
  }
  // A lone first point would be invisible as a path; mark it.
  if (steps.length === 1 && Number.isFinite(values[0])) ctx.arc(x(steps[0]), y(values[0]), width + 1, 0, 2 * Math.PI);
  ctx.stroke();
  ctx.restore();
}

function line(ctx, x0, y0, x1, y1) {
  ctx.beginPath();
  ctx.moveTo(x0, y0);
  ctx.lineTo(x1, y1);
  ctx.stroke();
}

function paddedRange(values) {
  const finite = values.filter(Number.isFinite);
  if (!finite.length) return { min: 0, max: 1 };
  let min = Math.min(...finite);
  let max = Math.max(...finite);
  if (min === max) {
    const pad = Math.abs(min) * 0.1 || 0.5;
    return { min: min - pad, max: max + pad };
  }
  const pad = (max - min) * 0.05;
  return { min: min - pad, max: max + pad };
}

function finiteMax(values) {
  let max = NaN;
  for (const v of values) if (Number.isFinite(v) && !(v <= max)) max = v;
  return max;
}

/** About `count` round values (1, 2 or 5 times a power of ten) inside [min, max]. */
function niceTicks(min, max, count) {
  const raw = (max - min) / count;
  if (!(raw > 0)) return [min];
  const power = 10 ** Math.floor(Math.log10(raw));
  const step = [1, 2, 5, 10].map((m) => m * power).find((s) => s >= raw);
  const ticks = [];
  for (let v = Math.ceil(min / step) * step; v <= max + step * 1e-9; v += step) {
    ticks.push(Number(v.toPrecision(12))); // drop float noise such as 0.30000000000000004
  }
  return ticks;
}

function formatTick(v) {
  if (v === 0) return "0";
  const abs = Math.abs(v);
  return abs >= 1000 || abs < 0.001 ? v.toExponential(1) : String(Number(v.toPrecision(3)));
}

/** Colors from the frontend's current palette (CSS variables), with dark-theme fallbacks. */
function readTheme(element) {
  const style = getComputedStyle(element);
  const read = (name, fallback) => style.getPropertyValue(name).trim() || fallback;
  return {
    background: read("--comfy-input-bg", "#222"),
    text: read("--input-text", "#ddd"),
    muted: read("--descrip-text", "#999"),
    axis: read("--border-color", "#4e4e4e"),
    grid: "rgba(128, 128, 128, 0.25)",
  };
}
