// The moepool web console: the Cluster view (workers, the layer x expert placement and its load,
// live charts) and a Chat view (streamed chat completions). Plain JavaScript, no build step; the
// only library is uPlot (the charts), served by the binary as /console/uplot.js.
//
// What it calls (docs/api.md): GET /v1/models, GET /v1/cluster, POST /v1/cluster/workers/{id}/drain,
// POST /v1/chat/completions (streamed), and the public GET /health and GET /metrics. Every /v1 call
// carries `Authorization: Bearer KEY` once a key is known; a 401 asks for the key, which is kept in
// localStorage. Polling: every 2 s while the page is visible (/v1/cluster only on the Cluster tab).
'use strict';

(() => {
  const POLL_MS = 2000;
  const HISTORY_S = 300;            // the charts show the last 5 minutes
  const KEY_STORAGE = 'moepool.apiKey';
  const SETTINGS_STORAGE = 'moepool.chatSettings';
  const CHAT_STORAGE = 'moepool.chat';
  // Worker colours (Tableau 10, without its grey, which means "coordinator" here).
  const PALETTE = ['#4e79a7', '#f28e2b', '#59a14f', '#e15759', '#76b7b2',
                   '#edc948', '#b07aa1', '#ff9da7', '#9c755f', '#17becf'];
  const COORDINATOR_COLOUR = '#9aa0a6';

  const $ = (id) => document.getElementById(id);

  // Creates an element: el('td', {class: 'num', 'data-label': 'requests'}, 'text or node', ...).
  function el(tag, attrs = {}, ...children) {
    const node = document.createElement(tag);
    for (const [k, v] of Object.entries(attrs)) {
      if (v !== undefined && v !== null && v !== false) node.setAttribute(k, v === true ? '' : v);
    }
    for (const c of children) node.append(c);
    return node;
  }

  // ---------------------------------------------------------------------------------------------
  // Formatting

  function fmtBytes(n) {
    if (!Number.isFinite(n)) return '–';
    const units = ['B', 'KiB', 'MiB', 'GiB', 'TiB'];
    let i = 0;
    while (n >= 1024 && i < units.length - 1) { n /= 1024; i++; }
    return `${n >= 100 || i === 0 ? n.toFixed(0) : n.toFixed(1)} ${units[i]}`;
  }

  function fmtInt(n) {
    return Number.isFinite(n) ? Math.round(n).toLocaleString('en-US') : '–';
  }

  function fmtMs(ms) {
    if (!Number.isFinite(ms)) return '–';
    return ms >= 100 ? ms.toFixed(0) : ms >= 10 ? ms.toFixed(1) : ms.toFixed(2);
  }

  // ---------------------------------------------------------------------------------------------
  // API access and the API key

  let apiKey = localStorage.getItem(KEY_STORAGE) || '';
  let needKey = false;              // a /v1 call got 401; /v1 polling waits for a key

  class ApiError extends Error {
    constructor(status, message) { super(message); this.status = status; }
  }

  // The message of an OpenAI-style error response ({"error": {"message": ...}}), else the status.
  async function errorMessage(res) {
    const text = await res.text().catch(() => '');
    try {
      const j = JSON.parse(text);
      if (j && j.error) return typeof j.error === 'string' ? j.error : j.error.message || text;
    } catch { /* not JSON */ }
    return `${res.status} ${res.statusText}${text ? `: ${text.slice(0, 200)}` : ''}`;
  }

  // fetch() for /v1 paths: adds the key; on 401 asks for one and throws.
  async function api(path, options = {}) {
    const headers = new Headers(options.headers || {});
    if (apiKey) headers.set('Authorization', `Bearer ${apiKey}`);
    const res = await fetch(path, { ...options, headers });
    if (res.status === 401) {
      const message = await errorMessage(res);
      askForKey(apiKey ? 'The server did not accept that key.' : '');
      throw new ApiError(401, message);
    }
    return res;
  }

  async function apiJson(path, options) {
    const res = await api(path, options);
    if (!res.ok) throw new ApiError(res.status, await errorMessage(res));
    return res.json();
  }

  function askForKey(message) {
    needKey = true;
    const dialog = $('key-dialog');
    const error = $('key-error');
    error.textContent = message;
    error.hidden = !message;
    if (!dialog.open) dialog.showModal();
    $('key-input').focus();
  }

  function initKeyDialog() {
    const dialog = $('key-dialog');
    // A <form method="dialog"> closes the dialog on submit; keep the key and start over.
    $('key-form').addEventListener('submit', () => {
      apiKey = $('key-input').value.trim();
      $('key-input').value = '';
      localStorage.setItem(KEY_STORAGE, apiKey);
      needKey = false;
      loadModel();
      pollSoon();
    });
    dialog.addEventListener('cancel', () => {
      showClusterError('This server needs an API key.',
                       { action: { label: 'Enter API key', onClick: () => askForKey('') } });
    });
  }

  // ---------------------------------------------------------------------------------------------
  // Header: model and health

  let modelId = '';

  async function loadModel() {
    try {
      const j = await apiJson('/v1/models');
      modelId = (j.data && j.data[0] && j.data[0].id) || '';
      $('model-id').textContent = modelId || '?';
      clearClusterError();
    } catch (e) {
      if (e.status !== 401) $('model-id').textContent = '?';
    }
  }

  async function fetchHealth() {
    const node = $('health');
    let status = 'unreachable';
    let title = 'GET /health failed';
    try {
      const res = await fetch('/health', { cache: 'no-store' });
      const j = await res.json().catch(() => ({}));
      status = j.status || (res.ok ? 'ok' : 'unavailable');
      if (status === 'ok' && j.fallback_experts && j.fallback_experts.length) status = 'ok, fallback';
      title = `GET /health: ${res.status}` +
        (j.active_sequences !== undefined ? `\nactive sequences ${j.active_sequences}, queued ${j.queued_requests}` : '') +
        (j.kv_blocks_total !== undefined ? `\nKV blocks free ${j.kv_blocks_free} of ${j.kv_blocks_total}` : '');
    } catch { /* unreachable */ }
    node.textContent = status;
    node.dataset.status = status.startsWith('ok') ? (status === 'ok' ? 'ok' : 'degraded') : 'down';
    node.title = title;
  }

  // ---------------------------------------------------------------------------------------------
  // Prometheus text parsing (only the moepool_ series)

  // Returns Map(name -> [{labels, value}]).
  function parseMetrics(text) {
    const out = new Map();
    const line = /^(moepool_[A-Za-z0-9_:]*)(?:\{([^}]*)\})?\s+(\S+)/;
    const label = /([A-Za-z_][A-Za-z0-9_]*)="((?:[^"\\]|\\.)*)"/g;
    for (const raw of text.split('\n')) {
      const m = line.exec(raw);
      if (!m) continue;
      const labels = {};
      if (m[2]) for (const l of m[2].matchAll(label)) labels[l[1]] = l[2];
      const value = m[3] === '+Inf' ? Infinity : m[3] === '-Inf' ? -Infinity : Number(m[3]);
      if (!out.has(m[1])) out.set(m[1], []);
      out.get(m[1]).push({ labels, value });
    }
    return out;
  }

  function scalar(metrics, name) {
    const s = metrics.get(name);
    return s && s.length ? s.reduce((a, x) => a + x.value, 0) : NaN;
  }

  // A histogram's buckets (cumulative counts, sorted by bound), sum and count.
  function histogram(metrics, name) {
    const buckets = (metrics.get(`${name}_bucket`) || [])
      .map((b) => ({ le: b.labels.le === '+Inf' ? Infinity : Number(b.labels.le), count: b.value }))
      .sort((a, b) => a.le - b.le);
    return { buckets, sum: scalar(metrics, `${name}_sum`), count: scalar(metrics, `${name}_count`) };
  }

  // The q-quantile of the observations between two snapshots of a histogram, interpolated within
  // the bucket as Prometheus' histogram_quantile does. null when nothing was observed.
  function quantileBetween(q, before, now) {
    if (!before || before.buckets.length !== now.buckets.length || !now.buckets.length) return null;
    const deltas = now.buckets.map((b, i) => ({ le: b.le, count: b.count - before.buckets[i].count }));
    const total = deltas[deltas.length - 1].count;
    if (!(total > 0)) return null;
    const rank = q * total;
    let lower = 0;
    let below = 0;
    for (const b of deltas) {
      if (b.count >= rank) {
        if (b.le === Infinity) return lower;      // above the highest bound: report that bound
        return lower + (b.le - lower) * (b.count > below ? (rank - below) / (b.count - below) : 1);
      }
      lower = b.le;
      below = b.count;
    }
    return lower;
  }

  // ---------------------------------------------------------------------------------------------
  // Polling

  let pollTimer = 0;
  let polling = false;
  let pollAgain = false;
  let lastCluster = null;           // latest GET /v1/cluster
  let lastRouted = new Map();       // "layer,expert" -> routed tokens since the server started
  let lastGauges = {};
  let prevSnapshot = null;          // the previous /metrics snapshot, for rates

  // The charts' data: unix seconds and one array per series.
  const series = { t: [], tps: [], stepP50: [], stepMean: [], ttft: [] };

  function clusterVisible() { return !$('view-cluster').hidden; }

  function pollSoon() {
    if (polling) { pollAgain = true; return; }
    poll();
  }

  async function poll() {
    clearTimeout(pollTimer);
    polling = true;
    try {
      const wantCluster = clusterVisible() && !needKey;
      if (!modelId && !needKey) loadModel();   // the server was down when the page loaded
      const [cluster, metrics] = await Promise.allSettled([
        wantCluster ? apiJson('/v1/cluster') : Promise.resolve(null),
        fetch('/metrics', { cache: 'no-store' }).then((r) => {
          if (!r.ok) throw new Error(`GET /metrics: ${r.status}`);
          return r.text();
        }),
        fetchHealth(),
      ]);
      if (metrics.status === 'fulfilled') onMetrics(metrics.value);
      if (cluster.status === 'fulfilled' && cluster.value) {
        lastCluster = cluster.value;
        clearClusterError();
      } else if (cluster.status === 'rejected' && cluster.reason.status !== 401) {
        showClusterError(`GET /v1/cluster: ${cluster.reason.message}`);
      }
      if (clusterVisible()) renderCluster();
    } finally {
      polling = false;
      if (pollAgain) {
        pollAgain = false;
        pollTimer = setTimeout(poll, 0);
      } else if (!document.hidden) {
        pollTimer = setTimeout(poll, POLL_MS);
      }
    }
  }

  // Turns a /metrics scrape into gauges, routing counts and one point per chart.
  function onMetrics(text) {
    const m = parseMetrics(text);
    const now = Date.now() / 1000;
    const snap = {
      t: now,
      generated: scalar(m, 'moepool_generated_tokens_total'),
      step: histogram(m, 'moepool_step_duration_seconds'),
      ttft: histogram(m, 'moepool_time_to_first_token_seconds'),
    };
    lastGauges = {
      active: scalar(m, 'moepool_active_sequences'),
      queued: scalar(m, 'moepool_queue_depth'),
      kvUsed: scalar(m, 'moepool_kv_blocks_used'),
      kvFree: scalar(m, 'moepool_kv_blocks_free'),
      generated: snap.generated,
    };
    lastRouted = new Map();
    for (const s of m.get('moepool_expert_routed_tokens_total') || []) {
      lastRouted.set(`${s.labels.layer},${s.labels.expert}`, s.value);
    }

    const prev = prevSnapshot;
    prevSnapshot = snap;
    // A counter that went down means the server restarted: start the rates over.
    if (!prev || snap.generated < prev.generated || snap.step.count < prev.step.count) return;
    const dt = now - prev.t;
    if (dt <= 0) return;
    const dStepCount = snap.step.count - prev.step.count;
    const dTtftCount = snap.ttft.count - prev.ttft.count;
    const p50 = quantileBetween(0.5, prev.step, snap.step);
    series.t.push(now);
    series.tps.push((snap.generated - prev.generated) / dt);
    series.stepP50.push(p50 === null ? null : p50 * 1000);
    series.stepMean.push(dStepCount > 0 ? (snap.step.sum - prev.step.sum) / dStepCount * 1000 : null);
    series.ttft.push(dTtftCount > 0 ? (snap.ttft.sum - prev.ttft.sum) / dTtftCount * 1000 : null);
    while (series.t.length && series.t[0] < now - HISTORY_S) {
      for (const k of Object.keys(series)) series[k].shift();
    }
  }

  // ---------------------------------------------------------------------------------------------
  // Cluster view

  const colourOf = new Map();       // worker id -> colour, stable for the page's life

  function workerColour(id) {
    if (!colourOf.has(id)) {
      const m = /^w(\d+)$/.exec(id);
      let i;
      if (m) {
        i = Number(m[1]);
      } else {
        i = 0;
        for (const ch of id) i = (i * 31 + ch.charCodeAt(0)) >>> 0;
      }
      colourOf.set(id, PALETTE[i % PALETTE.length]);
    }
    return colourOf.get(id);
  }

  // The Cluster view's error line. `source` says what cleared it: a successful poll clears the
  // poll's errors; an action's error (a failed drain) stays for 20 s.
  let clusterErrorSource = '';
  let clusterErrorTimer = 0;

  function showClusterError(message, { source = 'poll', action } = {}) {
    const node = $('cluster-error');
    node.replaceChildren(message);
    if (action) {
      const b = el('button', { type: 'button' }, action.label);
      b.addEventListener('click', action.onClick);
      node.append(' ', b);
    }
    node.hidden = false;
    clusterErrorSource = source;
    clearTimeout(clusterErrorTimer);
    if (source !== 'poll') clusterErrorTimer = setTimeout(() => clearClusterError(source), 20000);
  }

  function clearClusterError(source = 'poll') {
    if (clusterErrorSource !== source) return;
    $('cluster-error').hidden = true;
    clusterErrorSource = '';
  }

  function renderCluster() {
    renderStats();
    if (lastCluster) {
      renderWorkers(lastCluster.workers || []);
      renderGrid(lastCluster);
    }
    updateCharts();
  }

  function renderStats() {
    const g = lastGauges;
    const c = lastCluster;
    $('stat-placement').textContent = c ? `v${c.placement_version}` : '–';
    if (c) {
      const ws = c.workers || [];
      $('stat-ready').textContent = `${ws.filter((w) => w.state === 'ready').length} of ${ws.length}`;
    }
    $('stat-active').textContent = `${fmtInt(g.active)} / ${fmtInt(g.queued)}`;
    const kvTotal = g.kvUsed + g.kvFree;
    $('stat-kv').textContent = Number.isFinite(kvTotal) && kvTotal > 0
      ? `${fmtInt(g.kvUsed)} of ${fmtInt(kvTotal)}` : '–';
    $('stat-tokens').textContent = fmtInt(g.generated);
  }

  // --- Workers table: one row per worker, kept across polls (so a focused button survives).

  const rowOf = new Map();          // worker id -> <tr>
  const drainsInFlight = new Set(); // worker ids whose drain call has not returned

  function createWorkerRow(id) {
    const cell = (label, cls) => el('td', { 'data-label': label, class: cls });
    const tr = el('tr', { 'data-testid': 'worker-row', 'data-worker-id': id });
    const idCell = cell('id', 'id');
    idCell.append(el('span', { class: 'wid' }, el('span', { class: 'swatch', 'aria-hidden': 'true' }), id));
    const stateCell = cell('state');
    stateCell.append(el('span', { class: 'badge', 'data-testid': 'worker-state' }));
    const memCell = cell('memory', 'memory');
    memCell.append(el('span', { class: 'mem-text' }),
                   el('span', { class: 'meter', 'aria-hidden': 'true' }, el('span', { class: 'meter-fill' })));
    const actions = cell('', 'actions');
    const drain = el('button', { type: 'button', class: 'drain', 'data-testid': 'drain' }, 'Drain');
    drain.addEventListener('click', () => drainWorker(id));
    actions.append(drain);
    tr.append(idCell, cell('address', 'address'), stateCell, cell('device', 'device'), memCell,
              cell('requests', 'num requests'), cell('failures', 'num failures'),
              cell('round trip / compute', 'num timing'), actions);
    return tr;
  }

  function updateWorkerRow(tr, w) {
    const [idCell, addrCell, stateCell, devCell, memCell, reqCell, failCell, timeCell, actCell] = tr.cells;
    tr.dataset.state = w.state;
    idCell.querySelector('.swatch').style.background = workerColour(w.id);
    addrCell.textContent = w.address || '';
    if (w.last_error) addrCell.append(el('div', { class: 'last-error' }, w.last_error));
    const badge = stateCell.firstChild;
    badge.textContent = w.state + (w.up === false && w.state !== 'gone' ? ' (down)' : '');
    badge.className = `badge state-${w.state}`;
    badge.title = w.last_error ? `last error: ${w.last_error}` : '';
    devCell.textContent = `${w.device || '?'}${w.threads ? ` · ${w.threads} thr` : ''}`;
    const budget = w.memory_budget_bytes;
    memCell.querySelector('.mem-text').textContent =
      `${fmtBytes(w.expert_bytes)} of ${fmtBytes(budget)}`;
    memCell.querySelector('.meter-fill').style.width =
      budget > 0 ? `${Math.min(100, (100 * w.expert_bytes) / budget).toFixed(1)}%` : '0';
    memCell.title = `${(w.experts || []).length} (layer, expert) pairs, ${fmtInt(w.expert_bytes)} bytes` +
      (w.bytes_fetched !== undefined ? `; fetched ${fmtBytes(w.bytes_fetched)} in its latest join` : '');
    reqCell.textContent = fmtInt(w.requests);
    failCell.textContent = fmtInt(w.failures);
    failCell.classList.toggle('bad', w.failures > 0);
    const timed = w.rows > 0 || w.round_trip_ms > 0;
    timeCell.textContent = timed ? `${fmtMs(w.round_trip_ms)} / ${fmtMs(w.compute_ms)} ms` : '–';
    timeCell.title = w.rows !== undefined ? `${fmtInt(w.rows)} rows` : '';
    const drain = actCell.firstChild;
    const draining = drainsInFlight.has(w.id);
    drain.hidden = w.state !== 'ready' && !draining;
    drain.disabled = draining;
    drain.textContent = draining ? 'Draining…' : 'Drain';
  }

  function renderWorkers(workers) {
    const body = $('workers-body');
    const seen = new Set();
    workers.forEach((w, i) => {
      seen.add(w.id);
      let tr = rowOf.get(w.id);
      if (!tr) {
        tr = createWorkerRow(w.id);
        rowOf.set(w.id, tr);
      }
      if (body.children[i] !== tr) body.insertBefore(tr, body.children[i] || null);
      updateWorkerRow(tr, w);
    });
    for (const [id, tr] of rowOf) {
      if (!seen.has(id)) { tr.remove(); rowOf.delete(id); }
    }
    $('no-workers').hidden = workers.length > 0;
    $('workers-table').hidden = workers.length === 0;
  }

  async function drainWorker(id) {
    if (!confirm(`Drain worker ${id}? The coordinator stops routing to it at the next step ` +
                 '(its experts go to a replica or the coordinator; no request fails) and a joined ' +
                 'worker exits.')) return;
    drainsInFlight.add(id);
    const tr = rowOf.get(id);
    if (tr && lastCluster) {
      const w = (lastCluster.workers || []).find((x) => x.id === id);
      if (w) updateWorkerRow(tr, w);
    }
    pollSoon();                      // the state shows "draining" while the call waits
    try {
      // The body is ignored, but the server wants a Content-Length, which '' gives.
      const res = await api(`/v1/cluster/workers/${encodeURIComponent(id)}/drain`,
                            { method: 'POST', body: '' });
      if (!res.ok) throw new ApiError(res.status, await errorMessage(res));
    } catch (e) {
      showClusterError(`Drain ${id}: ${e.message}`, { source: 'drain' });
    } finally {
      drainsInFlight.delete(id);
      pollSoon();
    }
  }

  // --- Expert grid: rows are layers, columns experts.

  let gridMode = 'placement';
  let gridShape = '';               // "layers x experts" the cells were built for
  let cells = [];                   // cells[layer][expert] -> element

  // The model's layer and expert counts, from every place that names a pair.
  function modelShape(cluster) {
    let layers = 0;
    let experts = 0;
    const see = (l, e) => { layers = Math.max(layers, l + 1); experts = Math.max(experts, e + 1); };
    for (const w of cluster.workers || []) for (const [l, e] of w.experts || []) see(l, e);
    for (const key of lastRouted.keys()) {
      const [l, e] = key.split(',').map(Number);
      see(l, e);
    }
    for (const e of cluster.local_experts || []) experts = Math.max(experts, e + 1);
    return { layers, experts };
  }

  function buildGrid(layers, experts) {
    const grid = $('expert-grid');
    grid.style.setProperty('--experts', experts);
    grid.replaceChildren();
    grid.append(el('div', { class: 'corner' }, 'layer'));
    for (let e = 0; e < experts; e++) grid.append(el('div', { class: 'col-head' }, `e${e}`));
    cells = [];
    for (let l = 0; l < layers; l++) {
      grid.append(el('div', { class: 'row-head' }, String(l)));
      const row = [];
      for (let e = 0; e < experts; e++) {
        const c = el('div', { class: 'cell', 'data-testid': 'expert-cell', 'data-layer': l, 'data-expert': e });
        row.push(c);
        grid.append(c);
      }
      cells.push(row);
    }
  }

  // Pale yellow (little load) to dark red (the layer's busiest expert).
  function heat(x) {
    const h = 50 - 50 * x;
    const l = 92 - 50 * x;
    return `hsl(${h.toFixed(0)} 95% ${l.toFixed(0)}%)`;
  }

  function renderGrid(cluster) {
    const { layers, experts } = modelShape(cluster);
    const shape = `${layers}x${experts}`;
    if (shape !== gridShape) {
      buildGrid(layers, experts);
      gridShape = shape;
    }
    // Who holds each pair: ready workers serve it; others (joining, fetching, draining) are noted.
    const ready = new Map();
    const others = new Map();
    const held = new Map();         // worker id -> pairs it serves
    for (const w of cluster.workers || []) {
      const serving = w.state === 'ready' && w.up !== false;
      for (const [l, e] of w.experts || []) {
        const map = serving ? ready : others;
        const key = `${l},${e}`;
        if (!map.has(key)) map.set(key, []);
        map.get(key).push(serving ? w.id : { id: w.id, state: w.state });
        if (serving) held.set(w.id, (held.get(w.id) || 0) + 1);
      }
    }
    const local = new Set(cluster.local_experts || []);
    let onCoordinator = 0;
    for (let l = 0; l < layers; l++) {
      let layerTotal = 0;
      let layerMax = 0;
      for (let e = 0; e < experts; e++) {
        const n = lastRouted.get(`${l},${e}`) || 0;
        layerTotal += n;
        layerMax = Math.max(layerMax, n);
      }
      for (let e = 0; e < experts; e++) {
        const c = cells[l][e];
        const key = `${l},${e}`;
        const holders = ready.get(key) || [];
        const owner = holders.length ? holders[0] : 'coordinator';
        if (!holders.length) onCoordinator++;
        const routed = lastRouted.get(key) || 0;
        const share = layerTotal > 0 ? routed / layerTotal : 0;
        c.dataset.worker = owner;
        c.dataset.holders = holders.join(' ');
        c.dataset.routed = routed;
        c.classList.toggle('replica', holders.length > 1);
        c.classList.toggle('coordinator', !holders.length);
        const colour = holders.length ? workerColour(owner) : COORDINATOR_COLOUR;
        c.style.setProperty('--owner', colour);
        if (gridMode === 'load') {
          const x = layerMax > 0 ? routed / layerMax : 0;
          c.style.background = heat(x);
          c.style.color = x > 0.6 ? '#fff' : '#222';
          c.textContent = layerTotal > 0 ? `${Math.round(share * 100)}` : '';
        } else {
          c.style.background = colour;
          c.style.color = '';
          c.textContent = '';
        }
        // Also listed by a worker that is not ready: one joining or fetching takes the pair over
        // when it is ready (a dashed outline in its colour), one draining gives it up.
        const pending = others.get(key);
        const incoming = (pending || []).find((p) => p.state === 'joining' || p.state === 'fetching');
        c.classList.toggle('incoming', !!incoming);
        if (incoming) c.style.setProperty('--incoming', workerColour(incoming.id));
        c.title = `layer ${l}, expert ${e}\n` +
          (holders.length ? `held by ${holders.join(', ')}${holders.length > 1 ? ' (replica)' : ''}`
                          : `computed by the coordinator${local.has(e) ? ' (--local-experts)'
                              : (cluster.workers || []).length ? ' (fallback)' : ''}`) +
          (pending ? `\nalso listed by ${pending.map((p) => `${p.id} (${p.state})`).join(', ')}` : '') +
          `\nrouted tokens: ${fmtInt(routed)}${layerTotal > 0 ? ` (${(share * 100).toFixed(1)}% of layer ${l})` : ''}`;
      }
    }
    renderLegend(cluster, held, onCoordinator);
    $('stat-fallback').textContent = `${onCoordinator} ${onCoordinator === 1 ? 'pair' : 'pairs'}`;
  }

  function renderLegend(cluster, held, onCoordinator) {
    const items = [];
    for (const w of cluster.workers || []) {
      if (w.state === 'gone' && !held.has(w.id)) continue;
      const item = el('span', { class: 'legend-item', 'data-testid': 'legend-item', 'data-worker': w.id },
                      el('span', { class: 'swatch' }),
                      `${w.id} · ${held.get(w.id) || 0}${w.state !== 'ready' ? ` · ${w.state}` : ''}`);
      item.firstChild.style.background = workerColour(w.id);
      items.push(item);
    }
    const coord = el('span', { class: 'legend-item', 'data-testid': 'legend-item', 'data-worker': 'coordinator' },
                     el('span', { class: 'swatch' }), `coordinator · ${onCoordinator}`);
    coord.firstChild.style.background = COORDINATOR_COLOUR;
    items.push(coord);
    if ((cluster.workers || []).length) {
      items.push(el('span', { class: 'legend-item' }, el('span', { class: 'swatch replica-mark' }), 'replica'));
    }
    if (gridMode === 'load') {
      items.push(el('span', { class: 'legend-item' }, el('span', { class: 'heat-scale' }),
                    '% of the layer\'s routed tokens'));
    }
    $('legend').replaceChildren(...items);
  }

  function setGridMode(mode) {
    gridMode = mode;
    for (const b of document.querySelectorAll('.segmented button')) {
      b.setAttribute('aria-pressed', String(b.dataset.mode === mode));
    }
    $('expert-grid').dataset.mode = mode;
    if (lastCluster) renderGrid(lastCluster);
  }

  // --- Charts (uPlot), created when the Cluster view is first shown (they need a width).

  let charts = [];

  function chartColours() {
    const css = getComputedStyle(document.documentElement);
    return { axis: css.getPropertyValue('--muted').trim() || '#666',
             grid: css.getPropertyValue('--grid').trim() || '#ddd' };
  }

  // Clock time for the x axis (the date is noise over five minutes).
  function fmtClock(unixSeconds) {
    const d = new Date(unixSeconds * 1000);
    return [d.getHours(), d.getMinutes(), d.getSeconds()].map((n) => String(n).padStart(2, '0')).join(':');
  }

  function makeChart(node, lines, data) {
    const c = chartColours();
    const axis = { stroke: c.axis, grid: { stroke: c.grid, width: 1 }, ticks: { stroke: c.grid, width: 1 } };
    return new uPlot({
      width: Math.max(node.clientWidth, 200),
      height: 130,
      // The legend names the series when there are several; the caption shows the latest values.
      legend: { show: lines.length > 1, live: false },
      cursor: { drag: { x: false, y: false } },
      scales: { x: { time: true }, y: { range: (u, min, max) => [0, max > 0 ? max * 1.1 : 1] } },
      axes: [{ ...axis, values: (u, splits) => splits.map(fmtClock) }, { ...axis, size: 46 }],
      series: [{}, ...lines.map((s) => ({
        label: s.label, stroke: s.colour, width: 2, spanGaps: false,
        points: { show: s.points || false, size: 5, fill: s.colour },
        value: (u, v) => (v === null || v === undefined ? '–' : v.toFixed(s.digits ?? 1)),
      }))],
    }, data, node);
  }

  function chartData() {
    return [
      [series.t, series.tps],
      [series.t, series.stepP50, series.stepMean],
      [series.t, series.ttft],
    ];
  }

  function updateCharts() {
    if (typeof uPlot === 'undefined') return;
    const data = chartData();
    const nodes = [$('chart-tps'), $('chart-step'), $('chart-ttft')];
    if (charts.length) {
      charts.forEach((c, i) => c.setData(data[i]));
    } else if (nodes[0].clientWidth && series.t.length >= 2) {
      // Created once laid out (not while hidden) and with two points; until then the boxes say
      // "collecting data" (CSS).
      charts = [
        makeChart(nodes[0], [{ label: 'tokens/s', colour: '#4e79a7' }], data[0]),
        makeChart(nodes[1], [{ label: 'p50', colour: '#f28e2b', digits: 2 },
                             { label: 'mean', colour: '#59a14f', digits: 2 }], data[1]),
        makeChart(nodes[2], [{ label: 'TTFT', colour: '#e15759', points: true }], data[2]),
      ];
      new ResizeObserver(resizeCharts).observe(document.querySelector('.charts'));
    }
    // The latest values next to the captions: tokens/s now, the latest step times and TTFT seen.
    const last = (a, back = a.length) => {
      for (let i = a.length - 1; i >= 0 && i >= a.length - back; i--) if (a[i] !== null) return a[i];
      return null;
    };
    const fmt = (v, digits) => (v === null ? '–' : v.toFixed(digits));
    $('now-tps').textContent = series.t.length ? fmt(last(series.tps, 1), 1) : '';
    const p50 = last(series.stepP50, 3);
    const mean = last(series.stepMean, 3);
    $('now-step').textContent = p50 === null && mean === null ? '' : `${fmt(p50, 2)} / ${fmt(mean, 2)}`;
    const ttft = last(series.ttft);
    $('now-ttft').textContent = ttft === null ? '' : fmt(ttft, 1);
  }

  function resizeCharts() {
    for (const c of charts) {
      const w = c.root.parentElement.clientWidth;
      if (w > 0 && Math.abs(w - c.width) > 1) c.setSize({ width: w, height: 130 });
    }
  }

  // ---------------------------------------------------------------------------------------------
  // Chat view

  // Each message: {role: 'user'|'assistant', content, state: 'done'|'streaming'|'stopped'|'error',
  // error?, usage?, finish?, ttftMs?, tps?}. Kept in sessionStorage (this tab only).
  let conversation = [];
  let streamController = null;

  function loadConversation() {
    try {
      const saved = JSON.parse(sessionStorage.getItem(CHAT_STORAGE) || '[]');
      conversation = Array.isArray(saved)
        ? saved.map((m) => (m.state === 'streaming' ? { ...m, state: 'stopped' } : m)) : [];
    } catch { conversation = []; }
  }

  function saveConversation() {
    try { sessionStorage.setItem(CHAT_STORAGE, JSON.stringify(conversation)); } catch { /* full */ }
  }

  const settingFields = {
    temperature: 'set-temperature', max_tokens: 'set-max-tokens', top_p: 'set-top-p',
    seed: 'set-seed', system: 'set-system',
  };

  function loadSettings() {
    let saved = {};
    try { saved = JSON.parse(localStorage.getItem(SETTINGS_STORAGE) || '{}'); } catch { /* none */ }
    for (const [k, id] of Object.entries(settingFields)) {
      if (typeof saved[k] === 'string') $(id).value = saved[k];
      $(id).addEventListener('change', saveSettings);
    }
  }

  function saveSettings() {
    const out = {};
    for (const [k, id] of Object.entries(settingFields)) out[k] = $(id).value;
    localStorage.setItem(SETTINGS_STORAGE, JSON.stringify(out));
  }

  function messageNode(m) {
    const user = m.role === 'user';
    const node = el('div', { class: `msg msg-${m.role}` },
                    el('div', { class: 'msg-role' }, user ? 'you' : (modelId || 'assistant')),
                    el('div', { class: 'msg-content', 'data-testid': user ? 'user-message' : 'assistant-message' }));
    if (!user) {
      // Usage (data-testid="usage") appears with the final chunk; timings and the finish reason
      // next to it.
      node.append(el('div', { class: 'msg-meta', hidden: true },
                     el('span', { class: 'usage', 'data-testid': 'usage', hidden: true }),
                     el('span', { class: 'msg-stats' })),
                  el('div', { class: 'error', 'data-testid': 'chat-error', hidden: true }));
    }
    updateMessageNode(node, m);
    return node;
  }

  function updateMessageNode(node, m) {
    node.dataset.state = m.state || 'done';
    node.querySelector('.msg-content').textContent = m.content;
    if (m.role !== 'assistant') return;
    const usage = node.querySelector('.usage');
    if (m.usage) {
      const cached = m.usage.prompt_tokens_details && m.usage.prompt_tokens_details.cached_tokens;
      usage.textContent = `${m.usage.prompt_tokens} prompt + ${m.usage.completion_tokens} completion tokens` +
        (cached ? ` (${cached} cached)` : '');
    }
    usage.hidden = !m.usage;
    const stats = [];
    if (Number.isFinite(m.ttftMs)) stats.push(`first token ${fmtMs(m.ttftMs)} ms`);
    if (Number.isFinite(m.tps)) stats.push(`${m.tps.toFixed(1)} tokens/s`);
    if (m.finish) stats.push(`finish: ${m.finish}`);
    if (m.state === 'stopped') stats.push('stopped');
    node.querySelector('.msg-stats').textContent = (m.usage && stats.length ? ' · ' : '') + stats.join(' · ');
    node.querySelector('.msg-meta').hidden = !m.usage && !stats.length;
    const err = node.querySelector('.error');
    err.textContent = m.error || '';
    err.hidden = !m.error;
  }

  function renderConversation() {
    const list = $('messages');
    list.replaceChildren(...conversation.map(messageNode));
    if (!conversation.length) {
      list.append(el('p', { class: 'muted empty' }, 'Ask the model something. Replies stream in as they are generated.'));
    }
  }

  // True when the page is scrolled (nearly) to the bottom, so streaming text should keep it there.
  function nearBottom() {
    return window.innerHeight + window.scrollY >= document.documentElement.scrollHeight - 80;
  }

  function scrollToBottom() {
    window.scrollTo({ top: document.documentElement.scrollHeight });
  }

  // The messages to send: the system message, every completed exchange (a user message and a
  // reply that has text; failed or empty ones are left out so the roles alternate), the new one.
  function requestMessages(text) {
    const out = [];
    const system = $('set-system').value.trim();
    if (system) out.push({ role: 'system', content: system });
    for (let i = 0; i + 1 < conversation.length; i++) {
      const u = conversation[i];
      const a = conversation[i + 1];
      if (u.role === 'user' && a.role === 'assistant' && a.content && a.state !== 'error') {
        out.push({ role: 'user', content: u.content }, { role: 'assistant', content: a.content });
        i++;
      }
    }
    out.push({ role: 'user', content: text });
    return out;
  }

  function numberSetting(id) {
    const v = $(id).value.trim();
    return v === '' ? undefined : Number(v);
  }

  function setStreaming(on) {
    $('send').disabled = on;
    $('stop').hidden = !on;
  }

  async function sendMessage(text) {
    const body = {
      model: modelId || 'default',
      messages: requestMessages(text),
      stream: true,
      stream_options: { include_usage: true },
      temperature: numberSetting('set-temperature'),
      max_tokens: numberSetting('set-max-tokens'),
      top_p: numberSetting('set-top-p'),
      seed: numberSetting('set-seed'),
    };
    conversation.push({ role: 'user', content: text, state: 'done' });
    const reply = { role: 'assistant', content: '', state: 'streaming' };
    conversation.push(reply);
    renderConversation();
    const node = $('messages').lastElementChild;
    scrollToBottom();
    setStreaming(true);

    const controller = new AbortController();
    streamController = controller;
    const started = performance.now();
    let firstTokenAt = 0;
    try {
      const res = await api('/v1/chat/completions', {
        method: 'POST',
        headers: { 'Content-Type': 'application/json' },
        body: JSON.stringify(body),
        signal: controller.signal,
      });
      if (!res.ok) throw new Error(await errorMessage(res));
      const reader = res.body.pipeThrough(new TextDecoderStream()).getReader();
      let buffer = '';
      let done = false;
      while (!done) {
        const { value, done: eof } = await reader.read();
        if (eof) break;
        buffer += value;
        // Server-sent events: "data: {json}" lines separated by blank lines, then "data: [DONE]".
        let nl;
        while ((nl = buffer.indexOf('\n')) >= 0) {
          const line = buffer.slice(0, nl).replace(/\r$/, '');
          buffer = buffer.slice(nl + 1);
          if (!line.startsWith('data:')) continue;
          const data = line.slice(5).trim();
          if (data === '[DONE]') { done = true; break; }
          const chunk = JSON.parse(data);
          if (chunk.error) throw new Error(chunk.error.message || JSON.stringify(chunk.error));
          const choice = chunk.choices && chunk.choices[0];
          if (choice && choice.delta && choice.delta.content) {
            if (!firstTokenAt) {
              firstTokenAt = performance.now();
              reply.ttftMs = firstTokenAt - started;
            }
            reply.content += choice.delta.content;
          }
          if (choice && choice.finish_reason) reply.finish = choice.finish_reason;
          if (chunk.usage) reply.usage = chunk.usage;
        }
        const follow = nearBottom();
        updateMessageNode(node, reply);   // one DOM update per network read
        if (follow) scrollToBottom();
      }
      if (!done) throw new Error('the stream ended before [DONE]');
      reply.state = 'done';
    } catch (e) {
      if (e.name === 'AbortError') {
        reply.state = 'stopped';
      } else {
        reply.state = 'error';
        reply.error = e.status === 401 ? 'This server needs an API key.' : e.message;
      }
    } finally {
      const elapsed = (performance.now() - firstTokenAt) / 1000;
      if (firstTokenAt && reply.usage && reply.usage.completion_tokens > 1 && elapsed > 0) {
        reply.tps = (reply.usage.completion_tokens - 1) / elapsed;
      }
      streamController = null;
      setStreaming(false);
      updateMessageNode(node, reply);
      saveConversation();
    }
  }

  function initChat() {
    loadConversation();
    loadSettings();
    renderConversation();
    const input = $('chat-input');
    $('chat-form').addEventListener('submit', (ev) => {
      ev.preventDefault();
      const text = input.value.trim();
      if (!text || streamController) return;
      input.value = '';
      sendMessage(text);
    });
    // Enter sends (Shift+Enter: new line), except on touch screens, where Enter is a new line.
    const touch = matchMedia('(pointer: coarse)').matches;
    input.addEventListener('keydown', (ev) => {
      if (ev.key === 'Enter' && !ev.shiftKey && !ev.isComposing && !touch) {
        ev.preventDefault();
        $('chat-form').requestSubmit();
      }
    });
    $('stop').addEventListener('click', () => streamController && streamController.abort());
    $('clear').addEventListener('click', () => {
      if (streamController) streamController.abort();
      conversation = [];
      saveConversation();
      renderConversation();
    });
  }

  // ---------------------------------------------------------------------------------------------
  // Tabs (the hash keeps the tab across reloads: #cluster, #chat)

  function showView(view) {
    if (view !== 'chat') view = 'cluster';
    for (const tab of document.querySelectorAll('.tabs [role=tab]')) {
      const on = tab.dataset.view === view;
      tab.setAttribute('aria-selected', String(on));
      $(`view-${tab.dataset.view}`).hidden = !on;
    }
    if (location.hash !== `#${view}`) history.replaceState(null, '', `#${view}`);
    if (view === 'cluster') {
      renderCluster();
      resizeCharts();
      pollSoon();
    } else {
      $('chat-input').focus({ preventScroll: true });
    }
  }

  function init() {
    initKeyDialog();
    initChat();
    for (const tab of document.querySelectorAll('.tabs [role=tab]')) {
      tab.addEventListener('click', () => showView(tab.dataset.view));
    }
    for (const b of document.querySelectorAll('.segmented button')) {
      b.addEventListener('click', () => setGridMode(b.dataset.mode));
    }
    window.addEventListener('hashchange', () => showView(location.hash.slice(1)));
    document.addEventListener('visibilitychange', () => {
      if (document.hidden) clearTimeout(pollTimer);
      else pollSoon();
    });
    showView(location.hash.slice(1));
    loadModel();
  }

  init();
})();
