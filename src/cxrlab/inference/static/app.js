// cxrlab web page: upload one image, show the per-label table and the heatmap of a selected label.
// Plain browser JavaScript, no build step and nothing fetched from outside this server.
"use strict";

const $ = (id) => document.getElementById(id);
let current = null;   // the uploaded File
let selected = null;  // the label whose heatmap is shown

function showError(message) {
  $("error").textContent = message;
  $("error").hidden = false;
}

function clearError() {
  $("error").hidden = true;
  $("error").textContent = "";
}

async function detail(response) {
  try {
    const body = await response.json();
    return typeof body.detail === "string" ? body.detail : JSON.stringify(body.detail);
  } catch (e) {
    return response.statusText;
  }
}

async function loadModel() {
  const [labels, version] = await Promise.all([fetch("/labels").then((r) => r.json()),
                                               fetch("/version").then((r) => r.json())]);
  const m = version.model;
  $("model").textContent = `${m.head} on ${(m.backbones || []).join(" + ")} · ${m.format} ${m.file} · ` +
    `${labels.labels.length} labels · thresholds: ${labels.threshold_source} · ${version.runtime}`;
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

async function showHeatmap(label) {
  selected = label;
  for (const row of document.querySelectorAll("#labels tbody tr")) {
    row.classList.toggle("selected", row.dataset.label === label);
  }
  if ($("method").disabled) {
    $("heatmap-caption").textContent = "this model has no heatmaps";
    return;
  }
  const form = new FormData();
  form.append("file", current);
  form.append("label", label);
  form.append("method", $("method").value);
  $("heatmap-caption").textContent = `computing the ${label} heatmap…`;
  const response = await fetch("/heatmap", { method: "POST", body: form });
  if (!response.ok) {
    showError(`heatmap: ${await detail(response)}`);
    return;
  }
  const blob = await response.blob();
  $("heatmap").src = URL.createObjectURL(blob);
  const p = Number(response.headers.get("X-Probability"));
  $("heatmap-caption").textContent = `${label}: p = ${p.toFixed(3)} (${response.headers.get("X-Method")})`;
  $("heatmap").dataset.label = label;
}

async function upload(file) {
  clearError();
  current = file;
  $("status").textContent = `analysing ${file.name}…`;
  const form = new FormData();
  form.append("files", file);
  const response = await fetch("/predict", { method: "POST", body: form });
  $("status").textContent = "";
  if (!response.ok) {
    $("result").hidden = true;
    showError(`${file.name}: ${await detail(response)}`);
    return;
  }
  const body = await response.json();
  const isDicom = /\.(dcm|dicom)$/i.test(file.name);
  $("image").src = isDicom ? "" : URL.createObjectURL(file);
  $("image").hidden = isDicom;
  $("image-caption").textContent = isDicom ? `${file.name} (DICOM: see the heatmap view)` : file.name;
  const sorted = renderTable(body.results[0].labels);
  $("result").hidden = false;
  await showHeatmap(selected && sorted.some((e) => e.label === selected) ? selected : sorted[0].label);
}

$("file").addEventListener("change", (event) => {
  if (event.target.files.length) upload(event.target.files[0]);
});
$("method").addEventListener("change", () => { if (current && selected) showHeatmap(selected); });
const drop = $("drop");
drop.addEventListener("dragover", (event) => { event.preventDefault(); drop.classList.add("over"); });
drop.addEventListener("dragleave", () => drop.classList.remove("over"));
drop.addEventListener("drop", (event) => {
  event.preventDefault();
  drop.classList.remove("over");
  if (event.dataTransfer.files.length) upload(event.dataTransfer.files[0]);
});
loadModel().catch((e) => showError(`cannot reach the model: ${e}`));
