// The MMM studio: open a piece, select bars x tracks (or a new track), get candidates from the
// server, listen, accept one, undo/redo, download. Plain JS with no build step and no
// dependency: the page is served by the Python package as it is, works offline, and a reader
// can follow it from top to bottom. All music analysis (notes, bar grid, measured controls)
// comes from the server's /v1/analyze, so the page never parses MIDI itself.
"use strict";

const $ = (id) => document.getElementById(id);
const COLORS = ["#1f77b4", "#2ca02c", "#9467bd", "#8c564b", "#e377c2", "#17becf", "#bcbd22", "#7f7f7f", "#ff7f0e"];
const PITCH_NAMES = ["C", "C#", "D", "D#", "E", "F", "F#", "G", "G#", "A", "A#", "B"];

const studio = window.studio = {
  token: new URLSearchParams(location.hash.slice(1)).get("token") || sessionStorage.getItem("mmm-token"),
  info: null,
  piece: null,         // {name, blob, a}: a = the /v1/analyze answer
  history: [],         // pieces before the current one (undo)
  future: [],          // pieces undone (redo)
  sel: null,           // {tracks: [i, ...], a, b} (bars a..b included, model grid) or {add: true}
  candidates: [],      // {seed, blob, a, regions, measured}
  showing: -1,         // index of the candidate drawn and played, -1 = the piece
  mute: new Set(),
  solo: new Set(),
  job: null,           // id of the running job
  player: null,
  stats: {notesScheduled: 0, plays: 0, downloads: 0},
};

// --- server ----------------------------------------------------------------------------------------
async function api(path, options = {}) {
  const headers = Object.assign({}, options.headers || {});
  if (studio.token) headers["Authorization"] = "Bearer " + studio.token;
  const response = await fetch(path, Object.assign({}, options, {headers}));
  if (response.status === 401) {
    const token = window.prompt("This server needs its access token:");
    if (token) {
      studio.token = token;
      sessionStorage.setItem("mmm-token", token);
      return api(path, options);
    }
  }
  if (!response.ok) {
    let message = `HTTP ${response.status}`;
    try { message = (await response.json()).error.message; } catch (e) { /* not our JSON */ }
    throw new Error(message);
  }
  return response;
}

async function analyze(blob, name) {
  const form = new FormData();
  form.append("file", blob, name);
  return (await api("/v1/analyze", {method: "POST", body: form})).json();
}

function status(text, isError = false) {
  $("status").textContent = text;
  $("status").classList.toggle("error", isError);
}

// --- the piece and its history -------------------------------------------------------------------
async function openBlob(blob, name) {
  status(`Reading ${name}…`);
  try {
    const a = await analyze(blob, name);
    studio.sel = null;
    setPiece({name, blob, a}, false);
    studio.history = [];
    studio.future = [];
    updateButtons();
    status(`${name}: ${a.tracks.length} tracks, ${a.num_bars} bars (model grid), ${a.duration_s.toFixed(1)} s.`);
  } catch (err) {
    status(`Cannot open ${name}: ${err.message}`, true);
  }
}

function setPiece(piece, record) {
  stop();
  if (record && studio.piece) {
    studio.history.push(studio.piece);
    studio.future = [];
  }
  studio.piece = piece;
  studio.candidates = [];
  studio.showing = -1;
  const sel = studio.sel;  // kept while it still fits the piece (after accept, undo, redo)
  if (sel && !sel.add && (sel.b >= piece.a.num_bars || sel.tracks.some((t) => t >= piece.a.tracks.length))) {
    studio.sel = null;
  }
  const diff = piece.a.grid.difference;
  $("warning").hidden = !diff;
  $("warning").textContent = diff ? `Bar numbers: ${diff}. The grid below shows the model's bars.` : "";
  renderGrid();
  renderSelection();
  renderCandidates();
  drawRoll();
  updateButtons();
}

function undo() {
  if (!studio.history.length) return;
  const previous = studio.history.pop();
  studio.future.push(studio.piece);
  setPiece(previous, false);
  status("Undone.");
}

function redo() {
  if (!studio.future.length) return;
  const next = studio.future.pop();
  studio.history.push(studio.piece);
  setPiece(next, false);
  status("Redone.");
}

function download() {
  const piece = studio.piece;
  const url = URL.createObjectURL(piece.blob);
  const link = document.createElement("a");
  link.href = url;
  link.download = piece.name.replace(/\.midi?$/i, "") + (studio.history.length ? "_mmm" : "") + ".mid";
  document.body.appendChild(link);
  link.click();
  link.remove();
  setTimeout(() => URL.revokeObjectURL(url), 10000);
  studio.stats.downloads++;
}

function updateButtons() {
  const has = !!studio.piece;
  $("undo").disabled = !studio.history.length;
  $("redo").disabled = !studio.future.length;
  $("download").disabled = !has;
  $("play").disabled = !has;
  $("stop").disabled = !has;
  $("generate").disabled = !has || !studio.sel || !!studio.job;
}

// --- the bars x tracks grid ---------------------------------------------------------------------
function trackLabel(t) {
  const program = studio.info ? studio.info.programs.find((p) => p.program === t.program) : null;
  return `${t.index}: ${t.name || (program ? program.name : "track")}`;
}

function renderGrid() {
  const table = $("grid");
  table.innerHTML = "";
  const a = studio.piece.a;
  const head = table.insertRow();
  head.appendChild(document.createElement("th"));
  let lastTs = "";
  a.grid.time_signatures.forEach((ts, b) => {
    const th = document.createElement("th");
    th.className = "bar";
    const text = ts.join("/");
    th.textContent = String(b + 1);  // bars as a musician counts them: from 1
    th.title = `bar ${b + 1} (API bar ${b}), ${text}, starts at tick ${a.grid.starts[b]}`;
    if (text !== lastTs) {
      th.classList.add("ts");
      th.textContent += ` ${text}`;
      lastTs = text;
    }
    if (a.grid.file_starts[b] !== undefined && a.grid.file_starts[b] !== a.grid.starts[b]) {
      th.textContent += "⚠";
      th.title += `; the file's bar ${b + 1} starts at tick ${a.grid.file_starts[b]}`;
    }
    head.appendChild(th);
  });
  a.tracks.forEach((t) => {
    const row = table.insertRow();
    const th = document.createElement("th");
    th.className = "track";
    th.innerHTML = `<span class="swatch" style="background:${COLORS[t.index % COLORS.length]}"></span>`;
    th.appendChild(document.createTextNode(trackLabel(t)));
    for (const [label, set] of [["M", studio.mute], ["S", studio.solo]]) {
      const button = document.createElement("button");
      button.textContent = label;
      button.title = label === "M" ? "mute" : "solo";
      button.className = (label === "M" ? "mute" : "solo") + (set.has(t.index) ? " on" : "");
      button.onclick = (e) => {
        e.stopPropagation();
        set.has(t.index) ? set.delete(t.index) : set.add(t.index);
        button.classList.toggle("on", set.has(t.index));
        drawRoll();
      };
      th.appendChild(button);
    }
    row.appendChild(th);
    a.grid.time_signatures.forEach((_, b) => {
      const cell = row.insertCell();
      cell.className = "cell";
      cell.dataset.track = t.index;
      cell.dataset.bar = b;
      const bar = t.controls.bars[b] || {};
      const density = bar.note_density || 0;
      if (density > 0) {
        const alpha = Math.min(0.85, 0.15 + density / 24);
        cell.style.backgroundColor = hexAlpha(COLORS[t.index % COLORS.length], alpha);
      }
      cell.title = `track ${t.index}, bar ${b + 1}: ${density} notes`;
    });
  });
  const add = table.insertRow();
  add.className = "add";
  const th = document.createElement("th");
  th.className = "track";
  th.textContent = "+ add a track";
  add.appendChild(th);
  a.grid.time_signatures.forEach((_, b) => {
    const cell = add.insertCell();
    cell.className = "cell add";
    cell.dataset.add = "1";
    cell.dataset.bar = b;
  });
  paintSelection();
}

function hexAlpha(hex, alpha) {
  const n = parseInt(hex.slice(1), 16);
  return `rgba(${n >> 16}, ${(n >> 8) & 255}, ${n & 255}, ${alpha})`;
}

let drag = null;  // {track, bar} where the drag started

function cellAt(event) {
  const cell = event.target.closest && event.target.closest("td.cell");
  return cell && $("grid").contains(cell) ? cell : null;
}

function selectFrom(start, cell) {
  if (start.add || cell.dataset.add) {
    studio.sel = {add: true};
  } else {
    const t0 = +start.track, t1 = +cell.dataset.track, b0 = +start.bar, b1 = +cell.dataset.bar;
    const tracks = [];
    for (let t = Math.min(t0, t1); t <= Math.max(t0, t1); t++) tracks.push(t);
    studio.sel = {tracks, a: Math.min(b0, b1), b: Math.max(b0, b1)};
  }
  paintSelection();
}

function paintSelection() {
  const sel = studio.sel;
  for (const cell of $("grid").querySelectorAll("td.cell")) {
    const on = sel && (sel.add ? !!cell.dataset.add
      : !cell.dataset.add && sel.tracks.includes(+cell.dataset.track) && +cell.dataset.bar >= sel.a && +cell.dataset.bar <= sel.b);
    cell.classList.toggle("selected", !!on);
  }
}

$("grid").addEventListener("mousedown", (event) => {
  const cell = cellAt(event);
  if (!cell) return;
  event.preventDefault();
  drag = {track: cell.dataset.track, bar: cell.dataset.bar, add: !!cell.dataset.add};
  selectFrom(drag, cell);
});
$("grid").addEventListener("mouseover", (event) => {
  const cell = cellAt(event);
  if (drag && cell) selectFrom(drag, cell);
});
window.addEventListener("mouseup", () => {
  if (!drag) return;
  drag = null;
  renderSelection();
  drawRoll();
});

// --- controls of the selection ------------------------------------------------------------------
function median(values) {
  if (!values.length) return null;
  const sorted = [...values].sort((x, y) => x - y);
  return sorted[Math.floor(sorted.length / 2)];
}

// The piece's own value of a control over the selected bars of the selected tracks.
function measuredValue(name, kind) {
  const sel = studio.sel, values = [];
  for (const t of sel.tracks) {
    for (let b = sel.a; b <= sel.b; b++) {
      const bar = studio.piece.a.tracks[t].controls.bars[b] || {};
      if (bar[name] !== undefined) values.push(bar[name]);
    }
  }
  if (kind === "int") return median(values);
  if (kind === "set" || kind === "durations") return [...new Set(values.flat())];
  return median(values);
}

function renderSelection() {
  const sel = studio.sel, box = $("controls");
  box.innerHTML = "";
  $("addtrack").hidden = !(sel && sel.add);
  if (!sel) {
    $("selection").textContent = "Click or drag on the grid: bars × tracks to rewrite, or the “add track” row.";
    updateButtons();
    return;
  }
  let level, prefill;
  if (sel.add) {
    $("selection").textContent = "A new track over the whole piece.";
    level = "track";
    prefill = () => null;
  } else {
    const names = sel.tracks.map((t) => trackLabel(studio.piece.a.tracks[t])).join(", ");
    $("selection").textContent = `Bars ${sel.a + 1}–${sel.b + 1} of ${names} (API: bars=[${sel.a},${sel.b + 1}]).`;
    level = "bar";
    prefill = measuredValue;
  }
  const controls = studio.info.controls[level];
  for (const [name, spec] of Object.entries(controls)) {
    const row = document.createElement("div");
    row.className = "control";
    row.dataset.name = name;
    row.dataset.kind = spec.kind;
    const use = document.createElement("input");
    use.type = "checkbox";
    use.className = "use";
    use.title = "steer the model with this control";
    const label = document.createElement("span");
    label.textContent = name.replace(/_/g, " ");
    row.append(use, label);
    const value = prefill(name, spec.kind);
    if (spec.kind === "int" || spec.kind === "float") {
      const input = document.createElement("input");
      input.type = "number";
      input.className = "value";
      input.min = spec.values[0];
      input.max = spec.values[spec.values.length - 1];
      input.step = spec.kind === "float" ? "0.05" : "1";
      input.value = value ?? spec.values[Math.floor(spec.values.length / 2)];
      input.oninput = () => { use.checked = true; };
      row.append(input);
    } else {
      const chosen = new Set(value || []);
      const group = document.createElement("span");
      group.className = "pcs";
      for (const v of spec.values) {
        const button = document.createElement("button");
        button.textContent = spec.kind === "set" && name === "pitch_classes" ? PITCH_NAMES[v] : v;
        button.dataset.value = v;
        button.classList.toggle("on", chosen.has(v));
        button.onclick = () => { button.classList.toggle("on"); use.checked = true; };
        group.append(button);
      }
      row.append(group);
    }
    box.append(row);
  }
  updateButtons();
}

function chosenControls() {
  const out = {};
  for (const row of $("controls").querySelectorAll(".control")) {
    if (!row.querySelector(".use").checked) continue;
    const kind = row.dataset.kind;
    if (kind === "int") out[row.dataset.name] = parseInt(row.querySelector(".value").value, 10);
    else if (kind === "float") out[row.dataset.name] = parseFloat(row.querySelector(".value").value);
    else {
      out[row.dataset.name] = [...row.querySelectorAll("button.on")].map((b) => kind === "set" ? +b.dataset.value : b.dataset.value);
    }
  }
  return Object.keys(out).length ? out : null;
}

// --- generation ---------------------------------------------------------------------------------
async function followEvents(id, onProgress) {
  const response = await api(`/v1/jobs/${id}/events`);
  const reader = response.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  for (;;) {
    const {value, done} = await reader.read();
    if (done) throw new Error("the server closed the event stream");
    buffer += decoder.decode(value, {stream: true});
    let end;
    while ((end = buffer.indexOf("\n\n")) >= 0) {
      const block = buffer.slice(0, end);
      buffer = buffer.slice(end + 2);
      let event = "message", data = "";
      for (const line of block.split("\n")) {
        if (line.startsWith("event: ")) event = line.slice(7);
        else if (line.startsWith("data: ")) data += line.slice(6);
      }
      if (!data) continue;
      const payload = JSON.parse(data);
      if (event === "end") {
        reader.cancel();
        return payload;
      }
      onProgress(payload);
    }
  }
}

function b64ToBlob(b64) {
  const bytes = Uint8Array.from(atob(b64), (c) => c.charCodeAt(0));
  return new Blob([bytes], {type: "audio/midi"});
}

async function generate() {
  const sel = studio.sel, piece = studio.piece;
  const form = new FormData();
  form.append("file", piece.blob, piece.name);
  const controls = chosenControls();
  if (sel.add) {
    form.append("task", "add_track");
    form.append("program", $("program").value);
    if (controls) form.append("track_controls", JSON.stringify(controls));
  } else {
    form.append("task", "infill");
    form.append("track", JSON.stringify(sel.tracks.length === 1 ? sel.tracks[0] : sel.tracks));
    form.append("bars", JSON.stringify([sel.a, sel.b + 1]));
    if (controls) form.append("controls", JSON.stringify(controls));
  }
  form.append("num_variations", $("n").value || "1");
  // An empty field sends nothing: the server's default (SamplingConfig) applies.
  if ($("temperature").value !== "") form.append("temperature", $("temperature").value);
  if ($("top_p").value !== "") form.append("top_p", $("top_p").value);
  if ($("seed").value !== "") form.append("seed", $("seed").value);
  form.append("pitch_range", JSON.stringify($("pitch_range").checked));
  form.append("monophonic", $("monophonic").value);
  stop();
  $("cancel").hidden = false;
  $("progress").hidden = false;
  $("progress").value = 0;
  try {
    const job = await (await api("/v1/jobs", {method: "POST", body: form})).json();
    studio.job = job.id;
    updateButtons();
    status("Queued…");
    const end = await followEvents(job.id, (snap) => {
      const p = snap.progress;
      $("progress").max = Math.max(1, p.bars_total);
      $("progress").value = p.bars_done;
      status(snap.state === "queued" ? "Queued…" : `Generating: ${p.bars_done} of ${p.bars_total} bars…`);
    });
    if (end.state === "cancelled") { status("Cancelled."); return; }
    if (end.state !== "done") throw new Error(end.error ? end.error.message : end.state);
    const result = end.result;
    studio.candidates = [];
    for (const v of result.variations) {
      const blob = b64ToBlob(v.midi);
      const a = await analyze(blob, `candidate_${v.seed}.mid`);
      studio.candidates.push({seed: v.seed, blob, a, regions: v.regions, measured: v.controls.measured});
    }
    studio.showing = 0;
    renderCandidates();
    drawRoll();
    status(`${studio.candidates.length} candidate(s): listen, then accept one.` +
      (result.bar_grid_warning ? ` Note: ${result.bar_grid_warning}` : ""));
  } catch (err) {
    status(`Generation failed: ${err.message}`, true);
  } finally {
    studio.job = null;
    $("cancel").hidden = true;
    $("progress").hidden = true;
    updateButtons();
  }
}

async function cancel() {
  if (studio.job) await api(`/v1/jobs/${studio.job}`, {method: "DELETE"});
}

function summarizeMeasured(measured) {
  const parts = [];
  for (const [track, m] of Object.entries(measured)) {
    const bars = Object.values(m.bars);
    const densities = bars.map((b) => b.note_density).filter((d) => d !== undefined);
    parts.push(`track ${track}: ${densities.length ? "notes/bar " + densities.join(",") : "no notes"}`);
  }
  return parts.join("; ");
}

function renderCandidates() {
  const list = $("candidates");
  list.innerHTML = "";
  studio.candidates.forEach((c, k) => {
    const item = document.createElement("li");
    item.classList.toggle("showing", k === studio.showing);
    item.append(`seed ${c.seed} `);
    const show = document.createElement("button");
    show.textContent = "Show";
    show.className = "show-candidate";
    show.onclick = () => { stop(); studio.showing = k; renderCandidates(); drawRoll(); };
    const play = document.createElement("button");
    play.textContent = "▶";
    play.className = "play-candidate";
    play.onclick = () => { studio.showing = k; renderCandidates(); drawRoll(); startPlayback(); };
    const accept = document.createElement("button");
    accept.textContent = "Accept";
    accept.className = "accept";
    accept.onclick = () => {
      const base = studio.piece.name.replace(/_mmm\d*/, "");
      setPiece({name: base, blob: c.blob, a: c.a}, true);
      status(`Accepted the candidate with seed ${c.seed}. Undo brings the previous version back.`);
    };
    const measured = document.createElement("div");
    measured.className = "measured";
    measured.textContent = summarizeMeasured(c.measured);
    item.append(show, play, accept, measured);
    list.append(item);
  });
  const original = document.createElement("li");
  original.style.listStyle = "none";
  if (studio.candidates.length) {
    const button = document.createElement("button");
    button.textContent = "Show the current piece";
    button.className = "show-piece";
    button.onclick = () => { stop(); studio.showing = -1; renderCandidates(); drawRoll(); };
    original.append(button);
    list.append(original);
  }
  $("showing").textContent = studio.showing >= 0 ? `showing candidate (seed ${studio.candidates[studio.showing].seed})` : "";
}

// --- piano roll ---------------------------------------------------------------------------------
function shown() {
  return studio.showing >= 0 ? studio.candidates[studio.showing] : studio.piece;
}

function audible(track) {
  if (studio.solo.size) return studio.solo.has(track);
  return !studio.mute.has(track);
}

const ROLL_BARS = 32;  // a longer piece shows 32 bars around the selection (the grid scrolls)
let roll = null;  // the last drawn roll: {image, x(tick), grid, b0, b1}, redrawn only when it changes

// The bars the roll shows: all of a short piece, else a window starting a little before the selection.
function rollWindow(grid) {
  const n = grid.time_signatures.length;
  if (n <= ROLL_BARS) return [0, n];
  const sel = studio.sel;
  const first = sel && !sel.add ? Math.max(0, Math.min(sel.a - 2, n - ROLL_BARS)) : 0;
  return [first, first + ROLL_BARS];
}

function drawRoll() {
  const canvas = $("roll");
  const width = canvas.clientWidth || 800;
  if (canvas.width !== width) canvas.width = width;
  const g = canvas.getContext("2d"), H = canvas.height;
  g.clearRect(0, 0, width, H);
  roll = null;
  if (!studio.piece) return;
  const view = shown(), a = view.a, grid = a.grid;
  const [b0, b1] = rollWindow(grid);
  const t0 = grid.starts[b0], t1 = grid.starts[b1];
  const x = (tick) => 4 + ((tick - t0) / Math.max(1, t1 - t0)) * (width - 8);
  let lo = 127, hi = 0;
  for (const t of a.tracks) for (const n of t.notes) { lo = Math.min(lo, n[2]); hi = Math.max(hi, n[2]); }
  if (lo > hi) { lo = 48; hi = 72; }
  lo -= 2; hi += 2;
  const rowH = (H - 16) / (hi - lo + 1);
  const y = (pitch) => 14 + (hi - pitch) * rowH;
  const sel = studio.sel;
  if (sel && !sel.add) {
    g.fillStyle = "rgba(217, 72, 15, 0.10)";
    g.fillRect(x(grid.starts[sel.a]), 0, x(grid.starts[sel.b + 1]) - x(grid.starts[sel.a]), H);
  }
  g.strokeStyle = "#e4e4e4";
  g.fillStyle = "#999";
  g.font = "10px system-ui";
  for (let b = b0; b <= b1; b++) {
    g.beginPath();
    g.moveTo(x(grid.starts[b]) + 0.5, 0);
    g.lineTo(x(grid.starts[b]) + 0.5, H);
    g.stroke();
    if (b < b1) g.fillText(String(b + 1), x(grid.starts[b]) + 2, 10);
  }
  const regions = studio.showing >= 0 ? view.regions : [];
  const generated = (track, tick) => regions.some(([t, s, e]) => t === track && tick >= s && tick < e);
  for (const t of a.tracks) {
    const color = COLORS[t.index % COLORS.length];
    const on = audible(t.index);
    for (const n of t.notes) {
      if (n[0] >= t1 || n[0] + n[1] <= t0) continue;
      const isNew = generated(t.index, n[0]);
      g.globalAlpha = !on ? 0.15 : regions.length && !isNew ? 0.35 : 0.9;
      g.fillStyle = isNew ? "#d9480f" : color;
      g.fillRect(x(n[0]), y(n[2]), Math.max(1.5, x(n[0] + n[1]) - x(n[0]) - 0.5), Math.max(1.5, rowH));
    }
  }
  g.globalAlpha = 1;
  roll = {image: g.getImageData(0, 0, width, H), x, grid};
}

// The roll as last drawn, plus the playhead at `seconds` into the piece.
function drawPlayhead(seconds) {
  if (!roll) drawRoll();
  if (!roll) return;
  const g = $("roll").getContext("2d"), H = $("roll").height, grid = roll.grid;
  g.putImageData(roll.image, 0, 0);
  // seconds -> tick through the bar starts (tempo changes inside a bar are rare enough)
  const s = grid.starts_s;
  let b = 0;
  while (b + 1 < s.length && s[b + 1] <= seconds) b++;
  const span = (s[b + 1] ?? s[b] + 1) - s[b];
  const tick = grid.starts[b] + ((seconds - s[b]) / span) * ((grid.starts[b + 1] ?? grid.starts[b]) - grid.starts[b]);
  g.strokeStyle = "#d00";
  g.beginPath();
  g.moveTo(roll.x(tick), 0);
  g.lineTo(roll.x(tick), H);
  g.stroke();
}

// --- playback -----------------------------------------------------------------------------------
function playRange(a) {
  const sel = studio.sel;
  if ($("loop").checked && sel && !sel.add) {
    return [a.grid.starts_s[sel.a], a.grid.starts_s[sel.b + 1]];
  }
  return [0, a.duration_s];
}

function startPlayback() {
  stop();
  if (!studio.ctx) {
    studio.ctx = new (window.AudioContext || window.webkitAudioContext)();
    studio.synth = new Synth(studio.ctx);
  }
  studio.ctx.resume();
  const a = shown().a;
  const [from, to] = playRange(a);
  const loop = $("loop").checked && studio.sel && !studio.sel.add;
  const notes = [];
  for (const t of a.tracks) {
    for (const n of t.notes) {
      if (n[4] >= from && n[4] < to) notes.push({s: n[4], e: Math.min(n[5], to), p: n[2], v: n[3], track: t.index, program: t.program});
    }
  }
  notes.sort((p, q) => p.s - q.s);
  const player = studio.player = {from, to, loop, notes, next: 0, t0: studio.ctx.currentTime + 0.1};
  studio.stats.plays++;
  player.timer = setInterval(tick, 50);
  tick();
  animate();
}

function tick() {
  const player = studio.player, ctx = studio.ctx;
  if (!player) return;
  const length = player.to - player.from;
  const horizon = ctx.currentTime + 0.3;  // schedule a little ahead of time
  for (;;) {
    const until = player.from + (horizon - player.t0);
    while (player.next < player.notes.length && player.notes[player.next].s < until) {
      const n = player.notes[player.next++];
      if (!audible(n.track)) continue;
      studio.synth.note(player.t0 + (n.s - player.from), n.e - n.s, n.p, n.v, n.program);
      studio.stats.notesScheduled++;
    }
    if (until < player.to) break;
    if (player.loop && length > 0.05) {  // the next pass starts where this one ends
      player.t0 += length;
      player.next = 0;
      continue;
    }
    if (ctx.currentTime > player.t0 + length + 0.5) stop();
    break;
  }
}

function animate() {
  const player = studio.player;
  if (!player) { drawRoll(); return; }
  const length = player.to - player.from;
  let pos = studio.ctx.currentTime - player.t0;
  if (pos < 0 && player.loop) pos += length;
  drawPlayhead(player.from + Math.max(0, pos));
  requestAnimationFrame(animate);
}

function stop() {
  if (studio.player) {
    clearInterval(studio.player.timer);
    studio.player = null;
  }
  if (studio.synth) studio.synth.stopAll();
}

// --- start --------------------------------------------------------------------------------------
async function start() {
  try {
    studio.info = await (await api("/v1/info")).json();
  } catch (err) {
    status(`The server does not answer: ${err.message}`, true);
    return;
  }
  // The sampling defaults live in one place, the server's SamplingConfig: start from them.
  const sampling = studio.info.sampling;
  $("temperature").value = sampling.temperature;
  $("top_p").value = sampling.top_p === null ? "" : sampling.top_p;
  $("n").max = studio.info.limits.max_variations;
  // So do the decoding constraints' (mmm.generation.request.Request's).
  const decoding = studio.info.decoding;
  $("pitch_range").checked = decoding.pitch_range !== false;
  $("monophonic").value = JSON.stringify(decoding.monophonic);
  const m = studio.info.model;
  $("model").textContent = `model: ${m.checkpoint || "?"}, ${(m.parameters / 1e6).toFixed(2)}M parameters, context ${m.context}`;
  for (const [name, text] of Object.entries(studio.info.examples)) {
    const option = document.createElement("option");
    option.value = name;
    option.textContent = name.replace(/_/g, " ");
    option.title = text;
    $("examples").append(option);
  }
  for (const p of studio.info.programs) {
    const option = document.createElement("option");
    option.value = p.program;
    option.textContent = `${p.program}: ${p.name}`;
    if (p.program === 33) option.selected = true;
    $("program").append(option);
  }
  $("file").onchange = () => {
    const file = $("file").files[0];
    if (file) openBlob(file, file.name);
    $("file").value = "";
  };
  $("examples").onchange = async () => {
    const name = $("examples").value;
    if (!name) return;
    try {
      const blob = await (await api(`/v1/examples/${name}`)).blob();
      await openBlob(new Blob([blob], {type: "audio/midi"}), `${name}.mid`);
    } catch (err) {
      status(`Cannot open the example: ${err.message}`, true);
    }
    $("examples").value = "";
  };
  $("undo").onclick = undo;
  $("redo").onclick = redo;
  $("download").onclick = download;
  $("play").onclick = startPlayback;
  $("stop").onclick = stop;
  $("generate").onclick = generate;
  $("cancel").onclick = cancel;
  window.addEventListener("keydown", (e) => {
    if ((e.ctrlKey || e.metaKey) && e.key.toLowerCase() === "z") {
      e.preventDefault();
      e.shiftKey ? redo() : undo();
    }
  });
  window.addEventListener("resize", () => drawRoll());
  studio.ready = true;
}

start();
