// Starling's playground: plain JavaScript, no dependencies, talks only to the server that
// served it. Model text is only ever put into the page as text nodes (never as HTML).
"use strict";

const $ = (id) => document.getElementById(id);
const KEY = "starling.key";
// The admin key lives for this tab only (sessionStorage), the client key in localStorage.
const ADMIN_KEY = "starling.admin-key";

// ---------- HTTP ----------

function headers(extra) {
  const h = Object.assign({ "content-type": "application/json" }, extra || {});
  const key = localStorage.getItem(KEY);
  if (key) h.authorization = "Bearer " + key;
  return h;
}

let asking = null;

/** Asks for an API key (kept in localStorage only); resolves once the dialog closes. Calls
 * made while it is open share the one dialog. */
function askKey() {
  if (asking) return asking;
  asking = new Promise((resolve) => {
    const d = $("key-dialog");
    $("key-input").value = localStorage.getItem(KEY) || "";
    d.onclose = () => {
      if (d.returnValue === "save") {
        const v = $("key-input").value.trim();
        if (v) localStorage.setItem(KEY, v); else localStorage.removeItem(KEY);
      }
      asking = null;
      resolve();
    };
    d.returnValue = "";
    d.showModal();
  });
  return asking;
}

/** fetch with the key; a 401 asks for a key and tries once more. */
async function api(path, init) {
  let r = await fetch(path, Object.assign({}, init, { headers: headers(init && init.headers) }));
  if (r.status === 401) {
    await askKey();
    r = await fetch(path, Object.assign({}, init, { headers: headers(init && init.headers) }));
  }
  return r;
}

async function errorText(r) {
  try {
    const j = await r.json();
    return (j.error && j.error.message) || r.statusText;
  } catch (_) {
    return r.status + " " + r.statusText;
  }
}

// ---------- safe markdown ----------

/** Inline markdown (`code`, **bold**, *italic*) as DOM nodes built from text. */
function inline(parent, text) {
  const re = /(`[^`\n]+`|\*\*[^*\n]+\*\*|\*[^*\n]+\*)/g;
  let last = 0;
  for (const m of text.matchAll(re)) {
    if (m.index > last) parent.appendChild(document.createTextNode(text.slice(last, m.index)));
    const t = m[0];
    let el;
    if (t.startsWith("`")) { el = document.createElement("code"); el.textContent = t.slice(1, -1); }
    else if (t.startsWith("**")) { el = document.createElement("strong"); el.textContent = t.slice(2, -2); }
    else { el = document.createElement("em"); el.textContent = t.slice(1, -1); }
    parent.appendChild(el);
    last = m.index + t.length;
  }
  if (last < text.length) parent.appendChild(document.createTextNode(text.slice(last)));
}

/** Renders markdown into `el`: fenced code blocks, lists, headings, paragraphs. */
function renderMarkdown(el, text) {
  el.replaceChildren();
  const parts = text.split(/```/);
  parts.forEach((part, i) => {
    if (i % 2 === 1) {
      const pre = document.createElement("pre");
      const code = document.createElement("code");
      const nl = part.indexOf("\n");
      code.textContent = nl >= 0 && /^[\w+-]*$/.test(part.slice(0, nl)) ? part.slice(nl + 1) : part;
      pre.appendChild(code);
      el.appendChild(pre);
      return;
    }
    for (const block of part.split(/\n{2,}/)) {
      if (!block.trim()) continue;
      const lines = block.split("\n");
      if (lines.every((l) => /^\s*([-*]|\d+\.)\s+/.test(l) || !l.trim())) {
        const list = document.createElement(/^\s*\d+\./.test(lines[0]) ? "ol" : "ul");
        for (const l of lines.filter((l) => l.trim())) {
          const li = document.createElement("li");
          inline(li, l.replace(/^\s*([-*]|\d+\.)\s+/, ""));
          list.appendChild(li);
        }
        el.appendChild(list);
      } else if (/^#{1,6}\s/.test(block)) {
        const h = document.createElement("p");
        const s = document.createElement("strong");
        inline(s, block.replace(/^#{1,6}\s+/, ""));
        h.appendChild(s);
        el.appendChild(h);
      } else {
        const p = document.createElement("p");
        lines.forEach((l, j) => {
          if (j) p.appendChild(document.createElement("br"));
          inline(p, l);
        });
        el.appendChild(p);
      }
    }
  });
}

// ---------- chat ----------

const chat = {
  history: [],        // {role, content} sent to the server
  session: newSession(),
  running: null,      // {requestId, controller}
};

function newSession() {
  return "ui-" + Math.random().toString(36).slice(2) + Date.now().toString(36);
}

function knob(name) {
  const v = $("k-" + name).value.trim();
  return v === "" ? undefined : Number(v);
}

function requestBody() {
  const messages = [];
  const system = $("system").value.trim();
  if (system) messages.push({ role: "system", content: system });
  messages.push(...chat.history);
  const body = {
    model: $("model").value || undefined,
    messages,
    stream: true,
    stream_options: { include_usage: true },
    logprobs: true,
    top_logprobs: 5,
    session_id: chat.session,
  };
  for (const k of ["temperature", "top_p", "top_k", "min_p", "repetition_penalty", "frequency_penalty",
                   "presence_penalty", "seed", "max_tokens"]) {
    const v = knob(k);
    if (v !== undefined && !Number.isNaN(v)) body[k] = v;
  }
  const stop = $("k-stop").value.split(",").map((s) => s.trim()).filter(Boolean);
  if (stop.length) body.stop = stop;
  const schema = $("k-schema").value.trim();
  if (schema) {
    body.response_format = { type: "json_schema", json_schema: { name: "ui", schema: JSON.parse(schema) } };
  }
  return body;
}

function addMessage(role, text) {
  const div = document.createElement("div");
  div.className = "msg " + role;
  const body = document.createElement("div");
  body.className = "body";
  div.appendChild(body);
  if (role === "user") body.textContent = text;
  $("messages").appendChild(div);
  div.scrollIntoView({ block: "end" });
  return div;
}

function colour(logprob) {
  const p = Math.exp(logprob);
  return "hsl(" + Math.round(120 * p) + ", 70%, 85%)";
}

/** The per-token view: each token coloured by its probability, alternatives on hover. */
function tokenView(tokens) {
  const box = document.createElement("div");
  box.className = "tokens";
  for (const t of tokens) {
    const span = document.createElement("span");
    span.className = "tok";
    span.textContent = t.token;
    span.style.background = colour(t.logprob);
    const alts = (t.top_logprobs || []).map((a) => JSON.stringify(a.token) + " " + (100 * Math.exp(a.logprob)).toFixed(1) + "%");
    span.title = "p = " + (100 * Math.exp(t.logprob)).toFixed(1) + "%\n" + alts.join("\n");
    box.appendChild(span);
  }
  return box;
}

function metaLine(div, info) {
  const meta = document.createElement("div");
  meta.className = "meta";
  const add = (cls, text) => {
    const s = document.createElement("span");
    s.className = cls;
    s.textContent = text;
    meta.appendChild(s);
  };
  add("finish", "finish: " + info.finish);
  if (info.seed !== undefined) add("seed", "seed: " + info.seed);
  if (info.usage) add("cached", "cached tokens: " + info.usage.prompt_tokens_details.cached_tokens);
  if (info.timings) {
    add("queue", "queue " + info.timings.queue_ms.toFixed(0) + " ms");
    add("ttft", "TTFT " + info.timings.time_to_first_token_ms.toFixed(0) + " ms");
  }
  if (info.tps !== undefined) add("tps", info.tps.toFixed(1) + " tok/s");
  const copy = document.createElement("button");
  copy.className = "copy";
  copy.textContent = "copy";
  copy.onclick = () => copyText(info.text);
  meta.appendChild(copy);
  const toggle = document.createElement("button");
  toggle.className = "show-tokens";
  toggle.textContent = "tokens";
  toggle.onclick = () => {
    const open = div.querySelector(".tokens");
    if (open) open.remove(); else div.appendChild(tokenView(info.tokens));
  };
  meta.appendChild(toggle);
  div.appendChild(meta);
}

async function copyText(text) {
  try {
    await navigator.clipboard.writeText(text);
  } catch (_) {
    const t = document.createElement("textarea");
    t.value = text;
    document.body.appendChild(t);
    t.select();
    document.execCommand("copy");
    t.remove();
  }
}

function setRunning(on) {
  $("send").disabled = on;
  $("stop").disabled = !on;
  $("regenerate").disabled = on || !chat.history.some((m) => m.role === "assistant");
  document.body.dataset.running = on ? "1" : "";
}

/** Reads an SSE body, calling `onData` with each `data:` payload. */
async function readSse(response, onData) {
  const reader = response.body.getReader();
  const decoder = new TextDecoder();
  let buf = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) break;
    buf += decoder.decode(value, { stream: true });
    let at;
    while ((at = buf.indexOf("\n\n")) >= 0) {
      const frame = buf.slice(0, at);
      buf = buf.slice(at + 2);
      const data = frame.split("\n").filter((l) => l.startsWith("data:")).map((l) => l.slice(5).trimStart()).join("\n");
      if (data) onData(data);
    }
  }
}

async function send() {
  if (chat.running) return;
  const text = $("input").value;
  if (!text.trim()) return;
  $("input").value = "";
  chat.history.push({ role: "user", content: text });
  addMessage("user", text);
  await reply();
}

async function reply() {
  let body;
  try {
    body = requestBody();
  } catch (e) {
    addMessage("assistant", "").querySelector(".body").textContent = "JSON schema: " + e.message;
    return;
  }
  const div = addMessage("assistant", "");
  const out = div.querySelector(".body");
  const requestId = "ui-" + Math.random().toString(36).slice(2);
  chat.running = { requestId };
  setRunning(true);
  const info = { text: "", tokens: [], finish: "?", started: performance.now() };
  let firstAt = null;
  try {
    const r = await api("/v1/chat/completions", { method: "POST", body: JSON.stringify(body), headers: { "x-request-id": requestId } });
    if (!r.ok) throw new Error(await errorText(r));
    await readSse(r, (data) => {
      if (data === "[DONE]") return;
      const chunk = JSON.parse(data);
      if (chunk.error) throw new Error(chunk.error.message);
      if (chunk.usage) info.usage = chunk.usage;
      if (chunk.seed !== undefined) info.seed = chunk.seed;
      if (chunk.timings) info.timings = chunk.timings;
      const c = chunk.choices && chunk.choices[0];
      if (!c) return;
      if (c.delta && c.delta.content) {
        if (firstAt === null) firstAt = performance.now();
        info.text += c.delta.content;
        renderMarkdown(out, info.text);
      }
      if (c.logprobs && c.logprobs.content) info.tokens.push(...c.logprobs.content);
      if (c.finish_reason) info.finish = c.finish_reason;
    });
    const n = info.tokens.length;
    if (firstAt !== null && n > 1) info.tps = (n - 1) / ((performance.now() - firstAt) / 1000);
    chat.history.push({ role: "assistant", content: info.text });
    div.dataset.finish = info.finish;
    metaLine(div, info);
  } catch (e) {
    const err = document.createElement("div");
    err.className = "error";
    err.textContent = String(e.message || e);
    div.appendChild(err);
    div.classList.add("failed");
    div.dataset.finish = "error";
    // The turn did not happen: its user message leaves the history (it stays on screen).
    if (chat.history.length && chat.history[chat.history.length - 1].role === "user") chat.history.pop();
  } finally {
    chat.running = null;
    setRunning(false);
    div.scrollIntoView({ block: "end" });
  }
}

async function stop() {
  if (!chat.running) return;
  await api("/v1/cancel", { method: "POST", body: JSON.stringify({ request_id: chat.running.requestId, model: $("model").value || undefined }) });
}

async function regenerate() {
  if (chat.running) return;
  const last = chat.history.map((m) => m.role).lastIndexOf("assistant");
  if (last < 0) return;
  chat.history.splice(last, 1);
  const msgs = $("messages").querySelectorAll(".msg.assistant:not(.failed)");
  msgs[msgs.length - 1].remove();
  await reply();
}

function newChat() {
  if (chat.running) return;
  const old = chat.session;
  chat.history = [];
  chat.session = newSession();
  $("messages").replaceChildren();
  setRunning(false);
  api("/v1/session/close", { method: "POST", body: JSON.stringify({ session_id: old }) }).catch(() => {});
}

// ---------- tokenizer ----------

async function tokenize() {
  const r = await api("/v1/tokenize", { method: "POST", body: JSON.stringify({ text: $("tok-text").value, with_pieces: true, model: $("model").value || undefined }) });
  const box = $("tok-pieces");
  box.replaceChildren();
  if (!r.ok) { $("tok-count").textContent = await errorText(r); return; }
  const j = await r.json();
  $("tok-count").textContent = j.count + " tokens";
  j.ids.forEach((id, i) => {
    const s = document.createElement("span");
    s.className = "piece";
    s.textContent = j.pieces[i];
    const small = document.createElement("small");
    small.textContent = id;
    s.appendChild(small);
    box.appendChild(s);
  });
}

// ---------- server panel ----------

const series = { tps: [], queue: [], running: [], kv: [], hits: [] };

/** Sums the samples of `name` in Prometheus text (all label sets, or the chosen model's). */
function metric(text, name, model) {
  let sum = null;
  for (const line of text.split("\n")) {
    if (!line.startsWith(name + "{") && !line.startsWith(name + " ")) continue;
    if (model && line.includes("model=") && !line.includes('model="' + model + '"')) continue;
    const v = Number(line.slice(line.lastIndexOf(" ") + 1));
    if (!Number.isNaN(v)) sum = (sum || 0) + v;
  }
  return sum;
}

function draw(canvas, values, max) {
  const g = canvas.getContext("2d");
  g.clearRect(0, 0, canvas.width, canvas.height);
  const top = Math.max(max || 0, ...values, 1e-9);
  g.strokeStyle = "#2f6fde";
  g.beginPath();
  values.forEach((v, i) => {
    // The newest sample at the right edge; a minute of history across.
    const x = ((60 - values.length + i) / 59) * canvas.width;
    const y = canvas.height - 2 - (v / top) * (canvas.height - 4);
    if (i) g.lineTo(x, y); else g.moveTo(x, y);
  });
  g.stroke();
}

function show(name, value, text, max) {
  const s = series[name];
  s.push(value || 0);
  if (s.length > 60) s.shift();
  $("m-" + name).textContent = text;
  draw($("c-" + name), s, max);
}

let polling = false;

async function poll() {
  if (!$("server").classList.contains("active") || polling) return;
  polling = true;
  try {
    await pollOnce();
  } finally {
    polling = false;
  }
}

async function pollOnce() {
  const model = $("model").value;
  // Plain fetch: a 401 here is shown, not prompted for every second.
  const r = await fetch("/metrics", { headers: headers() });
  if (r.status === 401) $("m-tps").textContent = "needs an API key";
  if (r.ok) {
    const t = await r.text();
    const tps = metric(t, "starling_generation_tokens_per_second", model);
    const queue = metric(t, "starling_queue_depth", model);
    const running = metric(t, "starling_running_sequences", model);
    const kv = metric(t, "starling_kv_cache_usage_ratio", model);
    const hits = metric(t, "starling_prefix_cache_hits_total", model);
    const queries = metric(t, "starling_prefix_cache_queries_total", model);
    const rate = queries ? hits / queries : 0;
    show("tps", tps, (tps || 0).toFixed(1));
    show("queue", queue, String(queue || 0));
    show("running", running, String(running || 0));
    show("kv", kv, (100 * (kv || 0)).toFixed(1) + "%", 1);
    show("hits", rate, queries ? (100 * rate).toFixed(0) + "% of " + queries : "–", 1);
  }
  await loadModels(false);
}

/** The models table (and list); `prompt` asks for a key on a 401 (page load), the
 * once-a-second refresh does not. */
async function loadModels(prompt) {
  const admin = sessionStorage.getItem(ADMIN_KEY);
  const body = $("models-table").querySelector("tbody");
  const rows = [];
  const listed = prompt ? await api("/v1/models", {}) : await fetch("/v1/models", { headers: headers() });
  const models = listed.ok ? (await listed.json()).data : [];
  const states = {};
  if (admin) {
    const r = await fetch("/admin/models", { headers: { authorization: "Bearer " + admin } });
    if (r.ok) for (const m of (await r.json()).models || []) states[m.id] = m.state;
  }
  for (const m of models) rows.push([m.id, states[m.id] || "ready", String(m.context_length), m.tool_call_format || ""]);
  body.replaceChildren(...rows.map((cells) => {
    const tr = document.createElement("tr");
    for (const c of cells) { const td = document.createElement("td"); td.textContent = c; tr.appendChild(td); }
    return tr;
  }));
  return models;
}

async function captureTrace() {
  const admin = $("admin-key").value.trim();
  if (admin) sessionStorage.setItem(ADMIN_KEY, admin);
  const secs = Number($("trace-seconds").value) || 2;
  $("trace-status").textContent = "capturing " + secs + " s…";
  $("trace-link").hidden = true;
  const r = await fetch("/admin/trace?seconds=" + secs, { method: "POST", headers: { authorization: "Bearer " + admin } });
  if (!r.ok) { $("trace-status").textContent = await errorText(r); return; }
  const blob = await r.blob();
  const link = $("trace-link");
  if (link.href) URL.revokeObjectURL(link.href);
  link.href = URL.createObjectURL(blob);
  link.hidden = false;
  $("trace-status").textContent = (blob.size / 1024).toFixed(0) + " KiB captured";
}

// ---------- wiring ----------

function selectTab(name) {
  document.querySelectorAll(".tab").forEach((b) => b.classList.toggle("active", b.dataset.tab === name));
  document.querySelectorAll(".view").forEach((v) => v.classList.toggle("active", v.id === name));
  if (name === "server") poll();
}

async function init() {
  document.querySelectorAll(".tab").forEach((b) => (b.onclick = () => selectTab(b.dataset.tab)));
  $("send").onclick = send;
  $("stop").onclick = stop;
  $("regenerate").onclick = regenerate;
  $("new-chat").onclick = newChat;
  $("key-button").onclick = askKey;
  $("tok-go").onclick = tokenize;
  $("trace-go").onclick = captureTrace;
  $("admin-key").value = sessionStorage.getItem(ADMIN_KEY) || "";
  $("input").addEventListener("keydown", (e) => {
    if (e.key === "Enter" && !e.shiftKey) { e.preventDefault(); send(); }
  });
  document.addEventListener("keydown", (e) => { if (e.key === "Escape") stop(); });
  const models = await loadModels(true);
  $("model").replaceChildren(...models.map((m) => { const o = document.createElement("option"); o.value = m.id; o.textContent = m.id; return o; }));
  setInterval(poll, 1000);
  document.body.dataset.ready = "1";
}

init();
