// cxrlab web page: upload one or several images, list them, and for the selected one show the image as the
// model sees it, the per-label table and the heatmap of a selected label (the image's top label first).
// Plain browser JavaScript, no build step, no inline script or style, nothing fetched from outside this server.
"use strict";

const $ = (id) => document.getElementById(id);
const DISPLAY = 512;  // pixels of the picture and heatmap the server renders (shown smaller, crisp on HiDPI)
let uploads = [];     // [{file, result}] of the last upload
let current = null;   // the selected upload's File
let selected = null;  // the label whose heatmap is shown
let generation = 0;   // bumped by each upload / selection, so a late answer for an older one is dropped

function showError(message) {
  $("error").textContent = message;
  $("error").hidden = false;
}

function clearError() {
  $("error").hidden = true;
  $("error").textContent = "";
}

// the server's messages name the file ("a.png: not a PNG…", "cannot read image a.png: …"); the page
// shows the name beside them already
function withoutName(name, message) {
  if (message.startsWith(`${name}: `)) return message.slice(name.length + 2);
  return message.replace(` ${name}: `, ": ");
}

async function detail(response) {
  try {
    const body = await response.json();
    return typeof body.detail === "string" ? body.detail : JSON.stringify(body.detail);
  } catch (e) {
    return response.statusText;
  }
}

// a server started with a token (cxrlab serve --token) answers the API 401 without it: the page asks for
// it once and keeps it for this tab only (sessionStorage), sending it as a bearer token
const TOKEN_KEY = "cxrlab-token";
let asking = null;  // one question at a time, however many requests were refused together

async function api(url, options = {}) {
  for (let attempt = 0; attempt < 3; attempt++) {
    const token = sessionStorage.getItem(TOKEN_KEY);
    const response = await fetch(url, { ...options, headers: token ? { Authorization: `Bearer ${token}` } : {} });
    if (response.status !== 401 || attempt === 2) return response;
    if (sessionStorage.getItem(TOKEN_KEY) === token) {  // not already answered by another request's question
      asking = asking || Promise.resolve().then(() => {
        const entered = (window.prompt("This server needs its access token:") || "").trim();
        if (entered) sessionStorage.setItem(TOKEN_KEY, entered); else sessionStorage.removeItem(TOKEN_KEY);
      }).finally(() => { asking = null; });
      await asking;
    }
    if (!sessionStorage.getItem(TOKEN_KEY)) return response;
  }
}

async function loadModel() {
  const [labels, version] = await Promise.all([api("/labels").then((r) => r.json()),
                                               api("/version").then((r) => r.json())]);
  const m = version.model;
  $("model").textContent = `${m.head} on ${(m.backbones || []).join(" + ")} · ${m.format} ${m.file} · ` +
    `${labels.labels.length} labels · thresholds: ${labels.threshold_source} · ${version.runtime}`;
  const origin = version.provenance;
  $("provenance").textContent = origin.summary;
  if (origin.data_kind === "synthetic") {
    $("synthetic").textContent = `Trained on synthetic radiographs (${origin.source}): a demonstration of the ` +
      "pipeline. Its outputs say nothing about real chest X-rays.";
    $("synthetic").hidden = false;
  }
  const select = $("method");
  select.innerHTML = "";
  for (const method of labels.heatmap_methods) {
    const option = document.createElement("option");
    option.value = option.textContent = method;
    select.appendChild(option);
  }
  if (!labels.heatmap_methods.length) {
    select.disabled = true;
  }
}

function renderTable(entries) {
  const body = document.querySelector("#labels tbody");
  body.innerHTML = "";
  const sorted = entries.slice().sort((a, b) => (b.probability ?? -1) - (a.probability ?? -1));
  for (const entry of sorted) {
    const row = document.createElement("tr");
    row.dataset.label = entry.label;
    const mark = entry.positive === null ? ["untrained", "not trained"]
      : entry.positive ? ["positive", "● positive"] : ["negative", "○ negative"];
    const fmt = (v) => (v === null ? "–" : v.toFixed(3));
    row.innerHTML = `<td></td><td class="num">${fmt(entry.probability)}</td>` +
      `<td class="num">${fmt(entry.threshold)}</td><td class="${mark[0]}">${mark[1]}</td>`;
    row.firstChild.textContent = entry.label;
    row.addEventListener("click", () => showHeatmap(entry.label));
    body.appendChild(row);
  }
  return sorted;
}

function renderList() {
  const list = $("files");
  list.innerHTML = "";
  uploads.forEach((upload, index) => {
    const item = document.createElement("li");
    const name = document.createElement("span");
    name.className = "name";
    name.textContent = upload.file.name;
    const note = document.createElement("span");
    if (upload.result.error) {
      note.className = "file-error";
      note.textContent = withoutName(upload.file.name, upload.result.error);
    } else {
      const top = upload.result.labels.slice().sort((a, b) => (b.probability ?? -1) - (a.probability ?? -1))[0];
      note.className = "muted";
      note.textContent = top ? `top: ${top.label} ${top.probability.toFixed(3)}` : "";
    }
    item.append(name, " ", note);
    item.addEventListener("click", () => select(index));
    list.appendChild(item);
  });
  list.hidden = uploads.length < 2;
}

async function picture(endpoint, fields, token) {
  const form = new FormData();
  form.append("file", current);
  for (const [key, value] of Object.entries(fields)) form.append(key, value);
  const response = await api(endpoint, { method: "POST", body: form });
  if (token !== generation) return null;
  if (!response.ok) {
    showError(`${endpoint.slice(1)}: ${withoutName(current.name, await detail(response))}`);
    return null;
  }
  return response;
}

async function showHeatmap(label) {
  selected = label;
  $("flat").hidden = true;  // the note belongs to the map it was measured on
  for (const row of document.querySelectorAll("#labels tbody tr")) {
    row.classList.toggle("selected", row.dataset.label === label);
  }
  if ($("method").disabled) {
    $("heatmap-caption").textContent = "this model has no heatmaps";
    return;
  }
  const token = ++generation;
  $("heatmap-caption").textContent = `computing the ${label} heatmap…`;
  const response = await picture("/heatmap", { label, method: $("method").value, size: DISPLAY }, token);
  if (!response) return;
  const blob = await response.blob();
  if (token !== generation) return;
  $("heatmap").src = URL.createObjectURL(blob);
  const p = Number(response.headers.get("X-Probability"));
  $("heatmap-caption").textContent = `${label}: p = ${p.toFixed(3)} (${response.headers.get("X-Method")})`;
  // the server measures the map: one colour everywhere means no spatial evidence, not "evenly spread"
  const flat = response.headers.get("X-Flat-Map") === "true";
  $("flat").textContent = flat ? `flat map: this model gives no spatial evidence for ${label}` +
    ` (${response.headers.get("X-Method")} map is uniform over the image)` : "";
  $("flat").hidden = !flat;
  $("heatmap").dataset.label = label;
}

async function select(index) {
  const upload = uploads[index];
  current = upload.file;
  document.querySelectorAll("#files li").forEach((li, i) => li.classList.toggle("selected", i === index));
  if (upload.result.error) {
    $("result").hidden = true;
    showError(`${upload.file.name}: ${withoutName(upload.file.name, upload.result.error)}`);
    return;
  }
  clearError();
  $("image-caption").textContent = upload.file.name;
  for (const id of ["image", "heatmap"]) $(id).removeAttribute("src");  // no picture of the previous file meanwhile
  const sorted = renderTable(upload.result.labels);
  $("result").hidden = false;
  const token = ++generation;
  const preview = await picture("/preview", { size: DISPLAY }, token);
  if (preview) {
    const blob = await preview.blob();
    if (token === generation) $("image").src = URL.createObjectURL(blob);
  }
  if (token === generation) await showHeatmap(sorted[0].label);  // each new image opens on its own top label
}

async function upload(fileList) {
  const files = Array.from(fileList);
  clearError();
  const token = ++generation;
  $("status").textContent = files.length === 1 ? `analysing ${files[0].name}…` : `analysing ${files.length} images…`;
  const form = new FormData();
  for (const file of files) form.append("files", file);
  const response = await api("/predict", { method: "POST", body: form });
  if (token !== generation) return;
  $("status").textContent = "";
  if (!response.ok) {
    uploads = [];
    renderList();
    $("result").hidden = true;
    showError(await detail(response));  // the server's message names the file already
    return;
  }
  const body = await response.json();
  uploads = files.map((file, i) => ({ file, result: body.results[i] }));
  renderList();
  const first = uploads.findIndex((u) => !u.result.error);
  await select(first < 0 ? 0 : first);
}

$("file").addEventListener("change", (event) => {
  const files = Array.from(event.target.files);
  event.target.value = "";  // choosing the same file again is a new upload
  if (files.length) upload(files);
});
$("method").addEventListener("change", () => { if (current && selected) showHeatmap(selected); });
const drop = $("drop");
drop.addEventListener("dragover", (event) => { event.preventDefault(); drop.classList.add("over"); });
drop.addEventListener("dragleave", () => drop.classList.remove("over"));
drop.addEventListener("drop", (event) => {
  event.preventDefault();
  drop.classList.remove("over");
  if (event.dataTransfer.files.length) upload(event.dataTransfer.files);
});
loadModel().catch((e) => showError(`cannot reach the model: ${e}`));
