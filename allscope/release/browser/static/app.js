// allscope feature browser. Data files are scripts calling allscopeData(key, base64 gzip JSON),
// loaded on demand (pages opened from file:// may not fetch()). Corpus text is only ever
// inserted with textContent, never as HTML.
"use strict";

const waiting = new Map();   // key -> resolve, for scripts inserted but not yet run
const arrived = new Map();   // key -> payload, for scripts that ran before anyone asked
const loaded = new Map();    // key -> Promise of the parsed JSON
const PAGE = 50;
const state = { catalog: null, unit: null, summary: null, latent: 0, list: "all", page: 0,
                sort: "index", query: "" };

window.allscopeData = function (key, payload) {
  const resolve = waiting.get(key);
  if (resolve) { waiting.delete(key); resolve(payload); } else { arrived.set(key, payload); }
};

async function inflate(b64) {
  const bytes = Uint8Array.from(atob(b64), (c) => c.charCodeAt(0));
  const stream = new Blob([bytes]).stream().pipeThrough(new DecompressionStream("gzip"));
  return JSON.parse(await new Response(stream).text());
}

function load(key) {
  if (!loaded.has(key)) {
    loaded.set(key, new Promise((resolve, reject) => {
      if (arrived.has(key)) { resolve(arrived.get(key)); arrived.delete(key); return; }
      waiting.set(key, resolve);
      const script = document.createElement("script");
      script.src = "data/" + key + ".js";
      script.onerror = () => reject(new Error("cannot load data/" + key + ".js"));
      document.head.appendChild(script);
    }).then(inflate));
  }
  return loaded.get(key);
}

function el(tag, attrs, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (k === "text") node.textContent = v; else node.setAttribute(k, v);
  }
  for (const c of children) node.append(c);
  return node;
}

const $ = (id) => document.getElementById(id);
const fmt = (x) => (x === 0 ? "0" : Math.abs(x) >= 0.01 && Math.abs(x) < 1e4
  ? x.toPrecision(3) : x.toExponential(2));
const shown = (s) => s.replace(/\n/g, "\u21b5").replace(/\t/g, "\u21e5");

async function start() {
  try {
    state.catalog = await load("catalog");
  } catch (e) {
    $("status").textContent = String(e);
    throw e;
  }
  const f = state.catalog.facts;
  $("title").textContent = f.release;
  $("facts").textContent = `${f.tokens.toLocaleString()} tokens scanned at ` +
    `${Math.round(f.tokens_per_s).toLocaleString()} tokens/s; top ${f.top_n} contexts per latent`;
  for (const u of state.catalog.units) {
    $("dictionary").append(el("option", { value: u.id, text: `${u.label} (${u.width})` }));
  }
  $("dictionary").addEventListener("change", () => go($("dictionary").value, 0));
  $("latent").addEventListener("change", () => go(state.unit.id, Number($("latent").value)));
  $("prev").addEventListener("click", () => go(state.unit.id, state.latent - 1));
  $("next").addEventListener("click", () => go(state.unit.id, state.latent + 1));
  $("search").addEventListener("input", () => { state.query = $("search").value.trim();
    state.page = 0; renderList(); });
  $("sort").addEventListener("change", () => { state.sort = $("sort").value; state.page = 0;
    renderList(); });
  for (const b of document.querySelectorAll("#tabs button")) {
    b.addEventListener("click", () => {
      state.list = b.dataset.list; state.page = 0;
      for (const o of document.querySelectorAll("#tabs button")) o.classList.toggle("active", o === b);
      renderList();
    });
  }
  $("page-prev").addEventListener("click", () => { state.page = Math.max(0, state.page - 1); renderList(); });
  $("page-next").addEventListener("click", () => { state.page += 1; renderList(); });
  window.addEventListener("hashchange", fromHash);
  await fromHash();
}

async function fromHash() {
  const [id, latent] = decodeURIComponent(location.hash.slice(1)).split("/");
  const unit = state.catalog.units.find((u) => u.id === id) || state.catalog.units[0];
  await show(unit, Number.isInteger(Number(latent)) && latent !== undefined ? Number(latent) : 0);
}

function go(id, latent) {
  const unit = state.catalog.units.find((u) => u.id === id);
  latent = Math.min(Math.max(0, latent), unit.width - 1);
  const hash = `#${id}/${latent}`;
  if (location.hash === hash) fromHash(); else location.hash = hash;
}

async function show(unit, latent) {
  latent = Math.min(Math.max(0, latent), unit.width - 1);
  if (state.unit !== unit) {
    state.unit = unit;
    state.summary = await load(`${unit.id}/summary`);
    $("dictionary").value = unit.id;
    $("n-dead").textContent = `(${state.summary.dead.length})`;
    $("n-dense").textContent = `(${state.summary.dense.length})`;
    state.page = 0;
  }
  state.latent = latent;
  $("latent").value = latent;
  $("latent").max = unit.width - 1;
  renderList();
  const block = await load(`${unit.id}/block_${Math.floor(latent / unit.block_size)}`);
  if (state.unit !== unit || state.latent !== latent) return;  // a newer request won
  renderLatent(unit, block, block.latents[latent - block.start]);
}

function listed() {
  const s = state.summary;
  let ids = state.list === "dead" ? s.dead : state.list === "dense" ? s.dense
    : s.freq.map((_, i) => i);
  const q = state.query.toLowerCase();
  if (q) {
    ids = /^\d+$/.test(q) ? ids.filter((i) => String(i).startsWith(q))
      : ids.filter((i) => s.top_token[i].toLowerCase().includes(q) ||
                          (s.promoted[i] || "").toLowerCase().includes(q));
  }
  if (state.sort !== "index") ids = [...ids].sort((a, b) => s[state.sort][b] - s[state.sort][a]);
  return ids;
}

function renderList() {
  const s = state.summary, ids = listed();
  const pages = Math.max(1, Math.ceil(ids.length / PAGE));
  state.page = Math.min(state.page, pages - 1);
  const list = $("latents");
  list.replaceChildren();
  for (const i of ids.slice(state.page * PAGE, (state.page + 1) * PAGE)) {
    const label = `${String(i).padStart(5)} ${fmt(s.freq[i]).padStart(9)}  ${shown(s.top_token[i])}`;
    const li = el("li", { text: label, "data-latent": String(i) });
    if (i === state.latent) li.classList.add("current");
    li.addEventListener("click", () => go(state.unit.id, i));
    list.append(li);
  }
  if (!ids.length) list.append(el("li", { class: "empty", text: "no latents" }));
  $("page").textContent = ` ${state.page + 1} / ${pages} `;
}

function renderLatent(unit, block, lat) {
  const facts = state.catalog.facts, texts = block.texts;
  const view = $("view");
  view.replaceChildren();
  view.append(el("h2", { id: "latent-title", text: `${unit.label} \u2014 latent ${lat.i}` }));
  view.append(el("p", { class: "stats" },
    el("span", { text: `frequency ${fmt(lat.freq)}` }),
    el("span", { text: `max ${fmt(lat.max)}` }),
    el("span", { text: `mean when active ${fmt(lat.mean)}` }),
    el("span", { text: `${unit.n_tokens.toLocaleString()} tokens` })));

  view.append(el("h3", { text: "activation histogram (log-spaced bins)" }));
  const top = Math.max(1, ...lat.hist);
  const hist = el("div", { class: "hist" });
  const b = facts.bins;
  lat.hist.forEach((c, k) => {
    const lo = Math.pow(10, b.min_log10 + k / b.per_decade);
    hist.append(el("div", { style: `height:${(80 * c / top).toFixed(1)}px`,
                            title: `${c} activations >= ${fmt(lo)}` }));
  });
  view.append(el("div", { class: "histbox" }, hist, el("div", { class: "hist-axis" },
    el("span", { text: `10^${b.min_log10}` }), el("span", { text: "activation" }),
    el("span", { text: `10^${b.min_log10 + b.n / b.per_decade}` }))));

  if (lat.promoted) {
    const table = (cls, title, rows) => {
      const t = el("table", { class: cls }, el("caption", { text: title }));
      for (const [tok, v] of rows) t.append(el("tr", {}, el("td", { text: shown(texts[tok] ?? "") }),
                                                  el("td", { text: fmt(v) })));
      return t;
    };
    view.append(el("h3", { text: `output tokens (decoder direction through the unembedding)` }),
      el("div", { class: "logits" }, table("promoted", "promoted", lat.promoted),
                                      table("suppressed", "suppressed", lat.suppressed)));
  }

  view.append(el("h3", { text: `top activating contexts` }));
  const box = el("div", { id: "contexts" });
  if (!lat.contexts.length) box.append(el("p", { class: "empty", text: "never fired in this pass" }));
  for (const c of lat.contexts) {
    const row = el("div", { class: "context", title: `sequence ${c.seq}, position ${c.pos}` },
                   el("span", { class: "act", text: fmt(c.act) }));
    c.toks.forEach((tok, k) => {
      if (tok < 0) { row.append(el("span", { class: "token missing", text: "" })); return; }
      const a = c.acts[k], span = el("span", { class: "token", text: shown(texts[tok] ?? "") });
      if (a !== null) span.title = `activation ${fmt(a)}`;
      if (a > 0) span.style.background = `rgba(249,115,22,${(0.15 + 0.85 * a / lat.max).toFixed(3)})`;
      if (k === facts.before) span.classList.add("peak");
      row.append(span);
    });
    box.append(row);
  }
  view.append(box);
  document.body.dataset.ready = `${unit.id}/${lat.i}`;
}

start();
