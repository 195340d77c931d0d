// The operator's page: upload images, show score, decision and heatmap. The threshold slider
// re-labels the results already shown from their scores; it never calls the model again.
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
    `${body.width}×${body.height}, ${Math.round(body.timings_ms.total)} ms`;
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

loadModel();
