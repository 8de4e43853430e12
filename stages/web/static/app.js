// The page of `python -m stages.app`: plain DOM, no framework. Every text from the server is set as textContent.
"use strict";

const PAGE = { queries: 20, gallery: 24 };
const TABS = {
  composed: [["queries", "Known queries"], ["gallery", "Gallery"], ["upload", "Upload"]],
  matching: [["text", "Text"], ["gallery", "Gallery"], ["upload", "Upload"]],
};
const state = { info: null, split: null, tab: null, choice: null, offset: { queries: 0, gallery: 0 } };
const $ = (id) => document.getElementById(id);

function el(tag, attributes = {}, ...children) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(attributes)) {
    if (key === "className") node.className = value;
    else if (key === "dataset") Object.assign(node.dataset, value);
    else if (key.startsWith("on")) node.addEventListener(key.slice(2), value);
    else node.setAttribute(key, value);
  }
  for (const child of children) node.append(child);
  return node;
}

async function api(path, options) {
  const response = await fetch(path, options);
  const body = await response.json().catch(() => ({ detail: `HTTP ${response.status}` }));
  if (!response.ok) {
    throw new Error(typeof body.detail === "string" ? body.detail : JSON.stringify(body.detail));
  }
  return body;
}

function query(params) {
  return new URLSearchParams(Object.entries(params).filter(([, v]) => v !== undefined && v !== null)).toString();
}

function imageUrl(imageId) {
  return `/api/image?${query({ split: state.split, id: imageId })}`;
}

function say(message) {
  $("status").textContent = message || "";
}

function showTab(name) {
  state.tab = name;
  state.choice = null;
  $("selected").replaceChildren();
  for (const button of $("tabs").children) button.classList.toggle("active", button.dataset.tab === name);
  for (const tab of ["queries", "gallery", "upload", "text"]) $(`tab-${tab}`).hidden = tab !== name;
  const composed = state.info.task === "composed";
  $("text-label").hidden = !composed && name !== "text";
  if (name === "queries") loadQueries();
  if (name === "gallery") loadGallery();
}

function pager(id, kind, total, reload) {
  const offset = state.offset[kind];
  const size = PAGE[kind];
  const page = Math.floor(offset / size) + 1;
  const pages = Math.max(1, Math.ceil(total / size));
  const move = (to) => () => { state.offset[kind] = to; reload(); };
  $(id).replaceChildren(
    el("button", { type: "button", className: "prev", onclick: move(Math.max(0, offset - size)) }, "previous"),
    el("span", {}, `page ${page} of ${pages} (${total})`),
    el("button", { type: "button", className: "next", onclick: move(Math.min((pages - 1) * size, offset + size)) },
       "next"),
  );
  $(id).querySelector(".prev").disabled = page <= 1;
  $(id).querySelector(".next").disabled = page >= pages;
}

async function loadQueries() {
  try {
    const order = $("order").value;
    const data = await api(`/api/queries?${query({ split: state.split, offset: state.offset.queries,
                                                     limit: PAGE.queries, order })}`);
    $("queries").replaceChildren(...data.items.map((q) => {
      const thumb = el("img", { src: imageUrl(q.reference_id), alt: q.reference_id, loading: "lazy" });
      thumb.addEventListener("error", () => { thumb.hidden = true; });
      const rank = q.target_rank === null || q.target_rank === undefined ? "" : `rank ${q.target_rank}`;
      return el("li", { className: "query", dataset: { queryId: q.query_id }, title: q.query_id,
                        onclick: (event) => chooseQuery(q, event.currentTarget) },
                thumb, el("span", { className: "text" }, q.text), el("span", { className: "rank" }, rank));
    }));
    pager("queries-pager", "queries", data.total, loadQueries);
  } catch (err) {
    say(err.message);
  }
}

async function loadGallery() {
  try {
    const data = await api(`/api/gallery?${query({ split: state.split, offset: state.offset.gallery,
                                                     limit: PAGE.gallery })}`);
    $("gallery").replaceChildren(...data.items.map((item) =>
      el("img", { src: imageUrl(item.image_id), alt: item.image_id, title: `${item.image_id}: ${item.caption}`,
                  dataset: { imageId: item.image_id }, onclick: (event) => chooseImage(item, event.currentTarget) })));
    pager("gallery-pager", "gallery", data.total, loadGallery);
  } catch (err) {
    say(err.message);
  }
}

function mark(node) {
  for (const chosen of document.querySelectorAll(".chosen")) chosen.classList.remove("chosen");
  if (node) node.classList.add("chosen");
}

function showSelected(src, label) {
  $("selected").replaceChildren(el("img", { src, alt: "selected" }), el("span", {}, label));
}

function chooseQuery(q, node) {
  state.choice = { kind: "query", queryId: q.query_id, text: q.text };
  $("text").value = q.text;
  mark(node);
  showSelected(imageUrl(q.reference_id), `query ${q.query_id}: reference ${q.reference_id}, target ${q.target_id}`);
}

function chooseImage(item, node) {
  state.choice = { kind: "image", imageId: item.image_id };
  mark(node);
  const role = state.info.task === "composed" ? "reference" : "query image";
  showSelected(imageUrl(item.image_id), `${role} ${item.image_id}`);
}

function chooseUpload(file) {
  if (!file) return;
  state.choice = { kind: "upload", file };
  mark(null);
  showSelected(URL.createObjectURL(file), `upload ${file.name} (${file.size} bytes)`);
}

function request() {
  const base = { split: state.split, k: $("k").value };
  const text = $("text").value;
  const choice = state.choice;
  if (state.info.task === "composed") {
    if (!choice) throw new Error("pick a known query, a gallery image or an upload first");
    if (choice.kind === "query") {
      return [`/api/search?${query({ ...base, query_id: choice.queryId,
                                     text: text === choice.text ? undefined : text })}`];
    }
    if (choice.kind === "image") return [`/api/search?${query({ ...base, reference_id: choice.imageId, text })}`];
    return [`/api/search/upload?${query({ ...base, text })}`, { method: "POST", body: choice.file }];
  }
  if (state.tab === "text") return [`/api/search?${query({ ...base, text })}`];
  if (!choice) throw new Error("pick a gallery image or an upload first");
  if (choice.kind === "image") return [`/api/search?${query({ ...base, image_id: choice.imageId })}`];
  return [`/api/search/upload?${query(base)}`, { method: "POST", body: choice.file }];
}

function render(data) {
  const results = data.results.map((r) => {
    const score = el("span", { className: "score" }, r.score.toFixed(4));
    if (data.ranked === "captions") {
      return el("figure", { className: "result caption", dataset: { captionId: r.caption_id, imageId: r.image_id,
                                                                     rank: r.rank } },
                el("img", { src: imageUrl(r.image_id), alt: r.image_id }),
                el("figcaption", {}, el("b", {}, `#${r.rank} `), score, el("br"), r.text, el("br"),
                   el("span", { className: "meta" }, `${r.caption_id} (${r.image_id})`)));
    }
    const caption = el("figcaption", {}, el("b", {}, `#${r.rank} `), score, el("br"), r.image_id);
    if (r.target) caption.append(el("span", { className: "badge" }, "target"));
    return el("figure", { className: r.target ? "result target" : "result",
                          dataset: { imageId: r.image_id, rank: r.rank } },
              el("img", { src: imageUrl(r.image_id), alt: r.image_id }), caption);
  });
  $("results").replaceChildren(...results);
  const parts = [`top ${data.results.length} ${data.ranked} of split ${data.query.split}`];
  if (data.excluded) parts.push(`reference ${data.excluded} left out`);
  if (data.target_id) {
    const found = data.results.find((r) => r.target);
    parts.push(found ? `target ${data.target_id} at rank ${found.rank}` : `target ${data.target_id} not in the top k`);
  }
  $("summary").textContent = parts.join("; ");
  $("results").dataset.searches = String(Number($("results").dataset.searches) + 1);
}

async function search() {
  say("");
  try {
    const [url, options] = request();
    render(await api(url, options));
  } catch (err) {
    say(err.message);
  }
}

async function start() {
  try {
    state.info = await api("/api/info");
  } catch (err) {
    say(err.message);
    return;
  }
  const info = state.info;
  $("model").textContent = `${info.model_name} (${info.task === "composed" ? "composed retrieval" :
    "image-text matching"}), ${info.model}`;
  $("split").replaceChildren(...info.splits.map((s) => el("option", { value: s.name }, s.name)));
  state.split = info.splits[0].name;
  $("split").addEventListener("change", () => {
    state.split = $("split").value;
    state.offset = { queries: 0, gallery: 0 };
    showTab(state.tab);
  });
  const failures = $("order").querySelector('option[value="failures"]');
  failures.disabled = !info.per_query;
  if (!info.per_query) failures.textContent += " (start the app with --per-query)";
  $("order").addEventListener("change", () => { state.offset.queries = 0; loadQueries(); });
  $("tabs").replaceChildren(...TABS[info.task].map(([name, label]) =>
    el("button", { type: "button", dataset: { tab: name }, onclick: () => showTab(name) }, label)));
  $("upload").addEventListener("change", (event) => chooseUpload(event.target.files[0]));
  $("search").addEventListener("click", search);
  $("text").addEventListener("keydown", (event) => { if (event.key === "Enter") search(); });
  $("k").max = String(info.max_k);
  showTab(TABS[info.task][0][0]);
}

start();
