// itm's web page: plain JavaScript over the server's JSON API; no build step, nothing from elsewhere.
"use strict";

const $ = (id) => document.getElementById(id);
const SETTINGS = ["k", "kind", "rerank_k"];
const DEFAULTS = { k: "10", kind: "", rerank_k: "50" };

// ---- the query in the URL, so that a search can be bookmarked ------------------------------
function settingsParams() {
  const p = new URLSearchParams();
  for (const name of SETTINGS) {
    const value = $(name).value.trim();
    if (value !== "" && value !== DEFAULTS[name]) p.set(name, value);
  }
  if (!$("rerank").checked) p.set("rerank", "0");
  return p;
}

function loadSettings(p) {
  for (const name of SETTINGS) $(name).value = p.get(name) ?? DEFAULTS[name];
  $("rerank").checked = p.get("rerank") !== "0";
  $("rerank_k").disabled = !$("rerank").checked;
  $("q").value = p.get("q") ?? "";
}

function apiParams(p) {
  const api = new URLSearchParams();
  if (p.has("q")) api.set("q", p.get("q"));
  if (p.has("image")) api.set("image_id", p.get("image"));
  for (const name of SETTINGS) if (p.get(name)) api.set(name, p.get(name));
  api.set("rerank", p.get("rerank") === "0" ? "false" : "true");
  return api;
}

// ---- the access token ------------------------------------------------------------------------
// A server that listens beyond loopback asks for its token (401): the page asks once, keeps it in a cookie that
// only this server's pages send (images and thumbnails carry it too), and asks again only if it is refused.
async function request(url, options) {
  let response = await fetch(url, options);
  if (response.status === 401) {
    const token = prompt("This itm server needs its access token:");
    if (token) {
      document.cookie = `itm_token=${encodeURIComponent(token)}; path=/; SameSite=Strict; max-age=31536000`;
      response = await fetch(url, options);
    }
  }
  return response;
}

// ---- searching -----------------------------------------------------------------------------
async function searchFromUrl() {
  const p = new URLSearchParams(location.search);
  loadSettings(p);
  if (p.has("image")) showQueryImage(`/api/images/${encodeURIComponent(p.get("image"))}/thumbnail`, "this image");
  else hideQueryImage();
  if (!p.has("q") && !p.has("image")) return clearResults();
  await show(request("/api/search?" + apiParams(p)));
}

function go(query) {  // query: {q} or {image}
  const p = settingsParams();
  for (const [key, value] of Object.entries(query)) p.set(key, value);
  history.pushState(null, "", "?" + p);
  return searchFromUrl();
}

async function upload(file) {
  if (!file) return;
  const p = settingsParams();
  const form = new FormData();
  form.append("image", file);
  for (const name of SETTINGS) if (p.get(name)) form.append(name, p.get(name));
  form.append("rerank", $("rerank").checked ? "true" : "false");
  history.pushState(null, "", "?" + p);  // an uploaded image does not fit in a URL: only the settings stay
  $("q").value = "";
  showQueryImage(URL.createObjectURL(file), file.name);
  await show(request("/api/search/upload", { method: "POST", body: form }));
}

async function show(pending) {
  setStatus("Searching…");
  let reply;
  try {
    const response = await pending;
    reply = await response.json();
    if (!response.ok) return fail(reply.error || `the server answered ${response.status}`);
  } catch (e) {
    return fail(`the server could not be reached (${e.message})`);
  }
  render(reply);
}

// ---- results -------------------------------------------------------------------------------
function render(reply) {
  clearResults();
  const images = reply.hits.filter((h) => h.kind === "image");
  const texts = reply.hits.filter((h) => h.kind === "text");
  if (!reply.hits.length) {
    setStatus("Nothing matches this query in the index. Try other words, or show texts and images (show: both).", "empty");
    return;
  }
  const t = reply.timings;
  const parts = [count(images.length, "image"), count(texts.length, "text")].filter(Boolean);
  setStatus(`${parts.join(" and ")}${reply.reranked ? ", reranked by the fusion model" : ", by recall alone"}` +
            ` · ${Math.round(t.total_ms)} ms (encode ${t.encode_ms.toFixed(1)}, recall ${t.recall_ms.toFixed(1)},` +
            ` rerank ${t.rerank_ms.toFixed(1)}) · generation ${reply.generation}`);
  if (texts.length) $("texts").append(textList(texts));
  for (const hit of images) $("images").append(imageCard(hit));
}

function textList(hits) {
  const list = document.createElement("ol");
  for (const hit of hits) {
    const item = document.createElement("li");
    item.dataset.id = hit.id;
    const button = document.createElement("button");
    button.type = "button";
    button.className = "text-hit";
    button.title = "Search for images with this text";
    button.textContent = hit.text;
    button.addEventListener("click", () => go({ q: hit.text }));
    item.append(button, scores(hit));
    list.append(item);
  }
  return list;
}

function imageCard(hit) {
  const card = document.createElement("figure");
  card.dataset.id = hit.id;
  const button = document.createElement("button");
  button.type = "button";
  button.className = "image-hit";
  button.title = `More like this: ${hit.path}`;
  const img = document.createElement("img");
  img.src = hit.thumbnail;
  img.alt = hit.path.split("/").pop();
  img.loading = "lazy";
  button.append(img);
  button.addEventListener("click", () => go({ image: hit.id }));
  const caption = document.createElement("figcaption");
  const open = document.createElement("a");
  open.href = hit.image;
  open.target = "_blank";
  open.rel = "noopener";
  open.textContent = img.alt;
  open.title = hit.path;
  caption.append(scores(hit), open);
  card.append(button, caption);
  return card;
}

function scores(hit) {
  const span = document.createElement("span");
  span.className = "scores";
  span.textContent = hit.match_logit === null
    ? `recall ${hit.recall_score.toFixed(3)}`
    : `score ${hit.score.toFixed(3)} · recall ${hit.recall_score.toFixed(3)} · match ${hit.match_logit.toFixed(3)}`;
  return span;
}

function count(n, what) {
  return n ? `${n} ${what}${n === 1 ? "" : "s"}` : "";
}

// ---- page state ----------------------------------------------------------------------------
function setStatus(text, kind = "") {
  $("status").textContent = text;
  $("status").className = kind;
}

function fail(message) {
  clearResults();
  setStatus(message, "error");
}

function clearResults() {
  $("texts").replaceChildren();
  $("images").replaceChildren();
  setStatus("");
}

function showQueryImage(src, name) {
  const img = document.createElement("img");
  img.src = src;
  img.alt = name;
  const label = document.createElement("span");
  label.textContent = `Texts and images like ${name}`;
  $("query").replaceChildren(img, label);
  $("query").hidden = false;
}

function hideQueryImage() {
  $("query").hidden = true;
  $("query").replaceChildren();
}

async function describeIndex() {
  try {
    const info = await (await request("/api/info")).json();
    const n = info.counts.image + info.counts.text;
    $("about").textContent = `${info.index} · ${count(info.counts.image, "image") || "no images"}, ` +
      `${count(info.counts.text, "text") || "no texts"} · ${info.model.name || info.model.arch}` +
      `${info.reranker ? " with a fusion reranker" : ", recall only"} · generation ${info.generation}`;
    if (!n) setStatus("The index is empty: add images with `itm-index build FOLDER` (and texts with " +
                      "`itm-index build captions.txt`); this page picks them up without a restart.", "empty");
    return n;
  } catch (e) {
    fail(`the server could not describe its index (${e.message})`);
    return 0;
  }
}

// ---- wiring --------------------------------------------------------------------------------
function wire() {
  $("search").addEventListener("submit", (e) => {
    e.preventDefault();
    const q = $("q").value.trim();
    if (q) go({ q });
  });
  $("rerank").addEventListener("change", () => { $("rerank_k").disabled = !$("rerank").checked; });
  $("file").addEventListener("change", () => upload($("file").files[0]));
  const drop = $("drop");
  for (const name of ["dragenter", "dragover"]) {
    document.addEventListener(name, (e) => { e.preventDefault(); drop.classList.add("over"); });
  }
  for (const name of ["dragleave", "drop"]) {
    document.addEventListener(name, (e) => { e.preventDefault(); drop.classList.remove("over"); });
  }
  document.addEventListener("drop", (e) => upload(e.dataTransfer.files[0]));
  window.addEventListener("popstate", searchFromUrl);
}

wire();
describeIndex().then((n) => { if (n) searchFromUrl(); else loadSettings(new URLSearchParams(location.search)); });
