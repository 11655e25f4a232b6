// The run's loss curves on a <canvas>, drawn here without a library: axes with round ticks, train
// and validation in bits per character against step, a legend, and a dashed line at the step of
// the model the server answers with. page.js calls drawCurves after each poll of /api/run.
// The canvas's data-train-points and data-val-points say how many points it drew (for the tests).
"use strict";

const LN2 = Math.log(2);

function curves(records) {
  const train = [], val = [];
  for (const r of records) {
    const t = r.train_bpc ?? (r.train_loss == null ? null : r.train_loss / LN2);
    const v = r.val_bpc ?? (r.val_loss == null ? null : r.val_loss / LN2);
    if (Number.isFinite(t)) train.push([r.step, t]);
    if (Number.isFinite(v)) val.push([r.step, v]);
  }
  return {train, val};
}

// About `count` round tick values (1, 2 or 5 times a power of ten apart) covering lo..hi: the
// step whose number of ticks comes nearest `count`.
function ticks(lo, hi, count) {
  const span = hi - lo || 1, power = 10 ** Math.floor(Math.log10(span / count));
  const steps = [0.5, 1, 2, 5, 10].map((m) => m * power);
  const step = steps.reduce((best, s) => (Math.abs(span / s - count) < Math.abs(span / best - count) ? s : best));
  const out = [];
  for (let t = Math.ceil(lo / step) * step; t <= hi + step * 1e-9; t += step) out.push(+t.toPrecision(12));
  return {values: out, decimals: Math.max(0, -Math.floor(Math.log10(step) + 1e-9))};
}

// Math.min(...values) would pass a long run's every record as an argument, past the engine's limit.
const least = (values) => values.reduce((a, b) => Math.min(a, b), Infinity);
const most = (values) => values.reduce((a, b) => Math.max(a, b), -Infinity);

function drawCurves(canvas, records, modelStep) {
  const {train, val} = curves(records);
  canvas.dataset.trainPoints = train.length;
  canvas.dataset.valPoints = val.length;
  canvas.dataset.points = train.length + val.length;
  // The backing store follows the laid-out size and the screen's pixel ratio, so lines stay sharp.
  const ratio = window.devicePixelRatio || 1, W = canvas.clientWidth, H = canvas.clientHeight;
  canvas.width = Math.round(W * ratio);
  canvas.height = Math.round(H * ratio);
  const ctx = canvas.getContext("2d");
  ctx.setTransform(ratio, 0, 0, ratio, 0, 0);
  const css = getComputedStyle(document.documentElement);
  const color = (name) => css.getPropertyValue(name).trim();
  ctx.font = "12px system-ui, sans-serif";
  ctx.fillStyle = color("--muted");
  const all = train.concat(val);
  if (!all.length) {
    ctx.fillText("Waiting for the run's first losses…", 20, H / 2);
    return;
  }
  // Ranges: x from step 0; y over validation and the train curve after its first tenth, since
  // the first steps' losses (log2 V and more) would flatten everything after them.
  const x0 = Math.min(0, least(all.map((p) => p[0]))), x1 = Math.max(most(all.map((p) => p[0])), modelStep, x0 + 1);
  const late = train.filter((p) => p[0] >= x0 + 0.1 * (x1 - x0));
  const ys = (late.length ? late : train).concat(val).map((p) => p[1]);
  let y0 = least(ys), y1 = most(ys);
  const pad = (y1 - y0 || 0.5) * 0.08;
  y0 = Math.max(0, y0 - pad);
  y1 += pad;
  const box = {left: 52, right: W - 24, top: 12, bottom: H - 38};  // room for the last step's label
  const X = (x) => box.left + (x - x0) / (x1 - x0) * (box.right - box.left);
  const Y = (y) => box.bottom - (y - y0) / (y1 - y0) * (box.bottom - box.top);
  drawAxes(ctx, box, {x0, x1, y0, y1, X, Y}, color);
  ctx.save();
  ctx.beginPath();
  ctx.rect(box.left, box.top, box.right - box.left, box.bottom - box.top);
  ctx.clip();  // the first train losses run above the y range: cut, not drawn over the labels
  drawModelStep(ctx, box, X(modelStep), color("--muted"));
  drawLine(ctx, train, X, Y, color("--train"), 1.2, false);
  drawLine(ctx, val, X, Y, color("--val"), 2, true);
  ctx.restore();
  drawLegend(ctx, box, color, modelStep);
}

function drawAxes(ctx, box, s, color) {
  ctx.strokeStyle = color("--line");
  ctx.fillStyle = color("--muted");
  ctx.lineWidth = 1;
  ctx.textAlign = "center";
  ctx.textBaseline = "top";
  for (const x of ticks(s.x0, s.x1, 6).values) {
    ctx.beginPath();
    ctx.moveTo(s.X(x), box.top);
    ctx.lineTo(s.X(x), box.bottom + 4);
    ctx.stroke();
    ctx.fillText(x.toLocaleString("en-US"), s.X(x), box.bottom + 6);
  }
  ctx.fillText("step", (box.left + box.right) / 2, box.bottom + 22);
  ctx.textAlign = "right";
  ctx.textBaseline = "middle";
  const y = ticks(s.y0, s.y1, 5);
  for (const v of y.values) {
    ctx.beginPath();
    ctx.moveTo(box.left - 4, s.Y(v));
    ctx.lineTo(box.right, s.Y(v));
    ctx.stroke();
    ctx.fillText(v.toFixed(y.decimals), box.left - 6, s.Y(v));
  }
  ctx.save();
  ctx.translate(12, (box.top + box.bottom) / 2);
  ctx.rotate(-Math.PI / 2);
  ctx.textAlign = "center";
  ctx.fillText("bits / char", 0, 0);
  ctx.restore();
}

function drawLine(ctx, points, X, Y, colour, width, dots) {
  ctx.strokeStyle = ctx.fillStyle = colour;
  ctx.lineWidth = width;
  ctx.beginPath();
  points.forEach(([x, y], i) => (i ? ctx.lineTo(X(x), Y(y)) : ctx.moveTo(X(x), Y(y))));
  ctx.stroke();
  if (!dots) return;
  for (const [x, y] of points) {
    ctx.beginPath();
    ctx.arc(X(x), Y(y), 2.5, 0, 2 * Math.PI);
    ctx.fill();
  }
}

function drawModelStep(ctx, box, x, colour) {
  ctx.strokeStyle = colour;
  ctx.setLineDash([4, 4]);
  ctx.beginPath();
  ctx.moveTo(x, box.top);
  ctx.lineTo(x, box.bottom);
  ctx.stroke();
  ctx.setLineDash([]);
}

function drawLegend(ctx, box, color, modelStep) {
  const items = [["train", color("--train"), []], ["validation", color("--val"), []],
                 [`model served (step ${modelStep})`, color("--muted"), [4, 4]]];
  ctx.textAlign = "left";
  ctx.textBaseline = "middle";
  const width = Math.max(...items.map(([label]) => ctx.measureText(label).width)) + 40;
  let y = box.top + 12;
  const x = box.right - width - 8;
  ctx.fillStyle = color("--panel");
  ctx.globalAlpha = 0.85;
  ctx.fillRect(x - 6, box.top + 2, width + 10, items.length * 18 + 4);
  ctx.globalAlpha = 1;
  for (const [label, colour, dash] of items) {
    ctx.strokeStyle = colour;
    ctx.lineWidth = 2;
    ctx.setLineDash(dash);
    ctx.beginPath();
    ctx.moveTo(x, y);
    ctx.lineTo(x + 24, y);
    ctx.stroke();
    ctx.setLineDash([]);
    ctx.fillStyle = color("--ink");
    ctx.fillText(label, x + 30, y);
    y += 18;
  }
}
