// Painters playground: one prompt, up to four policies streamed side by side through POST /v1/completions.
// Plain browser JavaScript, no build step, no dependencies. Everything about a policy's layers (the strip, the
// changed layers) comes from the server (POST /v1/schedule); timings come from the `painters` object the server
// sends with each column's last chunk (a live client-side estimate is shown, marked "≈", until then).
"use strict";

const MAX_COLUMNS = 4;
const KEY_STORE = "painters-api-key"; // sessionStorage: this tab only
const $ = (sel, root = document) => root.querySelector(sel);

const state = {
  info: null,        // GET /v1/playground
  key: sessionStorage.getItem(KEY_STORE) || "",
  keyRequired: false,
  columns: [],
  probe: null,       // POST /v1/probe answer for the last prompt
  heatColumn: null,  // the column whose changed layers the heatmap outlines
  nextId: 0,
};

// -- HTTP -----------------------------------------------------------------------------------------------------------

class ApiError extends Error {
  constructor(status, message, retryAfter) {
    super(message);
    this.status = status;
    this.retryAfter = retryAfter;
  }
}

function headers() {
  const h = { "content-type": "application/json" };
  if (state.key) h.authorization = `Bearer ${state.key}`;
  return h;
}

async function errorOf(response) {
  let message = response.statusText;
  try {
    const body = await response.json();
    message = (body.error && body.error.message) || JSON.stringify(body);
  } catch (_) { /* not JSON */ }
  if (response.status === 401) {
    state.keyRequired = true;
    askForKey(state.key ? "That key was refused; enter another." : "");
  }
  return new ApiError(response.status, message, response.headers.get("retry-after"));
}

async function api(path, body, { signal } = {}) {
  const response = await fetch(path, {
    method: body === undefined ? "GET" : "POST",
    headers: headers(),
    body: body === undefined ? undefined : JSON.stringify(body),
    signal,
  });
  if (!response.ok) throw await errorOf(response);
  return response.json();
}

// Server-sent events from a fetch body: yields each `data:` payload ("[DONE]" included).
async function* sseData(response) {
  const reader = response.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) break;
    buffer += decoder.decode(value, { stream: true }).replace(/\r\n?/g, "\n");
    let cut;
    while ((cut = buffer.indexOf("\n\n")) >= 0) {
      const event = buffer.slice(0, cut);
      buffer = buffer.slice(cut + 2);
      const data = event.split("\n").filter((l) => l.startsWith("data:")).map((l) => l.slice(5).trimStart());
      if (data.length) yield data.join("\n");
    }
  }
}

// -- API key --------------------------------------------------------------------------------------------------------

let keyWaiters = [];

function askForKey(message) {
  const dialog = $("#key-dialog");
  $("#key-error").textContent = message || "";
  $("#key-button").hidden = false;
  if (!dialog.open) dialog.showModal();
  $("#key-input").focus();
  return new Promise((resolve) => keyWaiters.push(resolve));
}

function setupKeyDialog() {
  if (state.key) { // kept in this tab from an earlier 401: the server wants one, and the snippets must say so
    state.keyRequired = true;
    $("#key-button").hidden = false;
  }
  $("#key-form").addEventListener("submit", (event) => {
    const key = $("#key-input").value.trim();
    if (!key) { event.preventDefault(); return; }
    state.key = key;
    sessionStorage.setItem(KEY_STORE, key);
    $("#key-input").value = "";
    const waiters = keyWaiters;
    keyWaiters = [];
    waiters.forEach((resolve) => resolve());
  });
  $("#key-button").addEventListener("click", () => askForKey(""));
}

// -- formatting -----------------------------------------------------------------------------------------------------

const ms = (s) => (s == null ? "–" : `${(s * 1000).toFixed(s < 0.1 ? 1 : 0)} ms`);
const span = (layers) => (layers.length === 1 ? `${layers[0]}` : `${layers[0]}–${layers[layers.length - 1]}`);
const consecutive = (layers) => layers.every((l, i) => i === 0 || l === layers[i - 1] + 1);

function lpClass(logprob) {
  if (logprob == null) return "lp-4";
  const p = Math.exp(logprob);
  return p >= 0.5 ? "lp-0" : p >= 0.25 ? "lp-1" : p >= 0.1 ? "lp-2" : p >= 0.03 ? "lp-3" : "lp-4";
}

function changedRuns(layers) {
  const runs = [];
  for (const l of layers) {
    const last = runs[runs.length - 1];
    if (last && last[1] === l - 1) last[1] = l; else runs.push([l, l]);
  }
  return runs;
}

// -- columns --------------------------------------------------------------------------------------------------------

function addColumn(policy) {
  if (state.columns.length >= MAX_COLUMNS) return null;
  const el = $("#column-template").content.firstElementChild.cloneNode(true);
  const col = { id: state.nextId++, el, strip: null, text: "", tokens: 0, spans: [], done: false, timings: null,
                live: null, controller: null, request: null };
  el.dataset.column = col.id;
  const input = $(".policy", el);
  input.value = policy;
  let timer = null;
  input.addEventListener("input", () => { clearTimeout(timer); timer = setTimeout(() => loadStrip(col), 300); });
  input.addEventListener("keydown", (e) => { if (e.key === "Enter") { e.preventDefault(); loadStrip(col); } });
  $(".remove", el).addEventListener("click", () => removeColumn(col));
  $(".pick", el).addEventListener("click", () => togglePicker(col));
  $(".heat", el).addEventListener("change", () => { state.heatColumn = col; drawHeatmap(); });
  el.querySelectorAll(".copy").forEach((b) => b.addEventListener("click", () => copySnippet(col, b)));
  $("#columns").appendChild(el);
  state.columns.push(col);
  if (!state.heatColumn || state.columns.length === 2) selectHeat(col);
  updateColumnButtons();
  loadStrip(col);
  return col;
}

function removeColumn(col) {
  if (col.controller) col.controller.abort();
  col.el.remove();
  state.columns = state.columns.filter((c) => c !== col);
  if (state.heatColumn === col) selectHeat(state.columns[state.columns.length - 1] || null);
  updateColumnButtons();
  updateDivergence();
  updateStats();
}

function selectHeat(col) {
  state.heatColumn = col;
  if (col) $(".heat", col.el).checked = true;
  drawHeatmap();
}

function updateColumnButtons() {
  $("#add-column").disabled = state.columns.length >= MAX_COLUMNS;
  state.columns.forEach((c) => { $(".remove", c.el).disabled = state.columns.length <= 1; });
}

function policyOf(col) {
  return $(".policy", col.el).value.trim() || "full";
}

async function loadStrip(col) {
  const policy = policyOf(col);
  const error = $(".policy-error", col.el);
  try {
    const view = await api("/v1/schedule", { model: state.info.model, policy });
    if (policyOf(col) !== policy) return; // typed on meanwhile
    error.textContent = "";
    col.strip = view;
    drawStrip(col);
  } catch (e) {
    col.strip = null;
    error.textContent = e.status ? `${e.status}: ${e.message}` : e.message;
    $(".strip", col.el).replaceChildren();
    $(".strip-note", col.el).textContent = "";
  }
  col.el.dataset.policy = col.strip ? col.strip.policy : "";
  showPresetNote(col);
  syncPicker(col);
  updateSnippets(col);
  if (state.heatColumn === col) drawHeatmap();
}

function showPresetNote(col) {
  const preset = state.info.presets.find((p) => p.name === policyOf(col));
  const note = $(".preset-note", col.el);
  if (!preset) { note.textContent = ""; return; }
  const parts = [`preset → ${preset.policy}`];
  if (preset.score != null) parts.push(`score ${preset.score.toFixed(3)}`);
  if (preset.speedup != null) parts.push(`measured speed-up ${preset.speedup.toFixed(2)}×`);
  note.textContent = parts.join(" · ");
}

// The strip: what the server says the schedule runs, in order. Text carries the meaning (–, ‖, ↺, ×N, strike-through);
// colour only repeats it.
function drawStrip(col) {
  const view = col.strip;
  const strip = $(".strip", col.el);
  const parts = [];
  const words = [];
  for (const block of view.blocks) {
    const cells = block.cells.map((cell) => {
      const el = document.createElement("span");
      el.className = `cell ${cell.kind}${cell.moved ? " moved" : ""}`;
      el.style.flexGrow = String(cell.layers.length);
      if (cell.kind === "group") {
        el.textContent = consecutive(cell.layers) && cell.layers.length > 2
          ? `${span(cell.layers)} ‖` : cell.layers.join("‖");
        el.title = `layers ${cell.layers.join(", ")} in parallel on one input (${cell.combine})`;
        words.push(`${cell.layers.join("+")} in parallel`);
      } else if (cell.kind === "skipped") {
        el.textContent = span(cell.layers);
        el.title = `skipped: ${span(cell.layers)}`;
        words.push(`skip ${span(cell.layers)}`);
      } else {
        el.textContent = span(cell.layers) + (cell.moved ? "↺" : "");
        el.title = cell.moved ? `layer ${cell.layers[0]}, moved out of order` : `layers ${span(cell.layers)}`;
        words.push(span(cell.layers));
      }
      return el;
    });
    if (block.times > 1) {
      const loop = document.createElement("span");
      loop.className = "loop";
      loop.append(...cells);
      const count = document.createElement("b");
      count.className = "times";
      count.textContent = `×${block.times}`;
      loop.append(count);
      loop.style.flexGrow = String(block.cells.reduce((n, c) => n + c.layers.length, 0));
      words.push(`(previous ${block.cells.length > 1 ? "steps" : "step"} ${block.times} times)`);
      parts.push(loop);
    } else {
      parts.push(...cells);
    }
  }
  strip.replaceChildren(...parts);
  strip.setAttribute("aria-label", `layers in execution order: ${words.join(", ")}`);
  const notes = [`${view.layer_runs} layer runs per token (full: ${view.num_layers})`];
  if (view.skipped.length) notes.push(`${view.skipped.length} skipped`);
  if (view.changed.length) notes.push(`changes ${changedRuns(view.changed).map(([a, b]) => span(a === b ? [a] : [a, b])).join(", ")}`);
  $(".strip-note", col.el).textContent = notes.join(" · ");
}

function togglePicker(col) {
  const picker = $(".picker", col.el);
  const button = $(".pick", col.el);
  picker.hidden = !picker.hidden;
  button.setAttribute("aria-expanded", String(!picker.hidden));
  if (!picker.hidden) {
    syncPicker(col);
    const first = $("button", picker);
    if (first) first.focus();
  }
}

function syncPicker(col) {
  const grid = $(".picker-grid", col.el);
  const n = state.info.num_layers;
  if (grid.children.length !== n) {
    grid.replaceChildren(...Array.from({ length: n }, (_, i) => {
      const b = document.createElement("button");
      b.type = "button";
      b.textContent = String(i);
      b.setAttribute("aria-pressed", "false");
      b.setAttribute("aria-label", `skip layer ${i}`);
      b.addEventListener("click", () => {
        b.setAttribute("aria-pressed", b.getAttribute("aria-pressed") === "true" ? "false" : "true");
        const skipped = [...grid.children].filter((x) => x.getAttribute("aria-pressed") === "true")
          .map((x) => Number(x.textContent));
        $(".policy", col.el).value = skipped.length ? `skip:${skipped.join(",")}` : "full";
        loadStrip(col);
      });
      return b;
    }));
  }
  const skipped = new Set(col.strip ? col.strip.skipped : []);
  [...grid.children].forEach((b, i) => b.setAttribute("aria-pressed", String(skipped.has(i))));
}

// -- running --------------------------------------------------------------------------------------------------------

function samplingOf(index) {
  const seed = Number($("#seed").value) || 0;
  return {
    temperature: Number($("#temperature").value),
    max_tokens: Number($("#max-tokens").value) || 16,
    seed: $("#same-seed").checked ? seed : seed + index,
  };
}

function requestOf(col, index) {
  return { model: state.info.model, prompt: $("#prompt").value, policy: policyOf(col), ...samplingOf(index) };
}

function resetColumn(col) {
  if (col.controller) col.controller.abort();
  Object.assign(col, { text: "", tokens: 0, spans: [], done: false, timings: null, serverSoFar: null, live: null, schedule: null });
  $(".output", col.el).replaceChildren();
  $(".output", col.el).dataset.text = "";
  $(".run-error", col.el).textContent = "";
  $(".divergence", col.el).textContent = "";
  $(".timing-source", col.el).textContent = "";
  col.el.dataset.state = "running";
}

async function runAll() {
  $("#run").disabled = true;
  state.columns.forEach(resetColumn);
  state.columns.forEach((c, i) => updateSnippets(c, i));
  updateStats();
  const columns = [...state.columns];
  const requests = columns.map((col, i) => requestOf(col, i));
  if ($("#one-at-a-time").checked) {
    // each policy alone on the engine: its timings are its own
    await runProbe($("#prompt").value);
    for (const col of columns) {
      col.el.dataset.state = "waiting";
      $(".timing-source", col.el).textContent = "waiting for its turn";
    }
    for (const [i, col] of columns.entries()) {
      if (state.columns.includes(col)) await streamColumn(col, requests[i], "alone");
    }
  } else {
    const work = columns.map((col, i) => streamColumn(col, requests[i], `together with ${columns.length - 1} more`));
    work.push(runProbe($("#prompt").value));
    await Promise.allSettled(work);
  }
  $("#run").disabled = false;
}

async function streamColumn(col, request, how) {
  col.controller = new AbortController();
  col.how = how;
  col.el.dataset.state = "running";
  $(".timing-source", col.el).textContent = "";
  const started = performance.now();
  col.live = { started, first: null };
  try {
    const response = await fetch("/v1/completions", {
      method: "POST", headers: headers(), signal: col.controller.signal,
      body: JSON.stringify({ ...request, stream: true, logprobs: 0 }),
    });
    if (!response.ok) throw await errorOf(response);
    for await (const data of sseData(response)) {
      if (data === "[DONE]") break;
      const chunk = JSON.parse(data);
      if (chunk.error) throw new ApiError(chunk.error.code, chunk.error.message);
      const choice = chunk.choices && chunk.choices[0];
      if (choice) addText(col, choice);
      if (chunk.painters && choice && choice.finish_reason) finish(col, chunk.painters);
      else if (chunk.painters) { // the server's figures so far
        col.serverSoFar = chunk.painters.timings;
        $(".timing-source", col.el).textContent = `server timings so far · ${col.how}`;
      }
      updateStats();
      updateDivergence();
    }
    if (!col.done) throw new Error("the stream ended without its final chunk");
  } catch (e) {
    if (e.name === "AbortError") return;
    const retry = e.retryAfter ? ` (retry after ${e.retryAfter} s)` : "";
    $(".run-error", col.el).textContent = `${e.status ? `${e.status}: ` : ""}${e.message}${retry}`;
    const policyError = $(".policy-error", col.el);
    if (e.status === 400 && policyError.textContent.endsWith(e.message)) policyError.textContent = ""; // said once
    col.el.dataset.state = "error";
  } finally {
    col.controller = null;
  }
}

function addText(col, choice) {
  const lps = (choice.logprobs && choice.logprobs.token_logprobs) || [];
  if (!choice.text && !lps.length) return;
  if (col.live.first == null) col.live.first = performance.now();
  const el = document.createElement("span");
  const logprob = lps.length ? lps.reduce((a, b) => (a == null || b == null ? null : a + b), 0) : null;
  el.className = `tok ${lpClass(logprob)}`;
  el.textContent = choice.text;
  el.dataset.token = String(col.tokens);
  el.dataset.offset = String(col.text.length);
  const p = logprob == null ? "?" : Math.exp(logprob).toFixed(3);
  el.title = `token ${col.tokens} · logprob ${logprob == null ? "?" : logprob.toFixed(2)} · p ${p}`;
  col.spans.push(el);
  col.tokens += Math.max(1, lps.length);
  col.text += choice.text;
  const output = $(".output", col.el);
  output.appendChild(el);
  output.dataset.text = col.text;
}

function finish(col, painters) {
  col.done = true;
  col.timings = painters.timings;
  col.schedule = painters.schedule;
  col.el.dataset.state = "done";
  $(".timing-source", col.el).textContent = `server timings · ran ${painters.policy} ${col.how}`;
  if (!col.strip || col.strip.schedule !== painters.schedule) {
    // draw what the server says ran, whatever the box says now
    api("/v1/schedule", { model: state.info.model, policy: painters.schedule })
      .then((view) => { col.strip = view; drawStrip(col); if (state.heatColumn === col) drawHeatmap(); })
      .catch(() => {});
  }
}

function fullColumn() {
  return state.columns.find((c) => c.strip && c.strip.policy === "full" && (c.text || c.done)) || null;
}

function figures(col) {
  if (col.timings) {
    const t = col.timings;
    return { ttft: t.time_to_first_token_s, tpot: t.time_per_output_token_s, live: false };
  }
  const t = col.serverSoFar;
  if (t && t.time_to_first_token_s > 0) {
    return { ttft: t.time_to_first_token_s, tpot: t.time_per_output_token_s || null, live: false, soFar: true };
  }
  if (!col.live || col.live.first == null) return null;
  const now = performance.now();
  const tpot = col.tokens > 1 ? (now - col.live.first) / 1000 / (col.tokens - 1) : null;
  return { ttft: (col.live.first - col.live.started) / 1000, tpot, live: true };
}

function updateStats() {
  const full = fullColumn();
  const base = full ? figures(full) : null;
  for (const col of state.columns) {
    const f = figures(col);
    const mark = f && f.live ? "≈" : "";
    $(".ttft", col.el).textContent = f ? mark + ms(f.ttft) : "–";
    $(".tpot", col.el).textContent = f && f.tpot ? mark + (f.tpot * 1000).toFixed(1) : "–";
    $(".tps", col.el).textContent = f && f.tpot ? mark + (1 / f.tpot).toFixed(1) : "–";
    const speed = $(".speedup", col.el);
    if (col === full) speed.textContent = "baseline";
    else if (f && f.tpot && base && base.tpot) speed.textContent = `${f.live || base.live ? "≈" : ""}${(base.tpot / f.tpot).toFixed(2)}×`;
    else speed.textContent = full ? "–" : "add full";
  }
}

// The first character where a column's text departs from full's: marked on the token that holds it.
function updateDivergence() {
  const full = fullColumn();
  for (const col of state.columns) {
    col.spans.forEach((s) => s.classList.remove("diverge"));
    const note = $(".divergence", col.el);
    delete col.el.dataset.divergeChar;
    if (!full || col === full) { note.textContent = col === full ? "reference for divergence" : ""; continue; }
    const a = full.text, b = col.text;
    let i = 0;
    while (i < a.length && i < b.length && a[i] === b[i]) i++;
    const decided = (i < a.length && i < b.length) || (full.done && col.done);
    if (!decided) { note.textContent = b ? `same as full so far (${col.tokens} tokens)` : ""; continue; }
    if (i === a.length && i === b.length) { note.textContent = `identical to full (${col.tokens} tokens)`; continue; }
    const at = col.spans.find((s) => Number(s.dataset.offset) + s.textContent.length > i);
    col.el.dataset.divergeChar = String(i);
    if (at) {
      at.classList.add("diverge");
      at.dataset.mark = `≠${at.dataset.token}`;
      note.textContent = `departs from full at token ${at.dataset.token} (character ${i})`;
    } else {
      note.textContent = `stops where full goes on (character ${i})`;
    }
  }
}

// -- snippets -------------------------------------------------------------------------------------------------------

function updateSnippets(col, index) {
  if (!state.info) return;
  const i = index === undefined ? state.columns.indexOf(col) : index;
  const body = requestOf(col, Math.max(0, i));
  const auth = state.keyRequired ? " -H \"authorization: Bearer $PAINTERS_API_KEY\"" : "";
  const json = JSON.stringify(body).replace(/'/g, "'\\''");
  $(".curl", col.el).textContent =
    `curl -s ${location.origin}/v1/completions -H 'content-type: application/json'${auth} \\\n  -d '${json}'`;
  const key = state.keyRequired ? "os.environ[\"PAINTERS_API_KEY\"]" : "\"unused\"";
  $(".python", col.el).textContent = [
    ...(state.keyRequired ? ["import os"] : []),
    "from openai import OpenAI",
    `client = OpenAI(base_url="${location.origin}/v1", api_key=${key})`,
    `out = client.completions.create(model=${JSON.stringify(body.model)}, prompt=${JSON.stringify(body.prompt)},`,
    `    max_tokens=${body.max_tokens}, temperature=${body.temperature}, seed=${body.seed},`,
    `    extra_body={"policy": ${JSON.stringify(body.policy)}})`,
    "print(out.choices[0].text, out.painters)",
  ].join("\n");
}

async function copySnippet(col, button) {
  const text = $(`.${button.dataset.what}`, col.el).textContent;
  const label = button.textContent;
  try {
    await navigator.clipboard.writeText(text);
    button.textContent = "Copied ✓";
  } catch (_) {
    const range = document.createRange(); // no clipboard (plain http on another host): select it instead
    range.selectNodeContents($(`.${button.dataset.what}`, col.el));
    getSelection().removeAllRanges();
    getSelection().addRange(range);
    button.textContent = "Selected: press Ctrl+C";
  }
  setTimeout(() => { button.textContent = label; }, 1500);
}

// -- probe heatmap --------------------------------------------------------------------------------------------------

async function runProbe(prompt) {
  $("#heatmap-error").textContent = "";
  try {
    state.probe = await api("/v1/probe", { model: state.info.model, prompts: [prompt], policy: "full" });
  } catch (e) {
    state.probe = null;
    $("#heatmap-error").textContent = `probe: ${e.status || ""} ${e.message}`;
  }
  drawHeatmap();
}

// A perceptually ordered ramp (dark blue -> teal -> yellow), so the map reads in greyscale too.
const RAMP = [[13, 8, 135], [84, 2, 163], [139, 10, 165], [185, 50, 137], [219, 92, 104], [244, 136, 73],
              [254, 188, 43], [240, 249, 33]];

function rampColor(t) {
  const x = Math.min(1, Math.max(0, t)) * (RAMP.length - 1);
  const i = Math.min(RAMP.length - 2, Math.floor(x));
  const f = x - i;
  const c = RAMP[i].map((v, k) => Math.round(v + (RAMP[i + 1][k] - v) * f));
  return `rgb(${c[0]},${c[1]},${c[2]})`;
}

function drawHeatmap() {
  const canvas = $("#heatmap");
  const ctx = canvas.getContext("2d");
  const size = canvas.clientWidth || 360;
  const dpr = window.devicePixelRatio || 1;
  canvas.width = size * dpr;
  canvas.height = size * dpr;
  ctx.setTransform(dpr, 0, 0, dpr, 0, 0);
  ctx.clearRect(0, 0, size, size);
  const probe = state.probe;
  const caption = $("#heatmap-caption");
  if (!probe) return;
  const m = probe.similarity;
  const n = m.length;
  const pad = 28;
  const cell = (size - pad - 4) / n;
  let lo = 1;
  m.forEach((row) => row.forEach((v) => { lo = Math.min(lo, v); }));
  for (let i = 0; i < n; i++) {
    for (let j = 0; j < n; j++) {
      ctx.fillStyle = rampColor((m[i][j] - lo) / (1 - lo || 1));
      ctx.fillRect(pad + j * cell, pad + i * cell, Math.ceil(cell), Math.ceil(cell));
    }
  }
  ctx.fillStyle = "#222";
  ctx.font = "11px system-ui, sans-serif";
  ctx.textAlign = "center";
  ctx.textBaseline = "middle";
  for (let i = 0; i < n; i += 5) {
    const label = i === n - 1 ? "out" : String(i);
    ctx.fillText(label, pad + (i + 0.5) * cell, pad / 2);
    ctx.save();
    ctx.textAlign = "right";
    ctx.fillText(label, pad - 4, pad + (i + 0.5) * cell);
    ctx.restore();
  }
  const legend = document.querySelectorAll(".heatmap-legend span");
  legend[0].textContent = lo.toFixed(2);
  legend[1].textContent = "1.00";
  const col = state.heatColumn;
  const changed = col && col.strip ? col.strip.changed : [];
  const runs = changedRuns(changed);
  for (const [a, b] of runs) {
    // the states entering layers a..b and the one leaving b: the block the policy replaces
    const x = pad + a * cell, w = (b - a + 2) * cell;
    ctx.lineWidth = 3;
    ctx.strokeStyle = "#fff";
    ctx.strokeRect(x, x, w, w);
    ctx.setLineDash([5, 3]);
    ctx.lineWidth = 2;
    ctx.strokeStyle = "#000";
    ctx.strokeRect(x, x, w, w);
    ctx.setLineDash([]);
  }
  const who = col ? `<code>${escapeHtml(col.strip ? col.strip.policy : policyOf(col))}</code>` : "no policy";
  caption.innerHTML = `Cosine similarity of the states entering each layer under <code>full</code> for this prompt
    (<code>POST /v1/probe</code>, ${probe.num_tokens} tokens). Dashed squares: the layers ${who} changes
    (${runs.length ? runs.map(([a, b]) => span(a === b ? [a] : [a, b])).join(", ") : "none"}).`;
  canvas.setAttribute("aria-label", `layer similarity heatmap, ${n - 1} layers; outlined: ${changed.length} changed`);
}

function escapeHtml(s) {
  return s.replace(/[&<>"]/g, (c) => ({ "&": "&amp;", "<": "&lt;", ">": "&gt;", "\"": "&quot;" })[c]);
}

// -- start ----------------------------------------------------------------------------------------------------------

async function loadInfo() {
  for (;;) {
    try {
      return await api("/v1/playground");
    } catch (e) {
      if (e.status === 401) { await new Promise((resolve) => keyWaiters.push(resolve)); continue; }
      if (e.status === 503) { $("#model-line").textContent = e.message; await new Promise((r) => setTimeout(r, 2000)); continue; }
      throw e;
    }
  }
}

async function main() {
  setupKeyDialog();
  state.info = await loadInfo();
  const info = state.info;
  $("#model-line").textContent = `${info.model} · ${info.num_layers} layers · max ${info.max_model_len} tokens`;
  $("#max-tokens").max = String(info.max_model_len); // what the server allows, not a fixed guess
  const list = $("#policy-list");
  for (const p of info.presets) {
    const o = document.createElement("option");
    o.value = p.name;
    o.label = `preset: ${p.policy}${p.speedup ? ` · ${p.speedup.toFixed(2)}× measured` : ""}`;
    list.appendChild(o);
  }
  for (const e of info.examples) {
    const o = document.createElement("option");
    o.value = e;
    list.appendChild(o);
  }
  const params = new URLSearchParams(location.search);
  const initial = params.getAll("policy");
  const defaults = initial.length ? initial : ["full", "skip:10", info.presets.length ? info.presets[0].name : "pairs"];
  defaults.slice(0, MAX_COLUMNS).forEach(addColumn);
  $("#add-column").addEventListener("click", () => {
    const col = addColumn("full");
    if (col) $(".policy", col.el).focus();
  });
  $("#run-form").addEventListener("submit", (e) => { e.preventDefault(); runAll(); });
  document.addEventListener("keydown", (e) => { // from any field, a column's policy box included
    if (e.key === "Enter" && (e.ctrlKey || e.metaKey) && !$("#run").disabled && !$("#key-dialog").open) {
      e.preventDefault();
      runAll();
    }
  });
  ["#temperature", "#max-tokens", "#seed", "#same-seed", "#prompt"].forEach((sel) =>
    $(sel).addEventListener("change", () => state.columns.forEach((c) => updateSnippets(c))));
  window.addEventListener("resize", drawHeatmap);
  document.body.dataset.ready = "1";
}

main().catch((e) => { $("#model-line").textContent = `could not start: ${e.message}`; });
