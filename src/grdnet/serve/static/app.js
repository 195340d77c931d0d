// The operator's page: upload images, show score, decision and heatmap. The threshold slider
// re-labels the results already shown from their scores; it never calls the model again. The ROI
// editor draws a region of interest on a sample image, downloads its mask and inspects within it.
"use strict";

const $ = (id) => document.getElementById(id);
const state = { modelThreshold: null, results: [], queue: [], inFlight: 0 };
const MAX_IN_FLIGHT = 2; // the server batches concurrent requests; more would only queue there
let apiKey = sessionStorage.getItem("grdnet-api-key") || "";

function headers() {
  return apiKey ? { "X-API-Key": apiKey } : {};
}

async function errorText(resp) {
  try {
    const body = await resp.json();
    if (body && body.error) return body.error;
  } catch (e) { /* not JSON */ }
  return `HTTP ${resp.status}`;
}

function fmt(x, digits = 4) {
  return x === null || x === undefined ? "–" : Number(x).toFixed(digits);
}

// ---- model info and API key ----

async function loadModel() {
  const resp = await fetch("/model", { headers: headers() });
  if (resp.status === 401) {
    $("auth").hidden = false;
    $("auth-msg").textContent = apiKey ? "that key was refused" : "this service needs an API key";
    $("model").textContent = "model: (API key needed)";
    return;
  }
  if (!resp.ok) {
    $("model").textContent = "model info unavailable: " + (await errorText(resp));
    return;
  }
  $("auth").hidden = true;
  const m = await resp.json();
  const el = $("model");
  el.textContent = "";
  const parts = [
    ...(m.name ? [["model", m.name]] : []), ["id", m.model_id],
    ["input", `${m.image_size} px, ${m.channels === 1 ? "gray" : "RGB"}`], ["threshold", fmt(m.threshold)],
  ];
  for (const [k, v] of parts) {
    const span = document.createElement("span");
    span.append(k + " ");
    const b = document.createElement("b");
    b.textContent = v;
    if (k === "id") b.id = "model-id";
    span.append(b, "   ");
    el.append(span);
  }
  if (m.threshold_rule) el.title = "threshold rule: " + m.threshold_rule;
  state.modelThreshold = m.threshold;
  if (m.threshold !== null && m.threshold !== undefined) setThreshold(m.threshold);
}

$("api-key-save").addEventListener("click", () => {
  apiKey = $("api-key").value.trim();
  sessionStorage.setItem("grdnet-api-key", apiKey);
  loadModel();
});

// ---- threshold ----

function currentThreshold() {
  return Number($("threshold").value);
}

function setThreshold(t) {
  const v = Math.min(1, Math.max(0, Number(t)));
  $("threshold").value = v;
  $("threshold-value").value = v.toFixed(4);
  relabel();
}

$("threshold").addEventListener("input", () => {
  $("threshold-value").value = currentThreshold().toFixed(4);
  relabel();
});
$("threshold-value").addEventListener("change", () => setThreshold($("threshold-value").value));
$("threshold-reset").addEventListener("click", () => {
  if (state.modelThreshold !== null) setThreshold(state.modelThreshold);
});

function relabel() {
  const t = currentThreshold();
  let good = 0, bad = 0, failed = 0;
  for (const r of state.results) {
    if (r.score === undefined) { if (r.failed) failed++; continue; }
    const defective = r.score >= t;
    defective ? bad++ : good++;
    r.card.classList.toggle("defective", defective);
    r.card.classList.toggle("good", !defective);
    r.card.querySelector(".badge").textContent = defective ? "defective" : "good";
    r.card.querySelector(".mark").style.left = (t * 100).toFixed(2) + "%";
  }
  const n = state.results.length;
  $("summary").textContent = n === 0 ? "no images yet"
    : `${n} image(s): ${bad} defective, ${good} good` + (failed ? `, ${failed} failed` : "") +
      ` at threshold ${t.toFixed(4)}`;
  roiRelabel(t);
}

// ---- uploads ----

function addFiles(files) {
  for (const file of files) {
    const card = $("card-template").content.firstElementChild.cloneNode(true);
    card.querySelector(".name").textContent = file.name;
    card.querySelector(".name").title = file.name;
    const original = card.querySelector(".original");
    const url = URL.createObjectURL(file);
    original.src = url;
    original.addEventListener("error", () => { original.alt = "no preview in this browser"; });
    $("results").prepend(card);
    const r = { file, card, url };
    state.results.push(r);
    state.queue.push(r);
  }
  relabel();
  pump();
}

function pump() {
  while (state.inFlight < MAX_IN_FLIGHT && state.queue.length) {
    const r = state.queue.shift();
    state.inFlight++;
    score(r).finally(() => { state.inFlight--; pump(); });
  }
}

async function score(r, attempt = 0) {
  const form = new FormData();
  form.append("file", r.file, r.file.name);
  if (roiForUploads()) form.append("roi", roi.maskBlob, "roi.png");
  let resp;
  try {
    resp = await fetch("/predict?overlay=true", { method: "POST", body: form, headers: headers() });
  } catch (e) {
    return fail(r, "network error: " + e.message);
  }
  if (resp.status === 503 && attempt < 20) { // queue full: wait as the server asks, then retry
    const wait = 1000 * (Number(resp.headers.get("Retry-After")) || 1);
    await new Promise((ok) => setTimeout(ok, wait));
    return score(r, attempt + 1);
  }
  if (!resp.ok) {
    if (resp.status === 401) { $("auth").hidden = false; }
    return fail(r, await errorText(resp));
  }
  const body = await resp.json();
  r.score = body.score;
  const card = r.card;
  card.classList.remove("pending");
  card.querySelector(".score").textContent = fmt(body.score);
  card.querySelector(".fill").style.width = (Math.min(1, body.score) * 100).toFixed(2) + "%";
  card.querySelector(".timing").textContent =
    `${body.width}×${body.height}, ${Math.round(body.timings_ms.total)} ms` +
    (body.roi ? `, in ROI (${(body.roi.coverage * 100).toFixed(1)} %)` : "");
  if (body.overlay_png) card.querySelector(".overlay").src = "data:image/png;base64," + body.overlay_png;
  relabel();
}

function fail(r, message) {
  r.failed = true;
  r.card.classList.remove("pending");
  r.card.classList.add("failed");
  r.card.querySelector(".badge").textContent = "error";
  r.card.querySelector(".error").textContent = message;
  relabel();
}

const drop = $("drop");
$("file-input").addEventListener("change", (e) => { addFiles(e.target.files); e.target.value = ""; });
drop.addEventListener("dragover", (e) => { e.preventDefault(); drop.classList.add("over"); });
drop.addEventListener("dragleave", () => drop.classList.remove("over"));
drop.addEventListener("drop", (e) => {
  e.preventDefault();
  drop.classList.remove("over");
  addFiles(e.dataTransfer.files);
});
$("clear").addEventListener("click", () => {
  for (const r of state.results) URL.revokeObjectURL(r.url);
  state.results = [];
  state.queue = [];
  $("results").textContent = "";
  relabel();
});

// ---- ROI editor ----
// Shapes are kept in image pixels, as whole pixel indices (what an operator points at). The mask
// itself is made by the service (POST /roi) with the function `grdnet roi` uses, so the file the
// page downloads is the file that command writes for the same shapes: no second pixel rule here.

const roi = {
  file: null, url: null, width: 0, height: 0, mode: "rect",
  shapes: [], // {kind: "rect", coords: [x0, y0, x1, y1]} | {kind: "polygon", coords: [x, y, ...]}
  points: [], // the polygon being drawn: [[x, y], ...]
  drag: null, // the rectangle being dragged: {start: [x, y], end: [x, y], sx, sy}
  hover: null, maskBlob: null, maskUrl: null, seq: 0, result: null,
};
const MIN_DRAG_PX = 3; // a shorter drag is a stray click, not a rectangle

function roiForUploads() {
  return $("roi-apply").checked && roi.maskBlob !== null;
}

function shellQuote(s) {
  return /^[\w./-]+$/.test(s) ? s : "'" + s.replace(/'/g, "'\\''") + "'";
}

function roiStem() {
  return roi.file ? roi.file.name.replace(/\.[^.]*$/, "") || "sample" : "sample";
}

function shapesDoc() {
  const doc = { rects: [], polygons: [] };
  for (const s of roi.shapes) (s.kind === "rect" ? doc.rects : doc.polygons).push(s.coords);
  return doc;
}

function roiCommand() {
  const parts = ["grdnet roi --like", shellQuote(roi.file.name)];
  for (const s of roi.shapes) parts.push(s.kind === "rect" ? "--rect" : "--polygon", s.coords.join(","));
  parts.push("--out", shellQuote(roiStem() + "_roi.png"));
  return parts.join(" ");
}

function openSample(file) {
  if (!file) return;
  const img = $("roi-image");
  const url = URL.createObjectURL(file);
  img.onload = () => {
    $("roi-work").hidden = false; // laid out first: the image's box tells its stored proportions
    // The service reads the pixels as stored; naturalWidth/Height follow the EXIF orientation. The
    // image is shown as stored (CSS image-orientation: none), so a quarter-turn orientation shows
    // as a box with swapped proportions: then the stored size is the natural one swapped.
    let [width, height] = [img.naturalWidth, img.naturalHeight];
    const box = img.getBoundingClientRect();
    if (width !== height && (box.height > box.width) !== (height > width)) [width, height] = [height, width];
    if (roi.url) URL.revokeObjectURL(roi.url);
    Object.assign(roi, { file, url, width, height });
    // Fit the stage to the panel and to 70 % of the window height, whatever the aspect ratio.
    $("roi-stage").style.width = `min(100%, 44rem, ${(70 * roi.width / roi.height).toFixed(3)}vh)`;
    $("roi-result").querySelector(".roi-stage").style.width = $("roi-stage").style.width;
    $("roi-error").textContent = "";
    roi.shapes = [];
    roi.points = [];
    roi.drag = null;
    shapesChanged();
  };
  img.onerror = () => {
    URL.revokeObjectURL(url);
    $("roi-error").textContent = `${file.name}: this browser cannot show it; open a PNG or JPEG copy`;
  };
  img.src = url;
}

function pixelAt(e) {
  const r = $("roi-canvas").getBoundingClientRect();
  const x = Math.floor((e.clientX - r.left) / r.width * roi.width);
  const y = Math.floor((e.clientY - r.top) / r.height * roi.height);
  return [Math.min(roi.width - 1, Math.max(0, x)), Math.min(roi.height - 1, Math.max(0, y))];
}

function setMode(mode) {
  if (roi.points.length) closePolygon();
  roi.mode = mode;
  $("roi-mode-rect").setAttribute("aria-pressed", String(mode === "rect"));
  $("roi-mode-poly").setAttribute("aria-pressed", String(mode === "polygon"));
  draw();
}

function closePolygon() {
  if (roi.points.length >= 3) roi.shapes.push({ kind: "polygon", coords: roi.points.flat() });
  roi.points = [];
  shapesChanged();
}

function undo() {
  if (roi.points.length) roi.points.pop();
  else roi.shapes.pop();
  shapesChanged();
}

function shapesChanged() {
  const n = roi.shapes.length;
  $("roi-undo").disabled = n === 0 && roi.points.length === 0;
  $("roi-clear").disabled = $("roi-undo").disabled;
  $("roi-close").disabled = roi.points.length < 3;
  $("roi-command").textContent = n && roi.file ? roiCommand() : "";
  $("roi-command").parentElement.hidden = !n;
  roi.result = null; // a result for other shapes would mislead
  $("roi-result").hidden = true;
  draw();
  updateMask();
}

async function updateMask() {
  const seq = ++roi.seq;
  if (!roi.shapes.length) return showMask(null);
  const form = new FormData();
  form.append("width", roi.width);
  form.append("height", roi.height);
  form.append("shapes", JSON.stringify(shapesDoc()));
  $("roi-status").textContent = "making the mask…";
  let resp;
  try {
    resp = await fetch("/roi", { method: "POST", body: form, headers: headers() });
  } catch (e) {
    resp = null;
    if (seq === roi.seq) $("roi-error").textContent = "network error: " + e.message;
  }
  if (seq !== roi.seq) return; // a later edit's request has taken over
  if (resp && !resp.ok) {
    if (resp.status === 401) $("auth").hidden = false;
    $("roi-error").textContent = await errorText(resp);
  }
  if (!resp || !resp.ok) return showMask(null);
  const blob = await resp.blob();
  if (seq !== roi.seq) return;
  $("roi-error").textContent = "";
  showMask(blob, Number(resp.headers.get("X-ROI-Coverage")));
}

function showMask(blob, coverage) {
  if (roi.maskUrl) URL.revokeObjectURL(roi.maskUrl);
  roi.maskBlob = blob;
  roi.maskUrl = blob ? URL.createObjectURL(blob) : null;
  const link = $("roi-download");
  for (const img of [$("roi-mask"), $("roi-result-mask")]) {
    img.hidden = !blob;
    if (blob) img.src = roi.maskUrl; else img.removeAttribute("src");
  }
  if (blob) {
    link.href = roi.maskUrl;
    link.download = roiStem() + "_roi.png";
  } else {
    link.removeAttribute("href");
  }
  link.classList.toggle("disabled", !blob);
  $("roi-inspect").disabled = !blob;
  $("roi-apply").disabled = !blob;
  if (!blob) $("roi-apply").checked = false;
  const n = roi.shapes.length;
  $("roi-status").textContent = !blob ? (n ? "no mask" : "no shapes yet")
    : `${n} shape(s), ${(coverage * 100).toFixed(1)} % of the ${roi.width}×${roi.height} image`;
}

async function inspectInRoi() {
  const form = new FormData();
  form.append("file", roi.file, roi.file.name);
  form.append("roi", roi.maskBlob, "roi.png");
  const seq = roi.seq;
  $("roi-inspect").disabled = true;
  try {
    const resp = await fetch("/predict?overlay=true", { method: "POST", body: form, headers: headers() });
    if (seq !== roi.seq) return; // the shapes changed while the model ran
    if (!resp.ok) {
      $("roi-error").textContent = await errorText(resp);
      return;
    }
    const body = await resp.json();
    roi.result = body;
    $("roi-heatmap").src = "data:image/png;base64," + body.overlay_png;
    $("roi-score").textContent = fmt(body.score);
    $("roi-result").hidden = false;
    roiRelabel(currentThreshold());
  } catch (e) {
    $("roi-error").textContent = "network error: " + e.message;
  } finally {
    $("roi-inspect").disabled = roi.maskBlob === null;
  }
}

function roiRelabel(t) {
  if (!roi.result) return;
  const defective = roi.result.score >= t;
  const badge = $("roi-label");
  badge.textContent = defective ? "defective" : "good";
  $("roi-result").classList.toggle("defective", defective);
  $("roi-result").classList.toggle("good", !defective);
}

// Drawing: the canvas covers the image; its transform maps image pixels onto it, so shapes are
// drawn in the coordinates they are stored in.
function draw() {
  const c = $("roi-canvas");
  if (!roi.width) return;
  const r = c.getBoundingClientRect(), dpr = window.devicePixelRatio || 1;
  const w = Math.max(1, Math.round(r.width * dpr)), h = Math.max(1, Math.round(r.height * dpr));
  if (c.width !== w || c.height !== h) { c.width = w; c.height = h; }
  const ctx = c.getContext("2d");
  ctx.setTransform(1, 0, 0, 1, 0, 0);
  ctx.clearRect(0, 0, w, h);
  const sx = w / roi.width, sy = h / roi.height;
  ctx.setTransform(sx, 0, 0, sy, 0, 0);
  const px = 2 * dpr / Math.min(sx, sy); // a line 2 screen pixels wide, in image pixels
  ctx.lineWidth = px;
  ctx.lineJoin = "round";
  const rect = ([x0, y0, x1, y1]) => ctx.strokeRect(x0, y0, x1 - x0 + 1, y1 - y0 + 1); // both ends inside
  const path = (pts, close) => {
    ctx.beginPath();
    pts.forEach(([x, y], i) => (i ? ctx.lineTo(x + 0.5, y + 0.5) : ctx.moveTo(x + 0.5, y + 0.5)));
    if (close) ctx.closePath();
    ctx.stroke();
  };
  ctx.strokeStyle = "#2f5fd0";
  for (const s of roi.shapes) {
    if (s.kind === "rect") rect(s.coords);
    else path(s.coords.reduce((a, v, i) => (i % 2 ? a[a.length - 1].push(v) : a.push([v]), a), []), true);
  }
  ctx.strokeStyle = "#e07b00";
  if (roi.drag) rect(normRect(roi.drag.start, roi.drag.end));
  if (roi.points.length) {
    path(roi.hover ? [...roi.points, roi.hover] : roi.points, false);
    ctx.fillStyle = "#e07b00";
    for (const [x, y] of roi.points) ctx.fillRect(x + 0.5 - 1.5 * px, y + 0.5 - 1.5 * px, 3 * px, 3 * px);
  }
}

function normRect([ax, ay], [bx, by]) {
  return [Math.min(ax, bx), Math.min(ay, by), Math.max(ax, bx), Math.max(ay, by)];
}

const canvas = $("roi-canvas");
canvas.addEventListener("pointerdown", (e) => {
  if (roi.mode !== "rect" || e.button !== 0 || !roi.width) return;
  canvas.setPointerCapture(e.pointerId);
  roi.drag = { start: pixelAt(e), end: pixelAt(e), sx: e.clientX, sy: e.clientY };
  draw();
});
canvas.addEventListener("pointermove", (e) => {
  if (!roi.width) return;
  if (roi.drag) roi.drag.end = pixelAt(e);
  else if (roi.mode === "polygon" && roi.points.length) roi.hover = pixelAt(e);
  else return;
  draw();
});
canvas.addEventListener("pointerup", (e) => {
  const d = roi.drag;
  if (!d) return;
  roi.drag = null;
  d.end = pixelAt(e);
  if (Math.hypot(e.clientX - d.sx, e.clientY - d.sy) >= MIN_DRAG_PX) {
    roi.shapes.push({ kind: "rect", coords: normRect(d.start, d.end) });
    shapesChanged();
  } else {
    draw();
  }
});
canvas.addEventListener("pointercancel", () => { roi.drag = null; draw(); });
canvas.addEventListener("click", (e) => {
  if (roi.mode !== "polygon" || !roi.width) return;
  const p = pixelAt(e), last = roi.points[roi.points.length - 1];
  if (!last || last[0] !== p[0] || last[1] !== p[1]) roi.points.push(p); // a double-click adds one point
  roi.hover = null;
  $("roi-close").disabled = roi.points.length < 3;
  $("roi-undo").disabled = false;
  $("roi-clear").disabled = false;
  draw();
});
canvas.addEventListener("dblclick", (e) => {
  if (roi.mode === "polygon") { e.preventDefault(); closePolygon(); }
});
document.addEventListener("keydown", (e) => {
  if (!$("roi-panel").open || e.target.closest("input, textarea")) return;
  if (e.key === "Enter" && roi.points.length) { e.preventDefault(); closePolygon(); }
  if (e.key === "Escape" && (roi.points.length || roi.drag)) { roi.points = []; roi.drag = null; shapesChanged(); }
});
new ResizeObserver(draw).observe($("roi-stage"));

$("roi-file").addEventListener("change", (e) => { openSample(e.target.files[0]); e.target.value = ""; });
$("roi-mode-rect").addEventListener("click", () => setMode("rect"));
$("roi-mode-poly").addEventListener("click", () => setMode("polygon"));
$("roi-close").addEventListener("click", closePolygon);
$("roi-undo").addEventListener("click", undo);
$("roi-clear").addEventListener("click", () => { roi.shapes = []; roi.points = []; shapesChanged(); });
$("roi-inspect").addEventListener("click", inspectInRoi);
$("roi-download").addEventListener("click", (e) => { if (!roi.maskBlob) e.preventDefault(); });

loadModel();
