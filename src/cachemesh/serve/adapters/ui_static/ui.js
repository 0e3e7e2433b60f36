// The cachemesh page: reads the server's APIs and shows them; changes nothing.
//
// Every string from the server goes into the DOM as text (textContent, append of
// strings): source paths, file names, event texts and error messages are user input.
// No innerHTML anywhere. The token, when one is needed, lives in this closure only.
"use strict";

(() => {
  const params = new URLSearchParams(location.search);
  // ?interval=MS polls faster (the tests use it); never below 250 ms.
  const POLL_MS = Math.max(250, Number(params.get("interval")) || 2000);
  const MAX_STREAMS = 3;           // event streams at once (a browser allows 6 connections)
  const KEEP_EVENTS = 3;           // events shown per cache (the latest)
  const KEEP_SAMPLES = 300;        // chart points
  const FINAL = new Set(["Available", "Failed"]);
  const SERIES = [["requests", "#2a6fdb"], ["loads", "#1a9c5b"], ["evictions", "#d9822b"]];

  let token = null;
  let timer = null;
  let caches = new Map();          // name -> description (list API, then stream updates)
  const events = new Map();        // name -> recent events
  const eventsFor = new Map();     // name -> status whose events were fetched
  const streams = new Map();       // name -> AbortController
  const streamed = new Map();      // name -> when its stream last told us something
  const spread = new Map();        // name -> {nodes, expected, done}: a cluster-wide cache
  const samples = [];              // {t, requests, loads, evictions}: deltas
  let previous = null;             // counters at the last poll
  let here = null;                 // this node's name in cluster mode; null on a lone server

  const $ = (id) => document.getElementById(id);

  class AuthError extends Error {}

  // -- DOM helpers: text only ---------------------------------------------------------

  function el(tag, cls, ...children) {
    const e = document.createElement(tag);
    if (cls) e.className = cls;
    for (const c of children) {
      if (c === null || c === undefined) continue;
      e.append(c instanceof Node ? c : String(c));
    }
    return e;
  }

  function bytes(n) {
    if (n === null || n === undefined) return "–";
    const units = ["B", "KiB", "MiB", "GiB", "TiB"];
    let i = 0;
    while (Math.abs(n) >= 1024 && i < units.length - 1) { n /= 1024; i++; }
    return (i ? n.toFixed(1) : String(n)) + " " + units[i];
  }

  function ago(unix) {
    if (!unix) return "never";
    const s = Math.max(0, Date.now() / 1000 - unix);
    if (s < 60) return Math.round(s) + " s ago";
    if (s < 3600) return Math.round(s / 60) + " min ago";
    if (s < 86400) return Math.round(s / 3600) + " h ago";
    return Math.round(s / 86400) + " d ago";
  }

  const STATES = ["Pending", "Loading", "Available", "Failed", "Pulling", "Unloaded", "Ready",
                  "Unloading"];
  function state(name) {
    // A class only for states we know: a server string never becomes a class name.
    const known = STATES.includes(name) ? " s-" + name.toLowerCase() : "";
    return el("span", "state" + known, name);
  }

  // -- talking to the server ----------------------------------------------------------

  async function call(path, signal) {
    const headers = {};
    if (token) headers.Authorization = "Bearer " + token;
    const r = await fetch(path, {headers, cache: "no-store", signal});
    if (r.status === 401 || r.status === 403) {
      let message = r.status === 401 ? "a token is needed" : "this token may not read this";
      try { message = (await r.json()).error || message; } catch (e) { /* keep ours */ }
      throw new AuthError(message);
    }
    return r;
  }

  async function json(path) {
    const r = await call(path);
    if (!r.ok) throw new Error(path + ": HTTP " + r.status);
    return r.json();
  }

  // Server-sent events over fetch(): EventSource cannot send an Authorization header.
  async function readEvents(response, onEvent) {
    const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
    let buffer = "";
    for (;;) {
      const {value, done} = await reader.read();
      if (done) return;
      buffer += value.replace(/\r\n?/g, "\n");
      let end;
      while ((end = buffer.indexOf("\n\n")) >= 0) {
        const block = buffer.slice(0, end);
        buffer = buffer.slice(end + 2);
        let kind = "message";
        const data = [];
        for (const line of block.split("\n")) {
          if (line.startsWith("event:")) kind = line.slice(6).trim();
          else if (line.startsWith("data:")) data.push(line.slice(5).replace(/^ /, ""));
        }
        if (data.length) onEvent(kind, JSON.parse(data.join("\n")));
      }
    }
  }

  function follow(name) {
    if (streams.has(name) || streams.size >= MAX_STREAMS) return;
    const control = new AbortController();
    streams.set(name, control);
    const path = "api/v1/datacaches/" + encodeURIComponent(name) + "/events";
    call(path, control.signal)
      .then((r) => r.ok ? readEvents(r, (kind, data) => onCacheEvent(name, kind, data)) : null)
      .catch((e) => { if (e instanceof AuthError) locked(e.message); })
      .finally(() => { streams.delete(name); });
  }

  function onCacheEvent(name, kind, data) {
    const info = caches.get(name);
    streamed.set(name, performance.now());
    if (kind === "event") {
      remember(name, [data]);
    } else if (kind === "nodes") {
      spread.set(name, {nodes: data.nodes || {}, expected: data.expected || [], done: data.done});
    } else if (kind === "progress" && info) {
      info.progress = {...info.progress, ...data};
      delete info.progress.name;
    } else if (kind === "status" && info) {
      info.status = data.status;
      info.error = data.error;
      eventsFor.set(name, data.status);
      if (FINAL.has(data.status)) soon();
    }
    renderCaches();
  }

  function remember(name, list) {
    const known = events.get(name) || [];
    const ids = new Set(known.map((e) => e.id));
    const all = known.concat(list.filter((e) => !ids.has(e.id)));
    all.sort((a, b) => a.id - b.id);
    events.set(name, all.slice(-KEEP_EVENTS));
  }

  async function fetchEvents(name, status) {
    eventsFor.set(name, status);
    try {
      const d = await json("api/v1/datacaches/" + encodeURIComponent(name));
      remember(name, d.events || []);
      if (d.nodes && d.cluster) {
        spread.set(name, {nodes: d.nodes, expected: d.cluster.expected || [],
                          done: d.cluster.done});
      }
      renderCaches();
    } catch (e) {
      if (e instanceof AuthError) locked(e.message);
    }
  }

  // -- Prometheus text: the counters the page needs ----------------------------------

  function parseMetrics(text) {
    const out = [];
    for (const line of text.split("\n")) {
      if (!line || line[0] === "#") continue;
      const m = /^([A-Za-z_:][\w:]*)(?:\{(.*)\})?\s+(\S+)/.exec(line);
      if (!m) continue;
      const labels = {};
      for (const l of (m[2] || "").matchAll(/(\w+)="((?:[^"\\]|\\.)*)"/g)) {
        labels[l[1]] = l[2].replace(/\\(.)/g, (_, c) => (c === "n" ? "\n" : c));
      }
      out.push({name: m[1], labels, value: Number(m[3])});
    }
    return out;
  }

  function counters(metrics) {
    const c = {requests: 0, loads: 0, evictions: 0, byModel: new Map(), byVersion: new Map()};
    for (const s of metrics) {
      if (s.name === "cachemesh_requests_total") {
        c.requests += s.value;
        const m = c.byModel.get(s.labels.model) || {requests: 0, errors: 0};
        m.requests += s.value;
        if (s.labels.outcome !== "ok") m.errors += s.value;
        c.byModel.set(s.labels.model, m);
      } else if (s.name === "cachemesh_model_load_seconds_count") {
        c.loads += s.value;
      } else if (s.name === "cachemesh_evictions_total") {
        c.evictions += s.value;
      } else if (s.name === "cachemesh_version_requests_total") {
        c.byVersion.set(s.labels.model + "@" + s.labels.version, s.value);
      }
    }
    return c;
  }

  // -- rendering ----------------------------------------------------------------------

  function renderCaches() {
    const rows = [];
    for (const c of caches.values()) {
      const p = c.progress || {};
      const bar = el("progress");
      bar.max = 100;
      bar.value = p.percent || 0;
      bar.title = (p.percent || 0) + "%";
      const detail = (p.percent || 0) + "% · " + (p.files_done || 0) + "/" + (p.files_total || 0)
        + " files" + (c.status === "Loading" && p.rate ? " · " + bytes(p.rate) + "/s" : "");
      const u = c.usage;
      const list = el("ul", "events");
      for (const e of events.get(c.name) || []) {
        list.append(el("li", e.level === "info" ? "" : "warn", e.message));
      }
      const row = el("tr", "",
        el("td", "", el("code", "", c.name)),
        el("td", "", c.bucket),
        el("td", "path", c.source),
        el("td", "", state(c.status), c.error ? el("div", "error", c.error) : null),
        el("td", "progress", bar, el("div", "note", detail), spreadOf(c.name)),
        el("td", "num", bytes(p.bytes_total)),
        el("td", "num", u ? bytes(u.logical_bytes) + " / " + bytes(u.exclusive_bytes) : "–"),
        el("td", "path", el("code", "", c.view)),
        el("td", "", list));
      row.dataset.cache = c.name;
      rows.push(row);
    }
    $("cache-rows").replaceChildren(...rows);
    $("no-caches").hidden = rows.length > 0;
  }

  // Each node's pull of a cache declared cluster-wide (prewarm/ in etcd).
  function spreadOf(name) {
    const s = spread.get(name);
    if (!s) return null;
    const list = el("ul", "copies nodes");
    const names = [...new Set([...s.expected, ...Object.keys(s.nodes)])].sort();
    for (const node of names) {
      const p = s.nodes[node];
      const item = el("li", "", el("code", "", node), " · " + (p ? p.state + " "
        + Math.round(100 * (p.progress || 0)) + "%" : "not started"),
        p && p.error ? el("div", "error", p.error) : null);
      item.dataset.node = node;
      list.append(item);
    }
    return list;
  }

  function renderUsage(usage) {
    $("usage").textContent = usage ? "logical " + bytes(usage.logical_bytes) + ", stored "
      + bytes(usage.physical_bytes) + " (deduplication saves " + bytes(usage.saved_bytes) + ")"
      : "";
  }

  function renderModels(models, count) {
    const rows = [];
    for (const m of models) {
      const labels = Object.keys(m.versions);
      labels.forEach((label, i) => {
        const v = m.versions[label];
        const s = v.status;
        const copies = el("ul", "copies");
        for (const c of s.copies) {
          copies.append(el("li", "", "worker " + c.worker + " · " + c.state
            + (c.extra ? " · extra" : "")));
        }
        if (!s.copies.length) copies.append(el("li", "note", "none loaded"));
        const problems = el("div", "error");
        if (s.reason) problems.append(el("div", "", s.reason));
        for (const e of s.errors) if (!s.reason || !e.endsWith(s.reason)) {
          problems.append(el("div", "", e));
        }
        const mc = count ? count.byModel.get(m.name) : null;
        const vc = count ? count.byVersion.get(m.name + "@" + label) : undefined;
        const traffic = m.traffic && label in m.traffic ? m.traffic[label] + "%" : "–";
        const row = el("tr", i ? "more" : "",
          el("td", "", i ? "" : el("code", "", m.name)),
          el("td", "", label === "default" ? "–" : label),
          el("td", "num", traffic),
          el("td", "", state(s.state), problems.childNodes.length ? problems : null),
          el("td", "", copies),
          here === null ? null : el("td", "nodes", holders(s.nodes || [])),
          el("td", "", ago(s.last_used)),
          el("td", "num", s.rate.toFixed(2)),
          el("td", "num", vc === undefined ? (mc && !i ? mc.requests : "–") : vc),
          el("td", "num", i ? "" : (mc ? mc.errors : "–")),
          el("td", "num", s.size_bytes ? bytes(s.size_bytes)
            : s.predicted_bytes ? "~" + bytes(s.predicted_bytes) : "–"),
          el("td", "path", v.source));
        row.dataset.model = m.name;
        row.dataset.version = label;
        rows.push(row);
      });
    }
    $("model-rows").replaceChildren(...rows);
    $("no-models").hidden = rows.length > 0;
    $("model-nodes").hidden = here === null;
    $("models-note").textContent = here === null ? "" : "state, copies and counts: on node "
      + here + "; nodes: every node holding a copy";
  }

  // The nodes holding copies of one version (cluster mode: copies/ in etcd).
  function holders(nodes) {
    const list = el("ul", "copies");
    for (const n of nodes) {
      const item = el("li", "", el("code", "", n.node),
        n.node === here ? " (this node)" : null, n.state === "ready" ? null : " · " + n.state);
      item.dataset.node = n.node;
      list.append(item);
    }
    if (!nodes.length) list.append(el("li", "note", "none"));
    return list;
  }

  function renderMemory(memory) {
    const budget = memory.budget_bytes;
    $("budget").textContent = "held " + bytes(memory.held_bytes) + " of a budget of "
      + bytes(budget);
    const rows = memory.workers.map((w) => {
      const meter = el("meter");
      meter.min = 0;
      meter.max = budget;
      meter.high = budget * 0.9;
      meter.value = w.held_bytes;
      meter.title = bytes(w.held_bytes) + " / " + bytes(budget);
      const row = el("tr", w.alive ? "" : "dead",
        el("td", "", String(w.id) + (w.alive ? "" : " (dead)")),
        el("td", "num", w.pid),
        el("td", "", meter),
        el("td", "num", bytes(w.held_bytes)),
        el("td", "num", bytes(w.rss_bytes)),
        el("td", "", w.models.join(", ")));
      row.dataset.worker = w.id;
      return row;
    });
    $("worker-rows").replaceChildren(...rows);
  }

  const HEALTH = {
    ok: "its lease is alive and it takes requests",
    degraded: "it cannot reach etcd: it serves what it holds, declarations wait",
    stale: "as this node saw it before losing etcd: nobody can confirm it now",
    draining: "stopping: it takes no new requests",
  };

  function health(n) {
    const kind = n.degraded ? "degraded" : n.stale ? "stale" : n.draining ? "draining" : "ok";
    const badge = el("span", "state h-" + kind, kind === "stale" ? "stale record" : kind);
    badge.title = HEALTH[kind] + (n.updated_at ? "; record written "
      + new Date(n.updated_at * 1000).toLocaleTimeString() : "");
    return badge;
  }

  function held(c) {
    const name = c.model + (c.version && c.version !== "default" ? "@" + c.version : "");
    const item = el("li", "", el("code", "", name), " · " + c.state + " · " + bytes(c.bytes)
      + (c.rate ? " · " + c.rate.toFixed(2) + " req/s" : ""));
    item.dataset.model = c.model;
    return item;
  }

  // Cluster mode only. A lone server lists itself too, but its one row would repeat the
  // memory section: the page shows no nodes there.
  function renderNodes(body, cacheCount) {
    const cluster = body.cluster;
    here = cluster ? cluster.name : null;
    $("nodes").hidden = !cluster;
    document.title = cluster ? "cachemesh · " + cluster.name : "cachemesh";
    for (const span of document.querySelectorAll("h2 .where")) {
      span.textContent = cluster ? " on node " + cluster.name : "";
    }
    if (!cluster) {
      $("node-rows").replaceChildren();
      return;
    }
    const nodes = body.nodes || [];
    $("cluster-note").textContent = nodes.length + " node" + (nodes.length === 1 ? "" : "s")
      + " · this page: " + cluster.name + (cluster.leader ? " (leader)" : "")
      + " · membership " + cluster.state;
    const warning = $("cluster-warning");
    warning.hidden = !cluster.degraded;
    warning.textContent = cluster.degraded ? "Node " + cluster.name + " cannot reach etcd"
      + (cluster.degraded_since ? " since " + new Date(cluster.degraded_since * 1000)
        .toLocaleTimeString() : "") + (cluster.last_error ? " (" + cluster.last_error + ")" : "")
      + ": it serves what it has loaded and refuses declarations; the other nodes are shown"
      + " as it last saw them." : "";
    $("node-rows").replaceChildren(...nodes.map((n) => {
      const labels = el("ul", "labels");
      for (const [k, v] of Object.entries(n.labels || {})) labels.append(el("li", "", k + "=" + v));
      const cap = n.capacity_bytes;
      const used = n.memory_used_bytes || 0;
      const meter = el("meter");
      meter.min = 0;
      meter.max = cap || 1;
      meter.high = (cap || 1) * 0.9;
      meter.value = cap ? used : 0;
      meter.title = bytes(used) + " / " + (cap ? bytes(cap) : "no budget");
      const holds = el("ul", "copies", ...(n.copies || []).map(held));
      if (n.self && cacheCount) {
        holds.append(el("li", "note", cacheCount + " data cache" + (cacheCount === 1 ? "" : "s")
          + " (below)"));
      }
      if (!holds.childNodes.length) holds.append(el("li", "note", "nothing loaded"));
      const cannot = el("ul", "copies");
      for (const [m, why] of Object.entries(n.cannot_load || {})) {
        cannot.append(el("li", "error", el("code", "", m), ": " + why));
      }
      const row = el("tr", n.stale ? "dead" : "",
        el("td", "", el("code", "", n.name), n.self ? el("div", "note", "this node") : null),
        el("td", "addr", n.advertise),
        el("td", "", labels),
        el("td", "", health(n)),
        el("td", "", meter),
        el("td", "num", cap ? bytes(used) + " of " + bytes(cap) : "not reported yet"),
        el("td", "", holds),
        el("td", "", cannot.childNodes.length ? cannot : "–"));
      row.dataset.node = n.name;
      return row;
    }));
  }

  function sample(count) {
    const now = Date.now();
    if (previous) {
      const d = {t: now};
      for (const [k] of SERIES) d[k] = Math.max(0, count[k] - previous[k]);
      samples.push(d);
      if (samples.length > KEEP_SAMPLES) samples.shift();
    }
    previous = {requests: count.requests, loads: count.loads, evictions: count.evictions};
    drawChart();
  }

  function drawChart() {
    const canvas = $("chart");
    const width = canvas.clientWidth || canvas.width;
    const ratio = window.devicePixelRatio || 1;
    canvas.width = Math.round(width * ratio);
    canvas.height = Math.round(180 * ratio);
    const g = canvas.getContext("2d");
    g.setTransform(ratio, 0, 0, ratio, 0, 0);
    const h = 180, left = 40, bottom = 20, top = 8;
    g.clearRect(0, 0, width, h);
    const top_value = Math.max(1, ...samples.flatMap((s) => SERIES.map(([k]) => s[k])));
    g.strokeStyle = "#ccc";
    g.fillStyle = "#555";
    g.font = "11px sans-serif";
    g.beginPath();
    g.moveTo(left, top);
    g.lineTo(left, h - bottom);
    g.lineTo(width - 4, h - bottom);
    g.stroke();
    g.fillText(String(top_value), 4, top + 8);
    g.fillText("0", 4, h - bottom);
    if (samples.length) {
      const first = new Date(samples[0].t - POLL_MS).toLocaleTimeString();
      g.fillText(first, left, h - 4);
      g.fillText("now", width - 30, h - 4);
    }
    // The samples fill the width: from the oldest kept to the newest.
    const span = Math.max(1, samples.length - 1);
    const x = (i) => left + (width - left - 8) * i / span;
    const y = (v) => h - bottom - (h - bottom - top) * v / top_value;
    for (const [k, colour] of SERIES) {
      g.strokeStyle = colour;
      g.lineWidth = 2;
      g.beginPath();
      samples.forEach((s, i) => (i ? g.lineTo(x(i), y(s[k])) : g.moveTo(x(i), y(s[k]))));
      g.stroke();
    }
    const legend = SERIES.map(([k, colour]) => {
      const total = samples.reduce((a, s) => a + s[k], 0);
      const last = samples.length ? samples[samples.length - 1][k] : 0;
      const swatch = el("span", "swatch");
      swatch.style.background = colour;
      const item = el("li", "", swatch, k + ": " + total + " (last " + POLL_MS / 1000 + " s: "
        + last + ")");
      item.dataset.series = k;
      item.dataset.total = total;
      return item;
    });
    $("legend").replaceChildren(...legend);
    $("activity-note").textContent = samples.length + " samples, one every "
      + POLL_MS / 1000 + " s";
  }

  // -- the loop -------------------------------------------------------------------------

  function soon() {
    clearTimeout(timer);
    timer = setTimeout(poll, 100);
  }

  function locked(message) {
    clearTimeout(timer);
    timer = null;
    for (const c of streams.values()) c.abort();
    streams.clear();
    // Without a valid token the page shows nothing of the server.
    caches = new Map();
    events.clear();
    eventsFor.clear();
    streamed.clear();
    for (const id of ["cache-rows", "model-rows", "worker-rows", "node-rows", "legend"]) {
      $(id).replaceChildren();
    }
    $("main").hidden = true;
    $("login").hidden = false;
    $("login-error").textContent = token ? message : "";
    $("status").textContent = "this server needs a token";
    token = null;
    $("token").focus();
  }

  let polling = false;
  let again = false;

  async function poll() {
    clearTimeout(timer);
    timer = null;
    // One poll at a time: a late answer must not overwrite a newer one.
    if (polling) { again = true; return; }
    polling = true;
    try {
      await pollOnce();
    } finally {
      polling = false;
    }
    if (again) { again = false; soon(); }
  }

  async function pollOnce() {
    const asked = performance.now();
    try {
      const [list, models, nodes] = await Promise.all([
        json("api/v1/datacaches?usage=true"), json("api/v1/models"), json("api/v1/nodes")]);
      let count = null;
      let note = "";
      try {
        const r = await call("metrics");
        if (r.ok) count = counters(parseMetrics(await r.text()));
      } catch (e) {
        if (!(e instanceof AuthError)) throw e;
        note = " (request counts: this token may not read /metrics)";
      }
      $("login").hidden = true;
      $("main").hidden = false;
      caches = new Map(list.datacaches.map((c) => {
        const mine = caches.get(c.name);
        // A stream's news is newer than a list asked for before it came.
        const newer = mine && (streamed.get(c.name) || 0) > asked;
        return [c.name, newer ? {...mine, usage: c.usage} : c];
      }));
      for (const name of streamed.keys()) if (!caches.has(name)) streamed.delete(name);
      for (const name of events.keys()) if (!caches.has(name)) events.delete(name);
      for (const name of spread.keys()) if (!caches.has(name)) spread.delete(name);
      for (const c of caches.values()) {
        if (!FINAL.has(c.status)) follow(c.name);
        else if (!streams.has(c.name) && (eventsFor.get(c.name) !== c.status
                 || (spread.has(c.name) && !spread.get(c.name).done))) {
          fetchEvents(c.name, c.status);  // its events; other nodes may still be pulling
        }
      }
      renderNodes(nodes, caches.size);
      renderCaches();
      renderUsage(list.usage);
      renderModels(models.models, count);
      renderMemory(models.memory);
      if (count) sample(count);
      $("status").textContent = "updated " + new Date().toLocaleTimeString() + note;
      $("status").className = "";
    } catch (e) {
      if (e instanceof AuthError) { locked(e.message); return; }
      $("status").textContent = "cannot reach the server: " + e.message;
      $("status").className = "error";
    }
    if (timer === null) timer = setTimeout(poll, POLL_MS);
  }

  document.addEventListener("DOMContentLoaded", () => {
    $("login").addEventListener("submit", (event) => {
      event.preventDefault();
      token = $("token").value.trim() || null;
      $("token").value = "";
      $("login-error").textContent = "";
      poll();
    });
    window.addEventListener("resize", drawChart);
    poll();
  });
})();
