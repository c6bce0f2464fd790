// The tracker's status page: polls status.json and draws every swarm.
// Everything the tracker sends is put in the page as text (never as HTML): peer
// addresses come from announces.
"use strict";

const POLL_MS = 2000;
const RATE_WINDOW = 3; // polls over which a rate is averaged, smoothing announce steps

// root -> recent samples {t, held, origin, peers: Map(peer_id -> have)}, newest last
const history = new Map();

function formatSize(n) {
  const units = ["B", "KiB", "MiB", "GiB", "TiB"];
  let i = 0;
  while (Math.abs(n) >= 1024 && i < units.length - 1) {
    n /= 1024;
    i += 1;
  }
  return i === 0 ? `${Math.round(n)} B` : `${n.toFixed(1)} ${units[i]}`;
}

function formatRate(bytesPerSecond) {
  return bytesPerSecond === null ? "–" : `${formatSize(bytesPerSecond)}/s`;
}

function formatSeconds(s) {
  if (s < 90) return `${Math.round(s)} s`;
  if (s < 5400) return `${Math.round(s / 60)} min`;
  return `${(s / 3600).toFixed(1)} h`;
}

function el(tag, attrs, ...children) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(attrs || {})) {
    if (key === "class") node.className = value;
    else node.setAttribute(key, value);
  }
  for (const child of children) {
    if (child === null || child === undefined) continue;
    node.append(child instanceof Node ? child : String(child));
  }
  return node;
}

function bar(fraction) {
  const fill = el("span");
  fill.style.width = `${Math.max(0, Math.min(1, fraction)) * 100}%`;
  return el("div", { class: "bar" }, fill);
}

function figure(field, label, value, sub, fraction) {
  return el(
    "div",
    { class: "figure", "data-field": field },
    el("div", { class: "label" }, label),
    el("div", { class: "value" }, value),
    sub === null ? null : el("div", { class: "sub" }, sub),
    fraction === undefined ? null : bar(fraction),
  );
}

// Rate of `key` over the kept samples, in units per second, or null with too few.
function rate(samples, pick) {
  if (samples.length < 2) return null;
  const first = samples[0];
  const last = samples[samples.length - 1];
  const dt = last.t - first.t;
  if (dt <= 0) return null;
  const a = pick(first);
  const b = pick(last);
  if (a === undefined || b === undefined) return null;
  return Math.max(0, (b - a) / dt);
}

function remember(snapshot, swarm) {
  const samples = history.get(swarm.root) || [];
  const last = samples[samples.length - 1];
  if (last && last.t >= snapshot.uptime_seconds) return samples; // a cached answer
  const peers = new Map(swarm.peer_list.map((p) => [p.peer_id, p.have]));
  samples.push({ t: snapshot.uptime_seconds, held: swarm.held_bytes, origin: swarm.origin.bytes, peers });
  while (samples.length > RATE_WINDOW + 1) samples.shift();
  history.set(swarm.root, samples);
  return samples;
}

// Lightness falls from 92% (one peer) to 28% (every peer); no peer at all is red.
function cellColor(count, peers) {
  if (count <= 0) return "#d93025";
  const share = peers > 1 ? Math.min(1, (count - 1) / (peers - 1)) : 1;
  return `hsl(214, 70%, ${Math.round(92 - share * 64)}%)`;
}

function availabilityStrip(swarm) {
  const cells = swarm.availability.cells;
  const canvas = el("canvas", {
    class: "availability",
    width: String(Math.max(1, cells.length)),
    height: "1",
    "data-field": "availability",
    "data-cells": String(cells.length),
    role: "img",
    "aria-label": `piece availability: ${swarm.availability.missing} pieces on no live peer, `
      + `min ${swarm.availability.min}, max ${swarm.availability.max} peers`,
  });
  const ctx = canvas.getContext("2d");
  cells.forEach((count, i) => {
    ctx.fillStyle = cellColor(count, swarm.peers);
    ctx.fillRect(i, 0, 1, 1);
  });
  const perCell = swarm.pieces / Math.max(1, cells.length);
  const label = el(
    "div",
    { class: "strip-label" },
    `piece availability: ${swarm.pieces} pieces`
      + (perCell > 1 ? `, ${perCell.toFixed(1)} per cell (rarest shown)` : "")
      + ` · min ${swarm.availability.min}, max ${swarm.availability.max} peers`
      + ` · ${swarm.availability.missing} on no live peer`,
  );
  const swatch = (color) => {
    const span = el("span", { class: "swatch" });
    span.style.background = color;
    return span;
  };
  const legend = el(
    "div",
    { class: "legend" },
    swatch(cellColor(0, swarm.peers)), " on no live peer ",
    swatch(cellColor(1, swarm.peers)), " on 1 ",
    swarm.peers > 1 ? swatch(cellColor(swarm.peers, swarm.peers)) : null,
    swarm.peers > 1 ? ` on all ${swarm.peers} peers` : "",
  );
  return [label, canvas, legend];
}

function peerTable(swarm, samples) {
  const meanPiece = swarm.pieces ? swarm.size / swarm.pieces : 0;
  const head = el(
    "tr",
    null,
    ...["peer", "address", "pieces", "rate ≈", "origin pieces", "pulling", "last announce"].map(
      (h) => el("th", null, h),
    ),
  );
  const rows = swarm.peer_list.map((p) => {
    const perSecond = rate(samples, (s) => s.peers.get(p.peer_id));
    return el(
      "tr",
      { "data-peer": p.peer_id },
      el("td", { class: "id", title: p.peer_id }, p.peer_id.slice(0, 12)),
      el("td", { class: "addr" }, `${p.host}:${p.port}`),
      el(
        "td",
        { "data-field": "have" },
        bar(swarm.pieces ? p.have / swarm.pieces : 1),
        `${p.have} / ${swarm.pieces}`,
        p.finished ? el("span", { class: "badge done" }, "done") : null,
      ),
      el("td", null, formatRate(perSecond === null ? null : perSecond * meanPiece)),
      el("td", null, String(p.pulled)),
      el("td", null, String(p.pulling)),
      el("td", null, `${formatSeconds(p.seen_seconds_ago)} ago`),
    );
  });
  const table = el("table", { class: "peers" }, el("thead", null, head), el("tbody", null, ...rows));
  const hidden = swarm.peers - swarm.peer_list.length;
  const more = hidden > 0
    ? el("div", { class: "more" }, `${hidden} more peers not shown (the least advanced are listed)`)
    : null;
  return [table, more];
}

function swarmCard(snapshot, swarm) {
  const samples = remember(snapshot, swarm);
  const received = rate(samples, (s) => s.held);
  const fromOrigin = rate(samples, (s) => s.origin);
  const fromPeers = received === null || fromOrigin === null ? null : Math.max(0, received - fromOrigin);
  // What the live peers still lack, at the rate they are receiving it.
  const missing = Math.max(0, swarm.peers * swarm.size - swarm.held_bytes);
  let eta = "";
  if (missing === 0) eta = " · nothing left";
  else if (received) eta = ` · ETA ${formatSeconds(missing / received)}`;
  const badges = [];
  if (swarm.complete) badges.push(el("span", { class: "badge done" }, "complete"));
  if (swarm.barred) badges.push(el("span", { class: "badge warn" }, `${swarm.barred} barred`));
  const title = el(
    "div",
    null,
    el("h2", { "data-field": "name" }, swarm.name),
    ...badges,
    el("div", { class: "root", "data-field": "root", title: "artifact root (manifest digest)" }, swarm.root),
  );
  const figures = el(
    "div",
    { class: "figures" },
    figure("peers", "peers", String(swarm.peers), `${swarm.finished_peers} finished`),
    figure(
      "pieces",
      "pieces in the swarm",
      `${swarm.present_pieces} / ${swarm.pieces}`,
      `${formatSize(swarm.size)} in pieces of ${formatSize(swarm.piece_size)}`,
      swarm.pieces ? swarm.present_pieces / swarm.pieces : 1,
    ),
    figure(
      "origin",
      "origin bytes ÷ F",
      swarm.origin.ratio.toFixed(3),
      `${formatSize(swarm.origin.bytes)} of ${formatSize(swarm.size)}; `
        + `${swarm.origin.in_flight} in flight, ${swarm.origin.unassigned} waiting`,
    ),
    figure(
      "received",
      "received by peers",
      formatRate(received),
      `${formatRate(fromPeers)} peer to peer${eta}`,
    ),
    figure("origin-rate", "from the origin", formatRate(fromOrigin), `budget ${swarm.origin.budget} pieces at once`),
  );
  return el(
    "section",
    { class: "swarm", "data-root": swarm.root },
    title,
    figures,
    ...availabilityStrip(swarm),
    ...peerTable(swarm, samples),
  );
}

function render(snapshot) {
  const main = document.getElementById("swarms");
  const cards = snapshot.swarms.map((swarm) => swarmCard(snapshot, swarm));
  for (const root of history.keys()) {
    if (!snapshot.swarms.some((s) => s.root === root)) history.delete(root);
  }
  if (cards.length === 0) {
    cards.push(el("div", { class: "empty" }, "No swarms yet: they appear with their first announce."));
  }
  const hidden = snapshot.swarms_total - snapshot.swarms.length;
  if (hidden > 0) cards.push(el("div", { class: "more" }, `${hidden} more swarms not shown (the busiest are)`));
  main.replaceChildren(...cards);
  const peers = snapshot.swarms.reduce((n, s) => n + s.peers, 0);
  document.getElementById("summary").textContent =
    `${snapshot.swarms_total} swarms · ${peers} peers · ${snapshot.announces} announces · `
    + `up ${formatSeconds(snapshot.uptime_seconds)}`
    + (snapshot.open ? " · open cluster (no token)" : "");
  document.title = `swarm tracker · ${snapshot.swarms_total} swarms`;
}

async function poll() {
  const status = document.getElementById("connection");
  let snapshot;
  try {
    const response = await fetch("status.json", { cache: "no-store" });
    if (!response.ok) throw new Error(`HTTP ${response.status}`);
    snapshot = await response.json();
  } catch (err) {
    status.className = "connection error";
    status.textContent = `can't reach the tracker (${err.message}); retrying`;
    return;
  } finally {
    setTimeout(poll, POLL_MS);
  }
  render(snapshot); // a bug here shows in the console, not as a network error
  status.className = "connection ok";
  status.textContent = `updated ${new Date().toLocaleTimeString()}`;
}

poll();
