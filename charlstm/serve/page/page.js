// charlstm serve's page: sampling settings, the streamed sample, the model's facts and, for a run
// folder, the run's loss curves (drawn by curves.js). Plain JavaScript with no library, so the page
// works offline and needs no build step. Every URL is relative, so the page also works behind a
// proxy's sub-path.
"use strict";

const $ = (id) => document.getElementById(id);
const KEY_STORE = "charlstm.apiKey";
const POLL_MS = 2000;  // how often a run folder's page reads /api/run and /api/model
const state = {model: null, run: null, controller: null, stick: true, frame: 0, polling: false, key: ""};

// ------------------------------------------------------------------------------------- the API

function apiKey() {
  try { return localStorage.getItem(KEY_STORE) || state.key; } catch (_) { return state.key; }  // storage may be off
}

function headers(extra) {
  const key = apiKey();
  return key ? {...extra, Authorization: "Bearer " + key} : {...extra};
}

// An Error carrying the server's one-line message ({"error": {"code", "message", "type"}}) and the
// HTTP status, so a 401 can point at the key field.
async function apiError(response) {
  let message = "";
  try { message = (await response.json()).error.message; } catch (_) { /* not our JSON: a proxy's page */ }
  const error = new Error(`${response.status}: ${message || response.statusText || "request failed"}`);
  error.status = response.status;
  return error;
}

async function getJSON(path) {
  const response = await fetch(path, {headers: headers(), cache: "no-store"});
  if (!response.ok) throw await apiError(response);
  return response.json();
}

function say(text, isError = false) {
  const status = $("status");
  status.textContent = String(text).replace(/\s+/g, " ");  // one line, whatever the message holds
  status.title = status.textContent;
  status.classList.toggle("error", isError);
}

// ------------------------------------------------------------------------------ the model's facts

// Characters a reader cannot see, by name; anything else below a space as \xNN.
const NAMES = {"\n": "↵", "\r": "␍", "\t": "⇥", " ": "␣"};

// The vocabulary in little room: runs of 4 or more consecutive visible characters as "a–z".
function vocabNode(vocab) {
  const node = document.createElement("span");
  node.className = "vocab";
  const chars = Array.from(vocab);
  const code = (ch) => ch.codePointAt(0);
  const visible = (ch) => !(ch in NAMES) && code(ch) > 32 && code(ch) !== 127;
  for (let i = 0; i < chars.length;) {
    let j = i;
    const next = (k) => k + 1 < chars.length && visible(chars[k + 1]) && code(chars[k + 1]) === code(chars[k]) + 1;
    while (visible(chars[i]) && next(j)) j++;
    const item = document.createElement("span");
    if (j - i >= 3) {
      item.textContent = `${chars[i]}–${chars[j]}`;
    } else {
      j = i;
      const ch = chars[i];
      item.textContent = visible(ch) ? ch : NAMES[ch] || "\\x" + code(ch).toString(16).padStart(2, "0");
      if (!visible(ch)) { item.className = "special"; item.title = JSON.stringify(ch); }
    }
    node.append(item, " ");
    i = j + 1;
  }
  return node;
}

function showFacts(m) {
  const bpc = m.val_bpc == null ? "not measured" : `${m.val_bpc.toFixed(3)} bits/char`;
  const rows = [
    ["name", "Model", m.id],
    ["shape", "Shape", `${m.layers} × ${m.hidden} LSTM${m.peepholes ? ", peepholes" : ""}`],
    ["parameters", "Parameters", m.parameters.toLocaleString("en-US")],
    ["step", "Step", String(m.step)],
    ["val", "Validation", bpc],
    ["vocab-size", "Vocabulary", `${m.vocab_size} characters`],
    ["vocab", "", vocabNode(m.vocab)],
    ["precision", "Precision", m.precision],
    ["limit", "Length limit", m.max_tokens_limit.toLocaleString("en-US")],
    ["source", "Source", m.source],
    ["loaded", "Loaded", new Date(m.loaded_at * 1000).toLocaleTimeString()],
  ];
  const list = $("facts");
  list.replaceChildren();
  for (const [id, label, value] of rows) {
    const dt = document.createElement("dt"), dd = document.createElement("dd");
    dt.textContent = label;
    dd.id = "fact-" + id;
    dd.append(value);
    list.append(dt, dd);
  }
  $("model-name").textContent = m.id;
  $("length").max = m.max_tokens_limit;
}

async function loadModel() {
  try {
    state.model = await getJSON("api/model");
  } catch (e) {
    say(e.status === 401 ? `${e.message} (enter the API key at the top right)` : e.message, true);
    return;
  }
  showFacts(state.model);
  if (!state.controller) say("Ready: type a prime and press Generate.");
  if (state.model.run_folder && !state.polling) {
    state.polling = true;
    $("run-panel").hidden = false;
    document.body.classList.add("run");
    pollRun();
  }
}

// ---------------------------------------------------------------------------------- generating

// The request body from the settings; null (with the reason said) when a number is not one.
function settings() {
  const number = (id, label) => {
    const value = Number($(id).value);
    if ($(id).value.trim() === "" || !Number.isFinite(value)) throw new Error(`${label}: give a number`);
    return value;
  };
  try {
    const body = {prompt: $("prime").value, max_tokens: number("length", "Length"),
                  temperature: number("temperature", "Temperature"), top_k: number("top-k", "Top-k"),
                  top_p: number("top-p", "Top-p"), stream: true};
    if ($("seed").value.trim() !== "") body.seed = number("seed", "Seed");
    return body;
  } catch (e) {
    say(e.message, true);
    return null;
  }
}

// Reads the server-sent events of a streamed completion, handing each piece of text to onPiece;
// returns the finish_reason. A `data:` line holds one JSON chunk, or [DONE] at the end.
async function readEvents(response, onPiece) {
  const reader = response.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "", finish = null, paused = performance.now();
  for (;;) {
    const {value, done} = await reader.read();
    if (done) throw new Error("the stream ended before [DONE] (did the server stop?)");
    buffer += decoder.decode(value, {stream: true});
    let end;
    while ((end = buffer.indexOf("\n\n")) >= 0) {  // JSON escapes newlines, so "\n\n" only ends events
      const event = buffer.slice(0, end);
      buffer = buffer.slice(end + 2);
      for (const line of event.split("\n")) {
        if (!line.startsWith("data:")) continue;  // comments (": ping") and other fields
        const data = line.slice(5).trim();
        if (data === "[DONE]") return finish;
        const chunk = JSON.parse(data);
        if (chunk.error) throw new Error(`${chunk.error.code}: ${chunk.error.message}`);
        const choice = chunk.choices[0];
        if (choice.text) onPiece(choice.text);
        if (choice.finish_reason) finish = choice.finish_reason;
      }
    }
    // While data waits, each read resolves at once, as a microtask: without a pause now and then
    // the page would neither paint nor see a click on Stop.
    if (performance.now() - paused > 25) {
      await new Promise((resolve) => setTimeout(resolve, 0));
      paused = performance.now();
    }
  }
}

// The sample on the page. A small model writes hundreds of thousands of characters a second, so
// pieces wait in `pending` and reach the page once a frame; and the text grows in blocks, a new
// one after a newline once a block holds BLOCK_CHARS, so a frame lays out the last block only.
const BLOCK_CHARS = 8192;
const sample = {pending: "", node: null, size: 0};

function clearSample(prime) {
  $("output-prime").textContent = prime;
  sample.node = document.createTextNode("");  // the first block is inline: it goes on from the prime
  sample.size = 0;
  sample.pending = "";
  $("output-text").replaceChildren(sample.node);
}

function flushSample() {
  let text = sample.pending;
  sample.pending = "";
  while (text) {
    const newline = text.indexOf("\n", Math.max(0, BLOCK_CHARS - sample.size));
    const end = newline < 0 ? text.length : newline + 1;
    sample.node.appendData(text.slice(0, end));
    sample.size += end;
    text = text.slice(end);
    if (newline >= 0) {  // full, and a line ended: what follows starts a block of its own
      const block = document.createElement("span");
      block.className = "block";
      sample.node = block.appendChild(document.createTextNode(""));
      sample.size = 0;
      $("output-text").append(block);
    }
  }
  const output = $("output");
  if (state.stick) output.scrollTop = output.scrollHeight;
}

function running(on) {
  $("generate").disabled = on;
  $("stop").disabled = !on;
}

async function generate() {
  const body = settings();
  if (!body || state.controller) return;
  const controller = new AbortController();
  state.controller = controller;
  running(true);
  clearSample(body.prompt);
  state.stick = true;
  const started = performance.now();
  let count = 0;
  const rate = () => `${count} characters, ${(count / ((performance.now() - started) / 1000)).toFixed(0)}/s`;
  say("Generating…");
  try {
    const response = await fetch("v1/completions", {method: "POST", body: JSON.stringify(body),
      headers: headers({"Content-Type": "application/json"}), signal: controller.signal});
    if (!response.ok) throw await apiError(response);
    const finish = await readEvents(response, (piece) => {
      sample.pending += piece;
      count += Array.from(piece).length;  // characters, as the server counts them (not UTF-16 units)
      redrawSoon(() => say(`Generating… ${rate()}`));
    });
    say(`Done: ${rate()}; ${finish === "stop" ? "a stop string ended it" : "the length was reached"}.`);
  } catch (e) {
    if (e.name === "AbortError") say(`Stopped after ${count} characters.`);
    else say(e.message, true);
  } finally {
    cancelAnimationFrame(state.frame);  // a frame still due would write "Generating…" over the end
    state.frame = 0;
    flushSample();
    state.controller = null;
    running(false);
  }
}

// The page once a frame: the text that came since the last, and the status.
function redrawSoon(update) {
  if (state.frame) return;
  state.frame = requestAnimationFrame(() => {
    state.frame = 0;
    flushSample();
    update();
  });
}

// ------------------------------------------------------------------------------- the run's curves

async function pollRun() {
  try {
    const [run, model] = await Promise.all([getJSON("api/run"), getJSON("api/model")]);
    const before = state.model;
    if (model.reloads !== before.reloads || model.step !== before.step) {
      const when = new Date().toLocaleTimeString();
      $("run-notice").textContent = `new best.npz loaded at step ${model.step} (${when}); samples now come from it`;
    }
    state.model = model;
    showFacts(model);
    state.run = run;
    drawCurves($("curves"), run.records, model.step);
  } catch (e) {
    $("run-notice").textContent = "cannot read the run: " + e.message;
  }
  setTimeout(pollRun, POLL_MS);  // after the answer, so a slow server never has polls pile up
}

// ------------------------------------------------------------------------------------ wiring

function wire() {
  const slider = $("temperature-slider"), number = $("temperature");
  slider.addEventListener("input", () => { number.value = slider.value; });
  number.addEventListener("input", () => { slider.value = number.value; });
  $("generate").addEventListener("click", generate);
  $("stop").addEventListener("click", () => state.controller && state.controller.abort());
  $("prime").addEventListener("keydown", (e) => {
    if (e.key === "Enter" && (e.ctrlKey || e.metaKey)) { e.preventDefault(); generate(); }
  });
  // Follow the text as it streams, unless the reader scrolled up to read.
  $("output").addEventListener("scroll", (e) => {
    const o = e.target;
    state.stick = o.scrollTop + o.clientHeight >= o.scrollHeight - 24;
  });
  $("api-key").value = apiKey();
  $("api-key").addEventListener("change", (e) => {
    state.key = e.target.value.trim();
    try { localStorage.setItem(KEY_STORE, state.key); } catch (_) { /* then kept for this visit only */ }
    loadModel();
  });
  window.addEventListener("resize", () => state.run && drawCurves($("curves"), state.run.records, state.model.step));
}

async function start() {
  wire();
  try {
    const health = await getJSON("health");
    $("key-box").hidden = !health.auth;
  } catch (e) {
    say(`Cannot reach the server: ${e.message}`, true);
    return;
  }
  await loadModel();
}

start();
