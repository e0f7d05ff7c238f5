// canary's status page. No build step, no external assets: this file, style.css and
// index.html are served by the controller under a Content-Security-Policy that allows
// nothing else. Every string from the API is put on the page with textContent (or as
// an SVG text node), never parsed as HTML.
"use strict";

const KEY = "canary-token";
const SVGNS = "http://www.w3.org/2000/svg";
const FINAL = new Set(["succeeded", "rolled_back"]);
const ACTIONS = ["pause", "resume", "promote", "abort"];

const $ = (id) => document.getElementById(id);
let me = null;          // GET /api/v1/whoami
let listTimer = null;
let watching = null;    // AbortController of the open watch stream
let current = null;     // the rollout shown
let readingsAt = 0;
let pending = null;     // the action whose reason is being asked

// ---- the token: entered once, kept for this tab only -------------------------------------

function token() { return sessionStorage.getItem(KEY); }

async function api(method, path, body) {
  const headers = { "Authorization": "Bearer " + token() };
  if (body !== undefined) headers["Content-Type"] = "application/json";
  const resp = await fetch(path, { method, headers, cache: "no-store",
    body: body === undefined ? undefined : JSON.stringify(body) });
  let data = null;
  try { data = await resp.json(); } catch (e) { data = null; }
  if (resp.status === 401) { signOut("The token was refused: " + errorText(data, resp)); }
  if (!resp.ok) { const err = new Error(errorText(data, resp)); err.status = resp.status; throw err; }
  return data;
}

function errorText(data, resp) {
  return (data && typeof data.error === "string") ? data.error : ("HTTP " + resp.status);
}

function signOut(message) {
  sessionStorage.removeItem(KEY);
  me = null;
  stopAll();
  show("login");
  $("who").textContent = "";
  $("forget").hidden = true;
  $("login-error").textContent = message || "";
}

async function signIn() {
  try {
    me = await api("GET", "/api/v1/whoami");
  } catch (e) {
    if (e.status !== 401) signOut("Cannot reach the controller: " + e.message);
    return false;
  }
  $("who").textContent = "signed in as " + me.name + " (" + me.role + ")";
  $("forget").hidden = false;
  return true;
}

// ---- routing: #/ is the list, #/r/ID one rollout ------------------------------------------

function show(id) {
  for (const s of ["login", "list", "rollout"]) $(s).hidden = s !== id;
}

function stopAll() {
  if (listTimer) { clearInterval(listTimer); listTimer = null; }
  if (watching) { watching.abort(); watching = null; }
  current = null;
}

async function route() {
  stopAll();
  if (!token()) { show("login"); return; }
  if (!me && !(await signIn())) return;
  const m = location.hash.match(/^#\/r\/(.+)$/);
  if (m) { await openRollout(decodeURIComponent(m[1])); }
  else { show("list"); await refreshList(); listTimer = setInterval(refreshList, 5000); }
}

// ---- the list -----------------------------------------------------------------------------

function ago(iso) {
  if (!iso) return "-";
  const s = Math.max(0, (Date.now() - Date.parse(iso)) / 1000);
  if (s >= 86400) return Math.floor(s / 86400) + "d ago";
  if (s >= 3600) return Math.floor(s / 3600) + "h ago";
  if (s >= 60) return Math.floor(s / 60) + "m ago";
  return Math.floor(s) + "s ago";
}

function cell(tr, text, cls) {
  const td = document.createElement("td");
  td.textContent = text == null ? "" : String(text);
  if (cls) td.className = cls;
  tr.appendChild(td);
  return td;
}

async function refreshList() {
  let live, recent;
  try {
    [live, recent] = await Promise.all([
      api("GET", "/api/v1/rollouts?state=active&limit=500"),
      api("GET", "/api/v1/rollouts?limit=100")]);
  } catch (e) { $("list-error").textContent = e.message; return; }
  $("list-error").textContent = "";
  const seen = new Set(live.rollouts.map((r) => r.id));
  const rows = live.rollouts.concat(recent.rollouts.filter((r) => !seen.has(r.id)));
  const body = $("rollouts").tBodies[0];
  body.replaceChildren();
  for (const r of rows) {
    const tr = document.createElement("tr");
    tr.dataset.id = r.id;
    const a = document.createElement("a");
    a.href = "#/r/" + encodeURIComponent(r.id);
    a.textContent = r.id;
    const td = document.createElement("td");
    td.appendChild(a);
    tr.appendChild(td);
    cell(tr, r.target);
    cell(tr, r.canary_version);
    cell(tr, r.state.replace("_", " "), "state " + r.state);
    cell(tr, r.weight + "%");
    cell(tr, ago(r.started_at));
    cell(tr, r.reason || "", "reason");
    body.appendChild(tr);
  }
  if (!rows.length) {
    const tr = document.createElement("tr");
    cell(tr, "No rollouts yet.").colSpan = 7;
    body.appendChild(tr);
  }
}

// ---- one rollout --------------------------------------------------------------------------

function plainWords(r) {
  switch (r.state) {
    case "progressing":
      return "Progressing: stage " + (r.stage + 1) + ", " + (r.applied_weight ?? r.weight) +
        "% of traffic on " + r.canary_version + ".";
    case "paused":
      return "Paused at " + (r.applied_weight ?? r.weight) + "%: " + (r.reason || "no reason given") + ".";
    case "rolling_back":
      return "Rolling back to " + (r.stable_version || "stable") + ": " + (r.reason || "") + ".";
    case "rolled_back":
      return "Rolled back: all traffic is on " + (r.stable_version || "stable") + ". Why: " +
        (r.reason || "no reason recorded") + ".";
    case "succeeded":
      return "Succeeded: " + r.canary_version + " carries all traffic.";
    default:
      return r.state + (r.reason ? ": " + r.reason : "");
  }
}

async function openRollout(id) {
  show("rollout");
  $("r-error").textContent = "";
  $("r-confirm").hidden = true;
  try {
    current = await api("GET", "/api/v1/rollouts/" + encodeURIComponent(id));
  } catch (e) {
    $("r-title").textContent = id;
    $("r-summary").textContent = "";
    $("r-error").textContent = e.message;
    return;
  }
  renderRollout(current);
  await refreshReadings(true);
  if (!FINAL.has(current.state)) watch(id);
}

function renderRollout(r) {
  $("r-title").textContent = r.target + " → " + r.canary_version;
  const s = $("r-summary");
  s.textContent = plainWords(r);
  s.className = "summary " + r.state;
  s.dataset.state = r.state;
  $("r-meta").textContent = "rollout " + r.id + " · policy " + r.policy + " · stable " +
    (r.stable_version || "-") + " · started " + ago(r.started_at) + " · updated " + ago(r.updated_at);
  renderActions(r);
  const body = $("r-events").tBodies[0];
  body.replaceChildren();
  for (const e of (r.events || []).slice().reverse()) {
    const tr = document.createElement("tr");
    cell(tr, new Date(e.at).toLocaleString());
    cell(tr, e.type);
    cell(tr, e.actor);
    cell(tr, e.message, "message");
    body.appendChild(tr);
  }
}

function allowed(r, action) {
  if (!me || !me.may.includes(action) || FINAL.has(r.state) || r.state === "rolling_back") return false;
  if (action === "pause") return r.state === "progressing";
  if (action === "resume") return r.state === "paused";
  return true;
}

function renderActions(r) {
  const box = $("r-actions");
  const want = ACTIONS.filter((a) => allowed(r, a));
  if (box.dataset.shown === want.join(",")) return;  // (a button is not swapped under a click)
  box.dataset.shown = want.join(",");
  box.replaceChildren();
  for (const action of want) {
    const b = document.createElement("button");
    b.type = "button";
    b.id = "action-" + action;
    b.className = action;
    b.textContent = action[0].toUpperCase() + action.slice(1);
    b.addEventListener("click", () => ask(action));
    box.appendChild(b);
  }
}

function ask(action) {
  pending = action;
  $("r-reason-label").textContent = "Why " + action + "? (kept as an event with your name)";
  $("r-send").textContent = action[0].toUpperCase() + action.slice(1) + " now";
  $("r-reason").value = "";
  $("r-confirm").hidden = false;
  $("r-reason").focus();
}

async function send(ev) {
  ev.preventDefault();
  const reason = $("r-reason").value.trim();
  if (!pending || !current) return;
  if (!reason) { $("r-error").textContent = "Give a reason: it is kept with the event."; return; }
  try {
    current = await api("POST", "/api/v1/rollouts/" + encodeURIComponent(current.id) + "/" + pending,
      { reason });
    $("r-error").textContent = "";
    $("r-confirm").hidden = true;
    pending = null;
    renderRollout(current);
  } catch (e) {
    $("r-error").textContent = e.message;
  }
}

// ---- live updates: the watch stream (fetch, so the token goes in a header) -----------------

async function watch(id) {
  const ctl = new AbortController();
  watching = ctl;
  let delay = 1000;
  while (!ctl.signal.aborted) {
    try {
      const resp = await fetch("/api/v1/rollouts/" + encodeURIComponent(id) + "/watch", {
        headers: { "Authorization": "Bearer " + token(), "Accept": "text/event-stream" },
        signal: ctl.signal, cache: "no-store" });
      if (resp.status === 401) { signOut("The token was refused."); return; }
      if (!resp.ok) throw new Error("HTTP " + resp.status);
      delay = 1000;
      const reader = resp.body.getReader();
      const decoder = new TextDecoder();
      let buf = "";
      for (;;) {
        const { value, done } = await reader.read();
        if (done) break;
        buf += decoder.decode(value, { stream: true });
        let cut;
        while ((cut = buf.indexOf("\n\n")) >= 0) {
          const block = buf.slice(0, cut);
          buf = buf.slice(cut + 2);
          const data = block.split("\n").filter((l) => l.startsWith("data: ")).map((l) => l.slice(6)).join("\n");
          if (data && block.includes("event: rollout")) onChange(JSON.parse(data));
        }
      }
      if (current && FINAL.has(current.state)) return;
    } catch (e) {
      if (ctl.signal.aborted) return;
    }
    await new Promise((ok) => setTimeout(ok, delay));
    delay = Math.min(delay * 2, 15000);
  }
}

function onChange(r) {
  if (!current || r.id !== current.id) return;
  current = r;
  renderRollout(r);
  refreshReadings(FINAL.has(r.state));
}

async function refreshReadings(now) {
  // at most one read of the history every 2 s, however often the rollout changes
  const t = Date.now();
  if (!now && t - readingsAt < 2000) {
    setTimeout(() => { if (Date.now() - readingsAt >= 2000) refreshReadings(true); }, 2100);
    return;
  }
  readingsAt = t;
  if (!current) return;
  let h;
  try { h = await api("GET", "/api/v1/rollouts/" + encodeURIComponent(current.id) + "/readings"); }
  catch (e) { $("r-error").textContent = e.message; return; }
  renderPlots(h, current);
}

// ---- plots (SVG, drawn here) ----------------------------------------------------------------

function el(name, attrs, parent) {
  const n = document.createElementNS(SVGNS, name);
  for (const k in attrs) n.setAttribute(k, String(attrs[k]));
  if (parent) parent.appendChild(n);
  return n;
}

function label(parent, x, y, text, anchor) {
  const t = el("text", { x, y, "text-anchor": anchor || "start" }, parent);
  t.textContent = text;
  return t;
}

function clock(ms) {
  const d = new Date(ms);
  return d.toTimeString().slice(0, 8);
}

function niceTicks(lo, hi, n) {
  if (!(hi > lo)) { hi = lo + 1; }
  const raw = (hi - lo) / n;
  const mag = Math.pow(10, Math.floor(Math.log10(raw)));
  const step = [1, 2, 2.5, 5, 10].map((m) => m * mag).find((s) => s >= raw) || raw;
  const out = [];
  for (let v = Math.ceil(lo / step) * step; v <= hi + step * 1e-9; v += step) out.push(+v.toPrecision(12));
  return out;
}

// ticks on whole seconds, minutes or hours, about six across
function timeTicks(t0, t1) {
  const span = (t1 - t0) / 1000;
  const steps = [1, 2, 5, 10, 15, 30, 60, 120, 300, 600, 900, 1800, 3600, 7200, 10800, 21600, 43200, 86400];
  const step = (steps.find((s) => span / s <= 6) || 86400) * 1000;
  const out = [];
  for (let t = Math.ceil(t0 / step) * step; t <= t1; t += step) out.push(t);
  return out;
}

function fmt(v) {
  if (v === 0) return "0";
  const a = Math.abs(v);
  if (a >= 1000 || a < 0.001) return v.toExponential(1);
  return String(+v.toPrecision(3));
}

// series: [{cls, points: [[t, v]], step?, dots?: [[t, v, verdict]]}]; stages: [[t, n]]
function plot(title, unit, t0, t1, series, opts) {
  opts = opts || {};
  const W = 900, H = 230, L = 64, R = 16, T = 26, B = 40;
  const box = document.createElement("div");
  box.className = "plot";
  const h = document.createElement("h3");
  h.textContent = title;
  box.appendChild(h);
  const svg = el("svg", { viewBox: `0 0 ${W} ${H}`, role: "img" });
  svg.setAttribute("aria-label", title + " (" + unit + ") over time");
  const ys = [];
  for (const s of series) for (const p of s.points) if (p[1] != null && isFinite(p[1])) ys.push(p[1]);
  let lo = opts.min != null ? opts.min : Math.min(0, ...ys);
  let hi = opts.max != null ? opts.max : Math.max(...ys, lo + 1e-9);
  if (opts.max == null) hi = hi + (hi - lo) * 0.1;
  if (!(t1 > t0)) t1 = t0 + 1000;
  const x = (t) => L + (W - L - R) * (t - t0) / (t1 - t0);
  const y = (v) => T + (H - T - B) * (1 - (v - lo) / (hi - lo || 1));
  // axes, grid, ticks
  for (const v of niceTicks(lo, hi, 4)) {
    el("line", { x1: L, x2: W - R, y1: y(v), y2: y(v), class: "grid" }, svg);
    label(svg, L - 6, y(v) + 4, fmt(v), "end");
  }
  for (const t of timeTicks(t0, t1)) {
    el("line", { x1: x(t), x2: x(t), y1: H - B, y2: H - B + 4, class: "axis" }, svg);
    label(svg, x(t), H - B + 16, clock(t), "middle");
  }
  el("line", { x1: L, x2: W - R, y1: H - B, y2: H - B, class: "axis" }, svg);
  el("line", { x1: L, x2: L, y1: T, y2: H - B, class: "axis" }, svg);
  label(svg, 4, 12, unit);
  label(svg, W - R, H - 4, "time (local)", "end");
  for (const [t, n] of opts.stages || []) {
    el("line", { x1: x(t), x2: x(t), y1: T, y2: H - B, class: "stage" }, svg);
    label(svg, x(t) + 3, T + 10, "stage " + (n + 1));
  }
  for (const s of series) {
    const pts = s.points.filter((p) => p[1] != null && isFinite(p[1]));
    if (!pts.length) continue;
    let d = "";
    pts.forEach((p, i) => {
      if (i === 0) d += `M${x(p[0]).toFixed(1)},${y(p[1]).toFixed(1)}`;
      else if (s.step) d += `H${x(p[0]).toFixed(1)}V${y(p[1]).toFixed(1)}`;
      else d += `L${x(p[0]).toFixed(1)},${y(p[1]).toFixed(1)}`;
    });
    if (s.until != null) d += `H${x(s.until).toFixed(1)}`;
    el("path", { d, class: s.cls }, svg).dataset.series = s.name;
    for (const p of s.dots || []) {
      if (p[1] == null || !isFinite(p[1])) continue;
      const cls = p[2] === "fail" ? "dot-fail" : p[2] === "pass" ? "dot-pass" : "dot-other";
      const c = el("circle", { cx: x(p[0]), cy: y(p[1]), r: p[2] === "fail" ? 4 : 2.5, class: cls }, svg);
      const tip = el("title", {}, c);
      tip.textContent = clock(p[0]) + " " + fmt(p[1]) + " " + unit + ": " + p[2] + (p[3] ? " (" + p[3] + ")" : "");
    }
  }
  // legend
  let lx = L + 8;
  for (const s of series) {
    if (!s.name) continue;
    el("rect", { x: lx, y: H - 14, width: 10, height: 10, class: "legend-" + s.legend }, svg);
    lx += 14 + label(svg, lx + 14, H - 5, s.name).textContent.length * 6.5 + 12;
  }
  box.appendChild(svg);
  if (opts.note) {
    const p = document.createElement("p");
    p.className = "note";
    p.textContent = opts.note;
    box.appendChild(p);
  }
  return box;
}

function renderPlots(h, r) {
  const ms = (iso) => Date.parse(iso);
  const t0 = ms(h.started_at);
  const t1 = FINAL.has(r.state) ? ms(h.updated_at) : Math.max(Date.now(), ms(h.updated_at));
  const stages = [];
  let last = -1;
  for (const w of h.weights) {
    if (w.stage !== last) { stages.push([ms(w.at), w.stage]); last = w.stage; }
  }
  const weight = plot("Canary weight", "% of traffic", t0, t1,
    [{ name: "canary weight", legend: "canary", cls: "line canary", step: true, until: t1,
       points: h.weights.map((w) => [ms(w.at), w.weight]) }],
    { min: 0, max: 100, stages });
  $("r-weight").replaceChildren(weight);
  const box = $("r-gates");
  box.replaceChildren();
  if (!h.gates.length) {
    const p = document.createElement("p");
    p.className = "muted";
    p.textContent = "No gate has been read yet.";
    box.appendChild(p);
  }
  for (const g of h.gates) {
    const rd = g.readings;
    const dots = rd.map((x) => [ms(x.at), x.value, x.verdict, x.detail]);
    if (g.kind === "errors") {
      const rate = (e, n) => (n ? 100 * e / n : null);
      box.appendChild(plot(g.name + ": error rate, canary vs stable (this stage so far)",
        "% of requests", t0, t1, [
          { name: "canary", legend: "canary", cls: "line canary",
            points: rd.map((x) => [ms(x.at), rate(x.canary_errors, x.canary_requests)]) },
          { name: "stable", legend: "stable", cls: "line stable",
            points: rd.map((x) => [ms(x.at), rate(x.stable_errors, x.stable_requests)]) }],
        { min: 0, stages }));
      box.appendChild(plot(g.name + ": evidence that the canary is worse", "log10 evidence", t0, t1, [
        { name: "evidence", legend: "canary", cls: "line canary", dots,
          points: rd.map((x) => [ms(x.at), x.value]) },
        { name: "rolls back here", legend: "bound", cls: "bound", step: true, until: t1,
          points: rd.map((x) => [ms(x.at), x.max]) }],
        { stages, note: "Rolls back when the evidence reaches the threshold (its false-alarm budget, alpha). Latest: " +
          (rd.length ? (rd[rd.length - 1].detail || rd[rd.length - 1].verdict) : "-") }));
    } else if (g.kind === "compare") {
      box.appendChild(plot(g.name + ": canary vs stable", "value", t0, t1, [
        { name: "canary", legend: "canary", cls: "line canary", dots,
          points: rd.map((x) => [ms(x.at), x.value]) },
        { name: "stable", legend: "stable", cls: "line stable",
          points: rd.map((x) => [ms(x.at), x.stable]) },
        { name: "highest allowed", legend: "bound", cls: "bound",
          points: rd.map((x) => [ms(x.at), x.bound]) }], { stages }));
    } else {
      const series = [{ name: "value", legend: "canary", cls: "line canary", dots,
        points: rd.map((x) => [ms(x.at), x.value]) }];
      if (rd.some((x) => x.max != null)) series.push({ name: "max", legend: "bound", cls: "bound", step: true, until: t1,
        points: rd.map((x) => [ms(x.at), x.max]) });
      if (rd.some((x) => x.min != null)) series.push({ name: "min", legend: "bound", cls: "bound", step: true, until: t1,
        points: rd.map((x) => [ms(x.at), x.min]) });
      box.appendChild(plot(g.name + ": value against its bound", "value", t0, t1, series, { stages }));
    }
  }
  const note = document.createElement("p");
  note.className = "muted";
  note.textContent = "History: " + h.downsampling + ".";
  box.appendChild(note);
}

// ---- wiring ------------------------------------------------------------------------------

document.addEventListener("DOMContentLoaded", () => {
  $("login-form").addEventListener("submit", async (ev) => {
    ev.preventDefault();
    const t = $("token").value.trim();
    if (!t) return;
    sessionStorage.setItem(KEY, t);
    $("token").value = "";
    $("login-error").textContent = "";
    me = null;
    await route();
  });
  $("forget").addEventListener("click", () => { signOut(""); });
  $("r-confirm").addEventListener("submit", send);
  $("r-cancel").addEventListener("click", () => { $("r-confirm").hidden = true; pending = null; });
  window.addEventListener("hashchange", route);
  route();
});
